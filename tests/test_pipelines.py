"""The sampling entry points (``models/pipelines.py``): what they check before sampling, how the latent is scaled
and noised, the memory pre-check's batch and window, and the step count context windows are scheduled over."""
import copy
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from fixtures import motion_model
from kinema.models import guidance, pipelines, sampling
from kinema.models.context import ContextOptions, context_windows, freenoise
from kinema.models.errors import KinemaError

SCALE = pipelines.SD15_LATENT_SCALE


def _conds(width=64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 4, width, generator=g), torch.randn(1, 4, width, generator=g)


def _identity_sampling(monkeypatch):
    """Sampling whose denoiser predicts that its input is already clean: every Euler step then keeps x, so the
    result is the starting point (the scaled latent, noised) unscaled again."""
    monkeypatch.setattr(pipelines, "CFGDenoiser", lambda *args, **kwargs: (lambda x, sigma, window=None: x))


@pytest.mark.parametrize("denoise", [0.3, 0.7])
def test_a_video_latent_is_scaled_for_the_model_and_back(monkeypatch, denoise):
    """ComfyUI's LATENT holds the VAE's unscaled latent: the sampler noises ``latent * 0.18215`` (the model's
    space) and returns its result divided by it again."""
    _identity_sampling(monkeypatch)
    latent = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    opts = pipelines.SampleOptions(seed=11, steps=4, cfg=1.0, sampler="euler", denoise=denoise)
    out = pipelines.sample_video(motion_model("v2"), *_conds(), latent, opts)
    sigmas = sampling.calculate_sigmas(sampling.DiscreteSchedule("linear"), "normal", 4, denoise)
    noise = sampling.initial_noise(11, tuple(latent.shape))
    assert torch.allclose(out, latent + float(sigmas[0]) * noise / SCALE, rtol=1e-5, atol=1e-5)


def test_the_frames_of_a_batch_index_get_the_noise_they_have_in_the_whole_video(monkeypatch):
    _identity_sampling(monkeypatch)
    latent = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    opts = pipelines.SampleOptions(seed=5, steps=3, cfg=1.0, sampler="euler", denoise=0.5)
    whole = pipelines.sample_video(motion_model("v2"), *_conds(), latent, opts)
    part = pipelines.sample_video(motion_model("v2"), *_conds(), latent[2:],
                                  replace(opts, batch_index=(2, 3)))
    assert torch.allclose(part, whole[2:], atol=1e-6)
    assert not torch.allclose(part, whole[:2] - latent[:2] + latent[2:], atol=1e-3)  # not the first frames' noise


def test_a_batch_index_part_gets_its_freenoise_noise_of_the_whole_video(monkeypatch):
    """With FreeNoise on (Context Options' default) a part of a video gets each frame's noise in a video of its
    largest index + 1 frames, rescheduled as there: the whole's own noise for a part that reaches its end."""
    _identity_sampling(monkeypatch)
    latent = torch.randn(20, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    context = ContextOptions(context_length=8, overlap=2, schedule="static", freenoise=True)
    opts = pipelines.SampleOptions(seed=5, steps=3, cfg=1.0, sampler="euler", denoise=0.5, context=context)
    whole = pipelines.sample_video(motion_model("v2"), *_conds(), latent, opts)
    part = pipelines.sample_video(motion_model("v2"), *_conds(), latent[10:],
                                  replace(opts, batch_index=tuple(range(10, 20))))
    assert torch.allclose(part, whole[10:], atol=1e-6)
    start = pipelines.sample_video(motion_model("v2"), *_conds(), latent[:10],
                                   replace(opts, batch_index=tuple(range(10))))
    short = pipelines.sample_video(motion_model("v2"), *_conds(), latent[:10], opts)  # a 10-frame video
    assert torch.allclose(start, short, atol=1e-6)
    plain = pipelines.sample_video(motion_model("v2"), *_conds(), latent[10:],
                                   replace(opts, batch_index=tuple(range(10, 20)),
                                           context=replace(context, freenoise=False)))
    assert not torch.allclose(part, plain, atol=1e-3)  # FreeNoise did reschedule this part's noise


@pytest.mark.parametrize("scheduler, steps, denoise, calls", [
    ("normal", 3, 1.0, 3), ("ddim_uniform", 3, 1.0, 3), ("ddim_uniform", 6, 1.0, 7),  # ComfyUI's: 7 for 6
    ("normal", 4, 0.5, 4), ("normal", 3, 0.0, 0)])  # a partial denoise keeps the steps
def test_sampling_steps_counts_the_model_calls_of_a_run(scheduler, steps, denoise, calls):
    opts = pipelines.SampleOptions(steps=steps, scheduler=scheduler, denoise=denoise)
    assert pipelines.sampling_steps(motion_model("v2"), opts) == calls


def test_context_windows_move_over_the_steps_of_the_run():
    """The windowed denoiser finds each sigma's step in the run's schedule (sigmas less the final 0): at step i
    its windows are ``context_windows(frames, opts, i, steps)``, which the uniform schedules shift step by step."""
    frames, steps = 20, 5
    opts = ContextOptions(context_length=8, overlap=2, schedule="uniform_standard", stride=2)
    sigmas = sampling.calculate_sigmas(sampling.DiscreteSchedule("linear"), "normal", steps)
    windowed = guidance.WindowedDenoiser(lambda x, sigma, window=None: x, opts, sigmas)
    seen = [[w.sub_idxs for w in windowed.windows(frames, sigmas[i])] for i in range(steps)]
    assert seen == [[w.sub_idxs for w in context_windows(frames, opts, i, steps)] for i in range(steps)]
    assert len({tuple(map(tuple, s)) for s in seen}) > 1  # the windows do move


@pytest.mark.parametrize("bad, match", [
    ({"positive": torch.randn(3, 4, 64)}, "positive conditioning has 3 entries for a video of 4 frames"),
    ({"negative": torch.randn(2, 4, 64)}, "negative conditioning has 2 entries"),
    ({"positive": torch.randn(1, 4, 32)}, "width 32 but the UNet expects 64.*CLIP of the same checkpoint"),
    ({"latent": torch.zeros(4, 3, 4, 4)}, r"video latent \[frames, 4, h, w\]"),
    ({"attn_chunk": True}, "attention_chunk must be 0"),
    ({"attn_chunk": -1}, "attention_chunk must be 0"),
])
def test_sample_video_refuses_mismatched_inputs_before_sampling(bad, match):
    pos, neg = _conds()
    args = {"positive": pos, "negative": neg, "latent": torch.zeros(4, 4, 4, 4), "attn_chunk": 0}
    args.update(bad)
    opts = pipelines.SampleOptions(steps=1, cfg=2.0, attn_chunk=args.pop("attn_chunk"))
    with pytest.raises(KinemaError, match=match):
        pipelines.sample_video(motion_model("v2"), args["positive"], args["negative"], args["latent"], opts)


@pytest.mark.parametrize("which", ["positive", "negative"])
def test_a_conditioning_holding_nan_is_refused_before_sampling(monkeypatch, which):
    """A NaN in the conditioning (a conditioning edit of another pack given a NaN strength) would make every step
    NaN: the sampler names the input instead of running."""
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: pytest.fail("sampled"))
    conds = dict(zip(("positive", "negative"), _conds()))
    conds[which][0, 2, 5] = float("inf" if which == "negative" else "nan")
    with pytest.raises(KinemaError, match=f"the {which} conditioning holds NaN or infinite values"):
        pipelines.sample_video(motion_model("v2"), conds["positive"], conds["negative"], torch.zeros(2, 4, 4, 4),
                               pipelines.SampleOptions(steps=1))


class _Net(torch.nn.Linear):
    dtype = property(lambda self: self.weight.dtype)


@pytest.mark.parametrize("half, cause", [
    ((), "the float32 model made them from finite inputs: check the checkpoint and its add-ons"),
    (("unet",), "the UNet in fp16 likely overflowed: set bf16 or fp32 (precision on Memory Policy (Kinema) (placed "
                "after Apply Motion Module) or on its loader)"),
    (("motion",), "the motion module in fp16 likely overflowed: set bf16 or fp32 (precision on Memory Policy"),
    (("controlnet",), "a ControlNet in fp16 likely overflowed: set bf16 or fp32 (precision on Load ControlNet "
                      "(Kinema))"),
    (("unet", "motion", "controlnet", "adapter"),
     "the UNet and the motion module and a ControlNet and an IP-Adapter in fp16 likely overflowed: set bf16 or fp32 "
     "(the UNet and the motion module: precision on Memory Policy (Kinema) (placed after Apply Motion Module) or on "
     "its loader; a ControlNet: precision on Load ControlNet (Kinema); an IP-Adapter: precision on Load IP-Adapter "
     "(Kinema))"),
])
def test_the_nan_error_names_every_network_in_fp16_and_where_its_precision_is_set(half, cause):
    """An fp16 motion module, ControlNet or IP-Adapter beside an fp32 UNet overflows too: each is named, with the
    node whose precision fixes it, not only the UNet's loader."""
    def net(name):
        return _Net(2, 2).to(torch.float16 if name in half else torch.float32)

    model = SimpleNamespace(unet=net("unet"), motion=net("motion"),
                            controls=(SimpleNamespace(controlnet=net("controlnet")),) * 2,
                            contents=(SimpleNamespace(adapter=net("adapter")),))
    with pytest.raises(KinemaError, match=r"^sampling produced NaN or infinite values, which decode to blank frames: "
                                          + re.escape(cause)):
        pipelines._check_sampled(torch.tensor([float("nan")]), model)


@pytest.mark.parametrize("dtype, cause", [
    (torch.float16, "the UNet in fp16 likely overflowed: set bf16 or fp32"),
    (torch.float32, "the float32 model made them from finite inputs: check the checkpoint and its add-ons"),
])
def test_a_sampling_that_makes_nan_says_why_at_the_sampler(monkeypatch, dtype, cause):
    """NaN out of finite inputs is named where it happened, with the cause the model's precision points at (fp16
    overflow is the usual one; an fp32 model cannot overflow that way), not left for the decode to blame."""
    model = motion_model("v2")
    model = model.with_options(unet=copy.deepcopy(model.unet).to(dtype))
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: torch.tensor([0.0, float("nan")]))
    with pytest.raises(KinemaError, match=f"sampling produced NaN or infinite values.*: {cause}"):
        pipelines.sample_video(model, *_conds(), torch.zeros(2, 4, 4, 4), pipelines.SampleOptions(steps=1))
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: torch.ones(2))
    out = pipelines.sample_video(model, *_conds(), torch.zeros(2, 4, 4, 4), pipelines.SampleOptions(steps=1))
    assert torch.equal(out, torch.ones(2))


def test_an_empty_video_latent_needs_a_frame():
    with pytest.raises(KinemaError, match="frames must be at least 1"):
        pipelines.empty_video_latent(0, 64, 64)
    assert pipelines.empty_video_latent(2, 16, 24).shape == (2, 4, 3, 2)


def _fit_check_sizes(monkeypatch):
    seen = []
    real = pipelines.video_activation_bytes

    def spy(frames, batch, *rest):
        seen.append((frames, batch))
        return real(frames, batch, *rest)

    monkeypatch.setattr(pipelines, "video_activation_bytes", spy)
    return seen


@pytest.mark.parametrize("cfg, with_negative, temporal_scale, batch_cond, batch", [  # batch: the wanted one
    (5.0, True, 1.0, True, 2),
    (5.0, True, 1.0, False, 1),  # cond and uncond one after the other
    (1.0, True, 1.0, True, 1),  # cfg 1 runs no uncond
    (1.0, True, 0.5, True, 2),  # temporal guidance runs the uncond at cfg 1 too
    (5.0, False, 1.0, True, 1),
])
def test_the_memory_check_sizes_the_batch_the_sampler_runs(monkeypatch, cfg, with_negative, temporal_scale,
                                                             batch_cond, batch):
    seen = _fit_check_sizes(monkeypatch)
    pos, neg = _conds()
    model = motion_model("v2").with_options(temporal_scale=temporal_scale)
    opts = pipelines.SampleOptions(steps=1, cfg=cfg, batch_cond=batch_cond)
    pipelines.sample_video(model, pos, neg if with_negative else None, torch.zeros(4, 4, 4, 4), opts)
    assert seen == [(4, 1)] + ([(4, batch)] if batch > 1 else [])  # needed: one conditioning at a time


def test_the_memory_check_sizes_one_context_window(monkeypatch):
    seen = _fit_check_sizes(monkeypatch)
    opts = pipelines.SampleOptions(steps=1, cfg=1.0, context=ContextOptions(context_length=4, overlap=1))
    pipelines.sample_video(motion_model("v2"), _conds()[0], None, torch.zeros(10, 4, 4, 4), opts)
    assert seen == [(4, 1)]


def test_a_video_that_fits_one_conditioning_at_a_time_is_sampled(monkeypatch):
    """Cond and uncond batched need twice the memory, but the sampler goes one after the other by itself when the
    batch runs out of it: the run is refused only where one conditioning cannot fit. The host is asked to free
    room for the batch first."""
    from kinema.models import memory, placement

    model, latent = motion_model("v2"), torch.zeros(4, 4, 4, 4)
    one = memory.video_activation_bytes(4, 1, 4, 4, model.unet.cfg.model_channels, model.unet.dtype)
    asked, free = [], {"bytes": one * 3 // 2}
    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    monkeypatch.setattr(placement, "make_room", lambda nbytes, device: asked.append(nbytes))  # any device
    opts = pipelines.SampleOptions(steps=1, cfg=5.0)
    assert pipelines.sample_video(model, *_conds(), latent, opts).shape == latent.shape
    assert asked == [2 * one]
    free["bytes"] = one - 1
    with pytest.raises(KinemaError, match="sampling 4 frames at once at 32x32 needs about .*Context Options"):
        pipelines.sample_video(model, *_conds(), latent, opts)


def test_the_svd_memory_check_sizes_the_batch_its_per_frame_guidance_runs(monkeypatch, tmp_path):
    from fixtures_svd_pipeline import tiny_img2vid

    bundle, cond, uncond, latent = tiny_img2vid(str(tmp_path), frames=3, size=64)
    seen = _fit_check_sizes(monkeypatch)
    for cfg, model, wanted in ((2.5, bundle.model, [(3, 2)]), (1.0, bundle.model.with_options(min_cfg=1.0), [])):
        pipelines.sample_img2vid(model, cond, uncond, latent, pipelines.SampleOptions(steps=1, cfg=cfg))
        assert seen == [(3, 1), *wanted]  # every frame's cfg 1: no uncond evaluation to batch
        seen.clear()


def test_controlnet_hints_are_fitted_to_a_video_that_is_not_square():
    """A latent of 6x10 is a video 48 pixels high and 80 wide: its hints (40x24, the same aspect) are resized to
    that, height by width."""
    from fixtures_controlnet import controlnet
    from kinema.models import addons

    hint = addons.control_hint(controlnet(), torch.rand(1, 24, 40, 3, generator=torch.Generator().manual_seed(0)))
    model = pipelines.prepare_addons(motion_model("v2").with_options(controls=(hint,)), torch.zeros(2, 4, 6, 10))
    (prepared,) = model.controls
    assert prepared.hints_for(range(2)).shape == (2, 3, 48, 80)


def test_freenoise_reschedules_the_seeds_noise_with_the_same_seed(monkeypatch):
    """With FreeNoise the starting noise is the seed's noise of the whole video shuffled by window, the shuffle
    drawn from the same seed."""
    _identity_sampling(monkeypatch)
    started = []
    real = pipelines.noise_latent
    monkeypatch.setattr(pipelines, "noise_latent", lambda x, noise, *a: started.append(noise) or real(x, noise, *a))
    ctx = ContextOptions(context_length=4, overlap=1, freenoise=True)
    latent = torch.zeros(12, 4, 4, 4)
    opts = pipelines.SampleOptions(seed=3, steps=2, cfg=1.0, context=ctx)
    pipelines.sample_video(motion_model("v2"), _conds()[0], None, latent, opts)
    plain = sampling.initial_noise(3, tuple(latent.shape))
    want = freenoise(plain, ctx, 3)
    assert len(started) == 1 and torch.equal(started[0], want)
    assert not torch.equal(want, plain)  # the frames past the first window are shuffled
