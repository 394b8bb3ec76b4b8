"""Shared test helpers: the demo models built once per session, and their diffusers twins.

Engine side (no diffusers needed): ``sd15_state_dict()``, ``motion_state_dict(v)``,
``unet()``, ``vae()``, ``motion_modules(v)`` and ``motion_model(v)`` build the
pack's tiny demo models (real SD1.5 / AnimateDiff layouts, random weights,
deterministic from ``SEED``) from in-memory state dicts and cache them for the
session. The cached objects are shared: treat them as read-only (the engine
never changes a model in place; compose with ``MotionModel.with_options``).

Reference side (imports diffusers lazily): ``diffusers_unet2d()``,
``diffusers_vae()``, ``motion_adapter(v)`` and ``diffusers_motion_unet(v)``
load the same tensors into diffusers after converting them with diffusers' own
single-file converters, so the parity tests also check the engine's key layout
independently. ``per_frame_motion_norms`` and ``cross_frame_resnet_norms``
patch a diffusers ``UNetMotionModel`` instance (never the library) to the
original AnimateDiff's GroupNorm semantics (design.md section 5).

Pytest fixtures: ``demo_model_paths`` (the demo files on disk, written once per
session through conftest's ``demo_models_dir``).

The bench (``bench/bench_animatediff.py``) imports this module too, so both use
one definition of the diffusers configs.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kinema.models import checkpoint, demo
from kinema.models.motion import MotionModel, MotionModuleSet, infer_motion_config
from kinema.models.unet import UNetModel, infer_unet_config
from kinema.models.vae import AutoencoderKL, infer_vae_config

SEED = 0
VERSIONS = ("v1", "v2", "v3")
#: the demo sizes every fixture is built at: the tiny demo width; the bench may switch to ``MEDIUM`` (``use_sizes``)
SIZES = demo.DemoSizes()
#: the real SD1.5 / AnimateDiff block structure at half the width (the bench's medium size)
MEDIUM = demo.DemoSizes(model_channels=160, channel_mult=(1, 2, 4, 4), clip_hidden=384, vae_ch=64,
                        vae_mult=(1, 2, 4, 4))
#: the published SD1.5 widths (UNet 320 channels, a 12-layer CLIP text model 768 wide, VAE 128): the benches' real size
REAL = demo.DemoSizes(model_channels=320, channel_mult=(1, 2, 4, 4), clip_hidden=768, clip_layers=12, vae_ch=128,
                      vae_mult=(1, 2, 4, 4))


def use_sizes(sizes: demo.DemoSizes) -> None:
    """Build every fixture at ``sizes`` from now on (the caches are dropped). For the benches."""
    global SIZES
    SIZES = sizes
    for cached in (sd15_state_dict, motion_state_dict, unet, vae, motion_modules, diffusers_unet2d, diffusers_vae):
        cached.cache_clear()
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


# -- the demo weights, as state dicts ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sd15_state_dict() -> dict[str, torch.Tensor]:
    """The demo SD1.5 single-file checkpoint (fp32, seed ``SEED``), original LDM layout. Read-only."""
    return demo.sd15_state_dict(SEED, torch.float32, SIZES)


@functools.lru_cache(maxsize=None)
def motion_state_dict(version: str) -> dict[str, torch.Tensor]:
    """The demo AnimateDiff motion module ``version`` in the published layout. Read-only."""
    return demo.motion_state_dict(version, SEED, torch.float32, SIZES)


# -- engine models -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def unet() -> UNetModel:
    sd = checkpoint.sub_state_dict(sd15_state_dict(), UNET_PREFIX)
    return checkpoint.build_on_meta(lambda: UNetModel(infer_unet_config(sd)), sd, torch.float32, "UNet", "demo")


@functools.lru_cache(maxsize=None)
def vae() -> AutoencoderKL:
    sd = checkpoint.sub_state_dict(sd15_state_dict(), VAE_PREFIX)
    return checkpoint.build_on_meta(lambda: AutoencoderKL(infer_vae_config(sd)), sd, torch.float32, "VAE", "demo")


@functools.lru_cache(maxsize=None)
def motion_modules(version: str) -> MotionModuleSet:
    sd = motion_state_dict(version)
    return checkpoint.build_on_meta(
        lambda: MotionModuleSet(infer_motion_config(sd)), sd, torch.float32, "motion module", f"demo_{version}"
    )


def motion_model(version: str | None = "v3", **options) -> MotionModel:
    """The demo UNet with the demo motion module ``version`` applied (None: the image model)."""
    mm = None if version is None else motion_modules(version)
    return MotionModel(unet(), mm, name=f"demo_{version}" if version else "demo", **options)


@pytest.fixture(scope="session")
def demo_model_paths(demo_models_dir) -> dict[str, str]:
    """{"checkpoint", "v1", "v2", "v3"} -> paths of the demo files (conftest's ``demo_models_dir``)."""
    return demo.write_demo_models(demo_models_dir)


# -- diffusers configs, read off the tensor shapes -----------------------------------------------------------------

def diffusers_unet_config(ldm_unet: dict) -> dict:
    """The ``UNet2DConditionModel`` config of an SD1.5 LDM UNet (``model.diffusion_model.*`` stripped).

    The block structure is SD1.5's (CrossAttnDownBlock2D x3 + DownBlock2D, 2 layers a
    block); widths come from the shapes. ``attention_head_dim=8`` is diffusers' SD1.5
    naming quirk: it is the number of heads.
    """
    widths = tuple(ldm_unet[f"input_blocks.{1 + 3 * i}.0.out_layers.3.weight"].shape[0] for i in range(4))
    return dict(
        sample_size=64,
        in_channels=ldm_unet["input_blocks.0.0.weight"].shape[1],
        out_channels=ldm_unet["out.2.weight"].shape[0],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=ldm_unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        use_linear_projection=False,
    )


def diffusers_vae_config(ldm_vae: dict) -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM VAE (``first_stage_model.*`` stripped)."""
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in ldm_vae:
        levels += 1
    widths = tuple(ldm_vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    layers = 0
    while f"encoder.down.0.block.{layers}.conv1.weight" in ldm_vae:
        layers += 1
    return dict(
        in_channels=ldm_vae["encoder.conv_in.weight"].shape[1],
        out_channels=ldm_vae["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=ldm_vae["decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,
        act_fn="silu",
        sample_size=256,
    )


def motion_adapter_config(motion_sd: dict) -> dict:
    """The diffusers ``MotionAdapter`` config of an AnimateDiff SD1.5 motion module file."""
    suffix = ".motion_modules.0.temporal_transformer.norm.weight"
    widths = tuple(motion_sd[f"down_blocks.{i}{suffix}"].shape[0] for i in range(4))
    pe = next(v for k, v in motion_sd.items() if k.endswith("pos_encoder.pe"))
    return dict(
        block_out_channels=widths,
        motion_layers_per_block=2,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=8,
        motion_norm_num_groups=32,
        motion_max_seq_length=pe.shape[1],
        use_motion_mid_block=any(k.startswith("mid_block.") for k in motion_sd),
    )


# -- diffusers models on the same weights --------------------------------------------------------------------------

def _load(model: nn.Module, sd: dict, allowed_missing: str | None = None) -> nn.Module:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (allowed_missing and k.endswith(allowed_missing))]
    assert not missing and not unexpected, f"diffusers conversion mismatch: missing {missing}, unexpected {unexpected}"
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def diffusers_unet2d():
    """diffusers ``UNet2DConditionModel`` with the demo UNet, converted by ``convert_ldm_unet_checkpoint``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    full = sd15_state_dict()
    model = UNet2DConditionModel(**diffusers_unet_config(checkpoint.sub_state_dict(full, UNET_PREFIX)))
    return _load(model, convert_ldm_unet_checkpoint(full, model.config))


@functools.lru_cache(maxsize=None)
def diffusers_vae():
    """diffusers ``AutoencoderKL`` with the demo VAE, converted by ``convert_ldm_vae_checkpoint``."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    full = sd15_state_dict()
    model = DiffusersVAE(**diffusers_vae_config(checkpoint.sub_state_dict(full, VAE_PREFIX)))
    return _load(model, convert_ldm_vae_checkpoint(full, model.config))


def motion_adapter(version: str):
    """diffusers ``MotionAdapter`` with the demo motion module, converted by
    ``convert_animatediff_checkpoint_to_diffusers`` (which drops the stored positional
    tables: diffusers recomputes them, so only those may be missing)."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    sd = motion_state_dict(version)
    adapter = MotionAdapter(**motion_adapter_config(sd))
    return _load(adapter, convert_animatediff_checkpoint_to_diffusers(dict(sd)), allowed_missing="pos_embed.pe")


def diffusers_motion_unet(version: str, per_frame_motion_norm: bool = True):
    """A fresh diffusers ``UNetMotionModel.from_unet2d(unet2d, adapter)`` on the demo weights.

    ``per_frame_motion_norm`` patches its motion-module GroupNorm to per frame, as the
    original AnimateDiff (diffusers pools it across frames).
    """
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_unet2d(diffusers_unet2d(), motion_adapter(version)).eval().requires_grad_(False)
    if per_frame_motion_norm:
        per_frame_motion_norms(model)
    return model


class PerFrameGroupNorm(nn.Module):
    """A GroupNorm given ``b c f h w`` that normalizes each frame on its own (original AnimateDiff)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b c f h w -> b c f h w"""
        y = self.inner(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(y, "(b f) c h w -> b c f h w", b=x.shape[0])


class CrossFrameGroupNorm(nn.Module):
    """A GroupNorm given ``(b f) c h w`` with statistics over all ``frames`` of a video (AnimateDiff v1)."""

    def __init__(self, norm: nn.GroupNorm, frames: int):
        super().__init__()
        self.inner, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b f) c h w -> (b f) c h w"""
        n = self.inner
        v = F.group_norm(rearrange(x, "(b f) c h w -> b c f h w", f=self.frames), n.num_groups, n.weight, n.bias, n.eps)
        return rearrange(v, "b c f h w -> (b f) c h w")


def per_frame_motion_norms(model) -> int:
    """Make every ``AnimateDiffTransformer3D.norm`` of a diffusers model per frame; returns how many."""
    count = 0
    for module in list(model.modules()):
        if type(module).__name__ == "AnimateDiffTransformer3D" and isinstance(module.norm, nn.GroupNorm):
            module.norm = PerFrameGroupNorm(module.norm)
            count += 1
    return count


def cross_frame_resnet_norms(model, frames: int) -> int:
    """Make the ResNet norms and ``conv_norm_out`` of a diffusers UNetMotionModel pool over ``frames``
    (the original AnimateDiff v1 UNet3D: torch GroupNorm on 5-D tensors). The spatial transformers'
    norms stay per frame, as in the original. Returns how many norms were patched."""
    count = 0
    for module in list(model.modules()):
        if type(module).__name__ == "ResnetBlock2D":
            module.norm1 = CrossFrameGroupNorm(module.norm1, frames)
            module.norm2 = CrossFrameGroupNorm(module.norm2, frames)
            count += 2
    model.conv_norm_out = CrossFrameGroupNorm(model.conv_norm_out, frames)
    return count + 1


class OutOfMemoryAbove:
    """A VAE that raises the allocator's error when a call holds more than ``frames`` frames or ``pixels`` latent
    pixels, and records the calls."""

    def __init__(self, vae, frames=99, pixels=10**9):
        self.vae, self.frames, self.pixels, self.calls = vae, frames, pixels, []

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def _check(self, x):
        self.calls.append(tuple(x.shape))
        if x.shape[0] > self.frames or x.shape[-2] * x.shape[-1] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    def decode(self, z):
        self._check(z)
        return self.vae.decode(z)

    def encode(self, x):  # pixels counted in image pixels
        self._check(x)
        return self.vae.encode(x)
