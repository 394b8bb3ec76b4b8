"""The pack's exception types.

Every error a user can cause (a wrong file, a bad size, a name outside a models
folder) is raised as ``KinemaError`` with a message that names the thing and
the fix. Nodes let it propagate: ComfyUI shows the message in the UI.
"""
import math
import numbers

import torch


class KinemaError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class KinemaOutOfMemoryError(KinemaError, torch.OutOfMemoryError):
    """Out of memory after what the pack does about it (a retry with a smaller setting, the host asked to unload
    its models): the message names the setting to change. Also a ``torch.OutOfMemoryError``, so that a host that
    handles those (ComfyUI unloads its models and adds its tips) still does; the pack's own retries never retry
    it (``memory.is_out_of_memory``)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error (CUDA, MPS, XPU or CPU), whatever its exception class; False
    for the pack's own ``KinemaOutOfMemoryError``, which comes after the retries and is final."""
    if isinstance(exc, KinemaError):
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # CUDA/MPS/XPU say "out of memory"; the CPU allocator raises a plain RuntimeError "DefaultCPUAllocator: can't
    # allocate memory: you tried to allocate ..."
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def finite_number(value, what: str) -> float:
    """``value`` as a float, or KinemaError naming ``what`` unless it is a finite real number (an API prompt can
    send NaN or infinity, which ComfyUI's min/max checks let through)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise KinemaError(f"{what} must be a finite number, got {value!r}")
    return float(value)
