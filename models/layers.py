"""Building blocks shared by the UNets: attention, ResBlock, spatial transformer.

Names of parameters follow the original LDM checkpoints so a state dict loads
without renaming. Every tensor reshape is an einops pattern.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


#: The feed-forward's widest intermediate (its GEGLU projection) is made for at most this many bytes at once: longer
#: inputs run in slices of tokens (each token's feed-forward is its own, so the result is the same). At the
#: published sizes this bounds what would be the largest activation of a video UNet call (AnimateDiff 16x512²:
#: 640 MiB; SVD-XT 25x1024x576: 2.2 GiB); the small inputs of the tests and CPU benchmarks run in one piece.
FF_SLICE_BYTES = 128 << 20
#: A temporal block (attention over the frames of each pixel: AnimateDiff's motion modules, SVD's time_stack) runs
#: on slices of pixel positions whose [rows, f, c] activations stay within this many bytes: rows are independent,
#: so the result is the same, and the block's dozen intermediates are those of one slice.
ROW_SLICE_BYTES = 16 << 20


def row_step(x: torch.Tensor, chunk: int = 0) -> int:
    """Rows of ``x`` [r, ...] per slice: as many as fit ``ROW_SLICE_BYTES`` (at least 1), at most ``chunk`` if
    set."""
    step = max(1, ROW_SLICE_BYTES // max(1, x[0].numel() * x.element_size()))
    return min(step, chunk) if chunk else step


def by_rows(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, step: int) -> torch.Tensor:
    """``fn(rows, first_row)`` on slices of ``step`` rows of ``x`` [r, ...], gathered into one output [r, ...]
    (``fn`` maps each row on its own)."""
    if x.shape[0] <= step:
        return fn(x, 0)
    out = None
    for i in range(0, x.shape[0], step):
        part = fn(x[i:i + step], i)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[i:i + step] = part
    return out

#: Extra keys/values a cross-attention attends to: ``(k [b, m, c], v [b, m, c], scale)`` each, scale a float or a
#: tensor broadcasting to ``[b, n, c]``.
ExtraKV = Sequence[tuple]


@dataclass(frozen=True)
class RunOptions:
    """Per-call switches of the networks (never stored on the modules).

    num_frames: frames of one video in the folded batch ``(b f)``.
    cross_frame_norm: AnimateDiff v1's UNet GroupNorm statistics over all
        frames of a video instead of per frame.
    attn_chunk: split attention queries into chunks of this many (0 = no split).
    """

    num_frames: int = 1
    cross_frame_norm: bool = False
    attn_chunk: int = 0


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, opts: RunOptions | None = None) -> torch.Tensor:
    """GroupNorm over ``(b f) c h w``, per frame or, for v1, across frames."""
    if opts is not None and opts.cross_frame_norm and opts.num_frames > 1:
        v = rearrange(x, "(b f) c h w -> b c f h w", f=opts.num_frames)
        v = F.group_norm(v, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return rearrange(v, "b c f h w -> (b f) c h w")
    return norm(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunk: int = 0) -> torch.Tensor:
    """Multi-head attention: [b, n, c] x [b, m, c] -> [b, n, c] (SDPA, optional query chunks).

    Query chunks are written into the output as they come (no list of chunks, no concatenated copy): beside it
    one chunk's attention is alive at a time, which bounds memory where SDPA holds the whole [n, m] score matrix
    (``fused_attention``: not on CUDA or the CPU)."""
    b, n, c = q.shape
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if chunk and n > chunk:
        out = q.new_empty(b, n, heads, c // heads)
        for i in range(0, n, chunk):
            out[:, i:i + chunk] = rearrange(F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v),
                                            "b h n d -> b n h d")
        return rearrange(out, "b n h d -> b n (h d)")
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


def fused_attention(device: torch.device | str) -> bool:
    """Whether PyTorch's attention (SDPA) on ``device`` runs a kernel that never holds the whole [n, m] score
    matrix: CUDA's flash or memory-efficient kernels where enabled, the CPU's flash kernel (PyTorch 2.2 and
    later). There query chunks save no memory (an H200 measured the same peaks with and without them): the
    out-of-memory retry and its advice leave them out. Elsewhere (e.g. Apple MPS) a chunk bounds the matrix."""
    kind = torch.device(device).type
    if kind == "cpu":
        return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    if kind == "cuda":
        return torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
    return False


@dataclass(frozen=True)
class SharedContext:
    """A cross-attention context ``[(b f), m, d]`` whose consecutive frames repeat (one prompt for many frames):
    kept once per run of equal entries (``values`` [u, m, d]) with each frame's entry in ``index`` [(b f)], so the
    keys and values are projected once per distinct prompt instead of once per frame. ``index`` None: every frame
    its own entry, checked (``checked``)."""

    values: torch.Tensor
    index: torch.Tensor | None

    @staticmethod
    def of(context: torch.Tensor | SharedContext) -> torch.Tensor | SharedContext:
        """``context`` [(b f), m, d] as a SharedContext when neighbouring entries repeat, else unchanged (a
        SharedContext is returned as it is: a caller that knows the runs can build one without comparing)."""
        if isinstance(context, SharedContext) or context.shape[0] < 2:
            return context
        same = (context[1:] == context[:-1]).flatten(1).all(dim=1)
        if not bool(same.any()):
            return context
        starts = torch.cat([same.new_ones(1), ~same])
        return SharedContext(context[starts], starts.long().cumsum(0) - 1)

    @staticmethod
    def checked(context: torch.Tensor | SharedContext) -> SharedContext:
        """``of(context)``, always as a SharedContext (no repeats: ``index`` None), so that a compiled UNet, whose
        ``of`` then passes it on, has no data-dependent branch to break its graph at."""
        shared = SharedContext.of(context)
        return shared if isinstance(shared, SharedContext) else SharedContext(shared, None)

    def project(self, linear: nn.Module) -> torch.Tensor:
        """``linear`` of every frame's context: [(b f), m, c], computed once per distinct entry."""
        out = linear(self.values)
        return out if self.index is None else out[self.index]


class CrossAttention(nn.Module):
    """Self or cross attention with the LDM names ``to_q/to_k/to_v/to_out.0``."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, chunk: int = 0,
                extra: ExtraKV = ()) -> torch.Tensor:
        """[b, n, c], context [b, m, c'] -> [b, n, c]

        ``extra``: more ``(k, v, scale)`` the same queries attend to, each added as ``scale * attention(q, k, v)``
        before ``to_out`` (decoupled cross-attention, as IP-Adapter's image tokens); k, v are [b, m', c].
        A context of one token without ``extra`` takes ``one_key`` (a broadcast view [b, n, c]).
        """
        if not extra and context is not None and _keys(context) == 1:
            return self.one_key(context).expand(-1, x.shape[1], -1)
        q = self.to_q(x)
        if isinstance(context, SharedContext):
            k, v = context.project(self.to_k), context.project(self.to_v)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, chunk)
        for k, v, scale in extra:
            out = out + scale * attention(q, k.to(q.dtype), v.to(q.dtype), self.heads, chunk)
        return self.to_out(out)

    def one_key(self, context: torch.Tensor | SharedContext) -> torch.Tensor:
        """The attention output for a context of ONE token (SVD's image embedding): the softmax over one key is
        exactly 1, so every query gets that token's value: ``to_out(to_v(context))`` [b, 1, c], without the
        query projection and the attention over every query."""
        if isinstance(context, SharedContext):
            return context.project(lambda c: self.to_out(self.to_v(c)))
        return self.to_out(self.to_v(context))


def _keys(context: torch.Tensor | SharedContext) -> int:
    return (context.values if isinstance(context, SharedContext) else context).shape[1]


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[b, n, c] -> [b, n, dim_out]"""
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)  # in place on the fresh gelu output: one intermediate fewer


class FeedForward(nn.Module):
    """GEGLU feed-forward, names ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., c] -> [..., c], in slices of tokens when the projection would exceed ``FF_SLICE_BYTES``"""
        rows = x.shape[:-1].numel()
        step = max(1, FF_SLICE_BYTES // (self.net[0].proj.out_features * x.element_size()))
        if rows <= step:
            return self.net(x)
        out = by_rows(lambda part, _: self.net(part), x.reshape(rows, x.shape[-1]), step)
        return out.view(*x.shape[:-1], out.shape[-1])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, chunk: int = 0, extra: ExtraKV = ()) -> torch.Tensor:
        """[b, n, c], context [b, m, c'] -> [b, n, c] (``extra``: see ``CrossAttention``, for ``attn2``)"""
        # the self-attention and feed-forward outputs are made here: the residual adds go in place into them (the
        # same sums); the cross-attention's may be a broadcast view (one-token context), so that add makes a tensor
        y = self.attn1(self.norm1(x), chunk=chunk)
        y += x
        x = y + self.attn2(self.norm2(y), context, chunk=chunk, extra=extra)
        y = self.ff(self.norm3(x))
        y += x
        return y


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: GroupNorm, proj_in (conv 1x1 or linear), blocks, proj_out."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear_proj: bool):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = make()

    def forward(self, x: torch.Tensor, context: torch.Tensor, opts: RunOptions,
                extra: Callable[[int], ExtraKV] | None = None) -> torch.Tensor:
        """(b f) c h w, context [(b f), m, c'] -> (b f) c h w (``extra(j)``: block j's extra cross-attention)"""
        y = self.tokens_in(x)
        for j, block in enumerate(self.transformer_blocks):
            y = block(y, context, opts.attn_chunk, extra(j) if extra is not None else ())
        return self.tokens_out(x, y)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """(b f) c h w -> [(b f), (h w), c]: norm and ``proj_in`` (a 1x1 conv before, or a linear after, the fold)"""
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")
        return self.proj_in(y) if self.linear_proj else y

    def tokens_out(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """input x (b f) c h w, tokens [(b f), (h w), c] -> x + ``proj_out`` of the tokens, (b f) c h w"""
        if self.linear_proj:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=x.shape[-2], w=x.shape[-1])
        if not self.linear_proj:
            y = self.proj_out(y)
        return x + y


class ResBlock(nn.Module):
    """LDM ResBlock with timestep embedding (``in_layers``, ``emb_layers``, ``out_layers``)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, opts: RunOptions) -> torch.Tensor:
        """(b f) c h w, emb [(b f), e] -> (b f) c' h w"""
        # the activations and adds work in place on tensors made here (one full-size intermediate fewer each)
        h = F.silu(group_norm(self.in_layers[0], x, opts), inplace=True)
        h = self.in_layers[2](h)
        h += rearrange(self.emb_layers(emb), "b c -> b c 1 1").to(h.dtype)
        h = F.silu(group_norm(self.out_layers[0], h, opts), inplace=True)
        h = self.out_layers[3](h)
        h += self.skip_connection(x)
        return h


def flatten_hw(video: torch.Tensor) -> torch.Tensor:
    """b c f h w -> b c f (h w), a view where the strides allow. A channels_last_3d video (the CPU VAE's frames,
    channels_last, seen as a video) gives a channels_last tensor, which PyTorch's GroupNorm and convolutions keep;
    with one video the size-1 batch dimension is given the stride those kernels expect of that layout (a view's
    own is arbitrary there, and they would fall back to the default layout). Not while torch.compile traces: the
    strides it sees then are its own guesses where a dimension has size 1 (a 1x1 level of one video), and a stride
    read off them would be applied to a tensor laid out otherwise at run time."""
    flat = video.flatten(3)
    if torch.compiler.is_compiling():
        return flat
    if flat.shape[0] == 1 and not flat.is_contiguous() and flat.is_contiguous(memory_format=torch.channels_last):
        flat = flat.as_strided(flat.shape, (flat.numel(), *flat.stride()[1:]))
    return flat


#: Where a layer treats frames, or pixels, each on its own and would otherwise hold whole-video intermediates (SVD's
#: temporal decoder at full size: 14 frames of 1024x576), it runs on slices of at most this many positions (frames x
#: height x width) written into one output: the same result, one slice's intermediates (PyTorch's and cuDNN's).
SLICE_POSITIONS = 1 << 20
#: Devices where ``FrameConv`` convolves a large video whole: the CPU's 2D form makes no whole-size copies to bound,
#: and a band of rows of its channels_last video is not dense for oneDNN (bands made the SVD demo decoder's
#: 4-frame 1024x1024 decode 1.5x slower).
UNBANDED_DEVICES = frozenset({"cpu"})
#: Devices where ``FrameConv`` runs a kernel across frames only as a 2D convolution over ``b c f (h w)`` (elsewhere
#: as Conv3d). On CUDA which of the two holds less memory is measured by ``bench/probe_vae_memory.py``.
FRAME_CONV_2D_DEVICES = frozenset({"cpu"})


def per_frame_slices(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grow: int = 1) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` that treats each frame of ``x`` [(b f), c, h, w] on its own, on slices of frames of at
    most ``SLICE_POSITIONS`` positions (at least one frame), into one output in the first slice's memory layout.
    ``grow``: how many times more positions a frame has inside ``fn`` than in ``x`` (an upsampling: 4)."""
    n = max(1, SLICE_POSITIONS // max(1, x.shape[-2] * x.shape[-1] * grow))
    if n >= x.shape[0]:
        return fn(x)
    first = fn(x[:n])
    layout = torch.channels_last if first.ndim == 4 and not first.is_contiguous() \
        and first.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=layout)
    out[:n] = first
    del first
    for i in range(n, x.shape[0], n):
        out[i:i + n] = fn(x[i:i + n])
    return out


class FrameConv(nn.Conv3d):
    """A Conv3d over ``b c f h w`` (SVD's temporal convolutions; the parameters and names of ``nn.Conv3d``).

    On the CPU (``FRAME_CONV_2D_DEVICES``) a kernel ``(k, 1, 1)`` (SVD's: across frames only) runs as a 2D
    convolution with kernel ``(k, 1)`` over ``b c f (h w)``: the same sums. PyTorch sends such a Conv3d to its slow
    reference kernel at small sizes (e.g. the temporal decoder's 2-frame chunks: 0.65-0.78x the time of the whole
    decode in the 2D form) and its oneDNN 3D kernel is no faster than the 2D one elsewhere
    (``bench/bench_frame_conv.py``). Other kernels, and other devices (cuDNN has its own 3D kernels; which form
    holds less memory there is for ``bench/probe_vae_memory.py`` to measure), run as Conv3d.

    Such a kernel treats each pixel on its own: off the CPU (``UNBANDED_DEVICES``) a video of more than
    ``SLICE_POSITIONS`` positions is convolved a band of rows at a time into one output in the input's memory layout
    (the same sums; cuDNN's layout copies and the output's are a band's, and the temporal decoder's
    ``b c f h w -> (b f) c h w`` after it stays a view).
    """

    def _across_frames_only(self) -> bool:
        return self.weight.shape[-2:] == (1, 1) and self.stride == (1, 1, 1) and self.dilation == (1, 1, 1) \
            and self.groups == 1 and self.padding_mode == "zeros" and self.padding[1:] == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b c f h w -> b c' f' h w (f' = f with SVD's padding)"""
        if not self._across_frames_only():
            return super().forward(x)
        b, _, f, h, w = x.shape
        if b * f * h * w <= SLICE_POSITIONS or h < 2 or x.device.type in UNBANDED_DEVICES:
            return self._conv(x)
        rows = max(1, SLICE_POSITIONS // (b * f * w))
        shape = (b, self.out_channels, f + 2 * self.padding[0] - self.kernel_size[0] + 1, h, w)  # frames: padded
        out = torch.empty_like(x) if shape == x.shape else x.new_empty(shape)
        for r in range(0, h, rows):
            out[:, :, :, r:r + rows] = self._conv(x[:, :, :, r:r + rows])
        return out

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in FRAME_CONV_2D_DEVICES:
            return super().forward(x)
        y = F.conv2d(flatten_hw(x), self.weight.squeeze(-1), self.bias, padding=(self.padding[0], 0))
        return y.unflatten(-1, x.shape[-2:])  # b c' f' (h w) -> b c' f' h w


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b f) c h w -> (b f) c h/2 w/2"""
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(b f) c h w -> (b f) c 2h 2w (or the skip's size when given)"""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding as in LDM (cos first): [b] -> [b, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
