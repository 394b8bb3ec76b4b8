"""Tiny demo models in the real file formats, made deterministically by the pack's own code.

They have the real block structure (4 UNet levels with attention on the first
three, 2 ResBlocks a level, GroupNorm with 32 groups, the CLIP text model and
VAE of SD1.5, AnimateDiff motion modules v1/v2/v3) at a tiny width, and random
weights: they are UNTRAINED. They exist so the pack, its tests and its headless
runner work end to end on any machine; the videos they make are noise-like.

Every tensor is drawn from a generator seeded by (seed, key name), so the files
are identical on every machine and for every torch version.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch

from .motion import MotionConfig, MotionModuleSet, sinusoidal_table
from .svd import SVDUNet, SVDUNetConfig
from .svd_model import variant_of
from .unet import UNetConfig, UNetModel
from .vae import (
    SVD_COND_ENCODER_PREFIX,
    SVD_VAE_PREFIX,
    AutoencoderKL,
    ImageEncoderKL,
    TemporalAutoencoder,
    TemporalVAEConfig,
    VAEConfig,
)

DEMO_CHECKPOINT = "kinema_demo_sd15.safetensors"
DEMO_MOTION = {v: f"kinema_demo_mm_{v}.safetensors" for v in ("v1", "v2", "v3")}
DEMO_MOTION_LORA = "kinema_demo_motion_lora_v2.safetensors"  # a v2 MotionLoRA, as v2_lora_ZoomIn.ckpt
DEMO_LORA = "kinema_demo_lora_sd15.safetensors"  # a kohya-style SD1.5 LoRA: UNet (with 3x3 LoCon) + text encoder
DEMO_ADAPTER_LORA = "kinema_demo_v3_adapter.safetensors"  # the layout of the AnimateDiff v3 adapter (processor style)
DEMO_SVD = {"svd": "kinema_demo_svd.safetensors", "svd_xt": "kinema_demo_svd_xt.safetensors"}
DEMO_CLIP_VISION = "kinema_demo_clip_vision.safetensors"  # transformers layout, as ComfyUI's clip_vision files
DEMO_CONTROLNET = "kinema_demo_controlnet_depth.safetensors"  # control_model.* keys, as lllyasviel's .pth files
DEMO_CONTROLNET_HINT = (8, 16, 16, 32)  # the hint block's widths (16, 32, 96, 256 in the published files)
DEMO_IP_ADAPTER = "kinema_demo_ip_adapter_sd15.safetensors"  # flat keys, as ip-adapter_sd15.safetensors
DEMO_DEPTH = "kinema_demo_dpt"  # a transformers DPT folder: config.json, model.safetensors, preprocessor_config.json
DEMO_LORA_RANK = 4
DEMO_VERSION = "4"  # bump when the demo tensors change: cached files of another version are rewritten
UNTRAINED_NOTE = (
    "Kinema demo models: tiny, with random (untrained) weights, made by the pack itself. "
    "Put a real SD1.5 checkpoint and motion module in your models folder for real videos."
)


@dataclass(frozen=True)
class DemoSizes:
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 2, 2)
    clip_hidden: int = 64
    clip_layers: int = 2
    vae_ch: int = 32
    vae_mult: tuple = (1, 2, 2, 2)
    vision_hidden: int = 64  # the CLIP image tower of the demo SVD (ViT, patch 14)
    vision_layers: int = 2
    vision_image: int = 224  # as published (diffusers hard-codes 224 in its SVD pipeline)


def _clip_shapes(hidden: int, layers: int) -> dict[str, tuple]:
    """Key names and shapes of a transformers CLIPTextModel (SD1.5 layout, 49408 tokens, 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    # transformers 4 names keys "text_model.*", transformers 5 drops that level: normalise to the bare names
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def _fill(key: str, shape: tuple, seed: int) -> torch.Tensor:
    """A deterministic tensor for ``key``: unit norms, zero biases, fan-in scaled weights."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    leaf = key.rsplit(".", 1)[-1]
    parts = key.split(".")
    is_norm = any("norm" in p for p in parts) or key.endswith(
        (".in_layers.0.weight", ".in_layers.0.bias", ".out_layers.0.weight", ".out_layers.0.bias",
         "diffusion_model.out.0.weight", "diffusion_model.out.0.bias")
    )
    if leaf == "bias":
        if is_norm:
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen) * 0.02
    if is_norm and len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if "embedding" in key:
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _tensors(shapes: dict[str, tuple], prefix: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {prefix + k: _fill(prefix + k, s, seed).to(dtype) for k, s in shapes.items()}


def _shapes(module_factory) -> dict[str, tuple]:
    with torch.device("meta"):
        m = module_factory()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def demo_unet_config(sizes: DemoSizes = DemoSizes()) -> UNetConfig:
    return UNetConfig(model_channels=sizes.model_channels, channel_mult=sizes.channel_mult,
                      context_dim=sizes.clip_hidden)


def sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes()) -> dict:
    """A tiny SD1.5 single-file checkpoint: UNet, VAE, CLIP text model and DDPM buffers."""
    sd = {}
    sd.update(_tensors(_shapes(lambda: UNetModel(demo_unet_config(sizes))), "model.diffusion_model.", seed, dtype))
    vcfg = VAEConfig(ch=sizes.vae_ch, ch_mult=sizes.vae_mult)
    sd.update(_tensors(_shapes(lambda: AutoencoderKL(vcfg)), "first_stage_model.", seed, dtype))
    sd.update(_tensors(_clip_shapes(sizes.clip_hidden, sizes.clip_layers), "cond_stage_model.transformer.text_model.",
                       seed, dtype))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = alphas_cumprod.float()
    sd["alphas_cumprod_prev"] = torch.cat([torch.ones(1), alphas_cumprod[:-1].float()])
    return sd


def motion_state_dict(version: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                      sizes: DemoSizes = DemoSizes()) -> dict:
    """A tiny AnimateDiff motion module in the published layout (v1: 24 positions; v2: mid block; v3: 32)."""
    chans = tuple(sizes.model_channels * m for m in sizes.channel_mult)
    cfg = MotionConfig(down_channels=chans, modules_per_down=2, modules_per_up=3, has_mid=version == "v2",
                       max_len=24 if version == "v1" else 32)
    shapes = _shapes(lambda: MotionModuleSet(cfg))
    sd = {}
    for k, s in shapes.items():
        if k.endswith("pos_encoder.pe"):
            sd[k] = sinusoidal_table(s[1], s[2]).to(dtype)
        else:
            sd[k] = _fill(f"{version}.{k}", s, seed).to(dtype)
    return sd


def _lora_halves(key: str, out_shape: tuple, in_shape: tuple, seed: int, rank: int, dtype) -> tuple:
    """Deterministic (down [r, *in_shape], up [o, r, *1s]) for LoRA ``key``: small updates (about a tenth of
    the weight's scale)."""
    down = _fill(f"{key}.down", (rank, *in_shape), seed)
    up = _fill(f"{key}.up", (out_shape, rank) + (1,) * (len(in_shape) - 1), seed) * 0.1
    return down.to(dtype), up.to(dtype)


def motion_lora_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes(),
                           rank: int = DEMO_LORA_RANK) -> dict:
    """A tiny AnimateDiff v2 MotionLoRA in the published layout (every attention of every motion module, the
    mid block's included): ``...attention_blocks.m.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``."""
    chans = tuple(sizes.model_channels * m for m in sizes.channel_mult)
    cfg = MotionConfig(down_channels=chans, modules_per_down=2, modules_per_up=3, has_mid=True, max_len=32)
    sd = {}
    for k, shape in _shapes(lambda: MotionModuleSet(cfg)).items():
        if ".attention_blocks." not in k or not k.endswith(".weight"):
            continue
        base, rest = k[: -len(".weight")].split(".attention_blocks.")
        m, proj = rest.split(".", 1)
        if proj not in ("to_q", "to_k", "to_v", "to_out.0"):
            continue
        name = f"{base}.attention_blocks.{m}.processor.{proj.removesuffix('.0')}_lora"
        down, up = _lora_halves(f"mlora.{name}", shape[0], shape[1:], seed, rank, dtype)
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = down, up
    return sd


def _diffusers_layers(sizes: DemoSizes) -> dict[str, tuple[str, tuple]]:
    """diffusers module path -> (LDM module path, weight shape) for the Linear/Conv2d layers of the demo UNet."""
    from .lora import diffusers_module_name, ldm_to_diffusers_blocks

    cfg = demo_unet_config(sizes)
    with torch.device("meta"):
        unet = UNetModel(cfg)
    blocks = ldm_to_diffusers_blocks(cfg)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            diff = diffusers_module_name(name, blocks)
            if diff is not None:
                out[diff] = (name, tuple(module.weight.shape))
    return out


def sd15_lora_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes(),
                         rank: int = DEMO_LORA_RANK, alpha: float = 2.0) -> dict:
    """A tiny kohya-style SD1.5 LoRA: ``lora_unet_<diffusers path>`` for every attention projection, proj_in/out,
    feed-forward and the ResBlocks' 3x3 convs (LoCon), ``lora_te_text_model_encoder_layers_N_...`` for the text
    encoder's attention and MLP; each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``."""
    sd = {}

    def add(name: str, shape: tuple):
        down, up = _lora_halves(f"lora.{name}", shape[0], shape[1:], seed, rank, dtype)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)

    for diff, (_, shape) in _diffusers_layers(sizes).items():
        leaf = diff.rsplit(".", 1)[-1]
        if ".attentions." in diff or (".resnets." in diff and leaf in ("conv1", "conv2")):
            add("lora_unet_" + diff.replace(".", "_"), shape)
    for key, shape in _clip_shapes(sizes.clip_hidden, sizes.clip_layers).items():
        if key.startswith("encoder.layers.") and key.endswith(("_proj.weight", "fc1.weight", "fc2.weight")):
            add("lora_te_text_model_" + key[: -len(".weight")].replace(".", "_"), shape)
    return sd


def adapter_lora_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes(),
                            rank: int = DEMO_LORA_RANK) -> dict:
    """A tiny LoRA in the layout of the AnimateDiff v3 adapter: every spatial attention's projections as
    ``<diffusers path>.attn{1,2}.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (no alpha)."""
    sd = {}
    for diff, (_, shape) in _diffusers_layers(sizes).items():
        head, _, proj = diff.rpartition(".attn")
        if not head or not proj[:1] in ("1", "2"):
            continue
        attn, _, leaf = proj.partition(".")
        if leaf not in ("to_q", "to_k", "to_v", "to_out.0"):
            continue
        name = f"{head}.attn{attn}.processor.{leaf.removesuffix('.0')}_lora"
        down, up = _lora_halves(f"adapter.{name}", shape[0], shape[1:], seed, rank, dtype)
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = down, up
    return sd


def _vision_shapes(sizes: DemoSizes) -> dict[str, tuple]:
    """Key names and shapes of a transformers CLIPVisionModelWithProjection (gelu ViT, patch 14, projection to
    the demo SVD UNet's context width)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
                           num_hidden_layers=sizes.vision_layers, num_attention_heads=max(1, sizes.vision_hidden // 64),
                           image_size=sizes.vision_image, patch_size=14, projection_dim=sizes.clip_hidden,
                           hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def demo_svd_unet_config(sizes: DemoSizes = DemoSizes()) -> SVDUNetConfig:
    return SVDUNetConfig(model_channels=sizes.model_channels, channel_mult=sizes.channel_mult,
                         context_dim=sizes.clip_hidden)


def clip_vision_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes()) -> dict:
    """A tiny CLIP vision model in transformers names (``vision_model.*``, ``visual_projection.weight``)."""
    return {k: _fill(f"clip_vision.{k}", shape, seed).to(dtype) for k, shape in _vision_shapes(sizes).items()}


def svd_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes(),
                   image_decoder: bool = False) -> dict:
    """A tiny Stable Video Diffusion single-file checkpoint in the published layout: the VideoUNet, the
    autoencoder with its temporal decoder, the conditioning-frame encoder (a copy of the VAE encoder with its
    quant_conv) and the CLIP image tower in open_clip names. ``image_decoder``: the layout of the image-decoder
    releases (svd_image_decoder.safetensors): the autoencoder is sgm's AutoencoderKL, the SD VAE's layout with
    ``quant_conv`` and ``post_quant_conv`` (the other tensors are the same as without it)."""
    from .clip_vision import SVD_PREFIX, transformers_to_open_clip

    sd = _tensors(_shapes(lambda: SVDUNet(demo_svd_unet_config(sizes))), "model.diffusion_model.", seed, dtype)
    if image_decoder:
        first = _tensors(_shapes(lambda: AutoencoderKL(VAEConfig(ch=sizes.vae_ch, ch_mult=sizes.vae_mult))),
                         SVD_VAE_PREFIX, seed, dtype)
    else:
        vcfg = TemporalVAEConfig(ch=sizes.vae_ch, ch_mult=sizes.vae_mult)
        first = _tensors(_shapes(lambda: TemporalAutoencoder(vcfg)), SVD_VAE_PREFIX, seed, dtype)
    sd.update(first)
    cond = _tensors(_shapes(lambda: ImageEncoderKL(VAEConfig(ch=sizes.vae_ch, ch_mult=sizes.vae_mult))),
                    SVD_COND_ENCODER_PREFIX, seed, dtype)
    for k in cond:  # the same encoder weights as the first stage, as in the published files
        twin = SVD_VAE_PREFIX + k[len(SVD_COND_ENCODER_PREFIX):]
        if twin in first:
            cond[k] = first[twin].clone()
    sd.update(cond)
    sd.update(transformers_to_open_clip(clip_vision_state_dict(seed, dtype, sizes), prefix=SVD_PREFIX))
    return sd


def ip_adapter_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes()) -> dict:
    """A tiny SD1.5 IP-Adapter in the published flat layout (``image_proj.{proj,norm}.*``,
    ``ip_adapter.{1,3,...}.to_{k,v}_ip.weight``, 4 tokens) for the demo UNet's cross-attention and the demo CLIP
    vision's image embeddings (its LayerNorm bias is drawn too, so every weight matters)."""
    from .ip_adapter import IPAdapter, IPAdapterConfig, cross_attention_layers

    ucfg = demo_unet_config(sizes)
    cfg = IPAdapterConfig(clip_dim=sizes.clip_hidden, cross_dim=ucfg.context_dim, tokens=4,
                          widths=tuple(width for _, _, width in cross_attention_layers(ucfg)))
    sd = {k: _fill(f"ip_adapter_demo.{k}", s, seed) for k, s in _shapes(lambda: IPAdapter(cfg)).items()}
    sd["image_proj.norm.bias"] = _fill("ip_adapter_demo.image_proj_shift", sd["image_proj.norm.bias"].shape, seed)
    return {k: v.to(dtype) for k, v in sd.items()}


def controlnet_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, sizes: DemoSizes = DemoSizes()) -> dict:
    """A tiny SD1.5 ControlNet for the demo UNet, keys ``control_model.*`` as lllyasviel's published ``.pth``.

    The zero convolutions (``zero_convs``, ``middle_block_out``, and the hint block's last one) start at zero in
    training and are trained away from it; here they are random (the 1x1 ones at a tenth of the usual scale), so the
    ControlNet has a visible effect on the demo UNet.
    """
    from .controlnet import PREFIX, ControlNet, ControlNetConfig

    cfg = ControlNetConfig.for_unet(demo_unet_config(sizes), DEMO_CONTROLNET_HINT)
    sd = _tensors(_shapes(lambda: ControlNet(cfg)), PREFIX, seed, torch.float32)
    for k in sd:
        if k.startswith((f"{PREFIX}zero_convs.", f"{PREFIX}middle_block_out.")):
            sd[k] = sd[k] * 0.1
    return {k: v.to(dtype) for k, v in sd.items()}


def demo_depth_config():
    """A tiny DPT (the DPT-Large structure: ViT with readout projection, 4-stage neck, depth head) at 64x64."""
    from transformers import DPTConfig

    return DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                     patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                     fusion_hidden_size=16, architectures=["DPTForDepthEstimation"])


#: the demo DPT's preprocessor_config.json, in the published DPTImageProcessor layout (at 64 instead of 384)
DEMO_DEPTH_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "ensure_multiple_of": 1,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "DPTImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "keep_aspect_ratio": False, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 64, "width": 64},
}


def depth_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """The demo DPT's weights in transformers names (``dpt.*``, ``neck.*``, ``head.head.*``)."""
    from transformers import DPTForDepthEstimation

    cfg = demo_depth_config()
    shapes = _shapes(lambda: DPTForDepthEstimation(cfg))
    return {k: _fill(f"depth_demo.{k}", s, seed).to(dtype) for k, s in shapes.items()}


def _save_json(data: dict, path: str) -> None:
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_demo_depth_model(folder: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                           overwrite: bool = False) -> str:
    """Write the demo DPT as a transformers model folder (as published repositories are); returns ``folder``."""
    meta = {"format": "pt", "kinema_demo": DEMO_VERSION, "seed": str(seed), "dtype": str(dtype),
            "note": UNTRAINED_NOTE}
    weights = os.path.join(folder, "model.safetensors")
    config, pre = os.path.join(folder, "config.json"), os.path.join(folder, "preprocessor_config.json")
    if not overwrite and _is_current(weights, meta) and os.path.isfile(config) and os.path.isfile(pre):
        return folder
    os.makedirs(folder, exist_ok=True)
    _save_json(demo_depth_config().to_dict(), config)
    _save_json(DEMO_DEPTH_PREPROCESSOR, pre)
    _save(depth_state_dict(seed, dtype), weights, meta)
    return folder


def _save(sd: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_demo_models(models_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False) -> dict[str, str]:
    """Write the demo checkpoint and motion modules under ``models_dir`` (ComfyUI's folder names).

    Returns {"checkpoint": path, "v1": path, "v2": path, "v3": path, "motion_lora_v2": path, "lora": path,
    "adapter_lora": path, "svd": path, "svd_xt": path, "clip_vision": path, "ip_adapter": path,
    "controlnet": path, "depth_model": folder}. Existing files are kept unless ``overwrite``.
    """
    meta = {"kinema_demo": DEMO_VERSION, "seed": str(seed), "dtype": str(dtype), "note": UNTRAINED_NOTE}
    paths = {"checkpoint": os.path.join(models_dir, "checkpoints", DEMO_CHECKPOINT)}
    for v, name in DEMO_MOTION.items():
        paths[v] = os.path.join(models_dir, "animatediff_models", name)
    if overwrite or not _is_current(paths["checkpoint"], meta):
        _save(sd15_state_dict(seed, dtype), paths["checkpoint"], meta)
    for v in DEMO_MOTION:
        if overwrite or not _is_current(paths[v], meta):
            _save(motion_state_dict(v, seed, dtype), paths[v], meta)
    loras = {
        "motion_lora_v2": (os.path.join(models_dir, "animatediff_motion_lora", DEMO_MOTION_LORA),
                           motion_lora_state_dict),
        "lora": (os.path.join(models_dir, "loras", DEMO_LORA), sd15_lora_state_dict),
        "adapter_lora": (os.path.join(models_dir, "loras", DEMO_ADAPTER_LORA), adapter_lora_state_dict),
    }
    for key, (path, make) in loras.items():
        paths[key] = path
        if overwrite or not _is_current(path, meta):
            _save(make(seed, dtype), path, meta)
    svd = None
    for variant, name in DEMO_SVD.items():
        paths[variant] = os.path.join(models_dir, "checkpoints", name)
        if overwrite or not _is_current(paths[variant], meta):
            svd = svd if svd is not None else svd_state_dict(seed, dtype)
            _save(svd, paths[variant], meta)
    paths["clip_vision"] = os.path.join(models_dir, "clip_vision", DEMO_CLIP_VISION)
    if overwrite or not _is_current(paths["clip_vision"], meta):
        _save(clip_vision_state_dict(seed, dtype), paths["clip_vision"], meta)
    paths["controlnet"] = os.path.join(models_dir, "controlnet", DEMO_CONTROLNET)
    if overwrite or not _is_current(paths["controlnet"], meta):
        _save(controlnet_state_dict(seed, dtype), paths["controlnet"], meta)
    paths["ip_adapter"] = os.path.join(models_dir, "ipadapter", DEMO_IP_ADAPTER)
    if overwrite or not _is_current(paths["ip_adapter"], meta):
        _save(ip_adapter_state_dict(seed, dtype), paths["ip_adapter"], meta)
    paths["depth_model"] = write_demo_depth_model(os.path.join(models_dir, "depth_models", DEMO_DEPTH), seed, dtype,
                                                  overwrite)
    return paths


def _is_current(path: str, meta: dict) -> bool:
    """True when ``path`` is a demo file written by this version with the same seed and dtype."""
    if not os.path.exists(path):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}) == meta
    except Exception:  # unreadable: rewrite it
        return False


def substitute(kind: str, name: str) -> str | None:
    """The demo file that stands in for model ``name`` of folder ``kind`` (None: no demo of that kind).

    A checkpoint named for SVD ("svd", "stableVideoDiffusion") gets the demo SVD of the variant the loader
    reads from the name (``svd_model.variant_of``: ``svd_xt_1_1`` -> svd_xt), any other the demo SD1.5.
    Motion modules keep their version where the name tells it (``v3_sd15_mm`` -> v3,
    ``mm_sd_v15_v2`` -> v2, ``mm_sd_v15`` -> v1). MotionLoRAs are stood in for by the demo v2 MotionLoRA;
    LoRAs by the demo v3-adapter-style LoRA when the name says "adapter", else by the kohya-style one.
    """
    if kind == "checkpoints":
        lower = os.path.basename(str(name)).lower()
        if "svd" in lower or "videodiffusion" in lower:
            return DEMO_SVD[variant_of(name)]  # the variant the loader reads from the name
        return DEMO_CHECKPOINT
    if kind == "clip_vision":
        return None if str(name).startswith("(") else DEMO_CLIP_VISION
    if kind == "ipadapter":
        return DEMO_IP_ADAPTER
    if kind == "controlnet":
        return DEMO_CONTROLNET
    if kind == "depth_models":
        return DEMO_DEPTH
    if kind == "animatediff_models":
        lower = os.path.basename(str(name)).lower()
        if "v3" in lower:
            return DEMO_MOTION["v3"]
        if "v2" in lower:
            return DEMO_MOTION["v2"]
        if any(tag in lower for tag in ("v14", "v15", "v1.")):
            return DEMO_MOTION["v1"]
        return DEMO_MOTION["v2"]
    if kind == "animatediff_motion_lora":
        return DEMO_MOTION_LORA
    if kind == "loras":
        lower = os.path.basename(str(name)).lower()
        return DEMO_ADAPTER_LORA if "adapter" in lower else DEMO_LORA
    return None


def default_cache_dir() -> str:
    """Where the headless runner keeps the demo models (``KINEMA_CACHE_DIR`` or ~/.cache/kinema)."""
    base = os.environ.get("KINEMA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kinema")
    return os.path.join(base, "demo_models")
