"""The SVD spatio-temporal UNet (``models/svd.py``): layout, config inference, and parity with diffusers.

The tiny checkpoint (``tests/fixtures_svd_unet.py``) is in the published sgm layout; diffusers'
``UNetSpatioTemporalConditionModel`` gets the same tensors through the fixture's own key mapping
(diffusers has no single-file SVD UNet converter), with sgm's ResBlock GroupNorm eps (1e-5; diffusers
uses 1e-6 in its cross-attention down blocks and all up blocks) patched on the diffusers instance.

Diffusers takes one timestep, context and ``added_time_ids`` [b, 3] per video and builds the
micro-conditioning embedding itself; the engine takes everything per frame and ``y`` ready-made.
Both are compared: the UNets given the same ``y`` (diffusers' ``add_time_proj`` replaced on the
instance by the given vector), and ``micro_conditioning`` against diffusers' ``add_time_proj``.

Tolerance: max |diff| within ``1e-5 * max(1, max |reference|)`` in fp32.
"""
import copy
from contextlib import contextmanager

import pytest
import torch
from conftest import assert_net_close
from einops import rearrange, repeat
from fixtures_svd_unet import ADD_TIME_DIM, PREFIX, TINY, svd_unet, svd_unet_state_dict
from kinema.models import checkpoint
from kinema.models.errors import KinemaError
from kinema.models.layers import RunOptions, timestep_embedding
from kinema.models.svd import (
    SpatialVideoTransformer,
    SVDUNet,
    SVDUNetConfig,
    infer_svd_unet_config,
    micro_conditioning,
)
from torch import nn

VIDEOS, FRAMES, HW, TOKENS = 2, 5, 16, 3




def _inputs(videos: int = VIDEOS, frames: int = FRAMES, seed: int = 1):
    """Per-video inputs: x [b, f, 8, h, w], c_noise [b], context [b, n, d], y [b, adm]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(videos, frames, TINY.in_channels, HW, HW, generator=g)
    sigmas = torch.tensor([700.0, 0.3, 12.0, 1.0])[:videos]
    c_noise = 0.25 * sigmas.log()  # what the EDM wrapper passes
    context = torch.randn(videos, TOKENS, TINY.context_dim, generator=g)
    y = torch.randn(videos, TINY.adm_in_channels, generator=g)
    return x, c_noise, context, y


def _run_ours(model: SVDUNet, x, c_noise, context, y, opts: RunOptions = RunOptions(), indicator=None):
    """Per-video inputs -> the engine's per-frame call -> [b, f, c, h, w]."""
    f = x.shape[1]
    out = model(
        rearrange(x, "b f c h w -> (b f) c h w"),
        repeat(c_noise, "b -> (b f)", f=f),
        repeat(context, "b n d -> (b f) n d", f=f),
        repeat(y, "b e -> (b f) e", f=f),
        f,
        opts,
        image_only_indicator=indicator,
    )
    return rearrange(out, "(b f) c h w -> b f c h w", f=f)


class _GivenVector(nn.Module):
    """Stands in for diffusers' ``add_time_proj``: returns the given ``y`` [b, adm] whatever the ids."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        self.y = y

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[b * 3] -> [b, adm]"""
        return self.y


@contextmanager
def _diffusers_given_y(model, y: torch.Tensor):
    saved = model.add_time_proj
    model.add_time_proj = _GivenVector(y)
    try:
        yield model
    finally:
        model.add_time_proj = saved


# -- layout and config inference -----------------------------------------------------------------------------------

def test_tiny_config_is_read_off_the_shapes():
    sd = svd_unet_state_dict()
    assert all(k.startswith(PREFIX) for k in sd)
    assert infer_svd_unet_config(sd, prefix=PREFIX) == TINY
    assert infer_svd_unet_config(checkpoint.sub_state_dict(sd, PREFIX)) == TINY
    assert svd_unet().cfg == TINY
    assert [svd_unet(16).cfg.heads(c) for c in (32, 64)] == [2, 4]
    assert [TINY.heads(c) for c in (32, 64)] == [1, 1]  # max(1, channels // 64)


def test_real_config_is_read_off_the_shapes_alone():
    real = SVDUNetConfig()
    with torch.device("meta"):
        sd = SVDUNet(real).state_dict()
    assert infer_svd_unet_config(sd) == real
    # the published VideoUNet: sgm's VideoUNet built with svd.yaml's network_config has these 1428 tensors
    assert len(sd) == 1428
    published = {
        "input_blocks.0.0.weight": (320, 8, 3, 3),
        "label_emb.0.0.weight": (1280, 768),
        "label_emb.0.2.weight": (1280, 1280),
        "input_blocks.1.0.time_stack.in_layers.2.weight": (320, 320, 3, 1, 1),
        "input_blocks.1.0.time_stack.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.time_mixer.mix_factor": (1,),
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.time_stack.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.time_pos_embed.0.weight": (1280, 320),
        "input_blocks.1.1.time_mixer.mix_factor": (1,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.time_stack.0.attn1.to_q.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.time_stack.0.ff.net.2.weight": (320, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in published.items():
        assert tuple(sd[key].shape) == shape, key
    assert [real.heads(c) for c in (320, 640, 1280)] == [5, 10, 20]


def test_non_svd_state_dicts_are_refused():
    from fixtures import motion_state_dict, sd15_state_dict

    with pytest.raises(KinemaError, match="SVD UNet"):
        infer_svd_unet_config(sd15_state_dict(), prefix=PREFIX)  # an SD1.5 image UNet
    with pytest.raises(KinemaError, match="SVD UNet"):
        infer_svd_unet_config(motion_state_dict("v3"))
    with pytest.raises(KinemaError, match="SVD UNet"):
        infer_svd_unet_config({})
    sd = dict(svd_unet_state_dict())
    del sd[PREFIX + "label_emb.0.0.weight"]
    with pytest.raises(KinemaError, match="label_emb"):
        infer_svd_unet_config(sd, prefix=PREFIX)


def test_wrong_batch_is_refused():
    x, c_noise, context, y = _inputs(videos=1)
    flat = rearrange(x, "b f c h w -> (b f) c h w")
    with pytest.raises(KinemaError, match="num_frames"):
        svd_unet()(flat, c_noise.expand(FRAMES), context.expand(FRAMES, -1, -1), y.expand(FRAMES, -1), 3)
    two = torch.cat([flat, flat])  # two videos, with per-frame inputs for one
    full = {"timesteps": c_noise.expand(2 * FRAMES), "context": context.expand(2 * FRAMES, -1, -1),
            "y": y.expand(2 * FRAMES, -1)}
    short = {"timesteps": c_noise.expand(FRAMES), "context": context.expand(FRAMES, -1, -1), "y": y.expand(FRAMES, -1)}
    for name in full:
        args = {**full, name: short[name]}
        with pytest.raises(KinemaError, match=f"needs one {name} entry per frame: got {FRAMES} for {2 * FRAMES}"):
            svd_unet()(two, args["timesteps"], args["context"], args["y"], FRAMES)


# -- engine behaviour ----------------------------------------------------------------------------------------------

def test_attention_chunking_gives_the_same_output():
    model = svd_unet(16)
    inputs = _inputs()
    with torch.no_grad():
        whole = _run_ours(model, *inputs)
        chunked = _run_ours(model, *inputs, opts=RunOptions(num_frames=FRAMES, attn_chunk=2))
    assert_net_close(chunked, whole, "attn_chunk=2 vs whole")


def test_image_only_frames_are_independent():
    """With every frame marked as an image the temporal paths are blended out: frames run on their own."""
    model = svd_unet(16)
    x, c_noise, context, y = _inputs(videos=1)
    with torch.no_grad():
        together = _run_ours(model, x, c_noise, context, y, indicator=torch.ones(1, FRAMES))
        alone = [_run_ours(model, x[:, i : i + 1], c_noise, context, y, indicator=torch.ones(1, 1)) for i in range(2)]
        video = _run_ours(model, x, c_noise, context, y)
    assert_net_close(together[:, :2], torch.cat(alone, dim=1), "image-only frames vs one at a time")
    assert float((video - together).abs().max()) > 1e-3  # the temporal layers do act on a video


def test_the_temporal_cross_attention_attends_to_each_videos_first_frame_context():
    """sgm's temporal blocks cross-attend to the first frame's context of each video: with a context per frame (which
    the sampler accepts), the others' reach the output only through the spatial cross-attention, here switched off
    (on a copy: the cached model is shared, and zeroing its weights once reached the cached state dict too, so the
    diffusers parity tests after it compared two models with those layers off)."""
    model = copy.deepcopy(svd_unet(16))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpatialVideoTransformer):
                for block in m.transformer_blocks:
                    block.attn2.to_out[0].weight.zero_()
                    block.attn2.to_out[0].bias.zero_()
    x, c_noise, _, y = _inputs()
    ctx = torch.randn(VIDEOS, FRAMES, TOKENS, TINY.context_dim, generator=torch.Generator().manual_seed(3))

    def run(context):
        out = model(rearrange(x, "b f c h w -> (b f) c h w"), repeat(c_noise, "b -> (b f)", f=FRAMES),
                    rearrange(context, "b f n d -> (b f) n d"), repeat(y, "b e -> (b f) e", f=FRAMES), FRAMES)
        return rearrange(out, "(b f) c h w -> b f c h w", f=FRAMES)

    with torch.no_grad():
        base = run(ctx)
        later, first = ctx.clone(), ctx.clone()
        later[:, 1:] += 1.0  # every frame's context but the first of each video
        first[1, 0] += 1.0  # the second video's first frame
        assert_net_close(run(later), base, "contexts of frames after the first")
        moved = run(first)
    assert_net_close(moved[0], base[0], "the other video")
    assert float((moved[1] - base[1]).abs().max()) > 1e-3


def test_a_video_with_some_still_frames_keeps_its_temporal_layers():
    """Only when every frame is a still image are the temporal paths skipped: one marked frame among video frames
    blends them out for that frame alone (alpha 1), the others still mix across frames."""
    model = svd_unet(16)
    x, c_noise, context, y = _inputs(videos=1)
    with torch.no_grad():
        still = _run_ours(model, x, c_noise, context, y, indicator=torch.ones(1, FRAMES))
        mixed = _run_ours(model, x, c_noise, context, y, indicator=torch.tensor([[1.0] + [0.0] * (FRAMES - 1)]))
    assert float((mixed[:, 1:] - still[:, 1:]).abs().max()) > 1e-3


# -- parity with diffusers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_head_channels", [64, 16])
def test_unet_matches_diffusers_given_the_same_y(num_head_channels):
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures_svd_unet import diffusers_svd_unet

    ref_model = diffusers_svd_unet(num_head_channels)
    x, c_noise, context, y = _inputs()
    with torch.no_grad(), _diffusers_given_y(ref_model, y) as ref_with_y:
        ref = ref_with_y(x, c_noise, context, added_time_ids=torch.zeros(VIDEOS, 3)).sample
        ours = _run_ours(svd_unet(num_head_channels), x, c_noise, context, y)
    assert_net_close(ours, ref, f"SVD UNet, {num_head_channels} channels a head")


def test_unet_matches_diffusers_from_micro_conditioning_ids():
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures_svd_unet import diffusers_svd_unet

    ids = torch.tensor([[6.0, 127.0, 0.02], [24.0, 30.0, 0.5]])  # fps_id, motion_bucket_id, cond_aug
    x, c_noise, context, _ = _inputs()
    y = torch.cat([micro_conditioning(*row.tolist(), frames=1, dim_each=ADD_TIME_DIM) for row in ids])
    with torch.no_grad():
        ref = diffusers_svd_unet(16)(x, c_noise, context, added_time_ids=ids).sample
        ours = _run_ours(svd_unet(16), x, c_noise, context, y)
    assert_net_close(ours, ref, "SVD UNet from added_time_ids")


def test_single_frame_matches_diffusers():
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures_svd_unet import diffusers_svd_unet

    x, c_noise, context, y = _inputs(frames=1)
    with torch.no_grad(), _diffusers_given_y(diffusers_svd_unet(16), y) as ref_model:
        ref = ref_model(x, c_noise, context, added_time_ids=torch.zeros(VIDEOS, 3)).sample
        ours = _run_ours(svd_unet(16), x, c_noise, context, y)
    assert ours.shape == (VIDEOS, 1, TINY.out_channels, HW, HW)
    assert_net_close(ours, ref, "SVD UNet, num_frames=1")


def test_micro_conditioning_matches_sgm_order_and_diffusers():
    y = micro_conditioning(6, 127, 0.02, frames=4)
    assert y.shape == (4, 768) and torch.equal(y[0], y[3])
    # sgm: each scalar through the cos-first sinusoidal embedding, in the order fps_id, motion_bucket_id, cond_aug
    for i, value in enumerate((6.0, 127.0, 0.02)):
        torch.testing.assert_close(y[0, 256 * i : 256 * (i + 1)], timestep_embedding(torch.tensor([value]), 256)[0])
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers.models.embeddings import Timesteps

    ids = torch.tensor([[6.0, 127.0, 0.02]])
    proj = Timesteps(256, True, downscale_freq_shift=0)  # the UNet's add_time_proj at the published size
    ref = proj(ids.flatten()).reshape(1, -1)
    torch.testing.assert_close(y[:1], ref, rtol=0, atol=1e-6)
