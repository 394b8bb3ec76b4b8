"""Denoisers and the guidances composed on them.

Every denoiser takes an optional ``window`` (a ``context.ContextWindow``):
the frames of ``x`` are then those of ``window.sub_idxs`` in a longer video,
and per-frame conditioning is sliced to them. ``WindowedDenoiser`` runs a
denoiser window by window and fuses the predictions per frame.

``EpsVideoDenoiser`` turns an eps-prediction video model into
``x0 = f(x, sigma, contexts)`` for one video latent ``[f, c, h, w]``; a
guidance is a function of those x0 predictions. Classifier-free guidance
runs cond and uncond in one batch when ``batch_cond`` is set and memory
allows: a batch that runs out of memory is retried one context at a time, and
the denoiser stays unbatched for the rest of the run.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import context
from .memory import is_out_of_memory, release_cached_memory
from .sampling import DiscreteSchedule


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


class EpsVideoDenoiser:
    """x0 predictions of an eps video model for several per-frame contexts at one sigma.

    ``model(x, timesteps, context, num_frames, attn_chunk=, temporal=)`` is a
    ``MotionModel``; contexts are per-frame ``[f, n, d]``.
    """

    def __init__(self, model, schedule: DiscreteSchedule, attn_chunk: int = 0, batch_cond: bool = True):
        self.model = model
        self.schedule = schedule
        self.attn_chunk = attn_chunk
        self.batch_cond = batch_cond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, contexts: list[torch.Tensor],
                 temporal: bool = True, window=None) -> list[torch.Tensor]:
        """x [f, c, h, w], contexts [[f, n, d], ...] -> x0 for each context, each [f, c, h, w]"""
        frames = x.shape[0]
        dtype = self.model.unet.dtype
        device = next(self.model.unet.parameters()).device
        c_in = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
        t = self.schedule.timestep(sigma.reshape(1)).to(device)
        groups = [contexts]
        if not self.batch_cond or len(contexts) == 1:
            groups = [[c] for c in contexts]
        else:
            matched = match_token_lengths(contexts)
            groups = [matched] if matched is not None else [[c] for c in contexts]
        outs = []
        for group in groups:
            b = len(group)
            xin = (x.repeat(b, 1, 1, 1) * c_in).to(device, dtype)
            ctx = torch.cat(group).to(device, dtype)
            try:
                eps = self.model(xin, t.expand(b * frames), ctx, frames, attn_chunk=self.attn_chunk,
                                 temporal=temporal, window=window)
            except Exception as exc:
                if b == 1 or not is_out_of_memory(exc):
                    raise
                del xin, ctx
                release_cached_memory()
                self.batch_cond = False  # the rest of the run: one context at a time
                outs.extend(self(x, sigma, group, temporal=temporal, window=window))
                continue
            eps = eps.float().to(x.device)
            outs.extend(x - float(sigma) * e for e in eps.chunk(b))
        return outs


def frames_of(per_frame: torch.Tensor, window) -> torch.Tensor:
    """The entries of a per-frame tensor [F, ...] that belong to ``window`` (all of them without one)."""
    if window is None or (len(window.sub_idxs) == per_frame.shape[0]
                          and tuple(window.sub_idxs) == tuple(range(per_frame.shape[0]))):
        return per_frame
    return per_frame[list(window.sub_idxs)]


class CFGDenoiser:
    """Classifier-free guidance on x0: ``x0_u + cfg * (x0_c - x0_u)`` (uncond skipped at cfg 1).

    ``cond``/``uncond`` are per frame of the whole video, ``[F, n, d]``.
    """

    def __init__(self, denoiser: EpsVideoDenoiser, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float):
        self.denoiser, self.cond, self.uncond, self.cfg = denoiser, cond, uncond, float(cfg)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, window=None) -> torch.Tensor:
        """x [f, c, h, w] -> x0 [f, c, h, w]"""
        cond = frames_of(self.cond, window)
        if self.uncond is None or self.cfg == 1.0:
            return self.denoiser(x, sigma, [cond], window=window)[0]
        x0_u, x0_c = self.denoiser(x, sigma, [frames_of(self.uncond, window), cond], window=window)
        return x0_u + self.cfg * (x0_c - x0_u)


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
