"""Memory bounds that change no result: feed-forwards in slices of tokens, temporal blocks in slices of pixel
positions, the temporal decoder's float32 GroupNorm in slices of groups, and in-place blends and residual adds.

The tests' small inputs never reach the budgets, so each test shrinks a budget until every path runs in many
slices, checks that it did (the slices are counted), and compares with the one-piece result of the same weights.
What the bounds save at the published sizes is measured by ``bench/estimate_vram.py``.
"""
import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from fixtures import motion_model
from fixtures_svd_unet import TINY, svd_unet
from fixtures_temporal_vae import temporal_vae
from kinema.models import layers, vae
from kinema.models.layers import FeedForward, RunOptions, by_rows, row_step
from kinema.models.svd import AlphaBlender


@contextmanager
def _count_calls(module: torch.nn.Module):
    """The calls of ``module`` inside the block (the hook is removed after: fixtures are shared)."""
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_row_step_and_by_rows(monkeypatch):
    x = torch.randn(10, 4, 8)  # 128 bytes a row
    monkeypatch.setattr(layers, "ROW_SLICE_BYTES", 3 * 128)
    assert row_step(x) == 3 and row_step(x, chunk=2) == 2
    monkeypatch.setattr(layers, "ROW_SLICE_BYTES", 1)
    assert row_step(x) == 1  # never below one row
    firsts = []

    def fn(part, first):
        firsts.append(first)
        return part.sum(-1) * 2

    assert torch.equal(by_rows(fn, x, 3), x.sum(-1) * 2)
    assert firsts == [0, 3, 6, 9]


@pytest.mark.parametrize("tokens, budget, n_calls", [
    ((3, 50), 128 * 4 * 7, 22),  # 7 tokens of the 128-wide GEGLU projection: 150 tokens, 7 at a time
    ((2, 3), 1, 6),  # less than one token's projection: still one token at a time
], ids=["7 tokens", "under one token"])
def test_feed_forward_in_slices_of_tokens(monkeypatch, tokens, budget, n_calls):
    torch.manual_seed(0)
    ff = FeedForward(16).eval()
    x = torch.randn(*tokens, 16)
    with torch.no_grad():
        whole = ff(x)
        monkeypatch.setattr(layers, "FF_SLICE_BYTES", budget)
        with _count_calls(ff.net[0]) as calls:
            sliced = ff(x)
    assert len(calls) == n_calls
    assert sliced.shape == whole.shape and torch.allclose(sliced, whole, atol=1e-6)


def test_geglu_in_place_gate_is_the_product():
    torch.manual_seed(0)
    geglu = layers.GEGLU(8, 12).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        a, gate = geglu.proj(x).chunk(2, dim=-1)
        assert torch.equal(geglu(x), a * F.gelu(gate))


@pytest.mark.parametrize("chunk", [0, 5])
def test_motion_model_in_slices_gives_the_same_noise(monkeypatch, chunk):
    model = motion_model("v2")
    frames = 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * frames, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g).repeat_interleave(frames, dim=0)
    t = torch.full((2 * frames,), 400.0)
    with torch.no_grad():
        whole = model(x, t, ctx, frames, attn_chunk=chunk)
        monkeypatch.setattr(layers, "ROW_SLICE_BYTES", 1024)
        monkeypatch.setattr(layers, "FF_SLICE_BYTES", 4096)
        module = next(m for m in model.motion.modules() if type(m).__name__ == "TemporalTransformer")
        with _count_calls(module.proj_in) as calls:
            sliced = model(x, t, ctx, frames, attn_chunk=chunk)
    assert len(calls) > 1  # the first module's positions ran in several slices
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_motion_model_with_attention_chunks_gives_the_same_noise():
    """attn_chunk splits the spatial attention's queries and the motion modules' pixel positions: same result.
    It caps the positions a motion module takes at once, far below ``ROW_SLICE_BYTES``'s bound."""
    model = motion_model("v2")
    frames = 4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(frames, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 64, generator=g).repeat_interleave(frames, dim=0)
    t = torch.full((frames,), 400.0)
    module = next(m for m in model.motion.modules() if type(m).__name__ == "TemporalTransformer")
    with torch.no_grad():
        whole = model(x, t, ctx, frames)
        with _count_calls(module.proj_in) as calls:
            chunked = model(x, t, ctx, frames, attn_chunk=5)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert len(calls) == 13  # the first module's 64 positions, 5 at a time


def test_svd_unet_in_slices_gives_the_same_output(monkeypatch):
    model = svd_unet()
    frames, videos = 3, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(videos * frames, TINY.in_channels, 16, 16, generator=g)
    t = torch.full((videos * frames,), 0.5)
    ctx = torch.randn(videos, 1, TINY.context_dim, generator=g).repeat_interleave(frames, dim=0)
    y = torch.randn(videos, TINY.adm_in_channels, generator=g).repeat_interleave(frames, dim=0)
    with torch.no_grad():
        whole = model(x, t, ctx, y, frames)
        monkeypatch.setattr(layers, "ROW_SLICE_BYTES", 2048)
        monkeypatch.setattr(layers, "FF_SLICE_BYTES", 4096)
        block = next(m for m in model.modules() if type(m).__name__ == "VideoTransformerBlock")
        with _count_calls(block.attn1) as calls:
            sliced = model(x, t, ctx, y, frames, RunOptions(num_frames=frames, attn_chunk=7))
    assert len(calls) > 1
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_alpha_blender_in_place_is_the_blend():
    blender = AlphaBlender()
    with torch.no_grad():
        blender.mix_factor.fill_(0.3)
    xs, xt = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    indicator = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    for ind in (None, indicator):
        a = blender.alpha(ind, 6)[:, None, None, None]
        expected = a * xs + (1 - a) * xt
        assert torch.equal(blender(xs.clone(), xt.clone(), ind), expected)


def test_group_norm_fp32_in_slices_of_groups(monkeypatch):
    monkeypatch.setattr(vae, "NATIVE_HALF_GROUP_NORM", frozenset())  # the CPU stands in for a device without one
    norm = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(1, 64, 3, 8, 8) * 40).half()
    x = x.transpose(0, 2).transpose(0, 2)  # same values, a strided view as the decoder gives it
    reference = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).half()
    assert torch.equal(vae._group_norm_fp32(norm, x), reference)
    monkeypatch.setattr(vae, "GN_FP32_SLICE_BYTES", 2 * 3 * 8 * 8 * 4 * 3)  # 3 groups at a time
    sliced = vae._group_norm_fp32(norm, x)
    assert sliced.is_contiguous() and sliced.dtype == torch.float16
    torch.testing.assert_close(sliced, reference, rtol=0, atol=1e-3)


def test_temporal_decoder_in_slices_of_groups_is_unchanged(monkeypatch):
    monkeypatch.setattr(vae, "NATIVE_HALF_GROUP_NORM", frozenset())  # the CPU stands in for a device without one
    model = copy.deepcopy(temporal_vae()).half()  # the fixture is shared: cast a copy
    z = torch.randn(3, 4, 8, 8).half()
    with torch.no_grad():
        whole = model.decode(z, 3).float()
        monkeypatch.setattr(vae, "GN_FP32_SLICE_BYTES", 4096)
        sliced = model.decode(z, 3).float()
    torch.testing.assert_close(sliced, whole, rtol=0, atol=2e-3)


def test_attention_chunk_caps_the_pixel_positions_of_an_svd_temporal_block_slice():
    """RunOptions.attn_chunk caps the positions SVD's temporal blocks take at once, far below ``ROW_SLICE_BYTES``."""
    model = svd_unet()
    frames = 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(frames, TINY.in_channels, 16, 16, generator=g)
    t = torch.full((frames,), 0.5)
    ctx = torch.randn(1, 1, TINY.context_dim, generator=g).repeat_interleave(frames, dim=0)
    y = torch.randn(1, TINY.adm_in_channels, generator=g).repeat_interleave(frames, dim=0)
    block = next(m for m in model.modules() if type(m).__name__ == "VideoTransformerBlock")
    with torch.no_grad(), _count_calls(block.attn1) as calls:
        model(x, t, ctx, y, frames, RunOptions(num_frames=frames, attn_chunk=7))
    assert len(calls) > 1
