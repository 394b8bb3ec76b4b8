"""The Stable Video Diffusion spatio-temporal UNet ("VideoUNet" of Stability-AI/generative-models, sgm).

Parameter names are the published checkpoint's ``model.diffusion_model.*`` keys
(prefix stripped), so a state dict loads without renaming:

- ``input_blocks`` / ``middle_block`` / ``output_blocks`` as in the LDM UNet, every
  ResBlock a ``VideoResBlock``: the spatial ResBlock (``in_layers``, ``emb_layers``,
  ``out_layers``, ``skip_connection``) followed by a ResBlock over time with
  3D kernels ``video_kernel_size`` (``time_stack.*``) and a learned blend of the
  two (``time_mixer.mix_factor``);
- every attention layer a ``SpatialVideoTransformer``: the linear-projection
  spatial transformer (``norm``, ``proj_in``, ``transformer_blocks``, ``proj_out``)
  with, after each spatial block, a temporal block (``time_stack.N``: ``norm_in``/
  ``ff_in``, ``attn1`` over frames, ``attn2`` to the first frame's context, ``ff``),
  a frame-position MLP (``time_pos_embed``) and a blend (``time_mixer.mix_factor``);
- ``time_embed`` (the sinusoidal embedding of the continuous noise level the EDM
  wrapper passes, ``c_noise = 0.25 ln sigma``) plus ``label_emb`` (the
  micro-conditioning vector ``y``, see ``micro_conditioning``).

The blend of spatial and temporal paths is ``alpha * spatial + (1 - alpha) * temporal``
with ``alpha = sigmoid(mix_factor)``, or 1 for frames that ``image_only_indicator``
marks as still images ("learned_with_images", the published strategy).

Not in the weights, so fixed by convention: the number of attention heads is
``max(1, channels // num_head_channels)`` with ``num_head_channels = 64`` (the published
config; the head width is 64 wherever channels allow it), and the merge strategy is
"learned_with_images".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .errors import KinemaError
from .layers import (
    CrossAttention,
    FeedForward,
    FrameConv,
    ResBlock,
    RunOptions,
    SpatialTransformer,
    Upsample,
    attention,
    by_rows,
    row_step,
    timestep_embedding,
)
from .offload import BlockStreamer, call_directly, stream_blocks
from .unet import ldm_blocks, scan_input_blocks, transformer_depth

_PER_FRAME = RunOptions()  # the spatial ResBlocks of SVD always normalize each frame on its own


#: the width of each of SVD's three micro-conditioning embeddings, and of the vector ``y`` they make
SVD_ADM_EACH = 256
SVD_ADM_CHANNELS = 3 * SVD_ADM_EACH


@dataclass(frozen=True)
class SVDUNetConfig:
    """The VideoUNet hyper-parameters (defaults: the published SVD / SVD-XT config).

    attention_levels: levels (0 = full resolution) with a transformer after each ResBlock
        (sgm's ``attention_resolutions`` [4, 2, 1] are the downsampling factors of levels 2, 1, 0).
    num_head_channels: width of one attention head; heads = max(1, channels // num_head_channels).
    adm_in_channels: width of the micro-conditioning vector ``y`` (3 x 256 in SVD).
    video_kernel_size: the (frames, height, width) kernel of the temporal ResBlocks' convolutions.
    extra_ff_mix_layer: temporal blocks start with a feed-forward (``norm_in``, ``ff_in``).
    use_spatial_context: the temporal cross-attention attends to the first frame's ``context``
        (else it attends to its own input, as sgm does without a ``time_context``).
    """

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    adm_in_channels: int = SVD_ADM_CHANNELS
    video_kernel_size: tuple = (3, 1, 1)
    extra_ff_mix_layer: bool = True
    use_spatial_context: bool = True
    use_linear_in_transformer: bool = True
    max_time_embed_period: int = 10000

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer over ``channels`` (sgm: channels // num_head_channels, at least 1)."""
        if channels > self.num_head_channels and channels % self.num_head_channels:
            raise KinemaError(
                f"an SVD attention layer of {channels} channels does not split into heads of "
                f"{self.num_head_channels}: this UNet layout is not supported"
            )
        return max(1, channels // self.num_head_channels)


# -- blending ------------------------------------------------------------------------------------------------------

class AlphaBlender(nn.Module):
    """sgm's AlphaBlender with SVD's strategy, "learned_with_images": ``alpha * spatial + (1 - alpha) * temporal``
    with ``alpha = sigmoid(mix_factor)``, or 1 for the frames marked still images. (sgm's other strategies, a fixed
    or a learned factor without images, are in no published SVD file, and no key tells them apart.)"""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.full((1,), 0.5))

    def alpha(self, image_only_indicator: torch.Tensor | None, n: int) -> torch.Tensor:
        """image_only_indicator [b, f] (None: no still image) -> alpha [n = (b f)] (in the dtype of
        ``mix_factor``, as sgm)"""
        learned = torch.sigmoid(self.mix_factor).expand(n)
        if image_only_indicator is None:
            return learned
        ind = rearrange(image_only_indicator, "b f -> (b f)")
        return torch.where(ind.bool(), torch.ones_like(learned), learned)

    def spatial_only(self, image_only_indicator: torch.Tensor | None) -> bool:
        """True when every frame is a still image and the temporal path is blended out entirely (alpha = 1):
        computing it can be skipped without changing the result. No indicator (a video) is known without
        looking at the device (no synchronisation)."""
        return image_only_indicator is not None and bool(image_only_indicator.bool().all())

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor,
                image_only_indicator: torch.Tensor | None) -> torch.Tensor:
        """(b f) ..., (b f) ... (same shapes), indicator [b, f] or None -> (b f) ...

        In place: both inputs are overwritten (the callers pass intermediates of their own; at SVD-XT's size
        each is 280 MiB, and the blend runs after every ResBlock and transformer block). The same values as
        ``a * x_spatial + (1 - a) * x_temporal``."""
        a = self.alpha(image_only_indicator, x_spatial.shape[0])
        a = rearrange(a, "n -> n" + " 1" * (x_spatial.ndim - 1))
        return x_spatial.mul_(a.to(x_spatial.dtype)).add_(x_temporal.mul_((1.0 - a).to(x_spatial.dtype)))


# -- ResBlocks -----------------------------------------------------------------------------------------------------

class TemporalResBlock(nn.Module):
    """sgm ResBlock with ``dims=3``: convolutions over (frames, h, w) with ``kernel``, GroupNorm over all frames."""

    def __init__(self, channels: int, emb_channels: int, kernel: tuple):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), FrameConv(channels, channels, kernel, padding=pad)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(0.0), FrameConv(channels, channels, kernel, padding=pad)
        )
        self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """b c f h w, emb [(b f), e] -> b c f h w"""
        h = self.in_layers[2](F.silu(self.in_layers[0](x), inplace=True))
        h += rearrange(self.emb_layers(emb), "(b f) c -> b c f 1 1", f=num_frames).to(h.dtype)
        h = self.out_layers[3](F.silu(self.out_layers[0](h), inplace=True))
        h += self.skip_connection(x)  # in place on this block's own tensors: the same sums, fewer intermediates
        return h


class VideoResBlock(ResBlock):
    """The spatial LDM ResBlock, then a temporal ResBlock (``time_stack``), blended by ``time_mixer``."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, cfg: SVDUNetConfig):
        super().__init__(channels, emb_channels, out_channels)
        self.time_stack = TemporalResBlock(out_channels, emb_channels, tuple(cfg.video_kernel_size))
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int,
                image_only_indicator: torch.Tensor | None) -> torch.Tensor:
        """(b f) c h w, emb [(b f), e], indicator [b, f] or None -> (b f) c' h w"""
        x = super().forward(x, emb, _PER_FRAME)
        if self.time_mixer.spatial_only(image_only_indicator):
            return x
        video = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        temporal = rearrange(self.time_stack(video, emb, num_frames), "b c f h w -> (b f) c h w")
        return self.time_mixer(x, temporal, image_only_indicator)


# -- transformers --------------------------------------------------------------------------------------------------

class VideoTransformerBlock(nn.Module):
    """sgm's temporal block: attention over the frames of each pixel (``ff_in``, ``attn1``, ``attn2``, ``ff``)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, ff_in: bool):
        super().__init__()
        if ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim)
        else:
            self.norm_in = self.ff_in = None
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def _attend_context(self, x: torch.Tensor, context: torch.Tensor | None, first_row: int, n: int) -> torch.Tensor:
        """[r, f, c] (rows ``first_row`` .. of the (b n) rows), context [b, m, d] (one per video) or None (self)
        -> [r, f, c]"""
        attn = self.attn2
        if context is None:
            return attn(x)
        # the keys of one video's context serve every pixel of that video: project once, then pick per row
        video = torch.arange(first_row, first_row + x.shape[0], device=x.device) // n
        if context.shape[1] == 1:  # one token (SVD's image embedding): every frame gets its value
            return attn.one_key(context)[video].expand(-1, x.shape[1], -1)
        return attn.to_out(attention(attn.to_q(x), attn.to_k(context)[video], attn.to_v(context)[video],
                                     attn.heads))

    def _rows(self, x: torch.Tensor, context: torch.Tensor | None, first_row: int, n: int) -> torch.Tensor:
        """The block on rows [r, f, c] of pixels (each row one pixel's frames; rows are independent)."""
        if self.ff_in is not None:
            x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self._attend_context(self.norm2(x), context, first_row, n) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, num_frames: int, chunk: int = 0) -> torch.Tensor:
        """[(b f), n, c], context [b, m, d] or None -> [(b f), n, c]

        The pixel positions run in slices (``chunk`` of them at most, and within ``ROW_SLICE_BYTES``): every
        operation of the block is per pixel, so the result is the same, with the intermediates of one slice.
        """
        n = x.shape[1]
        x = rearrange(x, "(b f) n c -> (b n) f c", f=num_frames)
        x = by_rows(lambda part, first: self._rows(part, context, first, n), x, row_step(x, chunk))
        return rearrange(x, "(b n) f c -> (b f) n c", n=n)


class SpatialVideoTransformer(SpatialTransformer):
    """The spatial transformer with a temporal block after each spatial block, blended by ``time_mixer``."""

    def __init__(self, channels: int, cfg: SVDUNetConfig):
        heads = cfg.heads(channels)
        super().__init__(channels, heads, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer)
        time_context_dim = cfg.context_dim if cfg.use_spatial_context else None
        self.time_stack = nn.ModuleList(
            [VideoTransformerBlock(channels, heads, time_context_dim, cfg.extra_ff_mix_layer)
             for _ in range(cfg.transformer_depth)]
        )
        self.time_pos_embed = nn.Sequential(
            nn.Linear(channels, channels * 4), nn.SiLU(), nn.Linear(channels * 4, channels)
        )
        self.time_mixer = AlphaBlender()
        self.use_spatial_context = cfg.use_spatial_context
        self.max_time_embed_period = cfg.max_time_embed_period

    def frame_positions(self, num_frames: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """-> [f, c]: the learned embedding of the frame indices 0 .. f-1"""
        idx = torch.arange(num_frames, device=device)
        t = timestep_embedding(idx, self.in_channels, self.max_time_embed_period).to(dtype)
        return self.time_pos_embed(t)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int,
                image_only_indicator: torch.Tensor | None, opts: RunOptions = RunOptions()) -> torch.Tensor:
        """(b f) c h w, context [(b f), m, d], indicator [b, f] or None -> (b f) c h w"""
        y = self.tokens_in(x)
        # the temporal cross-attention sees the first frame's context of each video
        time_context = context[::num_frames] if self.use_spatial_context else None
        pos = repeat(self.frame_positions(num_frames, y.dtype, y.device), "f c -> (b f) 1 c",
                     b=y.shape[0] // num_frames)
        spatial_only = self.time_mixer.spatial_only(image_only_indicator)
        for block, time_block in zip(self.transformer_blocks, self.time_stack):
            y = block(y, context, opts.attn_chunk)
            if spatial_only:
                continue
            mix = y + pos
            mix = time_block(mix, time_context, num_frames, opts.attn_chunk)
            y = self.time_mixer(y, mix, image_only_indicator)
        return self.tokens_out(x, y)

    @property
    def in_channels(self) -> int:
        return self.norm.num_channels


# -- the UNet ------------------------------------------------------------------------------------------------------

class SVDUNet(nn.Module):
    """SVD VideoUNet; keys as in ``model.diffusion_model.*`` of the published checkpoints.

    ``forward`` takes everything per frame (frames folded into the batch, ``num_frames`` explicit; of
    ``opts`` only ``attn_chunk`` applies: the spatial GroupNorms are per frame and the temporal
    ResBlocks' across the frames of a video, as in sgm). ``image_only_indicator`` [b, f] (1 = a still
    image: its temporal paths are blended out); None (the default) is all zeros, a video, decided without a
    look at the device.
    """

    def __init__(self, cfg: SVDUNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        )

        def res(ch_in: int, ch_out: int) -> VideoResBlock:
            return VideoResBlock(ch_in, emb, ch_out, cfg)

        self.input_blocks, self.middle_block, self.output_blocks, ch = ldm_blocks(
            cfg, res, lambda ch: SpatialVideoTransformer(ch, cfg))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def _run_block(self, block, held, emb, context, num_frames, indicator, opts, up_size=None):
        """The layers of ``block`` on the input in ``held``, a list the caller hands the input over in (emptied
        here, so the input is freed once the first layer is done with it; see ``UNetModel._run_block``)."""
        h = held.pop()
        for layer in block:
            if isinstance(layer, VideoResBlock):
                h = layer(h, emb, num_frames, indicator)
            elif isinstance(layer, SpatialVideoTransformer):
                h = layer(h, context, num_frames, indicator, opts)
            elif isinstance(layer, Upsample):
                h = layer(h, up_size)
            else:
                h = layer(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        num_frames: int,
        opts: RunOptions = RunOptions(),
        image_only_indicator: torch.Tensor | None = None,
        stream: BlockStreamer | None = None,
        call_block: Callable = call_directly,
    ) -> torch.Tensor:
        """(b f) c h w, timesteps [(b f)], context [(b f), n, d], y [(b f), adm] -> (b f) c_out h w

        ``stream``: block offload, each block made resident on the compute device just before it runs;
        ``call_block(fn, *args)``: how each block's function is called (a compiled call, one graph per block).
        """
        if num_frames < 1 or x.shape[0] % num_frames:
            raise KinemaError(f"the SVD UNet got {x.shape[0]} frames in its batch, not a multiple of "
                              f"num_frames={num_frames}")
        for name, t in (("timesteps", timesteps), ("context", context), ("y", y)):
            if t.shape[0] != x.shape[0]:
                raise KinemaError(f"the SVD UNet needs one {name} entry per frame: got {t.shape[0]} for "
                                  f"{x.shape[0]} frames")
        if stream is not None:
            stream.use(nn.ModuleList([self.time_embed, self.label_emb]))
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)
        hs = []
        h = x
        for block in stream_blocks(stream, self.input_blocks, "input"):
            h = call_block(self._run_block, block, [h], emb, context, num_frames, image_only_indicator, opts)
            hs.append(h)
        for block in stream_blocks(stream, [self.middle_block], "middle"):
            h = call_block(self._run_block, block, [h], emb, context, num_frames, image_only_indicator, opts)
        for block in stream_blocks(stream, self.output_blocks, "output"):
            held = [torch.cat([h, hs.pop()], dim=1)]
            del h  # the block's input lives in ``held`` only (see _run_block)
            up_size = hs[-1].shape[-2:] if hs else None
            h = call_block(self._run_block, block, held, emb, context, num_frames, image_only_indicator, opts,
                           up_size)
        if stream is not None:
            stream.use(self.out)
        return self.out(h)


# -- conditioning --------------------------------------------------------------------------------------------------

def micro_conditioning(fps_id: float, motion_bucket_id: float, cond_aug: float, frames: int,
                       dim_each: int = SVD_ADM_EACH) -> torch.Tensor:
    """SVD's ``y`` vector, as sgm's ConcatTimestepEmbedderND builds it: -> [frames, 3 * dim_each].

    Each scalar goes through the sinusoidal embedding (cos half first) on its own; the three are
    concatenated in the conditioner's order fps_id, motion_bucket_id, cond_aug (``fps_id = fps - 1``).
    """
    values = torch.tensor([float(fps_id), float(motion_bucket_id), float(cond_aug)], dtype=torch.float32)
    emb = rearrange(timestep_embedding(values, dim_each), "k d -> (k d)")
    return repeat(emb, "e -> f e", f=frames).contiguous()


# -- config inference ----------------------------------------------------------------------------------------------

def infer_svd_unet_config(sd: dict, prefix: str = "") -> SVDUNetConfig:
    """Read an SVDUNetConfig off the tensor shapes of an SVD VideoUNet state dict (keys after ``prefix``).

    The number of heads is not in the weights: ``num_head_channels`` is the published 64 (and the blend the
    published "learned_with_images", see ``AlphaBlender``).
    """

    def get(key):
        return sd.get(prefix + key)

    conv_in = get("input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise KinemaError(f"no SVD UNet found: the key '{prefix}input_blocks.0.0.weight' is missing")
    if get("input_blocks.1.0.time_stack.in_layers.2.weight") is None:
        raise KinemaError(
            f"not an SVD UNet: '{prefix}input_blocks.1.0.time_stack.*' (the temporal ResBlock) is missing; "
            "this looks like an image UNet"
        )
    label = get("label_emb.0.0.weight")
    if label is None:
        raise KinemaError(f"not an SVD UNet: '{prefix}label_emb.0.0.weight' (the micro-conditioning embedding) "
                          "is missing")
    mc, in_ch = conv_in.shape[0], conv_in.shape[1]
    chans, blocks_in_level, attention = scan_input_blocks(get)
    attn_levels, depths = set(), set()
    context_dim = linear = ff_in = spatial_context = None
    for level, attn in attention:
        attn_levels.add(level)
        linear = get(attn + "proj_in.weight").ndim == 2
        depths.add(transformer_depth(get, attn))
        context_dim = get(attn + "transformer_blocks.0.attn2.to_k.weight").shape[1]
        ff_in = get(attn + "time_stack.0.ff_in.net.0.proj.weight") is not None
        time_k = get(attn + "time_stack.0.attn2.to_k.weight")
        if time_k is None:
            raise KinemaError(f"'{attn}time_stack.0.attn2' is missing: SVD UNets without temporal "
                              "cross-attention are not supported")
        spatial_context = time_k.shape[1] == context_dim
    if len(set(blocks_in_level)) != 1 or not chans:
        raise KinemaError("the SVD UNet's block layout is not supported (uneven levels)")
    if context_dim is None:
        raise KinemaError("the SVD UNet has no attention layers: not an SVD UNet")
    if len(depths) != 1:
        raise KinemaError(f"SVD UNets with different transformer depths per level ({sorted(depths)}) are not supported")
    if any(c % mc for c in chans):
        raise KinemaError("the SVD UNet's channel widths are not multiples of its base width")
    kernel = get("input_blocks.1.0.time_stack.in_layers.2.weight").shape[2:]
    return SVDUNetConfig(
        in_channels=in_ch,
        out_channels=get("out.2.weight").shape[0],
        model_channels=mc,
        channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=blocks_in_level[0],
        attention_levels=tuple(sorted(attn_levels)),
        num_head_channels=64,
        transformer_depth=depths.pop(),
        context_dim=context_dim,
        adm_in_channels=label.shape[1],
        video_kernel_size=tuple(int(k) for k in kernel),
        extra_ff_mix_layer=ff_in,
        use_spatial_context=spatial_context,
        use_linear_in_transformer=linear,
    )
