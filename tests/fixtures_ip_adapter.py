"""IP-Adapter fixtures: the demo adapter in the published layouts, the variants Kinema refuses, and diffusers'
UNet with the same adapter loaded through diffusers' own IP-Adapter loading code.

- ``ip_adapter_state_dict()``: the demo SD1.5 IP-Adapter (``kinema.models.demo``), flat keys as in
  ip-adapter_sd15.safetensors; ``nested(sd)`` is the ``.bin`` layout ``{"image_proj": ..., "ip_adapter": ...}``.
- ``basic_state_dict(...)``: a basic IP-Adapter of any widths (an SDXL-sized one, one for another UNet, one
  taking ViT-H/14 embeddings); ``plus_state_dict``, ``full_face_state_dict``, ``faceid_state_dict`` and
  ``faceid_plus_state_dict``: the other published variants, key for key as the reference implementation names
  them (Resampler, MLP projection, FaceID's projection and LoRA), at tiny sizes.
- ``diffusers_ip_unet()``: a copy of ``fixtures.diffusers_unet2d()`` (the cached one is never touched) with the
  demo adapter loaded by ``UNet2DConditionModel._load_ip_adapter_weights`` (what ``load_ip_adapter`` of the
  diffusers pipelines calls): its layer numbering is diffusers', independent of Kinema's.

Every tensor comes from a seeded generator, so each call gives the same weights.
"""
from __future__ import annotations

import copy
import functools
import zlib

import torch
from kinema.models import demo
from kinema.models.ip_adapter import IPAdapter, IPAdapterConfig, build_ip_adapter

SEED = 0


@functools.cache
def ip_adapter_state_dict() -> dict[str, torch.Tensor]:
    """The demo IP-Adapter (fp32, seed ``SEED``), flat published keys. Read-only."""
    return demo.ip_adapter_state_dict(SEED, torch.float32)


@functools.cache
def ip_adapter() -> IPAdapter:
    """The demo IP-Adapter as an engine model. Read-only."""
    return build_ip_adapter(dict(ip_adapter_state_dict()), torch.float32, "demo_ip_adapter")


def nested(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The ``.bin`` layout of a flat IP-Adapter state dict: ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, t in sd.items():
        part, _, rest = key.partition(".")
        out[part][rest] = t
    return out


def save_safetensors(sd: dict, path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def save_bin(sd: dict, path: str) -> str:
    """Save the nested ``.bin`` layout as the reference training script does (``torch.save`` of the dict)."""
    torch.save(nested(sd), path)
    return path


def _rand(key: str, shape: tuple, seed: int = SEED) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen) * 0.1


def _random(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: _rand(k, s) for k, s in shapes.items()}


def _ip_layers(cross_dim: int, widths) -> dict[str, tuple]:
    shapes = {}
    for k, w in enumerate(widths):
        shapes[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = (w, cross_dim)
        shapes[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = (w, cross_dim)
    return shapes


#: the widths of the demo UNet's 16 cross-attentions in file order: input blocks 1, 2, 4, 5, 7, 8; output blocks
#: 3..11; the middle block
DEMO_WIDTHS = (32, 32, 64, 64, 64, 64) + (64,) * 6 + (32,) * 3 + (64,)


def basic_state_dict(clip_dim: int = 64, cross_dim: int = 64, widths=DEMO_WIDTHS, tokens: int = 4) -> dict:
    """A basic IP-Adapter (ImageProjModel + to_k_ip/to_v_ip) of any sizes, flat keys."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in IPAdapter(IPAdapterConfig(clip_dim, cross_dim, tokens,
                                                                           tuple(widths))).state_dict().items()}
    return _random(shapes)


def plus_state_dict(cross_dim: int = 64, clip_hidden: int = 64, queries: int = 16, depth: int = 2,
                    heads: int = 2, dim_head: int = 16) -> dict:
    """IP-Adapter Plus (ip-adapter-plus_sd15, plus-face): a Resampler image projection on the CLIP hidden states."""
    inner = heads * dim_head
    shapes = {"image_proj.latents": (1, queries, cross_dim),
              "image_proj.proj_in.weight": (cross_dim, clip_hidden), "image_proj.proj_in.bias": (cross_dim,),
              "image_proj.proj_out.weight": (cross_dim, cross_dim), "image_proj.proj_out.bias": (cross_dim,),
              "image_proj.norm_out.weight": (cross_dim,), "image_proj.norm_out.bias": (cross_dim,)}
    for i in range(depth):
        p = f"image_proj.layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{p}0.{norm}.weight"] = shapes[f"{p}0.{norm}.bias"] = (cross_dim,)
        shapes[f"{p}0.to_q.weight"] = (inner, cross_dim)
        shapes[f"{p}0.to_kv.weight"] = (2 * inner, cross_dim)
        shapes[f"{p}0.to_out.weight"] = (cross_dim, inner)
        shapes[f"{p}1.0.weight"] = shapes[f"{p}1.0.bias"] = (cross_dim,)
        shapes[f"{p}1.1.weight"] = (4 * cross_dim, cross_dim)
        shapes[f"{p}1.3.weight"] = (cross_dim, 4 * cross_dim)
    shapes.update(_ip_layers(cross_dim, DEMO_WIDTHS))
    return _random(shapes)


def full_face_state_dict(cross_dim: int = 64, clip_hidden: int = 64) -> dict:
    """IP-Adapter Full Face (ip-adapter-full-face_sd15): MLPProjModel ``proj.{0,2,3}`` (Linear, GELU, Linear, LN)."""
    shapes = {"image_proj.proj.0.weight": (clip_hidden, clip_hidden), "image_proj.proj.0.bias": (clip_hidden,),
              "image_proj.proj.2.weight": (cross_dim, clip_hidden), "image_proj.proj.2.bias": (cross_dim,),
              "image_proj.proj.3.weight": (cross_dim,), "image_proj.proj.3.bias": (cross_dim,)}
    shapes.update(_ip_layers(cross_dim, DEMO_WIDTHS))
    return _random(shapes)


def _faceid_proj(cross_dim: int, id_dim: int, tokens: int) -> dict[str, tuple]:
    return {"image_proj.proj.0.weight": (2 * id_dim, id_dim), "image_proj.proj.0.bias": (2 * id_dim,),
            "image_proj.proj.2.weight": (tokens * cross_dim, 2 * id_dim), "image_proj.proj.2.bias": (tokens * cross_dim,),
            "image_proj.norm.weight": (cross_dim,), "image_proj.norm.bias": (cross_dim,)}


def faceid_state_dict(cross_dim: int = 64, id_dim: int = 32, tokens: int = 4, rank: int = 4) -> dict:
    """IP-Adapter FaceID (ip-adapter-faceid_sd15.bin): face-embedding MLP projection, LoRA on every attention."""
    shapes = _faceid_proj(cross_dim, id_dim, tokens)
    shapes.update(_ip_layers(cross_dim, DEMO_WIDTHS))
    for k, w in enumerate(DEMO_WIDTHS):
        for n, ctx in ((2 * k, w), (2 * k + 1, cross_dim)):
            for proj, fan_in in (("to_q", w), ("to_k", ctx), ("to_v", ctx), ("to_out", w)):
                shapes[f"ip_adapter.{n}.{proj}_lora.down.weight"] = (rank, fan_in)
                shapes[f"ip_adapter.{n}.{proj}_lora.up.weight"] = (w, rank)
    return _random(shapes)


def faceid_plus_state_dict(cross_dim: int = 64, id_dim: int = 32, clip_hidden: int = 64, tokens: int = 4) -> dict:
    """IP-Adapter FaceID Plus: FaceID's projection plus a ``perceiver_resampler`` on the CLIP hidden states."""
    shapes = _faceid_proj(cross_dim, id_dim, tokens)
    shapes.update({"image_proj.perceiver_resampler.proj_in.weight": (cross_dim, clip_hidden),
                   "image_proj.perceiver_resampler.proj_in.bias": (cross_dim,),
                   "image_proj.perceiver_resampler.proj_out.weight": (cross_dim, cross_dim),
                   "image_proj.perceiver_resampler.proj_out.bias": (cross_dim,),
                   "image_proj.perceiver_resampler.norm_out.weight": (cross_dim,),
                   "image_proj.perceiver_resampler.norm_out.bias": (cross_dim,)})
    shapes.update(_ip_layers(cross_dim, DEMO_WIDTHS))
    return _random(shapes)


def sdxl_state_dict(clip_dim: int = 8, layers: int = 70, width: int = 8) -> dict:
    """A basic IP-Adapter with SDXL's 2048-wide cross-attention and 70 layers (as ip-adapter_sdxl; narrow layers
    and a small CLIP width keep it small)."""
    return basic_state_dict(clip_dim=clip_dim, cross_dim=2048, widths=(width,) * layers)


# -- the diffusers side --------------------------------------------------------------------------------------------

@functools.cache
def diffusers_ip_unet():
    """A copy of the demo diffusers UNet with the demo IP-Adapter loaded by diffusers' own loader. Set its scale with
    ``set_diffusers_scale`` before each use."""
    from fixtures import diffusers_unet2d

    model = copy.deepcopy(diffusers_unet2d())
    model._load_ip_adapter_weights([nested(ip_adapter_state_dict())], low_cpu_mem_usage=False)
    return model.eval().requires_grad_(False)


def set_diffusers_scale(model, scale: float) -> int:
    """Set the scale of every IP-Adapter attention processor of a diffusers UNet; returns how many there are."""
    count = 0
    for proc in model.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]
            count += 1
    return count
