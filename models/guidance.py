"""Denoisers and the guidances composed on them.

Every denoiser takes an optional ``window`` (a ``context.ContextWindow``):
the frames of ``x`` are then those of ``window.sub_idxs`` in a longer video,
and per-frame conditioning is sliced to them. ``WindowedDenoiser`` runs a
denoiser window by window and fuses the predictions per frame.

``EpsVideoDenoiser`` (AnimateDiff: eps prediction on discrete DDPM levels)
and ``VEDMVideoDenoiser`` (Stable Video Diffusion: v prediction, EDM
preconditioning) turn a video model into ``x0 = f(x, sigma, conditionings)``
for one video latent ``[f, c, h, w]``; a guidance is a function of those x0
predictions. Classifier-free guidance runs cond and uncond in one batch when
``batch_cond`` is set and memory allows: a batch that runs out of memory is
retried one conditioning at a time, and the denoiser stays unbatched for the
rest of the run.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from . import context
from .addons import ControlReuse
from .errors import KinemaError
from .layers import fused_attention
from .memory import is_out_of_memory, release_cached_memory, run_with_oom_retry
from .sampling import DiscreteSchedule

logger = logging.getLogger("kinema")


def match_token_lengths(contexts: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Repeat contexts along tokens to one common length so they batch.

    Attending to a token sequence repeated k times gives exactly the result of
    attending to it once, so this changes nothing but the batch shape. Returns
    None when the lengths have no small common multiple.
    """
    lengths = [c.shape[1] for c in contexts]
    if len(set(lengths)) == 1:
        return contexts
    lcm = math.lcm(*lengths)
    if lcm > 4 * max(lengths):
        return None
    return [c.repeat(1, lcm // c.shape[1], 1) for c in contexts]


def sampling_remedy(model, attn_chunk: int, windowed: bool, chunks_help: bool = True) -> str:
    """What is left to change after a model call ran out of memory for good, the first time with ``attn_chunk``
    queries at once (0: all): the settings already at their least (block offload with one resident block, the
    smallest attention chunk) are not named, nor attention chunks where they save nothing (``chunks_help``
    False: ``layers.fused_attention``)."""
    left = ["lower the frame count or the size",
            "a shorter context_length on Context Options (Kinema)" if windowed
            else "connect Context Options (Kinema) to sample in windows"]
    retried = AttentionChunk(attn_chunk).smaller()
    if chunks_help and retried is not None and retried.smaller() is not None:
        left.append(f"set attention_chunk on the Video Sampler below {retried.queries}")
    offload = getattr(model, "offload", None)
    if getattr(offload, "mode", "none") != "block":
        left.append("use Memory Policy (Kinema) with block offload")
    elif getattr(offload, "resident", 1) > 1:
        left.append("set resident_blocks to 1 on Memory Policy (Kinema)")
    return ", ".join(left[:-1]) + ", or " + left[-1]


@dataclass(frozen=True)
class AttentionChunk:
    """Attention queries at once (0: all), as the out-of-memory retry describes and shrinks it."""

    queries: int = 0

    def smaller(self) -> AttentionChunk | None:
        """1024 queries at once after none or more (half a chunk larger than every query would be the same
        call again), then half the chunk down to 64."""
        if self.queries == 0:
            return AttentionChunk(1024)
        smaller = min(self.queries // 2, 1024)
        return AttentionChunk(smaller) if smaller >= 64 else None

    def __str__(self) -> str:
        return f"attention in chunks of {self.queries} queries" if self.queries else "attention unchunked"


class _BatchedDenoiser:
    """x0 predictions of a video model for several conditionings at one sigma, batched while memory allows.

    Subclasses say how conditionings group into batches (``_groups``) and how one batch is predicted
    (``_predict``). A batch that runs out of memory is retried one conditioning at a time, and the
    denoiser stays unbatched for the rest of the run. ``uncond`` flags the unconditional entries of
    ``conds`` (the model's add-ons that have a negative of their own, IP-Adapter's zero image, need it);
    ``temporal=False`` runs the model with its temporal layers off (frames independent).
    """

    def __init__(self, model, attn_chunk: int = 0, batch_cond: bool = True):
        self.model = model
        self.attn_chunk = attn_chunk
        self.batch_cond = batch_cond

    def _groups(self, conds: list) -> list[list]:
        if not self.batch_cond or len(conds) == 1:
            return [[c] for c in conds]
        return [conds]

    def _predict(self, x: torch.Tensor, sigma: torch.Tensor, group: list, window, uncond: tuple,
                 temporal: bool, reuse) -> list[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, conds: list, window=None,
                 uncond: list[bool] | None = None, temporal: bool = True,
                 reuse: ControlReuse | None = None) -> list[torch.Tensor]:
        """x [f, c, h, w], conds [per-frame conditioning, ...] -> x0 for each conditioning, each [f, c, h, w]

        ``reuse``: ControlNet residuals shared by the evaluations of one guidance call (``addons.ControlReuse``).
        """
        flags = list(uncond) if uncond is not None else [False] * len(conds)
        outs, start = [], 0
        for group in self._groups(conds):
            group_flags = tuple(flags[start:start + len(group)])
            start += len(group)
            if len(group) == 1:
                outs.extend(self._predict_one(x, sigma, group, window, group_flags, temporal, reuse))
                continue
            try:
                outs.extend(self._predict(x, sigma, group, window, group_flags, temporal, reuse))
                continue
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            # out of the except block: the failed batch's tensors are released before the retry
            release_cached_memory()
            logger.warning("sampling ran out of memory with %d conditionings in one batch; retrying them one "
                           "after the other, as for the rest of the run", len(group))
            self.batch_cond = False  # the rest of the run: one conditioning at a time
            outs.extend(self(x, sigma, group, window=window, uncond=list(group_flags), temporal=temporal,
                             reuse=reuse))
        return outs

    def _predict_one(self, x, sigma, group, window, flags, temporal, reuse) -> list[torch.Tensor]:
        """One conditioning; out of memory: once more with attention in (smaller) chunks, which gives the same
        prediction and holds for the rest of the run, where chunks save memory (``layers.fused_attention``:
        not on CUDA or the CPU, whose attention kernels never hold the score matrix); a second time, or where
        they would not: a KinemaError naming the settings."""
        def run(chunking: AttentionChunk):
            self.attn_chunk = chunking.queries
            return self._predict(x, sigma, group, window, flags, temporal, reuse)

        chunks_help = not fused_attention(self._device_dtype(self.model.unet)[0])
        remedy = sampling_remedy(self.model, self.attn_chunk, window is not None, chunks_help)
        smaller = AttentionChunk.smaller if chunks_help else lambda chunking: None
        out, used = run_with_oom_retry(run, AttentionChunk(self.attn_chunk), smaller, "sampling", remedy)
        self.attn_chunk = used.queries
        return out

    def _device_dtype(self, net) -> tuple[torch.device, torch.dtype]:
        device = getattr(self.model, "compute_device", None)  # block offload: not where the weights rest
        return (device if isinstance(device, torch.device) else next(net.parameters()).device), net.dtype


class EpsVideoDenoiser(_BatchedDenoiser):
    """x0 predictions of an eps video model (``MotionModel``) for several per-frame contexts at one sigma.

    ``model(x, timesteps, context, num_frames, attn_chunk=, temporal=, window=, sigma=, uncond=)``; contexts
    are ``[f, n, d]`` (prompts of different token lengths are batched by repeating their tokens, see
    ``match_token_lengths``). ``sigma`` lets the model's add-ons (ControlNets, IP-Adapters) keep to their
    start/end range.
    """

    def __init__(self, model, schedule: DiscreteSchedule, attn_chunk: int = 0, batch_cond: bool = True):
        super().__init__(model, attn_chunk, batch_cond)
        self.schedule = schedule

    def _groups(self, conds: list) -> list[list]:
        groups = super()._groups(conds)
        if len(groups) == 1 and len(conds) > 1:
            matched = match_token_lengths(conds)
            return [matched] if matched is not None else [[c] for c in conds]
        return groups

    def _predict(self, x, sigma, group, window, uncond, temporal, reuse):
        frames, b = x.shape[0], len(group)
        device, dtype = self._device_dtype(self.model.unet)
        c_in = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
        t = self.schedule.timestep(sigma.reshape(1)).to(device)
        xin = (x.repeat(b, 1, 1, 1) * c_in).to(device, dtype)
        ctx = torch.cat(group).to(device, dtype)
        eps = self.model(xin, t.expand(b * frames), ctx, frames, attn_chunk=self.attn_chunk, temporal=temporal,
                         window=window, sigma=float(sigma), uncond=uncond, control_reuse=reuse)
        eps = eps.float().to(x.device)
        return [x - float(sigma) * e for e in eps.chunk(b)]


class VEDMVideoDenoiser(_BatchedDenoiser):
    """x0 predictions of a v-prediction EDM video model (``SVDModel``), Stable Video Diffusion's preconditioning.

    ``x0 = c_skip x + c_out F(c_in x ++ concat, c_noise)`` with ``c_skip = 1/(s^2+1)``,
    ``c_out = -s/sqrt(s^2+1)``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = 0.25 ln s``. Each conditioning is a
    dict of per-frame tensors: ``context`` [f, n, d] (CLIP image embedding), ``concat`` [f, c, h, w]
    (unscaled VAE latents, concatenated to the input channels after ``c_in`` is applied, so not scaled by
    it) and ``y`` [f, adm] (the micro-conditioning vector).
    """

    def _predict(self, x, sigma, group, window, uncond, temporal, reuse):  # SVD runs no ControlNet: nothing to reuse
        frames, b = x.shape[0], len(group)
        device, dtype = self._device_dtype(self.model.unet)
        s = float(sigma)
        c_in, c_skip, c_out = 1.0 / math.sqrt(s * s + 1.0), 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        c_noise = torch.full((b * frames,), 0.25 * math.log(s), device=device)
        concat = torch.cat([c["concat"] for c in group])
        xin = torch.cat([x.repeat(b, 1, 1, 1) * c_in, concat.to(x.device, x.dtype)], dim=1).to(device, dtype)
        ctx = torch.cat([c["context"] for c in group]).to(device, dtype)
        y = torch.cat([c["y"] for c in group]).to(device, dtype)
        v = self.model(xin, c_noise, ctx, y, frames, attn_chunk=self.attn_chunk, window=window, temporal=temporal)
        v = v.float().to(x.device)
        return [c_skip * x + c_out * part for part in v.chunk(b)]


def frames_of(per_frame, window):
    """The entries of per-frame conditioning [F, ...] that belong to ``window`` (all of them without one).

    ``per_frame`` is a tensor, a dict of such tensors (sliced alike) or None.
    """
    if per_frame is None:
        return None
    if isinstance(per_frame, dict):
        return {k: frames_of(v, window) for k, v in per_frame.items()}
    if window is None or (len(window.sub_idxs) == per_frame.shape[0]
                          and tuple(window.sub_idxs) == tuple(range(per_frame.shape[0]))):
        return per_frame
    return per_frame[list(window.sub_idxs)]


CFG_MODES = ("constant", "linear", "triangle")


def per_frame_cfg(mode: str, min_cfg: float, max_cfg: float, frames: int, period: float = 1.0) -> torch.Tensor:
    """One guidance scale per frame, [frames] (Stable Video Diffusion's guiders).

    ``constant``: ``max_cfg`` everywhere; ``linear``: from ``min_cfg`` at the first frame to ``max_cfg`` at the
    last (sgm's LinearPredictionGuider); ``triangle``: ``min_cfg`` at both ends rising to ``max_cfg`` in the
    middle, a triangle wave of ``period`` over the frame positions 0..1 (sgm's TrianglePredictionGuider).
    """
    if frames < 1:
        raise KinemaError(f"a video needs at least 1 frame, got {frames}")
    if mode == "constant":
        return torch.full((frames,), float(max_cfg))
    if mode == "linear":
        return torch.linspace(float(min_cfg), float(max_cfg), frames)
    if mode == "triangle":
        if period <= 0:
            raise KinemaError(f"the triangle guidance period must be positive, got {period}")
        pos = torch.linspace(0, 1, frames, dtype=torch.float64) / period
        wave = 2 * (pos - torch.floor(pos + 0.5)).abs()
        return (wave * (float(max_cfg) - float(min_cfg)) + float(min_cfg)).float()
    raise KinemaError(f"unknown per-frame guidance '{mode}': use one of {', '.join(CFG_MODES)}")


def runs_uncond(uncond, cfg: float | torch.Tensor, temporal_scale: float = 1.0) -> bool:
    """Whether a ``CFGDenoiser`` of these settings evaluates the uncond side at all (the memory check before
    sampling sizes the model's batch with it): not without one, nor where cfg is 1 for every frame and w_t is 1."""
    if uncond is None:
        return False
    if float(temporal_scale) != 1.0:  # the temporal term takes the uncond side whatever cfg is
        return True
    if isinstance(cfg, torch.Tensor):
        return not bool((cfg == 1.0).all())
    return float(cfg) != 1.0


class CFGDenoiser:
    """Classifier-free guidance on x0, optionally composed with Gen-1's temporal guidance.

    ``cond``/``uncond`` are per frame of the whole video (``[F, n, d]``, or a dict of per-frame tensors for
    the denoisers that take several); ``cfg`` (w) is one scale or one per frame ``[F]``; ``temporal_scale``
    (w_t) weighs the video model against the same network with its temporal layers off (the image model,
    frames independent), as Gen-1 (Esser et al. 2023) composes the two guidances::

        x0 = x0_img(u) + w_t (x0_vid(u) - x0_img(u)) + w (x0_vid(c) - x0_vid(u))

    and without an uncond: ``x0 = x0_img(c) + w_t (x0_vid(c) - x0_img(c))``. ``w_t = 1`` is the plain video
    model exactly (the image model is not run); 0 takes the unconditional side from the image model, while the
    guidance term ``w (x0_vid(c) - x0_vid(u))`` still comes from the video model, also at cfg 1 (then
    ``x0_img(u) + x0_vid(c) - x0_vid(u)``): every frame is made on its own only without an uncond; above 1 it
    pushes temporal consistency past the video model's. Model evaluations per step: 1 (no uncond), 2 (with
    one), plus 1 image-model evaluation when ``w_t != 1`` (cheaper than a video one: no temporal layers). The
    uncond is skipped where cfg is 1 for every frame and ``w_t`` is 1 (the first formula is then ``x0_vid(c)``); with ``w_t != 1`` it is kept, so the
    result moves smoothly with cfg through 1.
    """

    def __init__(self, denoiser, cond, uncond, cfg: float | torch.Tensor, temporal_scale: float = 1.0):
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.cfg = cfg.float() if isinstance(cfg, torch.Tensor) else float(cfg)
        self.temporal_scale = float(temporal_scale)

    def _skip_uncond(self) -> bool:
        return not runs_uncond(self.uncond, self.cfg, self.temporal_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, window=None) -> torch.Tensor:
        """x [f, c, h, w] -> x0 [f, c, h, w]"""
        cond = frames_of(self.cond, window)
        w_t = self.temporal_scale
        if self._skip_uncond():
            reuse = None if w_t == 1.0 else ControlReuse(side=False)
            x0_c = self.denoiser(x, sigma, [cond], window=window, reuse=reuse)[0]
            if w_t == 1.0:
                return x0_c
            x0_img = self.denoiser(x, sigma, [cond], window=window, temporal=False, reuse=reuse)[0]
            return x0_img + w_t * (x0_c - x0_img)
        uncond = frames_of(self.uncond, window)
        # the image model's evaluation gets the uncond video evaluation's ControlNet residuals (the same inputs)
        reuse = None if w_t == 1.0 else ControlReuse(side=True)
        x0_u, x0_c = self.denoiser(x, sigma, [uncond, cond], window=window, uncond=[True, False], reuse=reuse)
        scale = self.cfg
        if isinstance(scale, torch.Tensor):
            scale = rearrange(frames_of(scale, window), "f -> f 1 1 1").to(x0_c.device)
        if w_t == 1.0:
            return x0_u + scale * (x0_c - x0_u)
        x0_img = self.denoiser(x, sigma, [uncond], window=window, uncond=[True], temporal=False, reuse=reuse)[0]
        return x0_img + w_t * (x0_u - x0_img) + scale * (x0_c - x0_u)


class WindowedDenoiser:
    """Context windows: a guided denoiser run on overlapping windows of frames, fused per frame.

    Guidance is linear in x0, so fusing guided window predictions equals guiding
    fused ones. Only one window's activations exist at a time: memory follows
    the context length, not the frame count. ``sigmas`` is the sampling
    schedule (the step index moves the uniform schedules' windows);
    ``on_window()`` is called after each window (progress, interrupt).
    """

    def __init__(self, denoiser, opts, sigmas: torch.Tensor, on_window: Callable[[], None] | None = None):
        self.denoiser, self.opts, self.on_window = denoiser, opts, on_window
        self.sigmas = sigmas.detach().float().cpu()

    def step_of(self, sigma: torch.Tensor) -> int:
        return int((self.sigmas - float(sigma)).abs().argmin())

    def windows(self, num_frames: int, sigma: torch.Tensor) -> list:
        return context.context_windows(num_frames, self.opts, self.step_of(sigma), max(1, len(self.sigmas) - 1))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x [F, c, h, w] -> x0 [F, c, h, w]"""
        windows = self.windows(x.shape[0], sigma)

        def parts():
            for window in windows:
                x0 = self.denoiser(x[list(window.sub_idxs)], sigma, window=window)
                if self.on_window is not None:
                    self.on_window()
                yield window, x0

        if len(windows) == 1 and tuple(windows[0].sub_idxs) == tuple(range(x.shape[0])):
            return next(parts())[1]
        return context.fuse(parts(), x.shape[0], self.opts.fuse)
