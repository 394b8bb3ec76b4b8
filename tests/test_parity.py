"""Parity of the engine with diffusers on identical weights, fp32.

The demo weights (``tests/fixtures.py``) are loaded into the engine in their
original layouts, and into diffusers after diffusers' own single-file
converters, so these tests also check the engine's key layout independently.
The known differences (design.md section 5) are handled explicitly: diffusers'
motion-module GroupNorm pools over frames and is patched to per frame (the
original AnimateDiff); AnimateDiff v1's cross-frame ResNet norms are expressed
by patching diffusers' ResNet norms and ``conv_norm_out``; diffusers' Euler
scheduler starts from ``sigma_max * noise`` with linspace spacing where
ComfyUI (and Kinema) start from ``sqrt(1 + sigma_max^2) * noise``.

Tolerances: each network within ``1e-5 * max(1, max |reference|)`` (max abs
difference); the full sampled video within ``1e-4`` of the largest latent value.
"""
import math

import pytest
import torch

from conftest import assert_net_close
from einops import rearrange

pytest.importorskip("diffusers", exc_type=ImportError)

from fixtures import (  # noqa: E402
    cross_frame_resnet_norms,
    diffusers_motion_unet,
    diffusers_unet2d,
    diffusers_unet_config,
    diffusers_vae,
    motion_adapter,
    motion_adapter_config,
    motion_model,
    motion_modules,
    motion_state_dict,
    sd15_state_dict,
    unet,
    vae,
)

from kinema.models import checkpoint  # noqa: E402
from kinema.models.errors import KinemaError  # noqa: E402
from kinema.models.pipelines import SD15_LATENT_SCALE, SampleOptions, sample_video  # noqa: E402
from kinema.models.sampling import DiscreteSchedule, initial_noise, normal_scheduler  # noqa: E402
from kinema.models.vae import decode_frames  # noqa: E402

FRAMES, HW = 8, 16
VIDEO_TOL = 1e-4  # relative to max |reference|


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)




# -- UNet ----------------------------------------------------------------------------------------------------------

def test_diffusers_configs_are_read_off_the_demo_shapes():
    cfg = diffusers_unet_config(checkpoint.sub_state_dict(sd15_state_dict(), "model.diffusion_model."))
    assert cfg["block_out_channels"] == (32, 64, 64, 64) and cfg["cross_attention_dim"] == 64
    ours = unet().cfg
    assert ours.model_channels * 2 == 64 and ours.channel_mult == (1, 2, 2, 2) and ours.num_heads == 8
    for version, mid, length in (("v1", False, 24), ("v2", True, 32), ("v3", False, 32)):
        adapter = motion_adapter_config(motion_state_dict(version))
        assert adapter["block_out_channels"] == (32, 64, 64, 64)
        assert (adapter["use_motion_mid_block"], adapter["motion_max_seq_length"]) == (mid, length)


@pytest.mark.parametrize("h,w", [(HW, HW), (12, 20)])  # 12x20: odd sizes at the deepest level (upsample to size)
def test_unet_matches_diffusers(h, w):
    g = _gen(1)
    x = torch.randn(3, 4, h, w, generator=g)
    ctx = torch.randn(3, 77, 64, generator=g)
    t = torch.tensor([999.0, 500.0, 1.0])
    with torch.no_grad():
        ours = unet()(x, t, ctx)
        ref = diffusers_unet2d()(x, t, ctx).sample
    assert_net_close(ours, ref, "UNet eps")


def _norm_eps(model, kind: str) -> list[float]:
    return [m.norm.eps for m in model.modules() if type(m).__name__ == kind]


def test_transformer_group_norms_have_the_eps_of_diffusers():
    """The spatial and temporal transformers' GroupNorm eps (1e-6, not torch's 1e-5): the parity runs' activations
    are too large for eps to show, so it is compared here on diffusers' modules of the same configs."""
    ours, ref = _norm_eps(unet(), "SpatialTransformer"), _norm_eps(diffusers_unet2d(), "Transformer2DModel")
    assert len(ours) == len(ref) > 0 and set(ours) == set(ref) == {1e-6}
    ours = _norm_eps(motion_modules("v2"), "TemporalTransformer")
    ref = _norm_eps(motion_adapter("v2"), "AnimateDiffTransformer3D")
    assert len(ours) == len(ref) > 0 and set(ours) == set(ref) == {1e-6}


# -- motion modules ----------------------------------------------------------------------------------------------

def _video_inputs(frames: int = FRAMES):
    """A batch of 2 videos (uncond, cond) folded as (b f), their contexts per frame, one timestep."""
    g = _gen(2)
    x = torch.randn(2 * frames, 4, HW, HW, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g).repeat_interleave(frames, dim=0)
    return x, torch.tensor(500.0), ctx


def _diffusers_eps(model, x, t, ctx, frames: int = FRAMES):
    with torch.no_grad():
        out = model(rearrange(x, "(b f) c h w -> b c f h w", f=frames), t, ctx).sample
    return rearrange(out, "b c f h w -> (b f) c h w")


def _kinema_eps(model, x, t, ctx, frames: int = FRAMES):
    with torch.no_grad():
        return model(x, t.expand(x.shape[0]), ctx, frames)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_motion_model_matches_diffusers_with_per_frame_motion_norm(version):
    x, t, ctx = _video_inputs()
    ours = _kinema_eps(motion_model(version), x, t, ctx)
    ref = diffusers_motion_unet(version)
    assert_net_close(ours, _diffusers_eps(ref, x, t, ctx), f"{version} eps")
    # the patch matters: diffusers' own (frame-pooled) motion norm is not the original AnimateDiff
    for module in ref.modules():
        if type(module).__name__ == "AnimateDiffTransformer3D":
            module.norm = module.norm.inner
    assert float((ours - _diffusers_eps(ref, x, t, ctx)).abs().max()) > 1e-3


def _set_norm_frames(model, frames: int) -> None:
    for module in model.modules():
        if type(module).__name__ == "CrossFrameGroupNorm":
            module.frames = frames


def test_v1_matches_diffusers_with_cross_frame_resnet_norms():
    x, t, ctx = _video_inputs()
    ref = diffusers_motion_unet("v1")
    assert cross_frame_resnet_norms(ref, FRAMES) == 2 * (4 * 2 + 2 + 4 * 3) + 1
    ours = _kinema_eps(motion_model("v1"), x, t, ctx)
    assert_net_close(ours, _diffusers_eps(ref, x, t, ctx), "v1 eps (cross-frame ResNet norms)")
    # forcing per-frame norms on both sides (frames=1 in the patched norms is per frame)
    _set_norm_frames(ref, 1)
    per_frame = _kinema_eps(motion_model("v1", cross_frame_norm=False), x, t, ctx)
    assert_net_close(per_frame, _diffusers_eps(ref, x, t, ctx), "v1 eps (per-frame norms forced)")
    assert float((ours - per_frame).abs().max()) > 1e-3


def test_v1_single_frame_is_per_frame_and_its_length_limit_is_enforced():
    x, t, ctx = _video_inputs(1)
    v1 = motion_model("v1")
    per_frame = v1.with_options(cross_frame_norm=False)
    assert torch.equal(_kinema_eps(v1, x, t, ctx, 1), _kinema_eps(per_frame, x, t, ctx, 1))
    v1.check_frames(24)
    with pytest.raises(KinemaError, match="at most 24 frames"):
        v1.check_frames(25)
    ctx1 = torch.zeros(1, 77, 64)
    with pytest.raises(KinemaError, match="at most 24 frames"):
        sample_video(v1, ctx1, ctx1, torch.zeros(25, 4, 8, 8), SampleOptions(steps=1))
    motion_model("v3").check_frames(32)


# -- VAE -----------------------------------------------------------------------------------------------------------

def test_vae_decode_matches_diffusers():
    z = torch.randn(3, 4, HW, HW, generator=_gen(3))
    with torch.no_grad():
        ref = diffusers_vae().decode(z).sample
        assert_net_close(vae().decode(z), ref, "VAE decode")
    image = decode_frames(vae(), z, chunk=2)  # chunked, clamped, IMAGE layout
    want = rearrange((ref.clamp(-1, 1) + 1) / 2, "f c h w -> f h w c")
    assert_net_close(image, want, "decode_frames IMAGE")


def test_vae_encode_matches_diffusers():
    px = torch.rand(2, 3, 8 * HW, 8 * HW, generator=_gen(4)) * 2 - 1
    with torch.no_grad():
        ours = vae().encode(px)
        ref = diffusers_vae().encode(px).latent_dist.mean
    assert_net_close(ours, ref, "VAE encode (mean)")


# -- one full sampled video ----------------------------------------------------------------------------------------

def test_sampled_video_matches_diffusers_animatediff_pipeline():
    from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler

    steps, seed, cfg, frames = 10, 42, 7.5, 4
    g = _gen(5)
    positive, negative = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)

    ours = sample_video(
        motion_model("v2", beta_schedule="linear"), positive, negative, torch.zeros(frames, 4, HW, HW),
        SampleOptions(seed=seed, steps=steps, cfg=cfg, sampler="euler", scheduler="normal"),
    )

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
        timestep_spacing="linspace", steps_offset=0,
    )
    unet_ref = diffusers_motion_unet("v2")
    pipe = AnimateDiffPipeline(vae=diffusers_vae(), text_encoder=None, tokenizer=None, unet=unet_ref,
                               motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    # the same schedule: ComfyUI's normal scheduler at 10 steps is linspace(999, 0, 10), integer timesteps.
    # (diffusers computes sigmas in fp32: its smallest, at t=0, is 1.3e-5 off the fp64 value; Kinema's 8e-8)
    scheduler.set_timesteps(steps)
    schedule = DiscreteSchedule("linear")
    ours_sigmas = normal_scheduler(schedule, steps)
    assert torch.allclose(ours_sigmas, scheduler.sigmas.float(), rtol=1e-4, atol=0)
    assert torch.equal(scheduler.timesteps, torch.linspace(999, 0, steps))
    assert torch.equal(schedule.timestep(ours_sigmas[:-1]), scheduler.timesteps)

    # the same start: ComfyUI scales noise by sqrt(1 + sigma_max^2), diffusers' linspace Euler by init_noise_sigma
    sigma_max = float(scheduler.sigmas.max())
    noise = initial_noise(seed, (frames, 4, HW, HW))
    start_scale = math.sqrt(1 + sigma_max**2) / float(scheduler.init_noise_sigma)
    latents = rearrange(noise, "f c h w -> 1 c f h w") * start_scale
    with torch.no_grad():
        out = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_frames=frames, height=8 * HW,
                   width=8 * HW, num_inference_steps=steps, guidance_scale=cfg, latents=latents,
                   output_type="latent").frames
    ref = rearrange(out[0], "c f h w -> f c h w")  # sampler space (scaled by 0.18215)

    # Kinema's latents are the VAE's (unscaled); diffusers' are scaled by the VAE config's factor (0.18215): the
    # reference's own factor, so that a wrong SD15_LATENT_SCALE (too bright or washed-out frames) shows here
    got = ours * pipe.vae.config.scaling_factor
    assert SD15_LATENT_SCALE == pipe.vae.config.scaling_factor
    rel = float((got - ref).abs().max()) / float(ref.abs().max())
    print(f"sampled video: max |diff| / max |value| = {rel:.3g} (max |value| {float(ref.abs().max()):.3g})")
    assert rel <= VIDEO_TOL, f"sampled video: max |diff| / max |value| = {rel:.3g} > {VIDEO_TOL:g}"
