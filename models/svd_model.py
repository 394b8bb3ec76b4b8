"""Stable Video Diffusion as the sampler sees it: the spatio-temporal UNet with its conditioning and guidance.

``SVDModel`` pairs a (never modified) ``svd.SVDUNet`` with the settings of the
published variant: ``svd`` (trained on 14 frames; per-frame guidance 1.0 -> 2.5)
or ``svd_xt`` (25 frames; 1.5 -> 3.0), as in the original sampling configs.
Both files have the same architecture, so the variant is read off the file name.

``image_conditioning`` turns an init image into the model's three
conditionings, as the original sampling script does:

- ``context`` [1, 1, d]: the CLIP image embedding of the clean image;
- ``concat`` [1, 4, h, w]: VAE latents of the image with Gaussian noise of
  standard deviation ``augmentation_level`` added in pixel space ([-1, 1]),
  unscaled (the latent scale is not applied), concatenated to the UNet input;
- ``y`` [1, 3 * 256]: the micro-conditioning of fps_id = fps - 1, the motion
  bucket id and the augmentation level.

The unconditional side zeroes ``context`` and ``concat`` and keeps ``y``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange

from . import compiling
from .compiling import CompileOptions
from .errors import KinemaError
from .layers import RunOptions
from .offload import NO_OFFLOAD, OffloadOptions, compute_device
from .svd import micro_conditioning
from .vae import encode_pixels
from .video_io import check_images


@dataclass(frozen=True)
class Variant:
    frames: int
    min_cfg: float
    max_cfg: float


VARIANTS = {"svd": Variant(frames=14, min_cfg=1.0, max_cfg=2.5), "svd_xt": Variant(frames=25, min_cfg=1.5, max_cfg=3.0)}
SVD_LATENT_SCALE = 0.18215
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0


def variant_of(filename: str) -> str:
    """``svd_xt`` for files named like the XT release, with "xt" a word of the name (``svd_xt.safetensors``,
    ``SVD_XT_1_1``, camel case as ``img2vidXt11``; not ``svd_extended`` or ``svd_next``), else ``svd``."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", stem)
    return "svd_xt" if "xt" in (w.lower() for w in words) else "svd"


@dataclass(frozen=True)
class SVDModel:
    """An SVD UNet and how to guide it. ``min_cfg`` None: the variant's; ``cfg_mode`` linear, triangle or constant
    (the sampler's cfg is the maximum)."""

    unet: torch.nn.Module
    variant: str = "svd"
    cfg_mode: str = "linear"
    min_cfg: float | None = None
    cfg_period: float = 1.0
    name: str = ""
    temporal_scale: float = 1.0  # Gen-1 temporal guidance w_t (1: the plain video model), see guidance.CFGDenoiser
    offload: OffloadOptions = NO_OFFLOAD  # the memory policy: model or block offload (offload.OffloadOptions)
    compile: CompileOptions | None = None  # the UNet through torch.compile (compiling.CompileOptions)

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes: the offload device under model or block offload, else where its weights are."""
        return compute_device(self.unet, self.offload)

    def with_options(self, **changes) -> SVDModel:
        return replace(self, **changes)

    @property
    def defaults(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def guidance_min(self) -> float:
        return self.defaults.min_cfg if self.min_cfg is None else float(self.min_cfg)

    def check_frames(self, num_frames: int, context_length: int | None = None) -> None:
        if num_frames < 1:
            raise KinemaError("a video needs at least 1 frame")

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                 num_frames: int, attn_chunk: int = 0, window=None, temporal: bool = True) -> torch.Tensor:
        """(b f) c h w, timesteps [(b f)], context [(b f), n, d], y [(b f), adm] -> v (b f) c' h w

        ``temporal=False``: every frame marked a still image (sgm's ``image_only_indicator``), which blends the
        temporal paths out: the pure spatial network, frames independent (Gen-1's image model).
        """
        indicator = None
        if not temporal:
            indicator = x.new_ones(x.shape[0] // num_frames, num_frames)
        return compiling.run_unet(self.unet, self.offload, self.compile, x, timesteps, context, y, num_frames,
                                  RunOptions(num_frames=num_frames, attn_chunk=attn_chunk),
                                  image_only_indicator=indicator)


@dataclass(frozen=True)
class ImageConditioningOptions:
    width: int = 1024
    height: int = 576
    frames: int = 14
    fps: int = 7
    motion_bucket_id: int = 127
    augmentation_level: float = 0.02
    seed: int = 0

    def validate(self) -> None:
        for name, v in (("width", self.width), ("height", self.height)):
            if v < 8 or v % 8:
                raise KinemaError(f"{name} must be a positive multiple of 8, got {v} (try {max(8, v // 8 * 8)})")
        if self.frames < 1:
            raise KinemaError(f"frames must be at least 1, got {self.frames}")
        if self.fps < 1:
            raise KinemaError(f"fps must be at least 1, got {self.fps}")
        if not 0 <= self.motion_bucket_id <= 1023:
            raise KinemaError(f"motion_bucket_id must be between 0 and 1023, got {self.motion_bucket_id}")
        if not 0.0 <= self.augmentation_level <= 10.0:
            raise KinemaError(f"augmentation_level must be between 0 and 10, got {self.augmentation_level}")


def fit_image(image: torch.Tensor, width: int, height: int, what: str = "the init image") -> torch.Tensor:
    """Scale an IMAGE to cover ``width x height`` (aspect kept, antialiased bilinear), centre-crop the rest:
    [1, H, W, 3|4] floats -> [1, height, width, 3] in [0, 1] (clamped whether or not it was scaled)"""
    check_images(image, f"SVD Image Conditioning ({what})", (3, 4))
    src_h, src_w = image.shape[1:3]
    if src_h < 2 or src_w < 2:
        raise KinemaError(f"{what} is {src_w}x{src_h}: too small to start a video from")
    if image.shape[0] > 1:
        image = image[:1]
    px = rearrange(image[..., :3].float(), "b h w c -> b c h w")
    if (src_h, src_w) != (height, width):
        s = max(width / src_w, height / src_h)
        sh, sw = max(height, round(src_h * s)), max(width, round(src_w * s))
        px = F.interpolate(px, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (sh - height) // 2, (sw - width) // 2
        px = px[:, :, top:top + height, left:left + width]
    if not bool(torch.isfinite(px).all()):
        raise KinemaError(f"{what} holds NaN or infinite values: check the node that made it")
    return rearrange(px.clamp(0, 1), "b c h w -> b h w c").contiguous()


def _image_encode_remedy(image_encoder) -> str:
    """What to change when the CLIP image encoding of SVD's one init (or content) image runs out of memory: the
    loader's precision where the encoder is in fp32 (half the memory in fp16), and free GPU memory."""
    half = getattr(image_encoder, "dtype", None) == torch.float32
    return "free GPU memory (other programs using it)" + (
        ", or set precision to fp16 on Load SVD Checkpoint (Kinema)" if half else "")


def image_conditioning(image_encoder, vae, image: torch.Tensor, opts: ImageConditioningOptions,
                       content_image: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Init image -> (cond, uncond), each ``{"context": [1, 1, d], "concat": [1, 4, h, w], "y": [1, adm]}``.

    ``content_image`` (Gen-1's content): the CLIP embedding comes from it instead of the init image (fitted to
    the same size first), while the init image still gives the first frame's latents: the video starts from the
    init image's structure and drifts toward the content image's look.
    """
    opts.validate()
    frame = fit_image(image, opts.width, opts.height)
    content = frame if content_image is None else fit_image(content_image, opts.width, opts.height, "the content image")
    with torch.inference_mode():
        embeds = image_encoder.encode(content, remedy=_image_encode_remedy(image_encoder)).float()
        gen = torch.Generator().manual_seed(int(opts.seed))
        pixels = rearrange(frame, "b h w c -> b c h w") * 2 - 1
        # drawn on the CPU (the same noise on every device), added where the image is (a GPU IMAGE of another node)
        noised = pixels + opts.augmentation_level * torch.randn(pixels.shape, generator=gen).to(pixels.device)
        concat = encode_pixels(vae, noised, "encoding the init image",
                               "lower width and height on SVD Image Conditioning (Kinema), or free GPU memory")
    y = micro_conditioning(opts.fps - 1, opts.motion_bucket_id, opts.augmentation_level, 1)
    context = rearrange(embeds, "b d -> b 1 d")
    cond = {"context": context, "concat": concat, "y": y}
    uncond = {"context": torch.zeros_like(context), "concat": torch.zeros_like(concat), "y": y}
    return cond, uncond
