"""Context windows: sampling videos longer than the motion module sees at once.

An AnimateDiff motion module attends over at most 16..32 frames. For a longer
video latent ``[f, c, h, w]`` each sampling step runs the model on overlapping
*windows* of ``context_length`` frames and blends the per-window x0
predictions frame by frame. This module holds only the bookkeeping: which
frames each window holds, the blend weights, the blending itself, and the
FreeNoise initial-noise rescheduling. It knows nothing about models.

Windows (``context_windows``)
-----------------------------
A video of ``f <= context_length`` frames is always one window ``0..f-1``,
whatever the schedule. Otherwise, with ``L = context_length`` and
``o = overlap``:

``static``
    The same windows at every step: contiguous windows starting at 0,
    ``L - o`` apart; the last one is pulled back so it ends exactly on the
    last frame (nothing wraps, nothing runs past the end). ``stride`` is
    ignored. Neighbouring windows share at least ``o`` frames.

``uniform_looped``
    The "uniform" schedule of the AnimateDiff community tools, written anew
    here. The video is treated as a loop. Stride levels ``k = 1, 2, 4, ...``
    (``stride`` levels at most, and only those whose strided window still
    fits, ``L * k <= f``) each contribute windows of ``L`` frames taking every
    ``k``-th frame, ``L * k - o`` apart. Every step shifts all windows by an
    offset taken from the "ordered halving" of the step index ``h(step)``:
    the step's binary digits mirrored behind the binary point (0, 1/2, 1/4,
    3/4, 1/8, ...), so consecutive steps put the seams far apart. Level ``k``
    starts at ``round(f * h) + floor(k * h)`` and places windows while the
    start is below ``f + round(f * h)``; all indices are taken modulo ``f``,
    so the last frames share windows with the first. Level 1 alone covers
    every frame at every step. ``num_steps`` does not change the windows
    (it is part of the signature so schedules that need it can be added).

``uniform_standard``
    The uniform windows for a video that does not loop: level ``k`` places
    windows while the start is below ``f + round(f * h) - o`` (``o`` frames
    earlier than the looped schedule: no window only to join end and start).
    A window that would run past the last frame is replaced by two that stay inside ``[0, f)`` with the same stride
    and the same frame phase: one pulled back to end on the last in-range
    frame it held, one pushed forward to begin on the first frame it wrapped
    onto. Together they hold every frame the wrapping window held, so level 1
    still covers every frame at every step; windows equal to an earlier one
    are dropped. For stride 1 these are the same windows as the community
    implementation (which adds the second window only when a neighbour does
    not already hold the wrapped start).

Every window holds ``min(L, f)`` distinct frames; its ``sub_idxs`` are in
window (temporal) order, which for the looped schedule may pass from the last
frame to the first.

Fusing (``fuse_weights``, ``fuse``, ``WindowAccumulator``)
----------------------------------------------------------
Each window's prediction is weighted by position inside the window, then
every frame is divided by the sum of the weights it received, so per frame
the weights sum to one (a frame seen by one window gets that window's value
exactly). Weights for a window of ``n`` frames:

- ``flat``: all ones (the plain mean).
- ``pyramid``: ``min(i + 1, n - i)``: 1, 2, ..., peak, ..., 2, 1.
- ``gauss``: ``exp(-((i - (n - 1) / 2) / sigma)**2 / 2)`` with
  ``sigma = n / 4``; the edges sit just under two sigmas from the centre
  (about 0.17 of the peak for 16 frames), never zero.

Fusing keeps one full-length accumulator and one per-frame weight sum;
windows are added one at a time and never stacked. The accumulator is
float32 (float64 for float64 inputs); the result has the predictions' dtype.

FreeNoise (``freenoise``)
-------------------------
Noise rescheduling after FreeNoise (Qiu et al. 2023), rule chosen here: with
``d = L - o`` (the static window advance), the first ``L`` frames keep their
noise; the later frames are cut into blocks of ``d`` (the last may be
shorter) and the block starting at frame ``p`` receives the (already
rescheduled) noise of frames ``p - L .. p - L + len - 1`` in an order shuffled
by ``torch.randperm`` from a CPU ``torch.Generator`` seeded with ``seed``
(one permutation per block, in block order). So the noise repeats with period
``L`` up to the shuffles, every frame's noise is one of the first ``L``
frames', and every static window holds each of those ``L`` noises exactly
once. With FreeNoise off, or ``f <= L``, the noise comes back unchanged (as a
copy). The input tensor is never modified.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import KinemaError

SCHEDULES = ("uniform_standard", "uniform_looped", "static")
FUSE_METHODS = ("pyramid", "flat", "gauss")

_SEED_MASK = (1 << 64) - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ContextOptions:
    """How a long video is split into windows and blended back (see the module docstring)."""

    context_length: int = 16
    overlap: int = 4
    stride: int = 1  # stride levels for the uniform schedules: 1 = contiguous only, 2 adds every 2nd frame, ...
    schedule: str = "uniform_standard"
    fuse: str = "pyramid"
    freenoise: bool = False

    def validate(self, num_frames: int | None = None) -> None:
        """Raise KinemaError naming the bad value and the fix; ``num_frames`` is the video's frame count."""
        for name in ("context_length", "overlap", "stride"):
            value = getattr(self, name)
            if not _is_int(value):
                label = name.replace("_", " ") if name.startswith("context") else f"context {name}"
                raise KinemaError(f"{label} must be a whole number, got {value!r}")
        if self.context_length < 1:
            raise KinemaError(
                f"context length is {self.context_length}: it must be at least 1 frame "
                "(16 is the usual choice for SD1.5 motion modules)"
            )
        if self.overlap < 0:
            raise KinemaError(f"context overlap is {self.overlap}: it must be 0 or more")
        if self.overlap >= self.context_length:
            raise KinemaError(
                f"context overlap is {self.overlap} but the context length is {self.context_length}: "
                f"the overlap must be less than the context length (set it to {self.context_length - 1} "
                "or less; a quarter of the length is the usual choice)"
            )
        if self.stride < 1:
            raise KinemaError(f"context stride is {self.stride}: it must be at least 1 (1 = contiguous windows only)")
        if self.schedule not in SCHEDULES:
            raise KinemaError(
                f"unknown context schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if self.fuse not in FUSE_METHODS:
            raise KinemaError(f"unknown fuse method {self.fuse!r}: choose one of {', '.join(FUSE_METHODS)}")
        if num_frames is not None and (not _is_int(num_frames) or num_frames < 1):
            raise KinemaError(f"a video for context windows needs at least 1 frame, got {num_frames!r}")


@dataclass(frozen=True)
class ContextWindow:
    """One window: the video frames it holds, in the order the model sees them."""

    full_length: int  # frames in the whole video
    context_length: int  # the option's context length
    sub_idxs: tuple[int, ...]  # video frame indices, in window order


# ---------------------------------------------------------------------------------------------------------------
# schedules


def ordered_halving(step: int) -> float:
    """The step's binary digits mirrored behind the binary point: 0, 1/2, 1/4, 3/4, 1/8, 5/8, ... in [0, 1).

    Uses the lowest 64 bits of the step.
    """
    step = int(step) & _SEED_MASK
    value, scale = 0.0, 0.5
    while step:
        if step & 1:
            value += scale
        step >>= 1
        scale *= 0.5
    return value


def stride_levels(num_frames: int, opts: ContextOptions) -> list[int]:
    """The frame spacings of the uniform schedules' window levels: 1, 2, 4, ... while the window fits the video."""
    levels = []
    for i in range(opts.stride):
        k = 1 << i
        if opts.context_length * k > num_frames:
            break
        levels.append(k)
    return levels or [1]


def _uniform_starts(num_frames: int, opts: ContextOptions, k: int, step: int, looped: bool) -> range:
    """Unwrapped start frames of level ``k``'s windows at ``step``."""
    h = ordered_halving(step)
    pad = int(round(num_frames * h))
    first = pad + int(math.floor(k * h))
    end = num_frames + pad - (0 if looped else opts.overlap)
    return range(first, end, opts.context_length * k - opts.overlap)


def _strided(start: int, k: int, length: int) -> tuple[int, ...]:
    return tuple(range(start, start + k * length, k))


def _static_windows(num_frames: int, length: int, overlap: int) -> list[tuple[int, ...]]:
    windows, start, advance = [], 0, length - overlap
    while True:
        begin = min(start, num_frames - length)
        windows.append(tuple(range(begin, begin + length)))
        if begin + length >= num_frames:
            return windows
        start += advance


def _looped_windows(num_frames: int, opts: ContextOptions, step: int) -> list[tuple[int, ...]]:
    windows = []
    ring = tuple(range(num_frames)) * 2  # a strided window spans at most num_frames frames: slice the loop twice
    for k in stride_levels(num_frames, opts):
        span = opts.context_length * k
        for start in _uniform_starts(num_frames, opts, k, step, looped=True):
            start %= num_frames
            windows.append(ring[start:start + span:k])
    return windows


def _standard_windows(num_frames: int, opts: ContextOptions, step: int) -> list[tuple[int, ...]]:
    length, windows, seen = opts.context_length, [], set()

    def add(window):
        if window not in seen:
            seen.add(window)
            windows.append(window)

    for k in stride_levels(num_frames, opts):
        for start in _uniform_starts(num_frames, opts, k, step, looped=False):
            start %= num_frames
            if start + (length - 1) * k < num_frames:
                add(_strided(start, k, length))
                continue
            # the window runs past the end: keep its phase, end it on its last in-range frame ...
            last = start + ((num_frames - 1 - start) // k) * k
            add(_strided(last - (length - 1) * k, k, length))
            # ... and start one on the first frame it wrapped onto (L * k <= f keeps both inside the video)
            add(_strided(last + k - num_frames, k, length))
    return windows


def context_windows(num_frames: int, opts: ContextOptions, step: int = 0, num_steps: int = 1) -> list[ContextWindow]:
    """The windows the model runs on at sampling ``step`` (0-based) of ``num_steps`` for a video of ``num_frames``."""
    opts.validate(num_frames)
    if not _is_int(step) or step < 0:
        raise KinemaError(f"the sampling step for context windows must be a whole number >= 0, got {step!r}")
    if num_frames <= opts.context_length:
        idxs = [tuple(range(num_frames))]
    elif opts.schedule == "static":
        idxs = _static_windows(num_frames, opts.context_length, opts.overlap)
    elif opts.schedule == "uniform_looped":
        idxs = _looped_windows(num_frames, opts, step)
    else:
        idxs = _standard_windows(num_frames, opts, step)
    return [ContextWindow(full_length=num_frames, context_length=opts.context_length, sub_idxs=w) for w in idxs]


# ---------------------------------------------------------------------------------------------------------------
# fusing


def gauss_sigma(length: int) -> float:
    """The standard deviation of the ``gauss`` weights for a window of ``length`` frames."""
    return max(length, 1) / 4.0


def fuse_weights(length: int, method: str) -> torch.Tensor:
    """[length] float32, all > 0: the weight of each position inside one window."""
    if method not in FUSE_METHODS:
        raise KinemaError(f"unknown fuse method {method!r}: choose one of {', '.join(FUSE_METHODS)}")
    if not _is_int(length) or length < 1:
        raise KinemaError(f"a window needs at least 1 frame, got {length!r}")
    pos = torch.arange(length, dtype=torch.float64)
    if method == "flat":
        weights = torch.ones(length, dtype=torch.float64)
    elif method == "pyramid":
        weights = torch.minimum(pos + 1, length - pos)
    else:
        centre = (length - 1) / 2.0
        weights = torch.exp(-0.5 * ((pos - centre) / gauss_sigma(length)) ** 2)
    return weights.float()


class WindowAccumulator:
    """Per-frame weighted mean of window predictions, one window at a time.

    Memory: one accumulator shaped like the whole video and one weight sum per
    frame, allocated on the first ``add`` with the prediction's device.
    """

    def __init__(self, num_frames: int, method: str):
        if method not in FUSE_METHODS:
            raise KinemaError(f"unknown fuse method {method!r}: choose one of {', '.join(FUSE_METHODS)}")
        self.num_frames, self.method = num_frames, method
        self.total: torch.Tensor | None = None
        self.weight_sum: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def add(self, window: ContextWindow, x0: torch.Tensor) -> None:
        """window.sub_idxs [n], x0 [n, ...] -> adds the weighted prediction to its frames"""
        idxs = tuple(window.sub_idxs)
        if x0.shape[0] != len(idxs):
            raise KinemaError(f"a window of {len(idxs)} frames came with a prediction of {x0.shape[0]} frames")
        if idxs and (min(idxs) < 0 or max(idxs) >= self.num_frames):
            raise KinemaError(f"window frames {idxs} fall outside a video of {self.num_frames} frames")
        if self.total is None:
            acc_dtype = torch.promote_types(x0.dtype, torch.float32)
            self.dtype = x0.dtype
            self.total = torch.zeros((self.num_frames, *x0.shape[1:]), dtype=acc_dtype, device=x0.device)
            self.weight_sum = torch.zeros(self.num_frames, dtype=acc_dtype, device=x0.device)
        elif x0.shape[1:] != self.total.shape[1:]:
            raise KinemaError(
                f"window predictions differ in shape: {tuple(x0.shape[1:])} after {tuple(self.total.shape[1:])}"
            )
        weights = fuse_weights(len(idxs), self.method).to(device=self.total.device, dtype=self.total.dtype)
        index = torch.tensor(idxs, dtype=torch.long, device=self.total.device)
        weighted = x0.to(self.total.dtype) * weights.reshape(-1, *([1] * (x0.ndim - 1)))
        self.total[index] += weighted  # indices within a window are distinct
        self.weight_sum[index] += weights

    def result(self) -> torch.Tensor:
        """-> [num_frames, ...] the fused video, in the predictions' dtype"""
        if self.total is None:
            raise KinemaError("no window predictions to fuse")
        missing = (self.weight_sum <= 0).nonzero().flatten().tolist()
        if missing:
            raise KinemaError(f"frames {missing[:10]} are held by no context window")
        norm = self.weight_sum.reshape(-1, *([1] * (self.total.ndim - 1)))
        return (self.total / norm).to(self.dtype)


def fuse(parts: Iterable[tuple[ContextWindow, torch.Tensor]], num_frames: int, method: str) -> torch.Tensor:
    """(window, x0 [len(window.sub_idxs), ...]) pairs -> [num_frames, ...] per-frame weighted mean"""
    acc = WindowAccumulator(num_frames, method)
    for window, x0 in parts:
        acc.add(window, x0)
    return acc.result()


# ---------------------------------------------------------------------------------------------------------------
# FreeNoise


def freenoise_sources(num_frames: int, opts: ContextOptions, seed: int) -> list[int]:
    """For each frame, the frame (among the first ``context_length``) whose noise it takes under FreeNoise."""
    length = opts.context_length
    sources = list(range(num_frames))
    if num_frames <= length:
        return sources
    block = length - opts.overlap
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & _SEED_MASK)
    for start in range(length, num_frames, block):
        size = min(block, num_frames - start)
        perm = torch.randperm(size, generator=gen).tolist()
        for m in range(size):
            sources[start + m] = sources[start - length + perm[m]]
    return sources


def freenoise(noise: torch.Tensor, opts: ContextOptions, seed: int) -> torch.Tensor:
    """noise [f, ...] -> a new tensor [f, ...] with the noise rescheduled (the input is left unchanged)"""
    frames = noise.shape[0]
    opts.validate(frames)
    if not opts.freenoise or frames <= opts.context_length:
        return noise.clone()
    index = torch.tensor(freenoise_sources(frames, opts, seed), dtype=torch.long, device=noise.device)
    return noise.index_select(0, index)
