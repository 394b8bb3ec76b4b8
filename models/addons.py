"""What a video model carries besides its weights: ControlNet hints and IP-Adapter content images.

An add-on is data (the network, its per-frame inputs, a strength and a start/end range) attached to a model
by composition (``MotionModel.with_options(controls=..., contents=...)``); nothing is patched into the UNet.
On every model call the add-ons that are active at the step's sigma turn into the UNet's per-call inputs:
ControlNet residuals (summed over stacked ControlNets) and extra cross-attention keys/values (IP-Adapter).

Hints, one per frame. A list of hints shorter than the video is spread evenly over it: with ``n`` hints and
``F`` frames, frame ``i`` takes hint ``floor(i * n / F)``, so each hint holds for ``F / n`` consecutive frames
(one hint: every frame). A longer list is cut to the first ``F``. Hints are resized to the video's size
(bilinear, antialiased) when their aspect ratio matches it; another aspect ratio is an error. Under context
windows each window takes the hints of its own frames.

Start/end percent follow ComfyUI: the fraction of the way through the model's noise levels (0 = pure noise,
1 = clean); an add-on works while ``sigma(end) <= sigma <= sigma(start)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .errors import KinemaError, finite_number
from .video_io import check_finite


@dataclass(frozen=True)
class StepRange:
    """The part of sampling an add-on works in: fractions 0..1 of the way from noise to image."""

    start: float = 0.0
    end: float = 1.0

    def validate(self, what: str) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise KinemaError(f"{what}: start_percent and end_percent must satisfy 0 <= start <= end <= 1, got "
                              f"{self.start} and {self.end}")

    def active(self, sigma: float | None, schedule) -> bool:
        if sigma is None or (self.start <= 0.0 and self.end >= 1.0):
            return True
        return schedule.percent_to_sigma(self.end) <= sigma <= schedule.percent_to_sigma(self.start)


def spread_indices(count: int, frames: int) -> list[int]:
    """Which of ``count`` per-frame inputs each of ``frames`` frames takes (see the module doc)."""
    if count < 1:
        raise KinemaError("no hint images: connect at least one image")
    if count >= frames:
        return list(range(frames))
    return [i * count // frames for i in range(frames)]


#: how far (relative) a hint's aspect ratio may be from the video's and still be resized to it
ASPECT_SLACK = 0.02


def fit_hints(hints: torch.Tensor, height: int, width: int, what: str = "ControlNet") -> torch.Tensor:
    """Hint images ``[n, 3, H, W]`` in [0, 1] at the video's pixel size: resized when the aspect ratios agree
    within ``ASPECT_SLACK`` (frames cropped to multiples of 8, as Load Video gives them, differ a little: 854x480
    becomes 848x480, 0.7% off 16:9; stretching by that much is invisible), refused otherwise."""
    h, w = hints.shape[-2:]
    if (h, w) == (height, width):
        return hints
    if abs(h * width - w * height) > ASPECT_SLACK * w * height:
        raise KinemaError(
            f"{what}: the hint images are {w}x{h} but the video is {width}x{height}, another aspect ratio: "
            f"resize or crop the hints to {width}x{height} (for example with an image resize node) first")
    return F.interpolate(hints, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class ControlHint:
    """A ControlNet with its hint images. ``hints`` [n, 3, H, W] in [0, 1]; ``frame_hints`` (set by
    ``prepared``) maps each video frame to its hint."""

    controlnet: torch.nn.Module
    hints: torch.Tensor
    strength: float = 1.0
    steps: StepRange = StepRange()
    frame_hints: tuple[int, ...] | None = None
    name: str = ""

    def prepared(self, frames: int, height: int, width: int) -> ControlHint:
        """This hint fitted to a video of ``frames`` frames of ``width`` x ``height`` pixels."""
        what = f"ControlNet '{self.name}'" if self.name else "ControlNet"
        self.steps.validate(what)
        return replace(self, hints=fit_hints(self.hints, height, width, what),
                       frame_hints=tuple(spread_indices(self.hints.shape[0], frames)))

    def hints_for(self, frame_idxs) -> torch.Tensor:
        """[len(frame_idxs), 3, H, W]"""
        if self.frame_hints is None:
            raise KinemaError("internal: a ControlNet hint was used before it was fitted to the video")
        return self.hints[[self.frame_hints[i] for i in frame_idxs]]


@dataclass(frozen=True)
class ImageContent:
    """An IP-Adapter with the image tokens of its content image (``tokens``) and of no image
    (``uncond_tokens``, for the unconditional side of CFG), each [1, t, d]."""

    adapter: torch.nn.Module
    tokens: torch.Tensor
    uncond_tokens: torch.Tensor
    weight: float = 1.0
    steps: StepRange = StepRange()
    name: str = ""


def _image_batch(images: torch.Tensor, what: str) -> torch.Tensor:
    """IMAGE [n, h, w, 3|4] in [0, 1] -> [n, 3, h, w] float (KinemaError for anything else)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KinemaError(f"{what}: expected IMAGE frames [count, height, width, 3], got {shape}")
    if images.shape[0] < 1:
        raise KinemaError(f"{what}: the image batch is empty (0 images); connect at least one image")
    if min(images.shape[1:3]) < 8:
        raise KinemaError(f"{what}: the images are {images.shape[2]}x{images.shape[1]}, too small")
    if not images.is_floating_point():
        raise KinemaError(f"{what}: the images are {images.dtype}, not an IMAGE's floats in [0, 1]: divide 8-bit "
                          "images by 255")
    check_finite(images, what)
    return rearrange(images[..., :3].float(), "n h w c -> n c h w").contiguous()


def control_hint(controlnet, images: torch.Tensor, strength: float = 1.0, start: float = 0.0, end: float = 1.0,
                 name: str = "") -> ControlHint:
    """A ControlNet and its hint images (IMAGE [n, h, w, 3], one per frame or spread, see the module doc)."""
    what = f"ControlNet '{name}'" if name else "ControlNet"
    steps = StepRange(float(start), float(end))
    steps.validate(what)
    return ControlHint(controlnet, _image_batch(images, what).cpu(), finite_number(strength, f"{what}: strength"),
                       steps, name=name)


@torch.no_grad()
def image_content(adapter, image_encoder, images: torch.Tensor, weight: float = 1.0, start: float = 0.0,
                  end: float = 1.0, name: str = "", combine: str = "mean") -> ImageContent:
    """An IP-Adapter with the content of ``images`` (IMAGE [n, h, w, 3]): the CLIP image embedding of the centre
    square (IP-Adapter's preprocessing) through the adapter's image projection; several images are averaged
    (``combine="mean"``) or put side by side (``"concat"``). The unconditional tokens are those of a zero
    embedding, as IP-Adapter was trained with."""
    from .ip_adapter import clip_image_embeds, content_tokens

    what = f"IP-Adapter '{name}'" if name else "IP-Adapter"
    steps = StepRange(float(start), float(end))
    steps.validate(what)
    _image_batch(images, what)
    adapter.check_image_encoder(image_encoder.embed_dim, getattr(image_encoder, "has_projection", True),
                                getattr(image_encoder, "source", ""))
    embeds = clip_image_embeds(image_encoder, images[..., :3])
    tokens, uncond = content_tokens(adapter, embeds.to(adapter.device, adapter.dtype), combine)
    return ImageContent(adapter, tokens.float().cpu(), uncond.float().cpu(), finite_number(weight, f"{what}: weight"),
                        steps, name=name)


def control_residuals(controls, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, frame_idxs,
                      sigma: float | None, schedule, opts) -> list[torch.Tensor] | None:
    """The summed residuals of the ControlNets active at ``sigma`` for a folded batch ``(b f)`` of the video frames
    ``frame_idxs`` (None when none is active)."""
    total = None
    frames = len(frame_idxs)
    for c in controls:
        if c.strength == 0.0 or not c.steps.active(sigma, schedule):
            continue
        net = c.controlnet
        param = next(net.parameters())
        hint = c.hints_for(frame_idxs)  # one per frame, shared by the videos of the batch (cond, uncond)
        res = net(x, hint.to(param.device, param.dtype), timesteps, context, replace(opts, num_frames=frames))
        res = [r * c.strength for r in res]
        total = res if total is None else [a + r for a, r in zip(total, res)]
    return total


class ControlReuse:
    """The ControlNet residuals of one side of guidance (``side``: True for the unconditional one), kept from one
    model evaluation for another at the same ``x``, sigma and frames: temporal guidance's image evaluation (the
    network with its temporal layers off) after the video evaluation. The ControlNet has no temporal layers and
    gets the same inputs, so its residuals are the same; reusing them saves its evaluation. Made for one
    guidance call (``guidance.CFGDenoiser``)."""

    def __init__(self, side: bool):
        self.side = side
        self.kept = False
        self.residuals: list[torch.Tensor] | None = None

    def residuals_for(self, compute, flags: tuple, frames: int) -> list[torch.Tensor] | None:
        """``compute()`` (the summed residuals of a batch of ``len(flags)`` videos of ``frames`` frames), or what
        was kept for a batch of this side alone; the residuals of this side are kept from the first batch that has
        it."""
        if self.kept and flags == (self.side,):
            return self.residuals
        res = compute()
        if not self.kept and self.side in flags:
            v = flags.index(self.side)
            self.residuals = None if res is None else [
                r if len(flags) == 1 else r[v * frames:(v + 1) * frames].clone() for r in res]
            self.kept = True
        return res


def content_cross_extra(contents, unet_cfg, frames: int, uncond, sigma: float | None, schedule):
    """The UNet's ``cross_extra`` for the IP-Adapters active at ``sigma`` (None when none is), for a batch of
    ``len(uncond)`` videos of ``frames`` frames; ``uncond[i]`` says video i is the unconditional side."""
    parts = []
    for c in contents:
        if c.weight == 0.0 or not c.steps.active(sigma, schedule):
            continue
        tokens = torch.cat([c.uncond_tokens if u else c.tokens for u in uncond])
        tokens = repeat(tokens, "b t d -> (b f) t d", f=frames)  # the adapter moves them to its device/dtype
        parts.append(c.adapter.cross_extra(unet_cfg, tokens, c.weight))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return lambda slot, j: [kv for part in parts for kv in part(slot, j)]


def video_frames(window, num_frames: int):
    """The video frame indices a model call sees: the window's, or all of them."""
    return window.sub_idxs if window is not None else range(num_frames)

