"""A tiny SVD VideoUNet in the published sgm layout, and its diffusers twin, for the SVD UNet tests.

Engine side (no diffusers needed): ``svd_unet_state_dict()`` is a tiny checkpoint's
``model.diffusion_model.*`` tensors (the real block structure: 4 levels, 2 ResBlocks a
level, attention at levels 0-2, GroupNorm with 32 groups; widths 32/64/64/64, context 64,
micro-conditioning 3 x 32) with random weights, deterministic from ``SEED``; the key
names and shapes come from the engine's own ``SVDUNet`` built on the meta device.
``svd_unet(num_head_channels)`` loads it into the engine. The heads are not in the
weights: 64 channels a head (the published setting) gives one head at these widths, so
the tests also run 16 channels a head (2/4/4/4 heads) to exercise multi-head attention.

Reference side: diffusers has no single-file converter for the SVD UNet, so
``sgm_to_diffusers`` is this module's own key mapping (sgm -> diffusers
``UNetSpatioTemporalConditionModel``), and ``diffusers_svd_unet`` loads the same tensors
with it (strict: every key on both sides). One difference between diffusers and sgm is
patched on the diffusers instance (never the library): sgm's ResBlocks (spatial and
temporal) normalize with GroupNorm eps 1e-5 everywhere, diffusers builds the ResBlocks
of its cross-attention down blocks and of all up blocks with eps 1e-6.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import replace

import torch
from torch import nn

from kinema.models import checkpoint
from kinema.models.svd import SVDUNet, SVDUNetConfig, infer_svd_unet_config

SEED = 0
PREFIX = "model.diffusion_model."
ADD_TIME_DIM = 32  # the width of each micro-conditioning embedding (256 in SVD)
TINY = SVDUNetConfig(
    in_channels=8,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_levels=(0, 1, 2),
    num_head_channels=64,
    transformer_depth=1,
    context_dim=64,
    adm_in_channels=3 * ADD_TIME_DIM,
)


def _fill(key: str, shape: tuple, seed: int) -> torch.Tensor:
    """A deterministic tensor for ``key``: norms near 1, small non-zero biases, fan-in scaled weights."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    leaf = key.rsplit(".", 1)[-1]
    norm_like = len(shape) == 1 and any(
        part.startswith("norm") for part in key.split(".")
    ) or key.endswith((".in_layers.0.weight", ".out_layers.0.weight", "diffusion_model.out.0.weight"))
    if leaf == "mix_factor":  # sigmoid(mix_factor) well inside (0, 1): both paths count
        return torch.randn(shape, generator=gen)
    if leaf == "bias":
        return torch.randn(shape, generator=gen) * 0.05
    if norm_like:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


@functools.lru_cache(maxsize=None)
def svd_unet_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """The tiny SVD UNet as a checkpoint would hold it (``model.diffusion_model.*``, fp32). Read-only."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SVDUNet(TINY).state_dict().items()}
    return {PREFIX + k: _fill(PREFIX + k, s, seed) for k, s in shapes.items()}


@functools.lru_cache(maxsize=None)
def svd_unet(num_head_channels: int = 64) -> SVDUNet:
    """The engine's SVDUNet on the tiny weights (config inferred from the shapes). Read-only."""
    sd = checkpoint.sub_state_dict(svd_unet_state_dict(), PREFIX)
    cfg = replace(infer_svd_unet_config(sd), num_head_channels=num_head_channels)
    return checkpoint.build_on_meta(lambda: SVDUNet(cfg), sd, torch.float32, "SVD UNet", "tiny_svd")


# -- diffusers -----------------------------------------------------------------------------------------------------

def diffusers_svd_config(cfg: SVDUNetConfig) -> dict:
    """The ``UNetSpatioTemporalConditionModel`` config of an SVD UNet (attention at all levels but the last)."""
    levels = cfg.levels
    if tuple(cfg.attention_levels) != tuple(range(levels - 1)):
        raise ValueError("diffusers' SVD UNet has attention at every level but the deepest")
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    return dict(
        sample_size=None,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
        block_out_channels=widths,
        addition_time_embed_dim=cfg.adm_in_channels // 3,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        num_attention_heads=tuple(cfg.heads(w) for w in widths),
    )


_RESBLOCK = {  # sgm ResBlock (spatial; the temporal one under time_stack.) -> diffusers ResnetBlock2D / Temporal
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def _resblock(rest: str) -> str:
    if rest.startswith("time_mixer."):
        return rest
    side = "spatial_res_block."
    if rest.startswith("time_stack."):
        side, rest = "temporal_res_block.", rest[len("time_stack."):]
    for old, new in _RESBLOCK.items():
        if rest.startswith(old):
            return side + new + rest[len(old):]
    raise KeyError(rest)


def _transformer(rest: str) -> str:
    if rest.startswith("time_stack."):
        return "temporal_transformer_blocks." + rest[len("time_stack."):]
    if rest.startswith("time_pos_embed."):
        idx, leaf = rest[len("time_pos_embed."):].split(".", 1)
        return "time_pos_embed." + {"0": "linear_1.", "2": "linear_2."}[idx] + leaf
    return rest  # norm, proj_in, proj_out, transformer_blocks.*, time_mixer.* share the names


def sgm_to_diffusers(sd: dict[str, torch.Tensor], cfg: SVDUNetConfig) -> dict[str, torch.Tensor]:
    """An SVD UNet state dict (sgm names, prefix stripped) in diffusers ``UNetSpatioTemporalConditionModel`` names."""
    per_level = cfg.num_res_blocks + 1
    fixed = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",
        "label_emb.0.2.": "add_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    out = {}
    for key, value in sd.items():
        new = next((n + key[len(o):] for o, n in fixed.items() if key.startswith(o)), None)
        if new is None:
            if key.startswith("middle_block."):
                key = "middle_block.0." + key[len("middle_block."):]  # one block, like the others' index
            part, index, layer, rest = key.split(".", 3)
            index, layer = int(index), int(layer)
            if part == "input_blocks":
                level, j = divmod(index - 1, per_level)
                base = f"down_blocks.{level}."
                if j == cfg.num_res_blocks:  # the downsampler
                    new = base + "downsamplers.0.conv." + rest.removeprefix("op.")
                elif layer == 0:
                    new = base + f"resnets.{j}." + _resblock(rest)
                else:
                    new = base + f"attentions.{j}." + _transformer(rest)
            elif part == "middle_block":
                if layer == 1:
                    new = "mid_block.attentions.0." + _transformer(rest)
                else:
                    new = f"mid_block.resnets.{layer // 2}." + _resblock(rest)
            elif part == "output_blocks":
                level, j = divmod(index, per_level)
                base = f"up_blocks.{level}."
                if layer == 0:
                    new = base + f"resnets.{j}." + _resblock(rest)
                elif rest.startswith("conv."):  # the upsampler (after the attention, if any)
                    new = base + "upsamplers.0." + rest
                else:
                    new = base + f"attentions.{j}." + _transformer(rest)
            else:
                raise KeyError(key)
        out[new] = value
    return out


def sgm_resblock_eps(model: nn.Module, eps: float = 1e-5) -> int:
    """Give every GroupNorm of the diffusers SpatioTemporalResBlocks sgm's eps; returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ == "SpatioTemporalResBlock":
            for norm in module.modules():
                if isinstance(norm, nn.GroupNorm) and norm.eps != eps:
                    norm.eps = eps
                    changed += 1
    return changed


@functools.lru_cache(maxsize=None)
def diffusers_svd_unet(num_head_channels: int = 64):
    """diffusers ``UNetSpatioTemporalConditionModel`` on the tiny weights (this module's mapping, strict),
    with sgm's ResBlock GroupNorm eps. Read-only."""
    from diffusers import UNetSpatioTemporalConditionModel

    ours = svd_unet(num_head_channels)
    model = UNetSpatioTemporalConditionModel(**diffusers_svd_config(ours.cfg))
    sd = sgm_to_diffusers(checkpoint.sub_state_dict(svd_unet_state_dict(), PREFIX), ours.cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, f"sgm -> diffusers mapping: missing {missing}, unexpected {unexpected}"
    assert sgm_resblock_eps(model) > 0
    return model.eval().requires_grad_(False)
