"""AutoencoderKL in the LDM names (``first_stage_model.*``), with frame-chunked encode/decode.

Frames are folded into the batch; ``decode_frames`` decodes a video latent
``[f, c, h, w]`` a chunk of frames at a time and returns a ComfyUI IMAGE
``[f, H, W, 3]`` in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import KinemaError


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
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


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
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = VAEResBlock(ch, ch)
        self.attn_1 = VAEAttention(ch)
        self.block_2 = VAEResBlock(ch, ch)

    def forward(self, x):
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
        self.mid = _Mid(ch)
        ups = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(VAEResBlock(ch, cfg.ch * mult))
                ch = cfg.ch * mult
            ups.insert(0, _Level(blocks, "upsample", nn.Conv2d(ch, ch, 3, padding=1)) if i else _Level(blocks, None))
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(32, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """b z h w -> b 3 H W in [-1, 1] (unclamped)"""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


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


def decode_frames(
    vae: AutoencoderKL,
    latent: torch.Tensor,
    chunk: int = 8,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Decode a video latent a chunk of frames at a time: [f, c, h, w] -> IMAGE [f, 8h, 8w, 3] in [0, 1].

    ``on_chunk(done, total)`` is called after each chunk (progress and interrupt).
    """
    if latent.ndim != 4:
        raise KinemaError(f"expected a video latent [frames, channels, h, w], got shape {tuple(latent.shape)}")
    if latent.shape[1] != vae.cfg.z_channels:
        raise KinemaError(
            f"the latent has {latent.shape[1]} channels but this VAE decodes {vae.cfg.z_channels}: "
            "use the VAE of the model that made the latent"
        )
    chunk = max(1, int(chunk))
    frames = latent.shape[0]
    out = []
    with torch.inference_mode():
        for start in range(0, frames, chunk):
            z = latent[start : start + chunk].to(vae.device, vae.dtype)
            pixels = vae.decode(z).float()
            out.append(rearrange((pixels.clamp(-1, 1) + 1) / 2, "f c h w -> f h w c").cpu())
            if on_chunk is not None:
                on_chunk(min(start + chunk, frames), frames)
    return torch.cat(out)


def encode_frames(
    vae: AutoencoderKL,
    images: torch.Tensor,
    chunk: int = 8,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Encode IMAGE frames [f, H, W, 3] in [0, 1] a chunk at a time -> latent [f, z, H/8, W/8] (unscaled).

    H and W must be multiples of 8; an alpha channel ([f, H, W, 4]) is dropped.
    ``on_chunk(done, total)`` is called after each chunk (progress and interrupt).
    """
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
    images = images[..., :3]
    chunk = max(1, int(chunk))
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], chunk):
            px = rearrange(images[start : start + chunk], "f h w c -> f c h w").to(vae.device, vae.dtype) * 2 - 1
            out.append(vae.encode(px).float().cpu())
            if on_chunk is not None:
                on_chunk(min(start + chunk, images.shape[0]), images.shape[0])
    return torch.cat(out)


def infer_vae_config(sd: dict, prefix: str = "") -> VAEConfig:
    """Read a VAEConfig off the shapes of an LDM AutoencoderKL state dict."""
    conv_in = sd.get(prefix + "decoder.conv_in.weight")
    enc_in = sd.get(prefix + "encoder.conv_in.weight")
    if conv_in is None or enc_in is None:
        raise KinemaError(f"no VAE found: '{prefix}encoder.conv_in.weight' / '{prefix}decoder.conv_in.weight' missing")
    ch = enc_in.shape[0]
    mults, i = [], 0
    while sd.get(f"{prefix}encoder.down.{i}.block.0.conv1.weight") is not None:
        mults.append(sd[f"{prefix}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch)
        i += 1
    nrb = 0
    while sd.get(f"{prefix}encoder.down.0.block.{nrb}.conv1.weight") is not None:
        nrb += 1
    return VAEConfig(
        ch=ch, ch_mult=tuple(mults), num_res_blocks=nrb, z_channels=conv_in.shape[1], in_channels=enc_in.shape[1]
    )
