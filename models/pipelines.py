"""End-to-end recipes as plain functions the nodes call.

Latents cross this surface as ComfyUI holds them: one video ``[f, c, h, w]``,
unscaled VAE latents. The SD1.5 latent scale is applied on the way in and
removed on the way out, as ComfyUI's KSampler does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .context import ContextOptions, context_windows, freenoise
from .errors import KinemaError
from .guidance import CFGDenoiser, EpsVideoDenoiser, WindowedDenoiser
from .sampling import (
    DiscreteSchedule,
    StepCallback,
    calculate_sigmas,
    get_sampler,
    initial_noise,
    noise_latent,
)

SD15_LATENT_SCALE = 0.18215
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class SampleOptions:
    seed: int = 0
    steps: int = 20
    cfg: float = 7.5
    sampler: str = "euler"
    scheduler: str = "normal"
    denoise: float = 1.0
    attn_chunk: int = 0
    batch_cond: bool = True
    context: ContextOptions | None = None  # context windows for videos longer than the motion module sees


def empty_video_latent(frames: int, width: int, height: int) -> torch.Tensor:
    """Zeros ``[frames, 4, height/8, width/8]``; sizes must be multiples of 8."""
    if frames < 1:
        raise KinemaError(f"frames must be at least 1, got {frames}")
    for name, v in (("width", width), ("height", height)):
        if v < 8 or v % 8:
            raise KinemaError(f"{name} must be a positive multiple of 8, got {v} (try {max(8, v // 8 * 8)})")
    return torch.zeros(frames, LATENT_CHANNELS, height // 8, width // 8)


def per_frame(context: torch.Tensor, frames: int, what: str) -> torch.Tensor:
    """One context for the video or one per frame: [1|f, n, d] -> [f, n, d]"""
    if context.ndim != 3:
        raise KinemaError(f"{what} conditioning must be [batch, tokens, dim], got shape {tuple(context.shape)}")
    if context.shape[0] == 1:
        return context.expand(frames, -1, -1)
    if context.shape[0] != frames:
        raise KinemaError(f"{what} conditioning has {context.shape[0]} entries for a video of {frames} frames")
    return context


def windows_per_step(frames: int, context: ContextOptions, steps: int) -> int:
    """How many windows a sampling step runs (the first step's count; the uniform schedules vary little)."""
    context.validate(frames)
    return max(1, len(context_windows(frames, context, 0, max(1, steps))))


def sample_video(
    model,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    latent: torch.Tensor,
    opts: SampleOptions,
    callback: StepCallback | None = None,
    on_window: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample one video with an eps video model (``MotionModel``).

    positive/negative: [1|f, n, d]; latent: [f, 4, h, w] unscaled (zeros for text-to-video).
    With ``opts.context`` the model sees windows of frames (``on_window()`` after each one).
    Returns the sampled latent [f, 4, h, w], unscaled, on the CPU.
    """
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise KinemaError(f"expected a video latent [frames, 4, h, w], got shape {tuple(latent.shape)}")
    frames = latent.shape[0]
    if opts.context is not None:
        opts.context.validate(frames)
    model.check_frames(frames, None if opts.context is None else opts.context.context_length)
    ctx_dim = model.unet.cfg.context_dim
    for what, c in (("positive", positive), ("negative", negative)):
        if c is not None and c.shape[-1] != ctx_dim:
            raise KinemaError(
                f"the {what} conditioning has width {c.shape[-1]} but the UNet expects {ctx_dim}: "
                "encode the prompt with the CLIP of the same checkpoint"
            )
    schedule = DiscreteSchedule(model.beta_schedule)
    sigmas = calculate_sigmas(schedule, opts.scheduler, opts.steps, opts.denoise)
    sampler = get_sampler(opts.sampler)
    x = latent.float() * SD15_LATENT_SCALE
    if len(sigmas) < 2:
        return latent.float().cpu()
    noise = initial_noise(opts.seed, tuple(latent.shape))
    if opts.context is not None and opts.context.freenoise:
        noise = freenoise(noise, opts.context, opts.seed)
    x = noise_latent(x, noise, sigmas, schedule)
    device = next(model.unet.parameters()).device
    denoiser = CFGDenoiser(
        EpsVideoDenoiser(model, schedule, attn_chunk=opts.attn_chunk, batch_cond=opts.batch_cond),
        per_frame(positive, frames, "positive"),
        None if negative is None else per_frame(negative, frames, "negative"),
        opts.cfg,
    )
    if opts.context is not None:
        denoiser = WindowedDenoiser(denoiser, opts.context, sigmas, on_window=on_window)
    out = sampler(denoiser, x.to(device), sigmas.to(device), callback=callback, seed=opts.seed)
    return (out / SD15_LATENT_SCALE).float().cpu()
