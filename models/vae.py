"""The VAEs: SD's AutoencoderKL and Stable Video Diffusion's temporal autoencoder, with frame-chunked encode/decode.

Frames are folded into the batch; ``decode_frames`` decodes a video latent
``[f, c, h, w]`` a chunk of frames at a time and returns a ComfyUI IMAGE
``[f, H, W, 3]`` in [0, 1].

**AutoencoderKL** (SD1.5, LDM names under ``first_stage_model.``): ``encoder``,
``decoder``, ``quant_conv``, ``post_quant_conv``.

**TemporalAutoencoder** (Stable Video Diffusion, sgm's ``AutoencodingEngine``
with the ``VideoDecoder`` of ``sgm/modules/autoencoding/temporal_ae.py``). What
the published ``svd.safetensors`` / ``svd_xt.safetensors`` hold:

- ``first_stage_model.encoder.*``: the plain LDM encoder (same names as SD's).
- ``first_stage_model.decoder.*``: the LDM decoder in which every ResBlock
  (``mid.block_1/2``, ``up.N.block.M``) is a VideoResBlock: the spatial block's
  own tensors plus ``time_stack.in_layers.{0,2}.*`` /
  ``time_stack.out_layers.{0,3}.*`` (GroupNorm + Conv3d with kernel (3, 1, 1))
  and ``mix_factor`` (shape [1]); ``conv_out`` keeps its 2D ``weight``/``bias``
  and adds ``conv_out.time_mix_conv.*`` (Conv3d 3 -> 3, kernel (3, 1, 1)). The
  mid attention stays spatial (``time_mode`` "conv-only", sgm's default, which
  the published config leaves unset; ``video_kernel_size: [3, 1, 1]``).
- NO ``first_stage_model.quant_conv`` / ``post_quant_conv``: the latent is the
  encoder's mean directly, and the decoder reads it directly.
- ``conditioner.embedders.3.encoder.*``: the conditioning-frame encoder
  (sgm ``AutoencoderKLModeOnly`` inside ``VideoPredictionEmbedderWithEncoder``),
  a plain LDM AutoencoderKL of its own: ``encoder.*`` (so
  ``conditioner.embedders.3.encoder.encoder.conv_in.weight``), ``quant_conv.*``
  (it HAS one), and a plain 2D ``decoder.*`` that SVD never runs (sgm's class
  also builds a ``post_quant_conv``; Kinema never reads it). img2vid encodes the
  conditioning frame with it: encoder -> quant_conv -> mean, unscaled. Load it
  with ``ImageEncoderKL`` (``infer_encoder_config(sd, SVD_COND_ENCODER_PREFIX)``).

The temporal decoder mixes the frames of one video: ``decode(latent,
num_frames)`` takes ``(b f) z h w``. Its time_stack GroupNorm pools statistics
over all frames of the video (and runs in float32, as sgm's GroupNorm32), and
its Conv3d kernels see neighbouring frames (zero-padded at the ends). Hence the
chunk size of ``decode_frames`` changes the output: each chunk is decoded as
one short video, which is what sgm does (``decoding_t`` frames a call in
``scripts/sampling/simple_video_sample.py``, default ``SVD_DECODE_CHUNK`` = 14).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .compiling import CompileOptions, run_decode
from .errors import KinemaError
from .layers import FrameConv, flatten_hw, per_frame_slices
from .memory import cast_weights, run_with_oom_retry
from .patching import shallow_copy
from .placement import on_device
from .tiling import TileOptions, run_tiled
from .video_io import check_finite

NO_TILES = TileOptions()
logger = logging.getLogger("kinema")

#: Frames a VAE call takes when no chunk is given and the frames are independent (the SD VAE; every encoder): at
#: most this many, and no more than fit in ``CHUNK_PIXELS`` pixels (``frames_per_call``).
DEFAULT_DECODE_CHUNK = 8
#: Pixels a default VAE call holds where frames are independent: 4 frames at 512x512. An SD VAE decode in fp16 peaks
#: at about 0.53 GiB a 512x512 frame on CUDA (8 frames: 4.4 GiB measured on an H200, ``bench/bench_gpu.py``), so 4
#: frames keep AnimateDiff's default policy under its sampling peak (3.5 GiB at 16 frames 512x512).
CHUNK_PIXELS = 4 * 512 * 512
#: Frames decoded a call by the SVD temporal decoder: ``decoding_t`` of sgm's simple_video_sample.py.
SVD_DECODE_CHUNK = 14
#: Where the published SVD files keep the video autoencoder and the conditioning-frame encoder.
SVD_VAE_PREFIX = "first_stage_model."
SVD_COND_ENCODER_PREFIX = "conditioner.embedders.3.encoder."


class VAEResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b c h w -> b c' h w"""
        # activations and the residual add in place on tensors made here: one full-size intermediate fewer each
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h


class VAEAttention(nn.Module):
    """Single-head spatial self-attention (``q``, ``k``, ``v``, ``proj_out`` as 1x1 convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b c h w -> b c h w"""
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(m(y), "b c h w -> b 1 (h w) c") for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks), an empty ``attn``, and ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], resample: str | None, conv: nn.Conv2d | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample:
            holder = nn.Module()
            holder.conv = conv
            setattr(self, resample, holder)


class _Mid(nn.Module):
    def __init__(self, ch: int, make_block: Callable[[int, int], nn.Module] = VAEResBlock):
        super().__init__()
        self.block_1 = make_block(ch, ch)
        self.attn_1 = VAEAttention(ch)
        self.block_2 = make_block(ch, ch)

    def forward(self, x):
        """b c h w -> b c h w"""
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ch = cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(VAEResBlock(ch, cfg.ch * mult))
                ch = cfg.ch * mult
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, None, None) if last
                             else _Level(blocks, "downsample", nn.Conv2d(ch, ch, 3, stride=2)))
        self.mid = _Mid(ch)
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b 3 H W -> b 2z h w (mean and log-variance)"""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, lambda cin, cout: self._make_block(cfg, cin, cout))
        ups = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(self._make_block(cfg, ch, cfg.ch * mult))
                ch = cfg.ch * mult
            ups.insert(0, _Level(blocks, "upsample", nn.Conv2d(ch, ch, 3, padding=1)) if i else _Level(blocks, None))
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = self._make_conv_out(cfg, ch, cfg.in_channels)

    def _make_block(self, cfg: VAEConfig, cin: int, cout: int) -> nn.Module:
        return VAEResBlock(cin, cout)

    def _make_conv_out(self, cfg: VAEConfig, cin: int, cout: int) -> nn.Module:
        return nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """b z h w -> b 3 H W in [-1, 1] (unclamped)"""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """SD VAE: ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """b 3 H W in [-1, 1] -> latent mean b z h w (unscaled, as ComfyUI's LATENT holds it)"""
        moments = self.quant_conv(self.encoder(pixels))
        return moments[:, : self.cfg.z_channels]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """unscaled latent b z h w -> b 3 H W in [-1, 1] (unclamped)"""
        return self.decoder(self.post_quant_conv(latent))


# -- Stable Video Diffusion: the temporal decoder (sgm VideoDecoder, time_mode "conv-only") ------------------------

@dataclass(frozen=True)
class TemporalVAEConfig(VAEConfig):
    """An SVD autoencoder: the VAEConfig fields, the Conv3d kernel of the temporal layers (frames, h, w), and
    whether the file has a ``quant_conv`` (the published ``first_stage_model`` has none)."""

    video_kernel_size: tuple = (3, 1, 1)
    quant_conv: bool = False


#: ``_group_norm_fp32`` makes its float32 copies for groups of channels of at most this many bytes at a time.
GN_FP32_SLICE_BYTES = 256 << 20
#: Devices whose own GroupNorm kernel normalises a half-precision input with float32 statistics and affine.
NATIVE_HALF_GROUP_NORM = frozenset({"cuda", "cpu"})


def _group_norm_fp32(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """sgm's GroupNorm32: statistics and affine in float32, result in the input dtype and memory layout (on the CPU
    the decoder's videos are channels_last_3d views of its channels_last frames: the convolutions after the norm
    run fastest in it, ``_layout``).

    Each group is normalised on its own, so a half-precision input is normalised a slice of groups at a time:
    float32 copies of the whole input (two of them, twice its size each: 8 GiB for SVD-XT's last decoder level
    at 14 frames 1024x576) would be the decoder's largest allocations.

    On CUDA the input dtype goes to PyTorch's own kernel, which already accumulates the statistics and computes the
    affine in float32 (it keeps the mean and 1/std in the input dtype between its two passes: a rounding at the
    result's own precision; diffusers and ComfyUI run it so). Its moments kernel gives each (video, group) row one
    thread block: a float32 path a slice of groups at a time leaves it a handful of rows of tens of millions of
    values, and made SVD-XT's temporal decode 4.4x slower (14 frames at 1024x576 on an H200: 4.03 s against 0.92 s;
    diffusers 1.18 s). The CPU's kernel accumulates in float32 too (``at::opmath_type``): a bf16 decode of the
    medium-width SVD VAE, 8 frames at 512x288, took 11.16 s with it against 13.22 s in float32 slices, as far from
    the float32 decode (a throwaway script, fastest of 2 alternating runs).
    """
    if x.ndim == 5:  # b c f h w as b c f (h w): the same groups; PyTorch's 5D GroupNorm drops channels_last_3d
        return _group_norm_fp32(norm, flatten_hw(x)).view(x.shape)
    if x.device.type in NATIVE_HALF_GROUP_NORM:
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    groups, per = norm.num_groups, x.shape[1] // norm.num_groups
    step = groups if x.dtype == torch.float32 else max(1, GN_FP32_SLICE_BYTES // (x[:, :per].numel() * 4))
    if step >= groups:
        return F.group_norm(x.float(), groups, w, b, norm.eps).to(x.dtype)
    out = torch.empty_like(x)
    for g in range(0, groups, step):
        c = slice(g * per, min(groups, g + step) * per)
        out[:, c] = F.group_norm(x[:, c].float(), min(groups, g + step) - g, None if w is None else w[c],
                                 None if b is None else b[c], norm.eps)
    return out


class TemporalResBlock(nn.Module):
    """sgm's ``time_stack``: a ResBlock over a video ``b c f h w`` with Conv3d (kernel (3, 1, 1) in SVD), no
    timestep embedding and an identity skip. Names ``in_layers.{0,2}``, ``out_layers.{0,3}``."""

    def __init__(self, ch: int, kernel: tuple):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), FrameConv(ch, ch, kernel, padding=pad))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, ch), nn.SiLU(), nn.Dropout(0.0), FrameConv(ch, ch, kernel, padding=pad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b c f h w -> b c f h w (GroupNorm statistics over all frames of each video)"""
        # one statement per step: each whole-video intermediate is freed before the next is made
        h = F.silu(_group_norm_fp32(self.in_layers[0], x), inplace=True)
        h = self.in_layers[2](h)
        h = F.silu(_group_norm_fp32(self.out_layers[0], h), inplace=True)
        h = self.out_layers[3](h)
        h += x
        return h


class VideoResBlock(VAEResBlock):
    """sgm's VideoResBlock: the spatial VAE ResBlock, then ``time_stack`` across frames, blended as
    ``a * temporal + (1 - a) * spatial`` with ``a = sigmoid(mix_factor)`` (merge strategy "learned")."""

    def __init__(self, cin: int, cout: int, kernel: tuple):
        super().__init__(cin, cout)
        self.time_stack = TemporalResBlock(cout, kernel)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(b f) c h w -> (b f) c' h w"""
        return self.temporal(self.spatial(x), num_frames)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial ResBlock, each frame on its own: (b f) c h w -> (b f) c' h w, a slice of frames at a time."""
        return per_frame_slices(super().forward, x)

    def temporal(self, spatial: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``time_stack`` on the spatial half's output and the blend: (b f) c h w -> (b f) c h w."""
        spatial = rearrange(spatial, "(b f) c h w -> b c f h w", f=num_frames)
        alpha = torch.sigmoid(self.mix_factor)
        # alpha * temporal + (1 - alpha) * spatial, in place on the two tensors made here (the same values)
        mixed = self.time_stack(spatial).mul_(alpha).add_(spatial.mul_(1.0 - alpha))
        return rearrange(mixed, "b c f h w -> (b f) c h w")


class TimeMixConv(nn.Conv2d):
    """sgm's AE3DConv: a 2D conv (``weight``, ``bias``) followed by ``time_mix_conv``, a Conv3d across frames."""

    def __init__(self, cin: int, cout: int, kernel: tuple):
        super().__init__(cin, cout, 3, padding=1)
        self.time_mix_conv = FrameConv(cout, cout, kernel, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(b f) c h w -> (b f) c' h w"""
        return self.temporal(super().forward(x), num_frames)

    def temporal(self, v: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``time_mix_conv`` on the 2D conv's output: (b f) c h w -> (b f) c h w."""
        v = rearrange(v, "(b f) c h w -> b c f h w", f=num_frames)
        return rearrange(self.time_mix_conv(v), "b c f h w -> (b f) c h w")


class VideoDecoder(Decoder):
    """SVD's temporal decoder in sgm's names: the LDM Decoder with VideoResBlocks and a TimeMixConv ``conv_out``;
    the mid attention stays spatial (time_mode "conv-only")."""

    def _make_block(self, cfg: TemporalVAEConfig, cin: int, cout: int) -> nn.Module:
        return VideoResBlock(cin, cout, tuple(cfg.video_kernel_size))

    def _make_conv_out(self, cfg: TemporalVAEConfig, cin: int, cout: int) -> nn.Module:
        return TimeMixConv(cin, cout, tuple(cfg.video_kernel_size))

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(b f) z h w -> (b f) 3 H W in [-1, 1] (unclamped); the frames of each video are mixed"""
        if num_frames < 1 or z.shape[0] % num_frames:
            raise KinemaError(
                f"the temporal VAE decodes whole videos: {z.shape[0]} latent frames do not split into videos of "
                f"{num_frames} frames"
            )
        # Every layer but the temporal halves treats each frame on its own and runs on slices of frames
        # (``per_frame_slices``); a block's input is freed before its temporal half runs. The same sums as whole
        # calls, with the intermediates of a slice: at full size the frames of a chunk hold gigabytes each.
        h = self.conv_in(z)
        h = self.mid.block_1.spatial(h)
        h = self.mid.block_1.temporal(h, num_frames)
        h = per_frame_slices(self.mid.attn_1, h)
        h = self.mid.block_2.spatial(h)
        h = self.mid.block_2.temporal(h, num_frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block.spatial(h)
                h = block.temporal(h, num_frames)
            if hasattr(level, "upsample"):
                h = per_frame_slices(lambda t, conv=level.upsample.conv: conv(F.interpolate(t, scale_factor=2.0,
                                                                                             mode="nearest")), h, 4)
        h = per_frame_slices(lambda t: nn.Conv2d.forward(self.conv_out, F.silu(self.norm_out(t), inplace=True)), h)
        return self.conv_out.temporal(h, num_frames)


class TemporalAutoencoder(nn.Module):
    """The SVD autoencoder (``first_stage_model.*``): plain LDM ``encoder``, temporal ``decoder``; a
    ``quant_conv`` only when the file has one (the published SVD files do not)."""

    #: ``decode_frames`` decodes this many frames a call by default (sgm's ``decoding_t``).
    default_decode_chunk = SVD_DECODE_CHUNK
    mixes_frames = True  # the frames decoded together change each other: the chunk size changes the output

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = VideoDecoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """b 3 H W in [-1, 1] -> latent mean b z h w (unscaled; frames are encoded independently)"""
        moments = self.encoder(pixels)
        if hasattr(self, "quant_conv"):
            moments = self.quant_conv(moments)
        return moments[:, : self.cfg.z_channels]

    def decode(self, latent: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """unscaled latent (b f) z h w -> (b f) 3 H W in [-1, 1] (unclamped); ``num_frames`` None: one video"""
        return self.decoder(latent, latent.shape[0] if num_frames is None else int(num_frames))


class ImageEncoderKL(nn.Module):
    """The encoder half of an LDM AutoencoderKL with its ``quant_conv``: SVD's conditioning-frame encoder
    (``conditioner.embedders.3.encoder.``: ``encoder.*`` + ``quant_conv.*``; its unused decoder is not built)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_out.weight.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """b 3 H W in [-1, 1] -> latent mean b z h w (unscaled; sgm AutoencoderKLModeOnly)"""
        return self.quant_conv(self.encoder(pixels))[:, : self.cfg.z_channels]


@dataclass(frozen=True)
class CodecSetting:
    """How much a VAE call takes at once: ``chunk`` frames, spatial ``tiles`` (in the call's input units);
    ``pixels``: image pixels a tile unit is (8 for a decode's latent tiles), so that the log and the errors give
    tiles in the pixels the nodes take."""

    chunk: int
    tiles: TileOptions = NO_TILES
    pixels: int = 1

    def __str__(self) -> str:
        tile, overlap = self.tiles.tile * self.pixels, self.tiles.overlap * self.pixels
        tiles = f", tiles of {tile} overlapping {overlap} pixels" if tile else ""
        return f"{self.chunk} frame(s) a chunk{tiles}"


#: the smallest tile, in image pixels, that codec calls are tiled in (as ComfyUI's tiled VAE nodes): below it the
#: tiles' results drift from the untiled one and seams show
MIN_TILE_PIXELS = 64


def node_remedy(node: str, side: int, temporal: bool = False) -> Callable[[CodecSetting], str]:
    """What is left to change on ``node`` (VAE Decode / Encode Frames) once a codec call with a setting ran out of
    memory for good: a lower frame_chunk (above 1 frame; ``temporal``: it changes the video), tiles (frames whose
    larger side, ``side`` pixels, is above ``MIN_TILE_PIXELS``) or smaller ones (down to it), and always freeing
    GPU memory."""
    def remedy(setting: CodecSetting) -> str:
        left = []
        if setting.chunk > 1:
            left.append("lower frame_chunk" + (" (fewer frames decoded together change the video a little)"
                                               if temporal else ""))
        tile = setting.tiles.tile * setting.pixels
        if not tile and side > MIN_TILE_PIXELS:
            left.append("set tile_size (512 to start)")
        elif tile > MIN_TILE_PIXELS:
            left.append(f"lower tile_size below {tile} ({MIN_TILE_PIXELS} at least)")
        on_node = f"{', or '.join(left)} on {node}, or " if left else ""
        return f"{on_node}free GPU memory (other models or programs using it)"
    return remedy


def _smaller(setting: CodecSetting, frames: int, size: int, min_tile: int, unit: int, chunk_changes_output: bool
             ) -> CodecSetting | None:
    """The next smaller setting after a chunk of ``frames`` frames ran out of memory: half those frames a chunk
    where that leaves the output unchanged, else smaller tiles, multiples of ``unit`` (tiling starts at half the
    larger side, ``size``; a tile that covers that side is no tiling)."""
    frames = min(setting.chunk, frames)
    if frames > 1 and not chunk_changes_output:
        return replace(setting, chunk=frames // 2)
    if 0 < setting.tiles.tile < size:
        tiles = setting.tiles.smaller(min_tile, unit)
    else:
        tiles = TileOptions.first(size, min_tile, unit)
    return None if tiles is None else replace(setting, tiles=tiles)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """A VAE's input in the memory layout its convolutions run fastest in: channels_last on the CPU (oneDNN's
    convolutions, and with them the GroupNorms, SiLUs and upsamplings between them, keep it: 0.7-0.9x the
    decode time of the tiny VAEs, ``bench/bench_vae_layout.py``); elsewhere unchanged (CUDA's GroupNorm would
    copy back to the default layout)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class Fp32Fallback:
    """Runs codec calls on ``vae``; a call whose fp16 output is not finite (fp16 overflowed inside the VAE) is
    run again on an fp32 copy of the VAE, which then serves the rest of the job (said once in the log). The
    input VAE is never changed (``memory.cast_weights`` copies). An output still not finite (in fp32 or bf16,
    whose range is fp32's: an input far outside what a sampler or an image gives) is a KinemaError, not blank
    frames."""

    def __init__(self, vae: nn.Module, what: str):
        self.vae, self.what = vae, what

    def __call__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = fn(self.vae, x)
        if bool(torch.isfinite(out).all()):
            return out
        if self.vae.dtype == torch.float16:
            logger.warning("%s overflowed in fp16 (inf/NaN in the output); running it in fp32 from here on",
                           self.what)
            del out
            self.vae = cast_weights(self.vae, torch.float32)
            out = fn(self.vae, x)
            if bool(torch.isfinite(out).all()):
                return out
        raise KinemaError(f"{self.what} gave NaN or infinite values in {str(self.vae.dtype).removeprefix('torch.')} "
                          f"(its input's largest magnitude is {x.abs().max().item():.3g}; a sampler's latents and "
                          "images stay within a few tens): check the node that made the input, or the VAE file")


def _run_chunks(call, items: torch.Tensor, setting: CodecSetting, scale: float, what: str, remedy,
                chunk_changes_output: bool, min_tile: int, on_chunk) -> list[torch.Tensor]:
    """``call`` on chunks of ``items`` [f, c, h, w] (tiled as ``setting`` says), retrying a chunk that runs out of
    memory once with a smaller setting, which then holds for the rest."""
    frames, out, start = items.shape[0], [], 0
    size = max(items.shape[-2:])
    unit = max(1, round(1 / scale))  # an encoder's tiles: whole latent pixels
    while start < frames:
        def run(s: CodecSetting, start=start):
            part = items[start:start + s.chunk]
            return run_tiled(call, part, s.tiles, scale), part.shape[0]

        def smaller(s: CodecSetting, left=frames - start) -> CodecSetting | None:
            return _smaller(s, left, size, min_tile, unit, chunk_changes_output)

        (result, done), setting = run_with_oom_retry(run, setting, smaller, what, remedy)
        out.append(result)
        start += done
        if on_chunk is not None:
            on_chunk(min(start, frames), frames)
    return out


def _check_chunk(chunk) -> None:
    """``chunk``: None (the default) or a whole number of frames, at least 1."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Real)
                              or not math.isfinite(chunk) or int(chunk) != chunk or chunk < 1):
        raise KinemaError(f"frame_chunk must be a whole number of frames, 1 or more (0 on the nodes: the default), "
                          f"got {chunk!r}")


def frames_per_call(height: int, width: int) -> int:
    """Frames of ``height`` x ``width`` pixels a VAE call takes by default where frames are independent: as many as
    ``CHUNK_PIXELS`` holds, at least 1 and at most ``DEFAULT_DECODE_CHUNK``."""
    return max(1, min(DEFAULT_DECODE_CHUNK, CHUNK_PIXELS // max(1, height * width)))


def default_decode_chunk(vae: nn.Module, height: int, width: int) -> int:
    """Frames a decode call takes when none is asked for: the VAE's own ``default_decode_chunk`` where it has one (SVD's
    temporal decoder: the chunk is part of its output), else ``frames_per_call``."""
    own = getattr(vae, "default_decode_chunk", None)
    return int(own) if own is not None else frames_per_call(height, width)


#: the attribute of a VAE whose decodes run through torch.compile (``with_compiled_decode``): its CompileOptions
DECODE_COMPILE = "kinema_decode_compile"


def with_compiled_decode(vae: AutoencoderKL | TemporalAutoencoder, opts: CompileOptions | None
                         ) -> AutoencoderKL | TemporalAutoencoder:
    """``vae`` whose ``decode_frames`` calls run its ``decode`` through ``torch.compile`` with ``opts`` (None: as it
    is): a new object sharing ``vae``'s modules and weights (and its placement); ``vae`` itself is unchanged."""
    if not isinstance(vae, (AutoencoderKL, TemporalAutoencoder)):
        raise KinemaError(f"only a VAE with a decoder can have its decoding compiled, not a {type(vae).__name__}")
    if opts is not None:
        opts.validate()
    new = shallow_copy(vae)
    setattr(new, DECODE_COMPILE, opts)
    return new


def decode_compile(vae: nn.Module) -> CompileOptions | None:
    """The compile options of ``vae``'s decodes (``with_compiled_decode``), None for plain ones."""
    return getattr(vae, DECODE_COMPILE, None)


def decode_frames(
    vae: AutoencoderKL | TemporalAutoencoder,
    latent: torch.Tensor,
    chunk: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    tiles: TileOptions = NO_TILES,
) -> torch.Tensor:
    """Decode a video latent a chunk of frames at a time: [f, c, h, w] -> IMAGE [f, 8h, 8w, 3] in [0, 1].

    ``chunk`` None: the VAE's default (``default_decode_chunk``: AutoencoderKL up to ``DEFAULT_DECODE_CHUNK`` frames
    within ``CHUNK_PIXELS``, 4 at 512x512; ``SVD_DECODE_CHUNK`` for the SVD temporal decoder). With
    AutoencoderKL frames are independent and the chunk only bounds memory.
    With the temporal decoder each chunk is decoded as ONE short video (its temporal layers mix the frames
    inside the chunk, never across chunks), so the chunk size changes the output: that is the original's
    behaviour (sgm decodes ``decoding_t`` frames a call); the last chunk may be shorter.
    ``tiles`` (in latent pixels): decode spatial tiles with feathered overlaps (``tiling.run_tiled``); each tile
    holds every frame of the chunk. Out of memory: the chunk is retried once smaller (AutoencoderKL: half the
    frames; the temporal decoder: smaller tiles, since fewer frames would change it), then a KinemaError.
    An fp16 VAE whose output is not finite (overflow) decodes that call again in fp32 (``Fp32Fallback``).
    A VAE from ``with_compiled_decode`` decodes through ``torch.compile`` (the first call with new sizes compiles).
    ``on_chunk(done, total)`` is called after each chunk (progress and interrupt).
    """
    if not callable(getattr(vae, "decode", None)) or not isinstance(getattr(vae, "cfg", None), VAEConfig):
        raise KinemaError(f"decoding needs a VAE with a decoder (from Load Checkpoint or Load SVD Checkpoint "
                          f"(Kinema)), not a {type(vae).__name__}")
    _check_chunk(chunk)
    if latent.ndim != 4:
        raise KinemaError(f"expected a video latent [frames, channels, h, w], got shape {tuple(latent.shape)}")
    if latent.shape[1] != vae.cfg.z_channels:
        raise KinemaError(
            f"the latent has {latent.shape[1]} channels but this VAE decodes {vae.cfg.z_channels}: "
            "use the VAE of the model that made the latent"
        )
    if not bool(torch.isfinite(latent).all()):
        raise KinemaError("the latent holds NaN or infinite values, which decode to blank frames: the node that made "
                          "it produced them (a sampler whose fp16 model overflowed: set the loader's precision to bf16 "
                          "or fp32; a latent edit: check its inputs)")
    tiles.validate("VAE decode tiling")
    if chunk is None:
        chunk = default_decode_chunk(vae, latent.shape[-2] * 8, latent.shape[-1] * 8)
    temporal = bool(getattr(vae, "mixes_frames", False))

    compile = decode_compile(vae)

    def decode(model, z: torch.Tensor) -> torch.Tensor:  # the temporal VAE: the chunk is one video
        return run_decode(model, compile, _layout(z.to(model.device, model.dtype))).float()

    def call(z: torch.Tensor) -> torch.Tensor:
        return ((precision(decode, z).clamp(-1, 1) + 1) / 2).cpu()

    precision = Fp32Fallback(vae, "VAE decoding")

    with torch.inference_mode(), on_device(vae):
        out = _run_chunks(call, latent, CodecSetting(int(chunk), tiles, pixels=8), 8, "VAE decoding",
                          node_remedy("VAE Decode Frames (Kinema)", max(latent.shape[-2:]) * 8, temporal), temporal,
                          MIN_TILE_PIXELS // 8, on_chunk)
    return rearrange(torch.cat(out), "f c h w -> f h w c")


def encode_frames(
    vae: AutoencoderKL | TemporalAutoencoder | ImageEncoderKL,
    images: torch.Tensor,
    chunk: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    tiles: TileOptions = NO_TILES,
) -> torch.Tensor:
    """Encode IMAGE frames [f, H, W, 3] in [0, 1] a chunk at a time -> latent [f, z, H/8, W/8] (unscaled).

    H and W must be multiples of 8; an alpha channel ([f, H, W, 4]) is dropped. Frames are encoded
    independently (the SVD encoder has no temporal layers), so the chunk only bounds memory (None:
    ``frames_per_call``, 4 at 512x512). ``tiles`` (in image
    pixels, multiples of 8): encode spatial tiles with feathered overlaps. Out of memory: the chunk is retried once
    with half the frames, then a KinemaError. fp16 overflow: that call again in fp32 (``Fp32Fallback``).
    ``on_chunk(done, total)`` is called after each chunk.
    """
    if not callable(getattr(vae, "encode", None)) or not isinstance(getattr(vae, "cfg", None), VAEConfig):
        raise KinemaError(f"encoding needs a VAE (from Load Checkpoint or Load SVD Checkpoint (Kinema)), not a "
                          f"{type(vae).__name__}")
    _check_chunk(chunk)
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise KinemaError(f"expected IMAGE frames [frames, height, width, 3], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise KinemaError("no frames to encode: the image batch is empty")
    h, w = images.shape[1:3]
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise KinemaError(
            f"the frames are {w}x{h}; the VAE needs both sides a multiple of 8. Resize or crop them first "
            f"(Load Video (Kinema) does; e.g. to {max(8, w // 8 * 8)}x{max(8, h // 8 * 8)})"
        )
    tiles.validate("VAE encode tiling")
    if tiles.tile % 8 or tiles.overlap % 8:
        raise KinemaError(f"VAE encode tiling: tile size and overlap must be multiples of 8 pixels, got "
                          f"{tiles.tile} and {tiles.overlap}")
    check_finite(images, "VAE encoding")
    pixels = rearrange(images[..., :3], "f h w c -> f c h w")
    if chunk is None:
        chunk = frames_per_call(h, w)
    return _encode(vae, pixels, False, CodecSetting(int(chunk), tiles), "VAE encoding",
                   node_remedy("VAE Encode Frames (Kinema)", max(h, w)), on_chunk)


def encode_pixels(vae: AutoencoderKL | TemporalAutoencoder | ImageEncoderKL, pixels: torch.Tensor, what: str,
                  remedy: str) -> torch.Tensor:
    """Encode pixels [f, 3, H, W] in [-1, 1] (H and W multiples of 8; e.g. SVD's noise-augmented init image) a
    frame at a time -> latent [f, z, H/8, W/8] (unscaled), as ``encode_frames`` does: fp16 overflow in fp32, out
    of memory retried once in tiles, then a ``KinemaOutOfMemoryError`` saying ``what`` and ``remedy``."""
    return _encode(vae, pixels, True, CodecSetting(1), what, remedy, None)


def _encode(vae, pixels: torch.Tensor, signed: bool, setting: CodecSetting, what: str,
            remedy: str | Callable[[CodecSetting], str], on_chunk) -> torch.Tensor:
    """``pixels`` [f, 3, H, W] in [-1, 1] (``signed``) or [0, 1] -> latent, chunked and tiled as ``setting`` says."""
    def encode(model, px: torch.Tensor) -> torch.Tensor:
        px = px.to(model.device, model.dtype)
        return model.encode(_layout(px if signed else px * 2 - 1)).float()

    def call(px: torch.Tensor) -> torch.Tensor:
        return precision(encode, px).cpu()

    precision = Fp32Fallback(vae, what)

    with torch.inference_mode(), on_device(vae):
        out = _run_chunks(call, pixels, setting, 1 / 8, what, remedy, False, MIN_TILE_PIXELS, on_chunk)
    return torch.cat(out)


def infer_vae_config(sd: dict, prefix: str = "") -> VAEConfig:
    """Read a VAEConfig off the shapes of an LDM AutoencoderKL state dict (the latent width off the decoder)."""
    conv_in = sd.get(prefix + "decoder.conv_in.weight")
    enc_in = sd.get(prefix + "encoder.conv_in.weight")
    if conv_in is None or enc_in is None:
        raise KinemaError(f"no VAE found: '{prefix}encoder.conv_in.weight' / '{prefix}decoder.conv_in.weight' missing")
    return VAEConfig(**{**_encoder_fields(sd, prefix), "z_channels": conv_in.shape[1]})


def _encoder_fields(sd: dict, prefix: str) -> dict:
    """ch, ch_mult, num_res_blocks, z_channels, in_channels read off the ``encoder.*`` shapes."""
    enc_in = sd.get(prefix + "encoder.conv_in.weight")
    enc_out = sd.get(prefix + "encoder.conv_out.weight")
    if enc_in is None or enc_out is None:
        raise KinemaError(f"no VAE encoder found: '{prefix}encoder.conv_in.weight' / "
                          f"'{prefix}encoder.conv_out.weight' missing")
    ch = enc_in.shape[0]
    mults, i = [], 0
    while sd.get(f"{prefix}encoder.down.{i}.block.0.conv1.weight") is not None:
        mults.append(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch)
        i += 1
    nrb = 0
    while sd.get(f"{prefix}encoder.down.0.block.{nrb}.conv1.weight") is not None:
        nrb += 1
    return dict(ch=ch, ch_mult=tuple(mults), num_res_blocks=nrb, z_channels=enc_out.shape[0] // 2,
                in_channels=enc_in.shape[1])


def infer_encoder_config(sd: dict, prefix: str = "") -> VAEConfig:
    """Read the VAEConfig of an LDM encoder (``encoder.*``, e.g. SVD's ``SVD_COND_ENCODER_PREFIX``) off its shapes."""
    return VAEConfig(**_encoder_fields(sd, prefix))


def is_temporal_vae(sd: dict, prefix: str = "") -> bool:
    """Whether the VAE under ``prefix`` has SVD's temporal decoder (``time_stack`` / ``time_mix_conv`` keys)."""
    dec = prefix + "decoder."
    return any(k.startswith(dec) and (".time_stack." in k or ".time_mix_conv." in k) for k in sd)


def infer_temporal_vae_config(sd: dict, prefix: str = "") -> TemporalVAEConfig:
    """Read a TemporalVAEConfig off the shapes of an SVD autoencoder state dict (``first_stage_model.`` stripped,
    or given as ``prefix``). Raise KinemaError for a plain image VAE or an unsupported temporal layout."""
    if not is_temporal_vae(sd, prefix):
        raise KinemaError(
            f"the VAE under '{prefix}' has a plain image decoder (no 'decoder.*.time_stack.*' / "
            "'decoder.conv_out.time_mix_conv.*' keys), not the Stable Video Diffusion temporal decoder: "
            "load it as an AutoencoderKL (infer_vae_config)"
        )
    if any(k.startswith(prefix + "decoder.") and ".time_mix_block." in k for k in sd):
        raise KinemaError(
            "this SVD decoder has temporal attention ('time_mix_block', sgm time_mode 'all' or 'attn-only'): "
            "Kinema supports the published SVD decoder (time_mode 'conv-only')"
        )
    stack = sd.get(prefix + "decoder.mid.block_1.time_stack.in_layers.2.weight")
    mix = sd.get(prefix + "decoder.conv_out.time_mix_conv.weight")
    if stack is None or mix is None or stack.ndim != 5 or mix.ndim != 5:
        raise KinemaError(
            f"incomplete SVD temporal decoder: '{prefix}decoder.mid.block_1.time_stack.in_layers.2.weight' and "
            f"'{prefix}decoder.conv_out.time_mix_conv.weight' (Conv3d) are both expected"
        )
    kernel = tuple(stack.shape[2:])
    if tuple(mix.shape[2:]) != kernel:
        raise KinemaError(
            f"the SVD decoder's temporal kernels differ (time_stack {kernel}, time_mix_conv {tuple(mix.shape[2:])})"
        )
    dec_in = sd.get(prefix + "decoder.conv_in.weight")
    if dec_in is None:
        raise KinemaError(f"no VAE decoder found: '{prefix}decoder.conv_in.weight' missing")
    fields = _encoder_fields(sd, prefix)
    fields["z_channels"] = dec_in.shape[1]
    return TemporalVAEConfig(**fields, video_kernel_size=kernel, quant_conv=prefix + "quant_conv.weight" in sd)
