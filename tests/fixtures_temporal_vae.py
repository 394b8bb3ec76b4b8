"""A tiny Stable Video Diffusion autoencoder in the published layout, and its diffusers twin.

Engine side (no diffusers needed): ``svd_state_dict()`` is the VAE part of an
``svd.safetensors`` at a tiny width (ch 32, ch_mult (1, 2, 2, 2), 2 ResBlocks a
level, 32-group GroupNorm): ``first_stage_model.encoder.*`` and the temporal
``first_stage_model.decoder.*`` (``time_stack``, ``mix_factor``,
``conv_out.time_mix_conv``; no ``quant_conv``/``post_quant_conv``), plus the
conditioning-frame autoencoder under ``conditioner.embedders.3.encoder.*``
(``encoder``, plain ``decoder``, ``quant_conv``, ``post_quant_conv``). The key
names and shapes come from the engine's own modules; the values are random and
deterministic (seeded by ``SEED`` and the key name), with non-zero temporal
convolutions and ``mix_factor`` so the temporal layers matter.
``temporal_vae()`` and ``cond_encoder()`` load them into the engine (cached,
read-only).

Reference side (imports diffusers lazily): ``to_diffusers_keys`` is this test
suite's own mapping from sgm names to diffusers' ``AutoencoderKLTemporalDecoder``
names, and ``diffusers_temporal_vae(...)`` loads the same tensors into it.
Where diffusers differs from sgm it is patched here, explicitly:

- diffusers' ``AutoencoderKLTemporalDecoder`` always applies a ``quant_conv``
  in ``encode``; the published ``first_stage_model`` has none, so it is set to
  the identity (``quant_conv=False``). The conditioning encoder has one and it
  is loaded as is.
- diffusers' temporal GroupNorm runs in the input dtype, sgm's GroupNorm32 in
  float32: the same in the fp32 parity tests.
- diffusers hard-codes the temporal kernel (3, 1, 1): the published one.
- diffusers' ``scripts/convert_svd_to_diffusers.py`` reads ``decoder.time_mix_conv.*``;
  the sgm modules (and the published files) name it ``decoder.conv_out.time_mix_conv.*``,
  which the mapping below uses.
"""
from __future__ import annotations

import functools
import math
import re
import zlib

import torch
from torch import nn

from kinema.models import checkpoint
from kinema.models.vae import (
    SVD_COND_ENCODER_PREFIX,
    SVD_VAE_PREFIX,
    AutoencoderKL,
    ImageEncoderKL,
    TemporalAutoencoder,
    TemporalVAEConfig,
    VAEConfig,
    infer_encoder_config,
    infer_temporal_vae_config,
)

SEED = 0
TINY = TemporalVAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=4, video_kernel_size=(3, 1, 1))
#: The published SVD / SVD-XT autoencoder (scripts/sampling/configs/svd.yaml: ch 128, ch_mult [1, 2, 4, 4]).
REAL = TemporalVAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, video_kernel_size=(3, 1, 1))


def _shapes(factory) -> dict[str, tuple]:
    with torch.device("meta"):
        module = factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _value(key: str, shape: tuple, seed: int) -> torch.Tensor:
    """Deterministic tensor for ``key``: norms near 1, small biases, fan-in scaled weights, mix factors ~N(0, 1)."""
    gen = torch.Generator().manual_seed((seed * 7919 + zlib.crc32(key.encode())) % 2**63)
    leaf = key.rsplit(".", 1)[-1]
    is_norm = ".norm" in key or key.endswith(("_layers.0.weight", "_layers.0.bias"))
    if leaf == "mix_factor":
        return torch.randn(shape, generator=gen)
    if leaf == "bias":
        return torch.randn(shape, generator=gen) * 0.02
    if is_norm:
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


@functools.lru_cache(maxsize=None)
def svd_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """The VAE tensors of a tiny published-layout SVD checkpoint (fp32). Read-only."""
    sd = {}
    for k, s in _shapes(lambda: TemporalAutoencoder(TINY)).items():
        sd[SVD_VAE_PREFIX + k] = _value(SVD_VAE_PREFIX + k, s, seed)
    plain = VAEConfig(ch=TINY.ch, ch_mult=TINY.ch_mult, num_res_blocks=TINY.num_res_blocks, z_channels=TINY.z_channels)
    for k, s in _shapes(lambda: AutoencoderKL(plain)).items():  # encoder, decoder, quant_conv, post_quant_conv
        sd[SVD_COND_ENCODER_PREFIX + k] = _value(SVD_COND_ENCODER_PREFIX + k, s, seed)
    return sd


@functools.lru_cache(maxsize=None)
def temporal_vae() -> TemporalAutoencoder:
    sd = checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX)
    cfg = infer_temporal_vae_config(sd)
    return checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, torch.float32, "VAE", "tiny svd")


@functools.lru_cache(maxsize=None)
def cond_encoder() -> ImageEncoderKL:
    sd = checkpoint.sub_state_dict(svd_state_dict(), SVD_COND_ENCODER_PREFIX)
    cfg = infer_encoder_config(sd)
    return checkpoint.build_on_meta(lambda: ImageEncoderKL(cfg), sd, torch.float32, "VAE encoder", "tiny svd")


# -- sgm -> diffusers (this suite's own mapping) -------------------------------------------------------------------

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _resnet(rest: str, temporal: bool) -> str:
    """Inside one ResBlock: sgm name -> diffusers name (ResnetBlock2D, or SpatioTemporalResBlock)."""
    if rest == "mix_factor":
        return "time_mixer.mix_factor"
    m = re.fullmatch(r"time_stack\.(\w+\.\d)\.(weight|bias)", rest)
    if m:
        return f"temporal_res_block.{_TIME_STACK[m[1]]}.{m[2]}"
    layer, leaf = rest.split(".")
    return ("spatial_res_block." if temporal else "") + f"{_RESNET[layer]}.{leaf}"


def to_diffusers_keys(sgm: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """sgm autoencoder names (prefix stripped) -> diffusers AutoencoderKLTemporalDecoder names.

    Attention projections (1x1 convs in sgm) become linear weights. Raises KeyError on a name it does not know,
    so a layout change cannot pass silently.
    """
    out = {}
    for key, t in sgm.items():
        part, rest = key.split(".", 1)
        if part in ("quant_conv", "post_quant_conv"):
            if part == "quant_conv":
                out[key] = t
            continue  # diffusers' temporal AE has no post_quant_conv
        if part not in ("encoder", "decoder"):
            raise KeyError(key)
        temporal = part == "decoder"
        if m := re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
            new = rest
        elif m := re.fullmatch(r"norm_out\.(weight|bias)", rest):
            new = f"conv_norm_out.{m[1]}"
        elif m := re.fullmatch(r"conv_out\.time_mix_conv\.(weight|bias)", rest):
            new = f"time_conv_out.{m[1]}"
        elif m := re.fullmatch(r"mid\.block_(\d)\.(.+)", rest):
            new = f"mid_block.resnets.{int(m[1]) - 1}.{_resnet(m[2], temporal)}"
        elif m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
            new = f"mid_block.attentions.0.{_ATTN[m[1]]}.{m[2]}"
            if m[2] == "weight" and m[1] != "norm":
                t = t.reshape(t.shape[0], t.shape[1])
        elif m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest):
            new = f"down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3], False)}"
        elif m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest):
            new = f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest):  # sgm up.0 is the last (full-size) level
            new = f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3], True)}"
        elif m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
            new = f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        else:
            raise KeyError(key)
        out[f"{part}.{new}"] = t
    return out


def diffusers_temporal_vae(encoder_prefix: str = SVD_VAE_PREFIX, quant_conv: bool = False):
    """diffusers AutoencoderKLTemporalDecoder holding the tiny SVD tensors (strict load).

    The decoder is always ``first_stage_model.decoder``; the encoder (and quant_conv when ``quant_conv``) come
    from ``encoder_prefix``: ``SVD_VAE_PREFIX`` (no quant_conv: diffusers' is set to the identity) or
    ``SVD_COND_ENCODER_PREFIX`` (its own quant_conv).
    """
    from diffusers import AutoencoderKLTemporalDecoder

    sd = svd_state_dict()
    widths = tuple(TINY.ch * m for m in TINY.ch_mult)
    model = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=TINY.num_res_blocks, latent_channels=TINY.z_channels,
    )
    sgm = {k: v for k, v in checkpoint.sub_state_dict(sd, SVD_VAE_PREFIX).items() if k.startswith("decoder.")}
    enc = checkpoint.sub_state_dict(sd, encoder_prefix)
    keep = ("encoder.", "quant_conv.") if quant_conv else ("encoder.",)
    sgm.update({k: v for k, v in enc.items() if k.startswith(keep)})
    mapped = to_diffusers_keys(sgm, len(widths))
    if not quant_conv:  # sgm's first stage has no quant_conv: make diffusers' the identity
        z2 = 2 * TINY.z_channels
        mapped["quant_conv.weight"] = torch.eye(z2).reshape(z2, z2, 1, 1)
        mapped["quant_conv.bias"] = torch.zeros(z2)
    model.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)


def meta_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A module's state dict (meta tensors are fine: config inference reads only shapes)."""
    return {prefix + k: v for k, v in module.state_dict().items()}
