"""Input checks shared by several nodes (no tensor math: they only look at what a node was given)."""
from __future__ import annotations

import torch

from ..models.errors import KinemaError
from ..models.motion import MotionModel
from ..models.sampling import check_batch_index
from ..models.svd_model import SVDModel


def require_sd15_model(model, node: str, fix: str) -> None:
    """Raise KinemaError unless ``model`` is an SD1.5 / AnimateDiff model (not SVD): ``node`` is the node's display
    name, ``fix`` says what to connect instead."""
    if isinstance(model, MotionModel):
        return
    found = "a Stable Video Diffusion model" if isinstance(model, SVDModel) else f"a {type(model).__name__}"
    raise KinemaError(f"{node} works on SD1.5 models, and its model input is {found}: {fix}")


def latent_samples(latent, node: str) -> torch.Tensor:
    """The ``samples`` tensor of a LATENT input, or KinemaError naming ``node`` (its display name): a dict holding a
    float video latent [frames, channels, height, width] of at least one frame."""
    fix = "connect Empty Video Latent (Kinema), VAE Encode Frames (Kinema) or the Video Sampler (Kinema)"
    if not isinstance(latent, dict) or "samples" not in latent:
        found = "a dict without 'samples'" if isinstance(latent, dict) else f"a {type(latent).__name__}"
        raise KinemaError(f"{node}: the latent input is {found}, not a LATENT: {fix}")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor):
        raise KinemaError(f"{node}: the latent's 'samples' is a {type(samples).__name__}, not a tensor: {fix}")
    if samples.ndim != 4 or not samples.is_floating_point():
        raise KinemaError(f"{node}: expected a video latent [frames, channels, height, width] of floats, got shape "
                          f"{list(samples.shape)} ({samples.dtype}): {fix}")
    if samples.shape[0] == 0:
        raise KinemaError(f"{node}: the latent holds 0 frames: {fix} with at least 1 frame")
    if samples.shape[-2] == 0 or samples.shape[-1] == 0:
        raise KinemaError(f"{node}: the latent is {samples.shape[-1]}x{samples.shape[-2]} latent pixels, an empty "
                          f"frame: {fix} with a size of at least 8x8 pixels")
    return samples


def latent_batch_index(latent: dict, samples: torch.Tensor) -> tuple[int, ...] | None:
    """The LATENT's ``batch_index`` (set by core Latent From Batch: each frame's place in the batch it came from),
    checked against its frames, or None."""
    index = latent.get("batch_index")
    return None if index is None else tuple(check_batch_index(index, samples.shape[0]))


def same_tensor(a, b) -> bool:
    """Whether two inputs hold the same values (a conditioning node may have replaced one of them)."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
