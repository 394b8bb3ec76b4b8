"""``torch.compile`` of a video model's UNet and of a VAE's decoder: the same networks, their elementwise work fused
into fewer kernels.

Half of a UNet step's GPU time is elementwise kernels around the matrix products (additions, GELU, the norms,
layout copies); inductor fuses them. On an H200 an AnimateDiff step (SD1.5 + v2, 16×512², fp16) took 0.119 s
compiled against 0.159 s plain (``bench/results/h200-2026-12-04-bench_gpu-compiled.md``), after a compile of
about two minutes. On a CPU the step is oneDNN's convolutions and BLAS and compiling gains nothing.

A model with ``compile`` set (``CompileOptions``; ``MotionModel`` and ``SVDModel``) makes every UNet call through
``run``: one compiled function per options (``compiled_call``) that dynamo compiles at the first call with new
sizes and reuses after, for any UNet of the same layout.

Block offload moves blocks to the device while the UNet runs, which one graph of the whole UNet cannot hold: under
it the UNet's own loop runs as it is, moving the blocks, and each block is called through a compiled function
(``compiled_block_call``, the UNet's ``call_block``): one graph per block, with static sizes, run between the moves.
A moved weight is the same parameter with its data on the device, which the graph's guards accept; a UNet of 25
blocks keeps 25 graphs per video size, so dynamo's recompile limits are raised while it runs (``BLOCK_GRAPHS``; the
whole UNet's ``UNET_GRAPHS``, the decoders' ``DECODE_GRAPHS``). A call past the limit runs uncompiled, said once in
the log (dynamo's own fallback would say nothing of it but a warning of torch's).

A VAE from ``vae.with_compiled_decode`` (the Compile VAE node) decodes through ``run_decode``: its ``decode``
compiled whole (one graph; the SVD temporal decoder's loops over frame slices unrolled), one static graph per chunk
and tile size, by a function of its own (``compiled_decode_call``) so that the decoders' graphs never count against
the UNets' in dynamo's limit of graphs per function. What it gains on a GPU is not measured yet
(``bench/bench_gpu.py``'s compiled policies decode so); on a CPU the decode was slower compiled (README).

CUDA graphs (modes ``reduce-overhead`` and ``max-autotune``) are not offered: model and block offload move the
weights between calls and a captured graph keeps the addresses it saw.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KinemaError
from .offload import BlockStreamer, OffloadOptions

logger = logging.getLogger("kinema")

COMPILE_BACKENDS = ("inductor", "eager")  # eager: dynamo's graph capture alone (a check; no speed)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """How the UNet is compiled: ``backend`` inductor (generated kernels) or eager (the captured graph run by
    PyTorch as it is); ``mode`` (inductor only) default, or max-autotune-no-cudagraphs (tries kernel variants:
    a longer compile)."""

    backend: str = "inductor"
    mode: str = "default"

    def validate(self) -> None:
        if self.backend not in COMPILE_BACKENDS:
            raise KinemaError(f"unknown compile backend '{self.backend}': use one of {', '.join(COMPILE_BACKENDS)}")
        if self.mode not in COMPILE_MODES:
            raise KinemaError(f"unknown compile mode '{self.mode}': use one of {', '.join(COMPILE_MODES)}")


def _compiled(fn: Callable, opts: CompileOptions, **kwargs) -> Callable:
    """``fn`` through ``torch.compile`` with ``opts`` (and ``kwargs``, e.g. ``dynamic``)."""
    opts.validate()
    mode = opts.mode if opts.backend == "inductor" and opts.mode != "default" else None
    try:
        return torch.compile(fn, backend=opts.backend, mode=mode, **kwargs)
    except Exception as e:  # torch.compile refusing this Python, platform or build before any graph is made
        raise KinemaError(f"torch.compile cannot run here ({type(e).__name__}: {e}): remove Compile Model (Kinema) "
                          "and Compile VAE (Kinema) from the graph, which run the same without them") from e


def _call(net: nn.Module, *args, **kwargs):
    return net(*args, **kwargs)


@functools.cache
def compiled_call(opts: CompileOptions) -> Callable:
    """``f(net, *args, **kwargs) -> net(*args, **kwargs)`` through ``torch.compile`` with ``opts``: one function
    per options, so every model compiled with them shares dynamo's cache of compiled graphs."""
    return _compiled(_call, opts)


def _call_block(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


#: dynamo's limits on the graphs of one function while a block-compiled UNet runs: one graph per block and video
#: size (an SD1.5 UNet has 25 blocks), beyond the defaults (8 per function, 256 in all)
BLOCK_GRAPHS = 4096


def _graph_limits(n: int, config=None) -> dict[str, int]:
    """dynamo's two limits set to ``n``, by their names in this torch (``cache_size_limit`` before 2.6)."""
    config = torch._dynamo.config if config is None else config
    names = [next(name for name in pair if hasattr(config, name))
             for pair in (("recompile_limit", "cache_size_limit"),
                          ("accumulated_recompile_limit", "accumulated_cache_size_limit"))]
    return dict.fromkeys(names, n)


#: dynamo's limits on the graphs of the whole-UNet function: each frame count, size, motion module, cond/uncond
#: batching, attention chunking or temporal-guidance pass that is new to it makes a graph (the default, 8 a
#: function, is reached in one working session)
UNET_GRAPHS = 64

#: dynamo's exception for a function past its limit, when asked to raise one (torch 2.6+; older ones run the
#: function uncompiled with a warning of their own)
_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None) or getattr(
    torch._dynamo.exc, "FailOnCacheLimitHit", None)


def _limits(n: int) -> dict:
    """dynamo's config while a compiled function runs: ``n`` graphs, and an exception where it has no room for
    another (``_LIMIT_HIT``) instead of a silent run uncompiled."""
    config = torch._dynamo.config
    fail = next((name for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(config, name)), None)
    return {**_graph_limits(n), **({fail: True} if fail and _LIMIT_HIT is not None else {})}


_uncompiled: set = set()  # (options, what) said in the log to run uncompiled


def _past_limit(opts: CompileOptions, what: str, n: int) -> None:
    if (opts, what) not in _uncompiled:
        _uncompiled.add((opts, what))
        logger.warning("Kinema: torch.compile holds %d graphs of the %s (one per size, model and setting it has "
                       "seen): calls that need another run uncompiled until ComfyUI restarts", n, what)


@functools.cache
def compiled_block_call(opts: CompileOptions) -> Callable:
    """``f(fn, *args, **kwargs) -> fn(*args, **kwargs)`` through ``torch.compile`` with ``opts`` and static sizes:
    the UNet's ``call_block`` under block offload, a graph per block."""
    return _compiled(_call_block, opts, dynamic=False)


_seen: set = set()  # (options, what, input sizes and dtypes) already said in the log


def _said_once(opts: CompileOptions, what: str, args: tuple) -> None:
    """Say in the log, once per options, ``what`` and input sizes, that the next call compiles (why it waits)."""
    inputs = tuple((tuple(a.shape), str(a.dtype).removeprefix("torch.")) for a in args if isinstance(a, torch.Tensor))
    if (opts, what, inputs) not in _seen:
        _seen.add((opts, what, inputs))
        logger.info("Kinema: torch.compile (%s) of the %s for inputs %s: if they are new to it, the first call "
                    "compiles first and takes a while (minutes: about two for SD1.5's UNet on a fast GPU), the next "
                    "ones reuse it", opts.backend, what,
                    ", ".join(f"{list(shape)} {dtype}" for shape, dtype in inputs))


def _failed(opts: CompileOptions, what: str, node: str, e: Exception) -> KinemaError:
    return KinemaError(f"torch.compile ({opts.backend}) could not compile the {what}: "
                       f"{str(e).splitlines()[0][:300]}. Inductor needs Triton for a GPU (Linux: the triton package "
                       "that comes with PyTorch's CUDA builds; Windows: triton-windows) and a C++ compiler for the "
                       f"CPU; or remove {node} from the workflow")


def run(net: nn.Module, opts: CompileOptions | None, *args, **kwargs):
    """``net(*args, **kwargs)``, compiled with ``opts`` when given: whole, or block by block when a ``stream``
    (block offload) is among the arguments. The first call with new sizes compiles (said in the log: the first
    sampling step takes minutes then)."""
    if opts is None:
        return net(*args, **kwargs)
    by_block = kwargs.get("stream") is not None
    what = type(net).__name__ + (" block by block (block offload)" if by_block else "")
    _said_once(opts, what, args)
    try:
        if not by_block:
            try:
                with torch._dynamo.config.patch(**_limits(UNET_GRAPHS)):
                    return compiled_call(opts)(net, *args, **kwargs)
            except Exception as e:
                if _LIMIT_HIT is None or not isinstance(e, _LIMIT_HIT):
                    raise
            _past_limit(opts, type(net).__name__, UNET_GRAPHS)  # out of the except block: its frames released
            return net(*args, **kwargs)
        with torch._dynamo.config.patch(**_graph_limits(BLOCK_GRAPHS)):
            return net(*args, call_block=compiled_block_call(opts), **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise _failed(opts, type(net).__name__, "Compile Model (Kinema)", e) from e


def _call_decode(decode: Callable, *args):
    return decode(*args)


#: dynamo's limits on the graphs of the decode function: one graph per chunk and tile size (the tiles of a frame
#: have up to 4 sizes, a video's chunks 2), beyond the default of 8 per function
DECODE_GRAPHS = 64


@functools.cache
def compiled_decode_call(opts: CompileOptions) -> Callable:
    """``f(decode, *args) -> decode(*args)`` through ``torch.compile`` with ``opts`` and static sizes: the VAEs'
    decodes, a function of their own so that their graphs do not count against the UNets' in dynamo's limit per
    function. Static sizes: each size keeps its own graph, so a chunk decodes the same every time (with dynamo's
    automatic dynamic sizes, the graph compiled for a second size would serve the first size too after it: the
    same frames to rounding, not bit for bit)."""
    return _compiled(_call_decode, opts, dynamic=False)


def run_decode(vae: nn.Module, opts: CompileOptions | None, *args):
    """``vae.decode(*args)``, compiled with ``opts`` when given (Compile VAE (Kinema)); the first call with new
    sizes compiles (said in the log)."""
    if opts is None:
        return vae.decode(*args)
    what = f"{type(vae).__name__} decoder"
    _said_once(opts, what, args)
    try:
        with torch._dynamo.config.patch(**_limits(DECODE_GRAPHS)):
            return compiled_decode_call(opts)(vae.decode, *args)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise _failed(opts, what, "Compile VAE (Kinema)", e) from e
    except Exception as e:
        if _LIMIT_HIT is None or not isinstance(e, _LIMIT_HIT):
            raise
    _past_limit(opts, what, DECODE_GRAPHS)
    return vae.decode(*args)


def run_unet(net: nn.Module, offload: OffloadOptions, opts: CompileOptions | None, *args, **kwargs):
    """A video model's UNet call, ``net(*args, **kwargs)``, under its memory policy and compile options: under
    block offload with a ``BlockStreamer`` for the call (every block back in storage after it, also when it fails),
    compiled with ``opts`` when given (``run``)."""
    stream = BlockStreamer(offload) if offload.mode == "block" else None
    try:
        return run(net, opts, *args, stream=stream, **kwargs)
    finally:
        if stream is not None:
            stream.close()
