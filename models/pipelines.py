"""End-to-end recipes as plain functions the nodes call.

Latents cross this surface as ComfyUI holds them: one video ``[f, c, h, w]``,
unscaled VAE latents. The latent scale (0.18215 for SD1.5 and SVD) is applied on
the way in and removed on the way out, as ComfyUI's KSampler does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .context import ContextOptions, context_windows, freenoise
from .errors import KinemaError, finite_number
from .guidance import CFGDenoiser, EpsVideoDenoiser, VEDMVideoDenoiser, WindowedDenoiser, per_frame_cfg, runs_uncond
from .memory import check_fits, video_activation_bytes
from .placement import video_model_on_device
from .sampling import (
    ContinuousEDMSchedule,
    DiscreteSchedule,
    StepCallback,
    calculate_sigmas,
    check_batch_index,
    get_sampler,
    initial_noise,
    noise_latent,
)
from .svd_model import SIGMA_MAX, SIGMA_MIN, SVD_LATENT_SCALE, SVDModel

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
    batch_index: tuple[int, ...] | None = None  # each frame's place in the batch the latent was taken from


def empty_video_latent(frames: int, width: int, height: int) -> torch.Tensor:
    """Zeros ``[frames, 4, height/8, width/8]``; sizes must be multiples of 8."""
    if frames < 1:
        raise KinemaError(f"frames must be at least 1, got {frames}")
    for name, v in (("width", width), ("height", height)):
        if v < 8 or v % 8:
            raise KinemaError(f"{name} must be a positive multiple of 8, got {v} (try {max(8, v // 8 * 8)})")
    check_fits(frames * LATENT_CHANNELS * (height // 8) * (width // 8) * 4, "cpu", f"a latent of {frames} frames",
               "lower the frame count")
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


def noise_schedule(model):
    """The noise levels a video model samples over: SVD's EDM schedule, else the model's DDPM betas."""
    if isinstance(model, SVDModel):
        return ContinuousEDMSchedule(SIGMA_MIN, SIGMA_MAX)
    return DiscreteSchedule(model.beta_schedule)


def sampling_steps(model, opts: SampleOptions) -> int:
    """The model calls a sampling run makes per window: the schedule's steps, which ``ddim_uniform`` can make one
    more than ``opts.steps`` (as ComfyUI's), and none for denoise 0."""
    return len(calculate_sigmas(noise_schedule(model), opts.scheduler, opts.steps, opts.denoise)) - 1


def windows_per_step(frames: int, context: ContextOptions, steps: int) -> int:
    """The most windows a sampling step runs (the uniform schedules run one more at some steps): a progress bar of
    ``steps`` times this never moves backwards."""
    context.validate(frames)
    steps = max(1, steps)
    return max(1, *(len(context_windows(frames, context, i, steps)) for i in range(steps)))


def _starting_noise(opts: SampleOptions, shape: tuple) -> torch.Tensor:
    """``initial_noise``, rescheduled by FreeNoise under context windows that ask for it. A part of a video
    (``batch_index``, from Latent From Batch) gets each frame's noise in a video of its largest index + 1 frames,
    FreeNoise included: the noise it had in the whole where the whole was that long (FreeNoise's last block depends
    on a video's length, which a part does not know)."""
    if opts.context is None or not opts.context.freenoise:
        return initial_noise(opts.seed, shape, opts.batch_index)
    if opts.batch_index is None:
        return freenoise(initial_noise(opts.seed, shape), opts.context, opts.seed)
    index = check_batch_index(opts.batch_index, shape[0])
    whole = initial_noise(opts.seed, (max(index) + 1, *shape[1:]))
    return freenoise(whole, opts.context, opts.seed)[index]


def _run_sampler(denoiser, latent: torch.Tensor, schedule, latent_scale: float, opts: SampleOptions,
                 device: torch.device, callback: StepCallback | None, on_window: Callable[[], None] | None
                 ) -> torch.Tensor:
    """The shared sampling loop: sigmas, (FreeNoise) starting noise, context windows, the sampler.

    ``denoiser(x, sigma, window=None) -> x0`` on the scaled latent. Returns the unscaled latent on the CPU.
    """
    sigmas = calculate_sigmas(schedule, opts.scheduler, opts.steps, opts.denoise)
    sampler = get_sampler(opts.sampler)
    if len(sigmas) < 2:
        return latent.float().cpu()
    # on the CPU, where the noise is drawn: a LATENT from another node may be on the GPU (ComfyUI's --gpu-only puts
    # EmptyLatentImage's and VAEEncode's there), and ComfyUI's KSampler takes it on any device
    x = latent.float().cpu() * latent_scale
    x = noise_latent(x, _starting_noise(opts, tuple(latent.shape)), sigmas, schedule)
    if opts.context is not None:
        denoiser = WindowedDenoiser(denoiser, opts.context, sigmas, on_window=on_window)
    out = sampler(denoiser, x.to(device), sigmas.to(device), callback=callback, seed=opts.seed)
    return (out / latent_scale).float().cpu()


def _check_conditioning(what: str, tensors) -> None:
    """KinemaError if a conditioning tensor holds NaN or infinity: every step would, and the video be blank."""
    if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors):
        raise KinemaError(f"the {what} conditioning holds NaN or infinite values: the node that made it (a text or "
                          "image encode, a conditioning edit given a NaN strength) produced them; check its inputs")


def _half_networks(model) -> list[tuple[str, str]]:
    """The networks of a sampling run whose weights are fp16, each with where its precision is set: the UNet and
    the motion module (Memory Policy (Kinema) converts both; else their loaders), each ControlNet and IP-Adapter
    (its loader)."""
    policy = "precision on Memory Policy (Kinema) (placed after Apply Motion Module) or on its loader"
    nets = [("the UNet", model.unet, policy), ("the motion module", getattr(model, "motion", None), policy)]
    nets += [("a ControlNet", c.controlnet, "precision on Load ControlNet (Kinema)")
             for c in getattr(model, "controls", ())]
    nets += [("an IP-Adapter", c.adapter, "precision on Load IP-Adapter (Kinema)")
             for c in getattr(model, "contents", ())]
    half = []
    for name, net, where in nets:
        weight = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
        if weight is not None and weight.dtype == torch.float16 and (name, where) not in half:
            half.append((name, where))
    return half


def _check_sampled(latent: torch.Tensor, model) -> torch.Tensor:
    """``latent`` unless the sampling (from finite inputs) made NaN or infinity, which decode to blank frames: then a
    KinemaError with the likely cause, the overflow of the networks in fp16 (named, with where their precision is
    set), or otherwise the weights and add-ons."""
    if bool(torch.isfinite(latent).all()):
        return latent
    half = _half_networks(model)
    if half:
        groups: dict[str, list[str]] = {}
        for name, where in half:
            groups.setdefault(where, []).append(name)
        fixes = next(iter(groups)) if len(groups) == 1 else "; ".join(
            f"{' and '.join(names)}: {where}" for where, names in groups.items())
        cause = f"{' and '.join(name for name, _ in half)} in fp16 likely overflowed: set bf16 or fp32 ({fixes})"
    else:
        cause = (f"the {str(model.unet.dtype).removeprefix('torch.')} model made them from finite inputs: check "
                 "the checkpoint and its add-ons (a LoRA or ControlNet at a high strength, a high cfg)")
    raise KinemaError(f"sampling produced NaN or infinite values, which decode to blank frames: {cause}")


def with_memory_policy(model, opts: SampleOptions) -> SampleOptions:
    """The sampling options with the model's memory policy (Memory Policy (Kinema)) where the sampler leaves them
    at their defaults: the sampler's nonzero attention chunk wins; cond/uncond are batched only if both allow."""
    policy = getattr(model, "offload", None)
    if policy is None:
        return opts
    return replace(opts, attn_chunk=opts.attn_chunk or policy.attn_chunk,
                   batch_cond=opts.batch_cond and policy.batch_cond)


def prepare_addons(model, latent: torch.Tensor):
    """The model with its ControlNet hints fitted to the video ``latent`` [f, 4, h, w] (spread over the frames,
    resized to its pixel size) and its add-ons checked against the UNet: errors before sampling starts."""
    controls = getattr(model, "controls", ())
    for c in controls:
        c.controlnet.check_unet(model.unet.cfg)
    for c in getattr(model, "contents", ()):
        c.adapter.check_unet(model.unet.cfg)
        c.steps.validate(f"IP-Adapter '{c.name}'" if c.name else "IP-Adapter")
    if not controls:
        return model
    frames, h, w = latent.shape[0], latent.shape[-2] * 8, latent.shape[-1] * 8
    return model.with_options(controls=tuple(c.prepared(frames, h, w) for c in controls))


def _check_latent(latent: torch.Tensor, opts: SampleOptions, model) -> int:
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise KinemaError(f"expected a video latent [frames, 4, h, w], got shape {tuple(latent.shape)}")
    frames = latent.shape[0]
    if not torch.isfinite(latent).all():
        raise KinemaError("the latent holds NaN or infinite values: the node that made it (a VAE encode, a latent "
                          "edit) produced them; check its inputs, or start from Empty Video Latent (Kinema)")
    finite_number(opts.cfg, "cfg")
    if isinstance(opts.attn_chunk, bool) or not isinstance(opts.attn_chunk, int) or opts.attn_chunk < 0:
        raise KinemaError(f"attention_chunk must be 0 (off) or a number of queries, got {opts.attn_chunk!r}")
    if opts.context is not None:
        opts.context.validate(frames)
    model.check_frames(frames, None if opts.context is None else opts.context.context_length)
    return frames


def _check_fits(model, latent: torch.Tensor, opts: SampleOptions, guided: bool, device: torch.device) -> None:
    """KinemaError before anything is allocated when the frames sampled at once clearly cannot fit, one
    conditioning at a time (``guided``: the sampler batches cond and uncond, and goes one after the other by
    itself when that runs out of memory: the host is asked for room for the batch, the run needs one's)."""
    frames = latent.shape[0]
    window = frames if opts.context is None else min(frames, opts.context.context_length)

    def needs(batch: int) -> int:
        return video_activation_bytes(window, batch, latent.shape[-2], latent.shape[-1],
                                      model.unet.cfg.model_channels, model.unet.dtype)

    size = f"{latent.shape[-1] * 8}x{latent.shape[-2] * 8}"
    check_fits(needs(1), device, f"sampling {window} frames at once at {size}",
               "lower the frame count or the size, or connect Context Options (Kinema) to the sampler to sample "
               "in windows of frames", wanted=needs(2) if guided and opts.batch_cond else 0)


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
    frames = _check_latent(latent, opts, model)
    opts = with_memory_policy(model, opts)
    _check_conditioning("positive", (positive,))
    _check_conditioning("negative", (negative,))
    ctx_dim = model.unet.cfg.context_dim
    for what, c in (("positive", positive), ("negative", negative)):
        if c is not None and c.shape[-1] != ctx_dim:
            raise KinemaError(
                f"the {what} conditioning has width {c.shape[-1]} but the UNet expects {ctx_dim}: "
                "encode the prompt with the CLIP of the same checkpoint"
            )
    device = model.compute_device
    _check_fits(model, latent, opts, runs_uncond(negative, opts.cfg, model.temporal_scale), device)
    model = prepare_addons(model, latent)
    schedule = noise_schedule(model)
    denoiser = CFGDenoiser(
        EpsVideoDenoiser(model, schedule, attn_chunk=opts.attn_chunk, batch_cond=opts.batch_cond),
        per_frame(positive, frames, "positive"),
        None if negative is None else per_frame(negative, frames, "negative"),
        opts.cfg,
        temporal_scale=model.temporal_scale,
    )
    with video_model_on_device(model):
        out = _run_sampler(denoiser, latent, schedule, SD15_LATENT_SCALE, opts, device, callback, on_window)
    return _check_sampled(out, model)


SVD_CONDITIONING_KEYS = ("context", "concat", "y")


def _svd_per_frame(cond: dict, frames: int, latent: torch.Tensor, what: str, context_dim: int) -> dict:
    """An image conditioning ``{context, concat, y}`` for one video -> the same per frame (views)."""
    missing = [k for k in SVD_CONDITIONING_KEYS if k not in cond]
    if missing:
        raise KinemaError(f"the {what} conditioning is not an image-to-video conditioning (no '{missing[0]}'): "
                          "connect SVD Image Conditioning (Kinema)")
    width = cond["context"].shape[-1]
    if width != context_dim:
        raise KinemaError(
            f"the {what} image conditioning holds {width}-wide CLIP image embeddings but this SVD model takes "
            f"{context_dim}-wide ones: connect the clip_vision output of Load SVD Checkpoint (Kinema) to SVD Image "
            "Conditioning (Kinema), or load the ViT-H/14 image encoder SVD was trained with (clip_vision_h)")
    concat = cond["concat"]
    if concat.shape[-2:] != latent.shape[-2:]:
        raise KinemaError(
            f"the {what} image conditioning is for a {concat.shape[-1] * 8}x{concat.shape[-2] * 8} video but the "
            f"latent is {latent.shape[-1] * 8}x{latent.shape[-2] * 8}: use the latent of the same conditioning node")
    for k in SVD_CONDITIONING_KEYS:
        if cond[k].shape[0] not in (1, frames):
            raise KinemaError(f"the {what} image conditioning's '{k}' has {cond[k].shape[0]} entries for a video of "
                              f"{frames} frames (one image, or one per frame): connect SVD Image Conditioning "
                              "(Kinema) and its latent")
    return {k: (v.expand(frames, *v.shape[1:]) if v.shape[0] == 1 else v) for k, v in cond.items()
            if k in SVD_CONDITIONING_KEYS}


def sample_img2vid(
    model,
    cond: dict,
    uncond: dict | None,
    latent: torch.Tensor,
    opts: SampleOptions,
    callback: StepCallback | None = None,
    on_window: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample one video with Stable Video Diffusion (``svd_model.SVDModel``): EDM, v prediction.

    cond/uncond: ``{"context": [1, 1, d], "concat": [1, 4, h, w], "y": [1, adm]}`` from
    ``svd_model.image_conditioning``; latent: [f, 4, h, w] unscaled (zeros). ``opts.cfg`` is the largest
    guidance scale; the model's ``cfg_mode`` spreads it over the frames from ``model.guidance_min``
    (Stable Video Diffusion's per-frame guidance). Returns the latent [f, 4, h, w], unscaled, on the CPU.
    """
    frames = _check_latent(latent, opts, model)
    opts = with_memory_policy(model, opts)
    for what, c in (("positive", cond), ("negative", uncond or {})):
        _check_conditioning(what, [v for v in c.values() if isinstance(v, torch.Tensor)])
    device = model.compute_device
    cfg = per_frame_cfg(model.cfg_mode, model.guidance_min, opts.cfg, frames, model.cfg_period)
    _check_fits(model, latent, opts, runs_uncond(uncond, cfg, model.temporal_scale), device)
    denoiser = CFGDenoiser(
        VEDMVideoDenoiser(model, attn_chunk=opts.attn_chunk, batch_cond=opts.batch_cond),
        _svd_per_frame(cond, frames, latent, "positive", model.unet.cfg.context_dim),
        None if uncond is None else _svd_per_frame(uncond, frames, latent, "negative", model.unet.cfg.context_dim),
        cfg,
        temporal_scale=model.temporal_scale,
    )
    schedule = noise_schedule(model)
    with video_model_on_device(model):
        out = _run_sampler(denoiser, latent, schedule, SVD_LATENT_SCALE, opts, device, callback, on_window)
    return _check_sampled(out, model)
