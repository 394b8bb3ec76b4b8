"""The low-VRAM policy: precision, the default placement of every model, out-of-memory handling.

``default_policy(vram, device)`` gives the defaults by how much accelerator memory there is (the host's VRAM
state: ComfyUI's --highvram / --lowvram / --novram): the video model's ``OffloadOptions`` and the ``Placement``
of the other models (VAE, text and image encoders, depth models, ControlNets, IP-Adapters). The Memory Policy
node overrides the video model's.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import placement
from .errors import KinemaError, KinemaOutOfMemoryError, is_out_of_memory
from .offload import OffloadOptions
from .patching import deferred_weights, replace_parameters
from .placement import Placement

logger = logging.getLogger("kinema")
S = TypeVar("S")
R = TypeVar("R")

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """Weight/compute dtype: ``auto`` is fp16 on CUDA and fp32 elsewhere (CPU fp16 is slow and lossy)."""
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise KinemaError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its floating-point weights in ``dtype``, as a copy (the input, which a node cache or
    another branch of the graph may hold, is never changed); ``module`` itself where nothing changes."""
    if all(p.dtype == dtype or not p.is_floating_point() for p in module.parameters()):
        return module
    pending = deferred_weights(module)  # a deferred LoRA merge's weights, made for the cast, not kept in it
    params = {**dict(module.named_parameters()), **pending}
    new = {n: p.detach().to(dtype) for n, p in params.items()
           if p.is_floating_point() and (p.dtype != dtype or n in pending)}
    return replace_parameters(module, new)


VRAM_STATES = ("cpu", "high", "normal", "low", "none")


def default_policy(vram: str, device: torch.device | str, storage: torch.device | str = "cpu"
                   ) -> tuple[OffloadOptions, Placement]:
    """(the video model's offload options, the other models' placement) by VRAM state.

    cpu: everything stays on ``device`` (the CPU), nothing moves. high: every model lives on the device.
    normal: every model is brought to the device only while it runs (model offload): a sampling run moves the
    UNet in once (well under a second over PCIe next to minutes of sampling) and the VAE decode after it finds
    the memory free, as do other nodes of the graph. low: the UNet's blocks are streamed (two resident, the next
    prefetched); none: one block resident and cond/uncond one after the other.
    """
    if vram not in VRAM_STATES:
        raise KinemaError(f"unknown VRAM state '{vram}': use one of {', '.join(VRAM_STATES)}")
    device, storage = str(torch.device(device)), str(torch.device(storage))
    if vram == "cpu" or torch.device(device).type == "cpu":
        return OffloadOptions(mode="none", device=device, storage=device), Placement(device=device, storage=device)
    if vram == "high":
        return OffloadOptions(mode="none", device=device, storage=storage), Placement(device=device, storage=storage)
    sub = Placement(device=device, offload=True, storage=storage)
    if vram == "normal":
        return OffloadOptions(mode="model", device=device, storage=storage), sub
    if vram == "low":
        return OffloadOptions(mode="block", device=device, storage=storage, resident=2), sub
    return OffloadOptions(mode="block", device=device, storage=storage, resident=1, batch_cond=False), sub


def release_cached_memory() -> None:
    """After an out-of-memory error, so that a retry can use the memory: ask the host to unload its idle models
    (``placement.make_room_all``: ComfyUI keeps its own loaded between prompts) and hand the accelerator's cached
    blocks back."""
    if torch.cuda.is_available():
        placement.make_room_all(torch.device("cuda", torch.cuda.current_device()))
        torch.cuda.empty_cache()


_reserved: Callable[[torch.device], int] | None = None


def set_reserved(fn: Callable[[torch.device], int] | None) -> None:
    """Register the host's ``fn(device)``: bytes of ``device`` to leave to other programs (ComfyUI's
    --reserve-vram), which ``available_bytes`` does not count as free."""
    global _reserved
    _reserved = fn


def available_bytes(device: torch.device | str) -> int | None:
    """Memory free for new tensors on ``device``: on CUDA the free VRAM plus what PyTorch's allocator holds
    cached but unused (new tensors take that first), less what the host reserves for other programs
    (``set_reserved``); ``MemAvailable`` on the CPU (Linux); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        free = int(free) + max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        return max(0, free - (_reserved(device) if _reserved is not None else 0))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(needed: int, device: torch.device | str, what: str, remedies: str, wanted: int = 0) -> None:
    """Raise ``KinemaOutOfMemoryError`` before allocating when ``needed`` bytes clearly exceed the free memory of
    ``device``, after asking the host to free that much (ComfyUI unloads its idle models). ``wanted``: what the
    faster way would take where the work falls back to ``needed`` by itself when memory runs out (cond and uncond
    batched): the host is asked to free that much, but only ``needed`` is required."""
    asked = max(needed, wanted)
    free = available_bytes(device)
    if free is not None and asked > free:
        placement.make_room(asked, device)
        free = available_bytes(device)
    if free is not None and needed > free:
        raise KinemaOutOfMemoryError(f"{what} needs about {placement.gib(needed)} but {torch.device(device).type} "
                                     f"has {placement.gib(free)} free: {remedies}")


def video_activation_bytes(frames: int, batch: int, latent_h: int, latent_w: int, channels: int,
                           dtype: torch.dtype) -> int:
    """A lower estimate of a video UNet's peak activations: a few full-resolution feature maps of the first
    level for every frame of the batch (real peaks are higher; this catches requests that cannot fit)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 8 * frames * batch * channels * latent_h * latent_w * itemsize


@dataclass(frozen=True)
class FrameBatch:
    """Frames a network takes at once, as an out-of-memory retry describes and halves it."""

    frames: int

    def smaller(self, left: int) -> FrameBatch | None:
        """Half the frames of a batch that ran out of memory with ``left`` frames still to run; None for one."""
        frames = min(self.frames, left)
        return FrameBatch(frames // 2) if frames > 1 else None

    def __str__(self) -> str:
        return f"{self.frames} frame(s) at once"


@contextmanager
def remedy_for_out_of_memory(what: str, remedy: str) -> Iterator[None]:
    """An allocator's out-of-memory error inside the block becomes a ``KinemaOutOfMemoryError`` saying ``what``
    ran out of memory and ``remedy`` (where there is nothing smaller to retry with)."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise KinemaOutOfMemoryError(f"{what} ran out of memory: {remedy}") from exc


def run_with_oom_retry(run: Callable[[S], R], setting: S, smaller: Callable[[S], S | None], what: str,
                       remedy: str | Callable[[S], str]) -> tuple[R, S]:
    """``run(setting)``; on an out-of-memory error, once more with ``smaller(setting)`` (said in the log).

    Returns the result and the setting that worked (callers keep it for the rest of the job). A second
    out-of-memory error, or none smaller to try, is a ``KinemaOutOfMemoryError`` naming ``remedy`` (the setting
    to change; a callable: of the last setting tried). Other errors pass unchanged.
    """
    try:
        return run(setting), setting
    except Exception as exc:  # only the allocator's errors are handled, the rest re-raised
        if not is_out_of_memory(exc):
            raise
    release_cached_memory()  # outside the except block: the failed attempt's tensors are gone
    retry = smaller(setting)
    if retry is None:
        raise KinemaOutOfMemoryError(f"{what} ran out of memory and there is nothing smaller to retry with: "
                                     f"{_remedy(remedy, setting)}")
    logger.warning("%s ran out of memory with %s; retrying once with %s", what, setting, retry)
    try:
        return run(retry), retry
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    release_cached_memory()
    raise KinemaOutOfMemoryError(f"{what} ran out of memory, also with {retry}: {_remedy(remedy, retry)}")


def _remedy(remedy: str | Callable[[S], str], setting: S) -> str:
    return remedy(setting) if callable(remedy) else remedy
