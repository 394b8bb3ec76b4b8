"""The shortcuts of the shared layers give what the plain computation gives: the attention shortcuts what full
attention gives, the frame convolution what a Conv3d gives."""
import math

import pytest
import torch
from einops import rearrange
from kinema.models import layers
from kinema.models.layers import (
    CrossAttention,
    FrameConv,
    RunOptions,
    SharedContext,
    attention,
    flatten_hw,
    group_norm,
    per_frame_slices,
)
from kinema.models.svd import VideoTransformerBlock

torch.manual_seed(0)


def _full(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Attention over every query and key, with no shortcut."""
    return attn.to_out(attention(attn.to_q(x), attn.to_k(context), attn.to_v(context), attn.heads))


@pytest.mark.parametrize("tokens", [1, 3])
def test_cross_attention_matches_full_attention(tokens):
    attn = CrossAttention(16, 24, heads=2).eval()
    x, context = torch.randn(4, 10, 16), torch.randn(4, tokens, 24)
    with torch.no_grad():
        assert torch.allclose(attn(x, context), _full(attn, x, context), atol=1e-6)


def test_one_token_context_skips_the_query_projection_and_the_attention():
    attn = CrossAttention(16, 24, heads=2).eval()
    calls = []
    attn.to_q.register_forward_hook(lambda *_: calls.append("to_q"))
    with torch.no_grad():
        out = attn(torch.randn(2, 10, 16), torch.randn(2, 1, 24))
    assert out.shape == (2, 10, 16) and calls == []


def test_shared_context_matches_the_per_frame_context():
    attn = CrossAttention(16, 24, heads=2).eval()
    for tokens in (1, 5):
        prompts = torch.randn(2, tokens, 24)
        context = prompts.repeat_interleave(3, dim=0)  # 2 prompts, 3 frames each
        shared = SharedContext.of(context)
        assert isinstance(shared, SharedContext) and shared.values.shape[0] == 2
        assert SharedContext.of(shared) is shared  # already shared: kept as it is (no comparison)
        x = torch.randn(6, 10, 16)
        with torch.no_grad():
            assert torch.allclose(attn(x, shared), _full(attn, x, context), atol=1e-6)


def test_prompts_sharing_their_first_token_stay_two_prompts():
    """Every prompt starts with the same start-of-text row: only a whole equal entry is a repeat."""
    attn = CrossAttention(16, 24, heads=2).eval()
    prompts = torch.randn(2, 5, 24)
    prompts[1, 0] = prompts[0, 0]
    context = prompts.repeat_interleave(3, dim=0)
    shared = SharedContext.of(context)
    assert shared.values.shape[0] == 2 and shared.index.tolist() == [0, 0, 0, 1, 1, 1]
    x = torch.randn(6, 10, 16)
    with torch.no_grad():
        assert torch.allclose(attn(x, shared), _full(attn, x, context), atol=1e-6)


def test_v1_cross_frame_group_norm_pools_the_frames_of_each_video():
    norm = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2 * 2, 64, 4, 4) * torch.arange(1.0, 5.0)[:, None, None, None]  # 2 videos of 2 frames
    with torch.no_grad():
        got = group_norm(norm, x, RunOptions(num_frames=2, cross_frame_norm=True))
        v = rearrange(x, "(b f) (g c) h w -> b g (f c h w)", f=2, g=32)  # by hand: over b c f h w, per group
        v = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + norm.eps)
        want = rearrange(v, "b g (f c h w) -> (b f) (g c) h w", f=2, h=4, w=4)
        want = want * norm.weight[:, None, None] + norm.bias[:, None, None]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, norm(x), atol=1e-3)  # not the per-frame norm
        assert torch.equal(group_norm(norm, x, RunOptions(num_frames=2)), norm(x))


def test_image_attention_with_extra_tokens_is_not_shortcut():
    attn = CrossAttention(16, 24, heads=2).eval()
    x, context = torch.randn(2, 10, 16), torch.randn(2, 1, 24)
    k, v = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        q = attn.to_q(x)
        expected = attn.to_out(attention(q, attn.to_k(context), attn.to_v(context), 2)
                               + 0.5 * attention(q, k, v, 2))
        assert torch.allclose(attn(x, context, extra=((k, v, 0.5),)), expected, atol=1e-6)


def test_svd_temporal_cross_attention_to_one_token_matches_full_attention():
    block = VideoTransformerBlock(16, heads=2, context_dim=24, ff_in=True).eval()
    videos, pixels, frames = 2, 5, 3
    x = torch.randn(videos * pixels, frames, 16)  # rows: the pixels of each video
    context = torch.randn(videos, 1, 24)
    row_context = context.repeat_interleave(pixels, dim=0)
    with torch.no_grad():
        out = block._attend_context(x, context, 0, pixels)
        assert torch.allclose(out, _full(block.attn2, x, row_context), atol=1e-6)
        # rows from the middle (attention chunks): the video of each row is kept
        part = block._attend_context(x[3:8], context, 3, pixels)
        assert torch.allclose(part, out[3:8], atol=1e-6)


def _conv3d_twin(conv: FrameConv) -> torch.nn.Conv3d:
    twin = torch.nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                           groups=conv.groups)
    twin.load_state_dict(conv.state_dict())
    return twin


@pytest.mark.parametrize("layout", ["contiguous", "frames of a channels_last batch"])
def test_frame_conv_is_the_conv3d_across_frames(layout):
    torch.manual_seed(0)
    conv = FrameConv(32, 48, (3, 1, 1), padding=(1, 0, 0))
    frames = torch.randn(2 * 5, 32, 6, 7)
    if layout != "contiguous":
        frames = frames.contiguous(memory_format=torch.channels_last)  # the CPU VAE's layout
    x = rearrange(frames, "(b f) c h w -> b c f h w", f=5)
    with torch.no_grad():
        out = conv(x)
        torch.testing.assert_close(out, _conv3d_twin(conv)(x), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 48, 5, 6, 7)
    assert list(conv.state_dict()) == ["weight", "bias"]  # the checkpoint names of a Conv3d
    assert conv.weight.shape == (48, 32, 3, 1, 1)


@pytest.mark.parametrize("devices,conv3d_calls", [(frozenset({"cpu"}), 0), (frozenset(), 1)],
                         ids=["2d form on the cpu", "conv3d where the device is not listed"])
def test_frame_conv_form_follows_the_device_set(monkeypatch, devices, conv3d_calls):
    """``FRAME_CONV_2D_DEVICES`` decides the form (``bench/probe_vae_memory.py`` measures both on CUDA)."""
    torch.manual_seed(0)
    conv = FrameConv(8, 8, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(1, 8, 5, 4, 6)
    monkeypatch.setattr(layers, "FRAME_CONV_2D_DEVICES", devices)
    calls, real = [], torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = conv(x)
    assert len(calls) == conv3d_calls
    torch.testing.assert_close(out, _conv3d_twin(conv)(x), rtol=1e-5, atol=1e-5)


def test_frame_conv_avoids_the_slow_reference_kernel():
    """PyTorch runs this Conv3d (a 2-frame chunk of the tiny temporal decoder) with its slow reference kernel on
    the CPU; the frame conv runs a oneDNN 2D convolution."""
    conv = FrameConv(32, 32, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(1, 32, 2, 64, 64)
    with torch.no_grad():
        def kernels(module):
            with torch.profiler.profile() as prof:
                module(x)
            return {e.key for e in prof.key_averages()}
        assert "aten::slow_conv3d_forward" in kernels(_conv3d_twin(conv))  # the case exists in this torch
        assert "aten::slow_conv3d_forward" not in kernels(conv)


@pytest.mark.parametrize("kernel,padding,groups", [((3, 3, 3), (1, 1, 1), 1), ((3, 1, 1), (1, 0, 0), 2)],
                         ids=["3x3x3", "across frames in 2 groups"])
def test_frame_conv_with_another_kernel_is_a_conv3d(kernel, padding, groups):
    torch.manual_seed(0)
    conv = FrameConv(8, 8, kernel, padding=padding, groups=groups)
    x = torch.randn(1, 8, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _conv3d_twin(conv)(x))


def test_flatten_hw_keeps_a_channels_last_video_channels_last():
    frames = torch.randn(6, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    for videos in (1, 2):
        video = rearrange(frames, "(b f) c h w -> b c f h w", f=6 // videos)
        flat = flatten_hw(video)
        assert flat.is_contiguous(memory_format=torch.channels_last)
        assert flat.data_ptr() == frames.data_ptr()  # a view
        torch.testing.assert_close(flat, video.reshape(videos, 8, 6 // videos, 15), rtol=0, atol=0)
        normed = torch.nn.functional.group_norm(flat, 4)
        assert normed.is_contiguous(memory_format=torch.channels_last)  # PyTorch keeps the layout


# -- slices: whole-video intermediates bounded, the same result ---------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_frame_slices_is_the_whole_call(monkeypatch, layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(7, 4, 5, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    seen = []

    def fn(t):
        seen.append(t.shape[0])
        return conv(torch.nn.functional.interpolate(t, scale_factor=2.0))

    with torch.no_grad():
        whole = fn(x)
        monkeypatch.setattr(layers, "SLICE_POSITIONS", 3 * 5 * 6 * 4)  # 3 frames a slice, after a 4x upsampling
        seen.clear()
        sliced = per_frame_slices(fn, x, grow=4)
    assert seen == [3, 3, 1]
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)
    assert sliced.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    monkeypatch.setattr(layers, "SLICE_POSITIONS", 1)  # at least one frame a slice
    seen.clear()
    with torch.no_grad():
        per_frame_slices(fn, x)
    assert seen == [1] * 7
    assert per_frame_slices(lambda t: t.double(), x).dtype == torch.float64  # the slices' dtype, not the input's


@pytest.mark.parametrize("form", ["2d", "conv3d"])
@pytest.mark.parametrize("layout", ["contiguous", "frames of a channels_last batch"])
def test_frame_conv_of_a_large_video_runs_a_band_of_rows_at_a_time(monkeypatch, layout, form):
    """The bands in either form of the convolution (the CPU's 2D form, or Conv3d as on CUDA by default)."""
    torch.manual_seed(0)
    if form == "conv3d":
        monkeypatch.setattr(layers, "FRAME_CONV_2D_DEVICES", frozenset())
    conv = FrameConv(8, 8, (3, 1, 1), padding=(1, 0, 0))
    frames = torch.randn(5, 8, 7, 6)
    if layout != "contiguous":
        frames = frames.contiguous(memory_format=torch.channels_last)
    x = rearrange(frames, "(b f) c h w -> b c f h w", f=5)
    bands = []
    with torch.no_grad():
        whole = conv(x)
        monkeypatch.setattr(layers, "SLICE_POSITIONS", 5 * 2 * 6)  # two rows of every frame a band
        original = FrameConv._conv  # each band is one _conv call
        monkeypatch.setattr(FrameConv, "_conv", lambda self, t: bands.append(t.shape[3]) or original(self, t))
        conv(x)
        assert bands == [7]  # the CPU convolves it whole (UNBANDED_DEVICES)
        bands.clear()
        monkeypatch.setattr(layers, "UNBANDED_DEVICES", frozenset())  # as on a GPU
        banded = conv(x)
    assert bands == [2, 2, 2, 1]
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)  # the same sums (oneDNN may block them apart)
    torch.testing.assert_close(banded, _conv3d_twin(conv)(x), rtol=1e-5, atol=1e-5)
    # the output keeps the input's layout: the temporal decoder's (b c f h w -> (b f) c h w) stays a view
    assert banded.stride() == x.stride()


def _query_sizes(monkeypatch) -> list:
    """The number of queries of every SDPA call from here on (the real SDPA still computes)."""
    sizes, real = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: sizes.append(q.shape[2]) or real(q, *args, **kwargs))
    return sizes


def test_query_chunks_are_of_the_given_size_and_the_last_partial_chunk_is_attended(monkeypatch):
    q, k, v = torch.randn(2, 11, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    whole = attention(q, k, v, 2)
    sizes = _query_sizes(monkeypatch)
    for chunk, want in ((4, [4, 4, 3]), (6, [6, 5]), (10, [10, 1]), (11, [11]), (12, [11])):
        sizes.clear()
        torch.testing.assert_close(attention(q, k, v, 2, chunk=chunk), whole, rtol=0, atol=1e-6)
        assert sizes == want, chunk


def test_the_attention_chunk_reaches_every_attention_of_every_transformer_block(monkeypatch):
    """Self-attention, cross-attention and its extra (IP-Adapter) keys/values, in each block, in query chunks."""
    torch.manual_seed(0)
    block = layers.SpatialTransformer(32, heads=2, depth=2, context_dim=24, linear_proj=False).eval()
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 24)  # 16 queries a frame
    k, v = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        whole = block(x, context, RunOptions(), lambda j: ((k, v, 0.5),))
        sizes = _query_sizes(monkeypatch)
        chunked = block(x, context, RunOptions(attn_chunk=5), lambda j: ((k, v, 0.5),))
    assert sizes == [5, 5, 5, 1] * 6  # three attentions in each of the two blocks
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_the_timestep_embedding_is_ldms_cos_half_then_sin_half():
    """LDM's ``timestep_embedding``: frequencies ``10000 ** (-i / half)``, the cosines first, then the sines."""
    emb = layers.timestep_embedding(torch.tensor([0.0, 1.0, 100.0]), 4)
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                         [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)],
                         [math.cos(100.0), math.cos(1.0), math.sin(100.0), math.sin(1.0)]])
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-5)


def test_the_feed_forward_runs_in_slices_of_tokens_past_its_byte_budget(monkeypatch):
    """A feed-forward whose widest intermediate (the GEGLU projection, 2 x 4 x dim) would exceed
    ``FF_SLICE_BYTES`` runs on slices of that many tokens: one token over the budget makes two slices; each
    token's result is the plain ``net``'s."""
    ff = layers.FeedForward(4).eval()  # the projection: 32 floats a token
    monkeypatch.setattr(layers, "FF_SLICE_BYTES", 3 * 32 * 4)  # 3 tokens at once
    rows = []
    ff.net[0].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    x = torch.randn(2, 2, 4)  # 4 tokens
    with torch.no_grad():
        out = ff(x)
        whole = torch.cat([ff.net(t) for t in x.reshape(4, 1, 4)]).view(2, 2, 4)
    assert rows[:2] == [3, 1]
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    rows.clear()
    with torch.no_grad():
        ff(torch.randn(3, 4))  # 3 tokens: within the budget, one piece
    assert rows == [3]


def test_an_odd_timestep_embedding_width_is_padded_with_a_zero_column():
    """As LDM's and diffusers' ``timestep_embedding``: the cos/sin halves of the even width below, then zeros."""
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    odd = layers.timestep_embedding(t, 7)
    assert odd.shape == (4, 7)
    torch.testing.assert_close(odd[:, :6], layers.timestep_embedding(t, 6), rtol=0, atol=0)
    assert torch.equal(odd[:, 6], torch.zeros(4))


@pytest.mark.parametrize("kernel,options", [
    ((3, 3, 3), {"padding": (1, 0, 0)}), ((3, 1, 1), {"padding": (1, 1, 1)}),
    ((3, 1, 1), {"padding": (1, 0, 0), "stride": (1, 2, 2)}),
    ((3, 1, 1), {"padding": (2, 0, 0), "dilation": (2, 1, 1)}),
    ((3, 1, 1), {"padding": (1, 0, 0), "padding_mode": "replicate"}), ((5, 1, 1), {"padding": (2, 0, 0)}),
    ((3, 1, 1), {}), ((3, 1, 1), {"padding": (2, 0, 0)}),
], ids=["3x3x3 unpadded in space", "padded in space", "strided in space", "dilated", "replicate padding",
        "(5, 1, 1)", "fewer frames out", "more frames out"])
def test_frame_conv_across_frames_with_other_options_is_a_conv3d(kernel, options):
    """Only a plain (k, 1, 1) kernel takes the 2D form (with its own padding across frames): other shapes, padding,
    strides, dilation and padding modes are the Conv3d's own."""
    torch.manual_seed(0)
    conv = FrameConv(8, 8, kernel, **options)
    twin = torch.nn.Conv3d(8, 8, kernel, **options)
    twin.load_state_dict(conv.state_dict())
    x = torch.randn(1, 8, 5, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), twin(x))


@pytest.mark.parametrize("pad", [1, 0, 2], ids=["as many frames", "fewer frames", "more frames"])
def test_frame_conv_bands_of_two_videos_into_more_channels(monkeypatch, pad):
    """A band's rows count the positions of every video, and an output of other channels (and frames, with other
    padding than SVD's) than the input is made for the bands."""
    torch.manual_seed(0)
    conv = FrameConv(8, 12, (3, 1, 1), padding=(pad, 0, 0))
    twin = torch.nn.Conv3d(8, 12, (3, 1, 1), padding=(pad, 0, 0))
    twin.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 5, 7, 6)
    bands = []
    with torch.no_grad():
        whole = twin(x)
        monkeypatch.setattr(layers, "SLICE_POSITIONS", 2 * 5 * 2 * 6)  # two rows of every frame of both videos
        monkeypatch.setattr(layers, "UNBANDED_DEVICES", frozenset())  # as on a GPU
        original = FrameConv._conv
        monkeypatch.setattr(FrameConv, "_conv", lambda self, t: bands.append(t.shape[3]) or original(self, t))
        banded = conv(x)
    assert bands == [2, 2, 2, 1]
    torch.testing.assert_close(banded, whole, rtol=0, atol=1e-6)


def test_query_chunks_hold_one_chunk_beside_the_output():
    """Chunks are written into the output as they come: at the peak the output and one chunk's attention, not the
    list of chunks and their concatenation (which held three outputs' worth); the result is the unchunked one."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import estimate_vram as ev

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 64, generator=g) for _ in range(3))
    peaks, outs = {}, {}
    for chunk in (0, 128):
        with ev.LiveBytes(device="cpu") as live:
            outs[chunk] = layers.attention(q, k, v, 4, chunk)
        peaks[chunk] = live.peak
    output = q.numel() * 4
    # the output and one chunk (an eighth) with its log-sum-exp; the old list and concatenation held two outputs
    assert peaks[128] <= min(peaks[0], output) + output / 4
    torch.testing.assert_close(outs[128], outs[0], rtol=1e-5, atol=1e-6)


def test_fused_attention_says_where_query_chunks_save_nothing(monkeypatch):
    """The CPU's flash kernel and CUDA's flash / memory-efficient kernels never hold the score matrix; other
    devices, and CUDA with both kernels off, may."""
    assert layers.fused_attention("cpu") is hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    assert not layers.fused_attention("mps") and not layers.fused_attention(torch.device("meta"))
    for flash, efficient in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda flash=flash: flash)
        monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda efficient=efficient: efficient)
        assert layers.fused_attention("cuda:0") is (flash or efficient)
