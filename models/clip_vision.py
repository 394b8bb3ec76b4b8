"""The CLIP image encoder of Stable Video Diffusion (transformers ``CLIPVisionModelWithProjection``).

Where the weights come from (``load_image_encoder`` tells the layouts apart by their keys):

- the published SVD checkpoints hold the ViT-H/14 image tower in open_clip names under
  ``conditioner.embedders.0.open_clip.model.visual.`` (``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*`` with one fused
  ``attn.in_proj_*``, ``ln_post``, ``proj`` stored [width, proj_dim]);
- open_clip files (``open_clip_pytorch_model.bin``) hold the same under ``visual.``, next to
  the text tower;
- the files ComfyUI users keep in ``models/clip_vision`` (``clip_vision_h.safetensors``: the
  same LAION ViT-H/14 as SVD's; ``clip_vision_g``: ViT-bigG/14; OpenAI ViT-L/14) are in
  transformers names: ``vision_model.*`` and ``visual_projection.weight`` (stored
  [proj_dim, width]); some also hold a ``text_model``, a ``logit_scale``, the old
  ``vision_model.embeddings.position_ids`` buffer, or no projection at all.

``open_clip_to_transformers`` and ``transformers_to_open_clip`` convert between the two
names (fused ``in_proj`` <-> ``q_proj``/``k_proj``/``v_proj``, ``proj`` transposed,
``ln_pre`` <-> ``pre_layrnorm`` (transformers' spelling), ``conv1`` <-> ``patch_embedding``).

What the weights do not say, and how it is decided:

- the head count: 16 for the known widths 1024 (ViT-L/14), 1280 (ViT-H/14, head width 80)
  and 1664 (ViT-bigG/14, head width 104); otherwise ``max(1, width // 64)`` (open_clip's
  default head width). ``num_heads=`` overrides it.
- the activation: ``quick_gelu`` for width 1024, because the ViT-L/14 towers in circulation
  are OpenAI's (trained with QuickGELU; ComfyUI decides the same); exact ``gelu`` otherwise,
  open_clip's default ``nn.GELU``, which the LAION ViT-H/14 of SVD and ViT-bigG/14 use.
  ``activation=`` overrides it (LAION's ViT-L/14 needs ``"gelu"``).
- ``layer_norm_eps`` is 1e-5 (torch's LayerNorm default, which open_clip uses).

The image size comes from the number of positional embeddings (grid^2 + 1) times the patch
size; the model is built on the meta device and the file's tensors are assigned (the
open_clip conversion hands out views: q/k/v are slices of ``in_proj``, so nothing is copied
unless ``dtype`` casts).

Preprocessing (``preprocess_images``) is that of SVD's original conditioner (sgm
``FrozenOpenCLIPImageEmbedder``): the [-1, 1] image is resized straight to 224x224 (no
centre crop, the aspect ratio is not kept) the way kornia's ``resize(..., antialias=True)``
does it: a Gaussian blur per axis with sigma = max((factor - 1) / 2, 0.001) and an odd
kernel of int(max(4 sigma, 3)) taps (reflect padding), then bicubic interpolation with
``align_corners=True``; then back to [0, 1] and the CLIP mean/std. No clamping, and the
embedding is not L2-normalised. ComfyUI's ``clip_preprocess`` differs (shortest side to 224
with torch's antialias, centre crop, quantised to 8 bits): its SVD embeddings are close to,
not equal to, the original's.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import KinemaError
from .memory import remedy_for_out_of_memory
from .patching import copy_whole
from .placement import on_device

#: what to do when encoding images runs out of memory
ENCODE_REMEDY = ("give it fewer images at once, free GPU memory (other programs using it), or load it in fp16 (its "
                 "loader's precision)")

#: where the published SVD checkpoints keep the image tower (open_clip names)
SVD_PREFIX = "conditioner.embedders.0.open_clip.model.visual."
#: OpenAI CLIP's normalisation, which open_clip's ViT-H/14 and SVD use
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: head counts of the published towers, by width (the weights do not hold it)
KNOWN_HEADS = {1024: 16, 1280: 16, 1664: 16}

# open_clip name -> transformers name, outside the residual blocks
_TOWER_NAMES = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip name -> transformers name, inside residual block N (weight and bias each)
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOWER_NAMES_BACK = {v: k for k, v in _TOWER_NAMES.items()}
_BLOCK_NAMES_BACK = {v: k for k, v in _BLOCK_NAMES.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPEN_CLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPEN_CLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _is_tower_key(key: str) -> bool:
    """A key of the image tower in transformers names (the old ``position_ids`` buffer is not one)."""
    return (key.startswith("vision_model.") and not key.endswith("position_ids")) or key == "visual_projection.weight"


# -- key conversion ------------------------------------------------------------------------------------------------

def open_clip_to_transformers(sd: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The open_clip tower under ``prefix`` in transformers names (``vision_model.*``, ``visual_projection.weight``).

    Keys outside ``prefix`` are ignored; a key under it that a plain CLIP ViT does not have
    (LayerScale, attention pooling, a timm trunk, ...) raises ``KinemaError``. The result holds
    views of the input tensors (q/k/v slices of ``in_proj``, ``proj`` transposed): make them
    contiguous and separate (``.clone()``) before saving them with safetensors.
    """
    out = {}
    n = len(prefix)
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[n:]
        if name in _TOWER_NAMES:
            out[_TOWER_NAMES[name]] = t
        elif name == "proj":
            out["visual_projection.weight"] = t.t()
        elif m := _OPEN_CLIP_IN_PROJ.fullmatch(name):
            layer, kind = m.groups()
            if t.shape[0] % 3:
                raise KinemaError(f"'{key}' has shape {tuple(t.shape)}: a fused q/k/v projection needs 3 x width rows")
            for part, piece in zip(_QKV, t.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{part}.{kind}"] = piece
        elif (m := _OPEN_CLIP_BLOCK.fullmatch(name)) and m.group(2) in _BLOCK_NAMES:
            layer, part, kind = m.groups()
            out[f"vision_model.encoder.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"] = t
        else:
            raise KinemaError(f"'{key}' is not part of a plain CLIP ViT image tower: this open_clip variant is not "
                              "supported (Kinema reads the ViT towers of SVD, OpenAI CLIP and LAION open_clip)")
    return out


def transformers_to_open_clip(sd: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers ``vision_model.*`` (+ ``visual_projection.weight``) -> open_clip names under ``prefix``.

    ``prefix=SVD_PREFIX`` gives the keys of a published SVD checkpoint, ``"visual."`` those of an
    open_clip file. Keys outside ``vision_model.*`` and ``visual_projection.weight`` (a text
    tower, ``logit_scale``) and ``position_ids`` are dropped; a ``vision_model`` key a plain CLIP
    ViT does not have raises ``KinemaError``. The fused ``in_proj`` and the transposed ``proj`` are new
    contiguous tensors, so the result can be saved with safetensors as it is.
    """
    out = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if not _is_tower_key(key):
            continue
        if key in _TOWER_NAMES_BACK:
            out[prefix + _TOWER_NAMES_BACK[key]] = t
        elif key == "visual_projection.weight":
            out[prefix + "proj"] = t.t().contiguous()
        elif m := _HF_BLOCK.fullmatch(key):
            layer, part, kind = m.groups()
            if part.startswith("self_attn.") and part[len("self_attn."):] in _QKV:
                qkv.setdefault((layer, kind), {})[part[len("self_attn."):]] = t
                continue
            if part not in _BLOCK_NAMES_BACK:
                raise KinemaError(f"'{key}' is not part of a plain CLIP ViT image tower")
            out[f"{prefix}transformer.resblocks.{layer}.{_BLOCK_NAMES_BACK[part]}.{kind}"] = t
        else:
            raise KinemaError(f"'{key}' is not part of a plain CLIP ViT image tower")
    for (layer, kind), parts in sorted(qkv.items(), key=lambda item: (int(item[0][0]), item[0][1])):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise KinemaError(f"the CLIP vision weights lack 'vision_model.encoder.layers.{layer}.self_attn."
                              f"{missing[0]}.{kind}'")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV])
    return out


# -- layout detection ----------------------------------------------------------------------------------------------

_OPEN_CLIP_MARK = "conv1.weight"
_HF_MARK = "vision_model.embeddings.patch_embedding.weight"


def find_image_tower(sd: dict, prefix: str | None = None, name: str = "the state dict") -> tuple[str, str]:
    """Where the CLIP image tower of ``sd`` is: ``("open_clip" | "transformers", prefix)``.

    open_clip towers are found by ``{prefix}conv1.weight`` next to ``{prefix}class_embedding``
    (the prefix ends in ``visual.``); transformers ones by
    ``{prefix}vision_model.embeddings.patch_embedding.weight`` (the prefix is usually empty).
    With ``prefix`` given, only there. Raises ``KinemaError`` saying what the tensors are when
    there is no tower, or when there are several and ``prefix`` does not choose.
    """
    if prefix is not None:
        if prefix + _OPEN_CLIP_MARK in sd and prefix + "class_embedding" in sd:
            return "open_clip", prefix
        if prefix + _HF_MARK in sd and prefix + "vision_model.embeddings.class_embedding" in sd:
            return "transformers", prefix
        raise KinemaError(f"{name} has no CLIP vision tower under '{prefix}' (neither '{prefix}conv1.weight' with "
                          f"'{prefix}class_embedding' nor '{prefix}vision_model.embeddings.*')")
    found = []
    for key in sd:
        if key.endswith(_OPEN_CLIP_MARK):
            p = key[: -len(_OPEN_CLIP_MARK)]
            if p + "class_embedding" in sd and p + "transformer.resblocks.0.attn.in_proj_weight" in sd:
                found.append(("open_clip", p))
        elif key.endswith(_HF_MARK):
            p = key[: -len(_HF_MARK)]
            if p + "vision_model.embeddings.class_embedding" in sd:
                found.append(("transformers", p))
    if len(found) == 1:
        return found[0]
    if SVD_PREFIX in [p for _, p in found]:
        return "open_clip", SVD_PREFIX
    if found:
        where = ", ".join(f"'{p}'" for _, p in found)
        raise KinemaError(f"{name} holds {len(found)} CLIP vision towers (under {where}): choose one with prefix=")
    raise KinemaError(f"{name} is not a CLIP vision model: {_what_it_is(sd)}. Use a CLIP vision file from "
                      "models/clip_vision (like clip_vision_h.safetensors) or a Stable Video Diffusion checkpoint.")


def _what_it_is(sd: dict) -> str:
    keys = list(sd)
    if any(k.endswith("patch_embedding.weight") for k in keys):
        return "its vision tower has no class token (a SigLIP-style image encoder, not CLIP)"
    if any(".trunk." in k or k.startswith("trunk.") for k in keys):
        return "it is an open_clip model with a timm trunk, which Kinema does not read"
    if any(k.endswith("attnpool.c_proj.weight") for k in keys):
        return "it is a ResNet CLIP, not a ViT"
    from .checkpoint import FORMAT_NAMES, detect_format

    found = detect_format(sd)
    if found in ("clip_vision", "unknown"):
        return "no 'conv1.weight' + 'class_embedding' (open_clip) or 'vision_model.embeddings.*' (transformers) keys"
    if found == "svd":
        return f"it is a Stable Video Diffusion checkpoint without its image encoder ('{SVD_PREFIX}*')"
    return f"it is {FORMAT_NAMES[found]}"


# -- config and model ----------------------------------------------------------------------------------------------

def heads_for_width(width: int) -> int:
    """Attention heads of a CLIP ViT of this width: 16 for ViT-L/H/bigG, else one per 64 channels."""
    return KNOWN_HEADS.get(width, max(1, width // 64))


def activation_for_width(width: int) -> str:
    """``quick_gelu`` for width 1024 (OpenAI ViT-L/14), exact ``gelu`` otherwise (open_clip's default)."""
    return "quick_gelu" if width == 1024 else "gelu"


def infer_vision_config(sd: dict, num_heads: int | None = None, activation: str | None = None):
    """A ``CLIPVisionConfig`` from the shapes of a tower in transformers names (no prefix)."""
    from transformers import CLIPVisionConfig

    needed = (_HF_MARK, "vision_model.embeddings.position_embedding.weight",
              "vision_model.encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise KinemaError(f"the CLIP vision weights lack '{missing[0]}': the file is incomplete")
    width, channels, ph, pw = sd[_HF_MARK].shape
    if ph != pw:
        raise KinemaError(f"the CLIP vision patches are {ph}x{pw}: only square patches are supported")
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(max(positions - 1, 0))
    if grid < 1 or grid * grid != positions - 1:
        raise KinemaError(f"the CLIP vision tower has {positions} positions, not a square grid plus the class token")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    heads = num_heads if num_heads is not None else heads_for_width(width)
    if heads < 1 or width % heads:
        raise KinemaError(f"a CLIP vision tower of width {width} cannot have {heads} attention heads")
    projection = sd.get("visual_projection.weight")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=projection.shape[0] if projection is not None else width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=channels,
        image_size=grid * ph,
        patch_size=ph,
        hidden_act=activation or activation_for_width(width),
        layer_norm_eps=1e-5,
    )


def load_image_encoder(sd: dict, prefix: str | None = None, dtype: torch.dtype | None = None,
                       name: str = "the CLIP vision weights", *, device="cpu", num_heads: int | None = None,
                       activation: str | None = None) -> "ImageEncoder":
    """Build the ``ImageEncoder`` of a state dict in any of the layouts above.

    ``prefix`` None finds the tower (the SVD prefix, ``visual.``, or transformers names);
    ``dtype`` None keeps the file's; ``name`` (the file name) appears in error messages.
    ``num_heads`` and ``activation`` override what is inferred (see the module docstring).
    """
    from transformers import CLIPVisionModelWithProjection

    from .checkpoint import build_on_meta

    layout, prefix = find_image_tower(sd, prefix, f"'{name}'")
    if layout == "open_clip":
        weights = open_clip_to_transformers(sd, prefix)
    else:
        n = len(prefix)
        weights = {}
        for key, t in sd.items():
            key = key[n:] if key.startswith(prefix) else ""
            if _is_tower_key(key):
                weights[key] = t
    config = infer_vision_config(weights, num_heads, activation)
    has_projection = "visual_projection.weight" in weights

    def factory():
        model = CLIPVisionModelWithProjection(config)
        if not has_projection:  # a tower saved without its projection: image_embeds is the pooled output
            model.visual_projection = torch.nn.Identity()
        return model

    model = build_on_meta(factory, weights, dtype, "CLIP vision", name)
    expected = model.state_dict()
    extra = sorted(k for k in weights if k not in expected)
    if extra:
        raise KinemaError(f"'{name}': '{prefix}{extra[0]}' is not part of a plain CLIP ViT image tower "
                          f"({len(extra)} such weights): this variant is not supported")
    embeddings = model.vision_model.embeddings
    positions = embeddings.position_embedding.weight.shape[0]  # the non-persistent buffer is still on meta
    embeddings.position_ids = torch.arange(positions, device=embeddings.position_embedding.weight.device)[None]
    return ImageEncoder(model.to(device), source=name)


# -- preprocessing -------------------------------------------------------------------------------------------------

def _gaussian_taps(factor: float, dtype: torch.dtype, device) -> torch.Tensor:
    """kornia's anti-aliasing kernel for a downscale ``factor`` (odd length, sums to 1)."""
    sigma = max((factor - 1.0) / 2.0, 0.001)
    size = int(max(4.0 * sigma, 3))
    size += 1 - size % 2
    s = torch.tensor(sigma, dtype=dtype, device=device)
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    taps = torch.exp(-x.pow(2.0) / (2 * s.pow(2.0)))
    return taps / taps.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor, axis: str) -> torch.Tensor:
    """Convolve ``(b c) 1 h w`` along ``axis`` ("h" or "w") with reflect padding; a unit impulse is skipped."""
    k = taps.numel()
    if taps[k // 2] == 1:  # the kernel of an upscale (sigma 0.001): exactly the identity
        return x
    r = k // 2
    if axis == "w":
        x = F.pad(x, (r, r, 0, 0), mode="reflect")
        return F.conv2d(x, rearrange(taps, "k -> 1 1 1 k"))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, rearrange(taps, "k -> 1 1 k 1"))


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[b, c, h, w] -> [b, c, *size]: kornia-style anti-aliased bicubic resize (SVD's original).

    Per axis, a Gaussian blur with sigma = max((in / out - 1) / 2, 0.001) and an odd kernel of
    int(max(4 sigma, 3)) taps (reflect padding; width first, then height), then bicubic
    interpolation with ``align_corners=True``. Values are not clamped.
    """
    b, c, h, w = x.shape
    y = rearrange(x, "b c h w -> (b c) 1 h w")
    y = _blur(y, _gaussian_taps(w / size[1], x.dtype, x.device), "w")
    y = _blur(y, _gaussian_taps(h / size[0], x.dtype, x.device), "h")
    y = rearrange(y, "(b c) 1 h w -> b c h w", b=b, c=c)
    return F.interpolate(y, size=tuple(size), mode="bicubic", align_corners=True)


#: how images are brought to the tower's size: ``svd`` (sgm's conditioner, ``antialiased_resize`` of the whole image)
#: or ``clip`` (transformers' ``CLIPImageProcessor``, what IP-Adapter was trained with: the shortest side to the
#: size with an antialiased bicubic, then the centre crop)
RESIZE_STYLES = ("svd", "clip")


def preprocess_images(images: torch.Tensor, size: int = 224, style: str = "svd") -> torch.Tensor:
    """ComfyUI IMAGE [b, h, w, 3] in [0, 1] -> CLIP pixel values [b, 3, size, size], float32.

    ``svd`` (SVD's original): the image goes to [-1, 1] (the conditioner's input), is resized with
    ``antialiased_resize`` to size x size (no crop) and comes back to [0, 1]. ``clip`` (``CLIPImageProcessor``'s):
    the shortest side is resized to ``size`` (torch's antialiased bicubic, PIL's filter but for rounding) and the
    centre ``size`` x ``size`` kept. Then CLIP's mean and std. A fourth (alpha) channel is dropped.
    """
    if style not in RESIZE_STYLES:
        raise KinemaError(f"unknown CLIP resize style {style!r}: one of {', '.join(RESIZE_STYLES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KinemaError(f"the CLIP image encoder takes images [b, h, w, 3], got {shape}")
    if min(images.shape[1], images.shape[2]) < 1:
        raise KinemaError(f"the CLIP image encoder got an empty image {tuple(images.shape)}")
    x = rearrange(images[..., :3].float(), "b h w c -> b c h w")
    if style == "svd":
        x = (antialiased_resize(x * 2.0 - 1.0, (size, size)) + 1.0) / 2.0
    else:
        h, w = x.shape[-2:]
        short = min(h, w)  # the longer side as transformers computes it, int(size * long / short): rounded down
        sh, sw = max(size, int(size * h / short)), max(size, int(size * w / short))
        if (sh, sw) != (h, w):
            x = F.interpolate(x, size=(sh, sw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (sh - size) // 2, (sw - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)
    return (x - rearrange(mean, "c -> 1 c 1 1")) / rearrange(std, "c -> 1 c 1 1")


# -- the encoder ---------------------------------------------------------------------------------------------------

class ImageEncoder:
    """SVD's CLIP image encoder: IMAGE [b, h, w, 3] -> image_embeds [b, proj_dim]."""

    def __init__(self, model, source: str = ""):
        """``model``: a transformers ``CLIPVisionModelWithProjection`` (any device and dtype)."""
        self.model = copy_whole(model.eval().requires_grad_(False))  # a transformers model (patching.copy_whole)
        self.source = source
        self.image_size = model.config.image_size
        self.has_projection = not isinstance(model.visual_projection, torch.nn.Identity)
        self.embed_dim = model.config.projection_dim if self.has_projection else model.config.hidden_size

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str | None = None, dtype: torch.dtype | None = None,
                        name: str = "the CLIP vision weights", **kwargs) -> "ImageEncoder":
        """``load_image_encoder`` (same arguments)."""
        return load_image_encoder(sd, prefix, dtype, name, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.vision_model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    def preprocess(self, images: torch.Tensor, style: str = "svd") -> torch.Tensor:
        """IMAGE [b, h, w, 3] -> pixel values [b, 3, s, s] (s: the tower's image size, 224 for the published ones;
        ``style``: see ``preprocess_images``)."""
        return preprocess_images(images.to(self.device), self.image_size, style)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, style: str = "svd", remedy: str = ENCODE_REMEDY) -> torch.Tensor:
        """IMAGE [b, h, w, 3] in [0, 1] -> image_embeds [b, proj_dim], float32 on the CPU (not L2-normalised);
        ``style``: how the images are resized, SVD's conditioner's or CLIPImageProcessor's (``preprocess_images``);
        ``remedy``: what the out-of-memory error tells the user to change."""
        with on_device(self), remedy_for_out_of_memory("CLIP vision encoding", remedy):
            pixels = self.preprocess(images, style).to(self.dtype)
            out = self.model(pixel_values=pixels)
            return out.image_embeds.float().cpu()
