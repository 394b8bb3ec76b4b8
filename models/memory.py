"""The low-VRAM policy: precision and placement of the sub-models.

This first version chooses weight precision per device; offload, tiling and
attention chunking grow here.
"""
from __future__ import annotations

import torch

from .errors import KinemaError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """Weight/compute dtype: ``auto`` is fp16 on CUDA and fp32 elsewhere (CPU fp16 is slow and lossy)."""
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise KinemaError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def vae_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The SD VAE overflows in fp16 on some images: keep it fp32 unless bf16 is asked for."""
    dtype = pick_dtype(precision, device)
    return torch.float32 if dtype == torch.float16 else dtype


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error (CUDA, MPS, XPU or CPU), whatever its exception class."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Hand the accelerator's cached blocks back after an out-of-memory error, so a retry can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
