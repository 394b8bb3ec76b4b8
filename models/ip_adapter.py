"""IP-Adapter for SD1.5: content from an image as extra image tokens in every cross-attention.

The CLIP image embedding of the content image (``clip_vision.ImageEncoder.encode``: ViT-H/14's
projected ``image_embeds`` for ip-adapter_sd15) goes through the adapter's image projection into
a few tokens of the UNet's context width; every cross-attention (``attn2``) of the UNet attends to
them with its own keys/values ``to_k_ip``/``to_v_ip`` and adds ``scale * attention(q, k_ip, v_ip)``
to the text attention (decoupled cross-attention). The UNet takes them per call through its
``cross_extra(slot, j)`` input, so the loaded UNet is never changed.

File formats (the published ip-adapter_sd15 / ip-adapter_sd15_light files):

- ``.safetensors``: flat keys ``image_proj.proj.weight`` [tokens * cross_dim, clip_dim],
  ``image_proj.proj.bias``, ``image_proj.norm.weight/bias`` [cross_dim] (a LayerNorm),
  ``ip_adapter.N.to_k_ip.weight`` and ``ip_adapter.N.to_v_ip.weight`` [width, cross_dim];
- ``.bin``: the same under a nested dict ``{"image_proj": {...}, "ip_adapter": {...}}``
  (``checkpoint.unwrap_state_dict`` flattens it to the flat keys).

Layer numbers. ``N`` is the position of the layer in diffusers' ``unet.attn_processors``, the
order the reference implementation saved them in: every transformer block has ``attn1`` (even
numbers, no IP weights) and ``attn2`` (odd numbers), down blocks first, then up blocks, then the
mid block (``UNet2DConditionModel`` registers ``down_blocks`` and ``up_blocks`` before
``mid_block``). So layer ``2k + 1`` is the k-th cross-attention in that order; for SD1.5 that
is 1..11 the input blocks with attention, 13..29 the output blocks with attention, 31 the
middle block. ``cross_attention_layers`` derives it from a ``UNetConfig``.

What is supported: the basic IP-Adapter (a Linear to ``tokens * cross_dim`` and a LayerNorm,
4 tokens; tokens and widths are read off the shapes). IP-Adapter Plus / Plus Face (a
Resampler on the CLIP hidden states), Full Face (an MLP projection), FaceID / FaceID Plus (face
embeddings, LoRA) and SDXL adapters are refused with a ``KinemaError`` naming the variant.

Unconditional side of CFG: the tokens of a zero image embedding (``uncond_tokens()``, the same as
``image_tokens(zeros)``), as the reference implementation and diffusers do.

Several content images: the reference implementation makes one prompt per image, diffusers and
ComfyUI_IPAdapter_plus (its default "concat") concatenate the images' tokens, and IPAdapter_plus
offers "average", the mean of the CLIP embeddings before the projection. ``content_tokens`` does
"mean" (one content, as strong as one image) or "concat" (the tokens side by side).

CLIP preprocessing: IP-Adapter was trained with transformers' ``CLIPImageProcessor`` (shortest
side to 224 with a bicubic filter, centre crop), and ComfyUI crops the same way; ``clip_image_embeds``
has the encoder resize so (``clip_vision.preprocess_images(style="clip")``), not as SVD's conditioner
does (the whole image squeezed to 224x224 after a Gaussian blur).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import nn

from .errors import KinemaError
from .unet import CrossExtra, Slot, UNetConfig

PROJ_PREFIX = "image_proj."
LAYERS_PREFIX = "ip_adapter."
SDXL_CROSS_DIM = 2048
#: what gives CLIP image embeddings of each width, and the file ComfyUI users have for it
CLIP_ENCODERS = {
    1024: "ViT-H/14: clip_vision_h.safetensors (CLIP-ViT-H-14-laion2B-s32B-b79K), the one ip-adapter_sd15 takes",
    1280: "ViT-bigG/14: clip_vision_g.safetensors (CLIP-ViT-bigG-14-laion2B-39B-b160k)",
    768: "ViT-L/14: OpenAI's clip-vit-large-patch14",
}
SUPPORTED = ("use the basic SD1.5 IP-Adapter, ip-adapter_sd15.safetensors or ip-adapter_sd15_light.safetensors "
             "(with the ViT-H/14 CLIP vision, clip_vision_h.safetensors)")
_LAYER_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")


@dataclass(frozen=True)
class IPAdapterConfig:
    """clip_dim: the CLIP image embedding width; cross_dim: the UNet's context width; tokens: image tokens;
    widths: the width of cross-attention layer k (file number 2k+1), in file order."""

    clip_dim: int = 1024
    cross_dim: int = 768
    tokens: int = 4
    widths: tuple = ()


def cross_attention_layers(cfg: UNetConfig) -> list[tuple[Slot, int, int]]:
    """``(slot, transformer block j, width)`` of every cross-attention of an LDM UNet, in IP-Adapter file order
    (diffusers' ``attn_processors``: down blocks, up blocks, mid block): entry k is file layer ``2k + 1``."""
    mc, levels = cfg.model_channels, len(cfg.channel_mult)
    slots = []
    i = 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            if level in cfg.attention_levels:
                slots.append((("input", i), mc * mult))
            i += 1
        if level != levels - 1:
            i += 1  # the downsampler
    o = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for _ in range(cfg.num_res_blocks + 1):
            if level in cfg.attention_levels:
                slots.append((("output", o), mc * mult))
            o += 1
    slots.append((("middle", 0), mc * cfg.channel_mult[-1]))
    return [(slot, j, width) for slot, width in slots for j in range(cfg.transformer_depth)]


class ImageProjection(nn.Module):
    """IP-Adapter's image projection: ``proj`` (Linear to tokens * cross_dim) then ``norm`` (LayerNorm) per token."""

    def __init__(self, clip_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[b, e] -> [b, t, d]"""
        return self.norm(rearrange(self.proj(image_embeds), "b (t d) -> b t d", t=self.tokens))


class ImageKV(nn.Module):
    """The image keys/values of one cross-attention layer (``to_k_ip``, ``to_v_ip``)."""

    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, t, d] -> (k [b, t, c], v [b, t, c])"""
        return self.to_k_ip(tokens), self.to_v_ip(tokens)


class IPAdapter(nn.Module):
    """An SD1.5 IP-Adapter; parameter names are the published file's flat keys."""

    def __init__(self, cfg: IPAdapterConfig, source: str = ""):
        super().__init__()
        self.cfg = cfg
        self.source = source
        self.image_proj = ImageProjection(cfg.clip_dim, cfg.cross_dim, cfg.tokens)
        self.ip_adapter = nn.ModuleDict({str(2 * k + 1): ImageKV(cfg.cross_dim, w) for k, w in enumerate(cfg.widths)})

    @property
    def _what(self) -> str:
        return f"IP-Adapter '{self.source}'" if self.source else "the IP-Adapter"

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.image_proj.proj.weight.device

    def check_image_encoder(self, embed_dim: int, projected: bool = True, source: str = "") -> None:
        """KinemaError unless a CLIP vision model giving ``embed_dim``-wide image embeddings fits this adapter.

        ``projected`` False: the tower has no ``visual_projection`` (its embeddings are the pooled output), which
        no IP-Adapter takes, whatever the width (a ViT-L/14 tower's pooled output is 1024 wide, as ViT-H/14's
        projected ``image_embeds``); ``source``: the CLIP vision file, for the message."""
        want = self.cfg.clip_dim
        if not projected:
            what = f"'{source}'" if source else "the CLIP vision model"
            need = CLIP_ENCODERS.get(want, f"a CLIP vision model with {want}-wide image embeddings")
            raise KinemaError(f"{what} has no visual projection ('visual_projection.weight'), so it gives no CLIP "
                              f"image embeddings for {self._what}: load a complete CLIP vision file in Load CLIP "
                              f"Vision ({need})")
        if embed_dim == want:
            return
        need = CLIP_ENCODERS.get(want, f"a CLIP vision model with {want}-wide image embeddings")
        have = CLIP_ENCODERS.get(embed_dim, "another CLIP vision model")
        raise KinemaError(f"{self._what} takes {want}-wide CLIP image embeddings ({need}), but the CLIP vision model "
                          f"gives {embed_dim}-wide ones ({have}): load the matching file in Load CLIP Vision")

    def check_unet(self, unet_cfg: UNetConfig) -> dict[tuple[Slot, int], str]:
        """KinemaError unless this adapter fits the UNet; returns ``{(slot, j): file layer number}``."""
        if unet_cfg.context_dim != self.cfg.cross_dim:
            raise KinemaError(f"{self._what} was made for a UNet with {self.cfg.cross_dim}-wide text context, the "
                              f"model's is {unet_cfg.context_dim}-wide (SD1.5: 768): {SUPPORTED}")
        layers = cross_attention_layers(unet_cfg)
        if len(layers) != len(self.cfg.widths):
            raise KinemaError(f"{self._what} has {len(self.cfg.widths)} cross-attention layers, the UNet has "
                              f"{len(layers)}: it was made for another UNet layout; {SUPPORTED}")
        out = {}
        for k, ((slot, j, width), own) in enumerate(zip(layers, self.cfg.widths)):
            if width != own:
                raise KinemaError(f"{self._what}: layer {2 * k + 1} is {own} wide, the UNet's cross-attention there "
                                  f"({slot[0]} block {slot[1]}) is {width} wide: it was made for another UNet")
            out[(slot, j)] = str(2 * k + 1)
        return out

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [b, e] -> image tokens [b, t, d] (in the adapter's dtype and device)."""
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2:
            shape = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise KinemaError(f"{self._what} takes CLIP image embeddings [count, width], got {shape}")
        self.check_image_encoder(image_embeds.shape[-1])
        return self.image_proj(image_embeds.to(self.device, self.dtype))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[b, e] -> [b, t, d] (``image_tokens``)"""
        return self.image_tokens(image_embeds)

    def uncond_tokens(self, batch: int = 1) -> torch.Tensor:
        """The tokens of no image (a zero embedding), for the unconditional side of CFG: [batch, t, d]."""
        return self.image_tokens(torch.zeros(batch, self.cfg.clip_dim, device=self.device, dtype=self.dtype))

    def cross_extra(self, unet_cfg: UNetConfig, tokens: torch.Tensor, scale: float | torch.Tensor = 1.0) -> CrossExtra:
        """The UNet's ``cross_extra`` for image tokens [(b f), t, d] at ``scale`` (a float, or a tensor [(b f)]).

        Keys/values are computed lazily, when the UNet reaches a layer. A tensor scale is folded into the
        values (``attention(q, k, s v) = s attention(q, k, v)``), so the UNet's dtype is never promoted.
        A float scale of 0 adds nothing (the plain UNet).
        """
        layers = self.check_unet(unet_cfg)
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[-1] != self.cfg.cross_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise KinemaError(f"{self._what} takes image tokens [batch, tokens, {self.cfg.cross_dim}], got {shape}")
        tokens = tokens.to(self.device, self.dtype)
        factor = None
        if isinstance(scale, torch.Tensor):
            if scale.ndim != 1 or scale.shape[0] != tokens.shape[0]:
                raise KinemaError(f"{self._what}: a per-sample scale must have one value per batch entry "
                                  f"({tokens.shape[0]}), got shape {tuple(scale.shape)}")
            factor = rearrange(scale.to(self.device, self.dtype), "b -> b 1 1")
            scale = 1.0
        scale = float(scale)

        def extra(slot: Slot, j: int) -> list[tuple]:
            key = layers.get((slot, j))
            if key is None or scale == 0.0:
                return []
            k, v = self.ip_adapter[key](tokens)
            return [(k, v if factor is None else v * factor, scale)]

        return extra


# -- loading ---------------------------------------------------------------------------------------------------------

def _variant(proj: dict, layers: dict) -> str | None:
    """The name of an IP-Adapter variant Kinema does not run (None: the basic one)."""
    if any(k.startswith("perceiver_resampler.") for k in proj):
        return "an IP-Adapter FaceID Plus (ip-adapter-faceid-plus*: face embeddings through a Resampler)"
    if "latents" in proj or "proj_in.weight" in proj or any(k.startswith("layers.") for k in proj):
        out = proj.get("proj_out.weight")
        xl = " for SDXL" if out is not None and out.shape[0] == SDXL_CROSS_DIM else ""
        return (f"an IP-Adapter Plus{xl} (ip-adapter-plus / plus-face: a Resampler on the CLIP hidden states, "
                f"'image_proj.latents')")
    if "proj.3.weight" in proj:
        return "an IP-Adapter Full Face (ip-adapter-full-face_sd15: an MLP on the CLIP hidden states)"
    if "proj.0.weight" in proj or any("lora" in k for k in layers):
        return "an IP-Adapter FaceID (ip-adapter-faceid*: InsightFace face embeddings and a LoRA)"
    return None


def infer_ip_adapter_config(sd: dict, name: str = "") -> IPAdapterConfig:
    """An ``IPAdapterConfig`` from the shapes of a flat IP-Adapter state dict; KinemaError naming what else it is
    (``name``: the file name, for the messages)."""
    name = name or "the file"
    proj = {k[len(PROJ_PREFIX):]: v for k, v in sd.items() if k.startswith(PROJ_PREFIX)}
    layers = {k[len(LAYERS_PREFIX):]: v for k, v in sd.items() if k.startswith(LAYERS_PREFIX)}
    if not proj and not layers:
        from .checkpoint import FORMAT_HOME, FORMAT_NAMES, detect_format

        found = detect_format(sd)
        where = f" It belongs in {FORMAT_HOME[found]}." if found in FORMAT_HOME else ""
        raise KinemaError(f"'{name}' is not an IP-Adapter ({FORMAT_NAMES[found]}; an IP-Adapter holds "
                          f"'image_proj.*' and 'ip_adapter.*' weights).{where} For IP-Adapter, {SUPPORTED}.")
    variant = _variant(proj, layers)
    if variant:
        raise KinemaError(f"'{name}' is {variant}, which Kinema does not run: {SUPPORTED}.")
    if not proj or not layers:
        missing = PROJ_PREFIX if not proj else LAYERS_PREFIX
        raise KinemaError(f"'{name}' has no '{missing}*' weights: the IP-Adapter file is incomplete, download it again")
    needed = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    absent = [k for k in needed if k not in proj]
    if absent:
        raise KinemaError(f"'{name}' lacks '{PROJ_PREFIX}{absent[0]}': the IP-Adapter file is incomplete")
    unknown = sorted(set(proj) - set(needed))
    if unknown:
        raise KinemaError(f"'{name}': '{PROJ_PREFIX}{unknown[0]}' is not part of the basic IP-Adapter's image "
                          f"projection (an unknown variant): {SUPPORTED}")
    cross_dim = proj["norm.weight"].shape[0]
    rows, clip_dim = proj["proj.weight"].shape
    if rows % cross_dim:
        raise KinemaError(f"'{name}': the image projection gives {rows} values, not a whole number of "
                          f"{cross_dim}-wide tokens: the file is damaged or not an IP-Adapter")
    if cross_dim == SDXL_CROSS_DIM:
        raise KinemaError(f"'{name}' is an SDXL IP-Adapter (2048-wide cross-attention, like ip-adapter_sdxl): "
                          f"Kinema runs SD1.5 models; {SUPPORTED}")
    numbers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in layers.items():
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            raise KinemaError(f"'{name}': '{LAYERS_PREFIX}{key}' is not a weight of the basic IP-Adapter (an unknown "
                              f"variant): {SUPPORTED}")
        numbers.setdefault(int(m.group(1)), {})[m.group(2)] = t
    order = sorted(numbers)
    if order != list(range(1, 2 * len(order), 2)):
        raise KinemaError(f"'{name}': the cross-attention layers are numbered {order[:4]}..., not 1, 3, 5, ... as "
                          f"IP-Adapter files are: the file is damaged or another format")
    widths = []
    for n in order:
        parts = numbers[n]
        for part in ("to_k_ip", "to_v_ip"):
            t = parts.get(part)
            if t is None:
                raise KinemaError(f"'{name}' lacks '{LAYERS_PREFIX}{n}.{part}.weight': the file is incomplete")
            if t.ndim != 2 or t.shape[1] != cross_dim or t.shape != parts["to_k_ip"].shape:
                raise KinemaError(f"'{name}': '{LAYERS_PREFIX}{n}.{part}.weight' has shape {tuple(t.shape)}, "
                                  f"expected [width, {cross_dim}]")
        widths.append(parts["to_k_ip"].shape[0])
    return IPAdapterConfig(clip_dim=clip_dim, cross_dim=cross_dim, tokens=rows // cross_dim, widths=tuple(widths))


def build_ip_adapter(sd: dict, dtype: torch.dtype | None = None, name: str = "") -> IPAdapter:
    """An ``IPAdapter`` from a flat state dict (the published ``.safetensors`` keys); ``dtype`` None keeps the file's."""
    from .checkpoint import build_on_meta, damaged_file

    with damaged_file(name or "the file", "an SD1.5 IP-Adapter"):
        cfg = infer_ip_adapter_config(sd, name)
        return build_on_meta(lambda: IPAdapter(cfg, name), sd, dtype, "IP-Adapter", name or "the file")


def load_ip_adapter(path: str, dtype: torch.dtype | None = None) -> IPAdapter:
    """Load an SD1.5 IP-Adapter file (``.safetensors`` flat or ``.bin`` nested, as published) on the CPU."""
    from .checkpoint import load_state_dict

    return build_ip_adapter(load_state_dict(path), dtype, os.path.basename(path))


# -- content images --------------------------------------------------------------------------------------------------

def clip_image_embeds(image_encoder, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
    """IMAGE [n, h, w, 3] in [0, 1] -> CLIP image embeddings [n, e] (float32, CPU) through
    ``clip_vision.ImageEncoder.encode`` with CLIPImageProcessor's resize, as IP-Adapter's preprocessing: ``crop``
    keeps the centre square (the processor's centre crop), else the whole image is squeezed to a square."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KinemaError(f"IP-Adapter: expected content images [count, height, width, 3], got {shape}")
    if crop:
        return image_encoder.encode(images, style="clip")
    return image_encoder.encode(images, style="svd")


@torch.no_grad()
def content_tokens(adapter: IPAdapter, image_embeds: torch.Tensor, combine: str = "mean"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The content of n images [n, e] as (tokens [1, t', d], unconditional tokens [1, t', d]).

    ``combine``: "mean" (the mean CLIP embedding through the projection, t' = t) or "concat" (each image's
    tokens side by side, t' = n t; the unconditional side is n times the zero image's tokens).
    """
    if combine == "mean":
        embeds = image_embeds.float().mean(dim=0, keepdim=True)
        return adapter.image_tokens(embeds), adapter.uncond_tokens(1)
    if combine == "concat":
        tokens = adapter.image_tokens(image_embeds)
        uncond = repeat(adapter.uncond_tokens(1), "1 t d -> 1 (n t) d", n=image_embeds.shape[0])
        return rearrange(tokens, "n t d -> 1 (n t) d"), uncond
    raise KinemaError(f"IP-Adapter: combine must be 'mean' or 'concat', got {combine!r}")
