"""Block offload: a network's blocks kept in storage memory and streamed to the compute device as they run.

A ``BlockStreamer`` is made for one model call. ``use(module)`` brings a block to the compute device (if it is
not there yet) and evicts the least recently used blocks beyond ``resident``; ``prefetch(module)`` starts the
next block's copy early (on CUDA, a side stream, ``CopyStream``, overlaps the copy with the running block, pinned
memory permitting, and hands the copied tensors over to the compute stream when the block is used; elsewhere it is
the same as ``use``, done ahead of time). ``close()`` moves every block back to
storage, so between calls the model holds no compute memory. Every move is reported to ``on_move(module,
device)`` when given (the tests count residency this way; it works with a CPU "compute device" too).

Moving parameters changes the module in place, as ComfyUI's own model management does with its offloaded
models; the streamer always moves them back, also when the call fails. Weights are read-only while they run, so
nothing is copied back: ``bring`` keeps each tensor's storage copy and ``send_back`` puts it back in place (half
the transfers, and eviction costs nothing). On CUDA the storage copies are pinned the first time a block is
streamed, so the prefetch copy really overlaps the running block.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KinemaError

OFFLOAD_MODES = ("none", "model", "block")


@dataclass(frozen=True)
class OffloadOptions:
    """A video model's memory policy. ``mode``: none (the model stays where its weights are), model (the UNet,
    motion modules and add-ons brought to ``device`` for each sampling call and back to ``storage`` after, see
    ``placement``) or block (blocks streamed to ``device`` one at a time); ``resident``: blocks kept on the
    compute device at once (more is faster when memory allows); ``attn_chunk``: attention queries (spatial) /
    pixel positions (temporal) at once, 0 = all;
    ``batch_cond``: cond and uncond in one batch (False: one after the other)."""

    mode: str = "none"
    device: str | None = None  # None: where the weights are (mode none only)
    storage: str = "cpu"
    resident: int = 2
    attn_chunk: int = 0
    batch_cond: bool = True
    on_move: Callable[[nn.Module, torch.device], None] | None = None  # instrumentation: called after every move

    def validate(self) -> None:
        if self.mode not in OFFLOAD_MODES:
            raise KinemaError(f"unknown offload mode '{self.mode}': use one of {', '.join(OFFLOAD_MODES)}")
        if self.mode != "none" and self.device is None:
            raise KinemaError(f"{self.mode} offload needs the compute device to move the model to")
        if self.resident < 1:
            raise KinemaError(f"resident_blocks must be 1 or more (the UNet blocks block offload keeps on the "
                              f"device at once), got {self.resident}")
        if self.attn_chunk < 0:
            raise KinemaError(f"the attention chunk must be 0 (off) or more, got {self.attn_chunk}")


NO_OFFLOAD = OffloadOptions()


def compute_device(net: nn.Module, opts: OffloadOptions) -> torch.device:
    """Where a model computes: the offload device under model or block offload, else where its weights are."""
    if opts.device is not None:
        return torch.device(opts.device)
    return next(net.parameters()).device


Stash = list[tuple[torch.Tensor, torch.Tensor]]  # (a module's tensor, its storage copy)


def bring(module: nn.Module, device: torch.device, non_blocking: bool = False, pin: bool = False) -> Stash:
    """Move ``module``'s parameters and buffers to ``device`` in place, keeping their storage copies (pinned first
    with ``pin`` when copying from the CPU to CUDA) for ``send_back``. A move that fails half-way (out of memory)
    puts back what it had moved before raising."""
    stash: Stash = []
    try:
        for t in itertools.chain(module.parameters(), module.buffers()):
            src = t.data
            if src.device == device:
                continue
            if pin and src.device.type == "cpu" and device.type == "cuda" and not src.is_pinned():
                src = src.pin_memory()
            t.data = src.to(device, non_blocking=non_blocking)
            stash.append((t, src))
    except BaseException:  # out of memory half-way: what was moved goes back, nothing stays on the device
        send_back(stash)
        raise
    return stash


def send_back(stash: Stash) -> None:
    """Put the storage copies of ``bring`` back in place: no copy from the device."""
    for t, src in stash:
        t.data = src


def return_to(module: nn.Module, stash: Stash, storage: torch.device) -> None:
    """``module`` back to ``storage``: the kept copies put back, and what was on the device before ``bring`` (which
    has no storage copy) moved."""
    send_back(stash)
    module.to(storage)


class CopyStream:
    """The side stream that prefetch copies run on (CUDA), and the hand-over of what it copied to the compute
    stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copying(self):
        """Context: the copies made inside it run on the side stream."""
        return torch.cuda.stream(self.stream)

    def hand_over(self, stash: Stash) -> None:
        """Before the compute stream uses tensors copied on the side stream: it waits for the copies, and the
        tensors are recorded on it. Without the record, the caching allocator would give a tensor's memory, once
        the block is evicted, to the next block's copy on the side stream at once, while the compute stream may
        still be reading the evicted weights (the CPU runs ahead of the GPU)."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t, _ in stash:
            t.data.record_stream(compute)


class BlockStreamer:
    """Streams blocks to ``device`` for one call (see the module doc)."""

    def __init__(self, opts: OffloadOptions):
        opts.validate()
        self.device, self.storage = torch.device(opts.device), torch.device(opts.storage)
        self.resident, self.on_move = opts.resident, opts.on_move
        self._on_device: OrderedDict[int, nn.Module] = OrderedDict()
        self._stashes: dict[int, Stash] = {}
        self._copies = CopyStream(self.device) if self.device.type == "cuda" else None
        self._prefetched: set[int] = set()  # copied on the side stream, not yet handed over to the compute stream

    def _move(self, module: nn.Module, device: torch.device, non_blocking: bool = False) -> None:
        if device == self.device:
            self._stashes[id(module)] = bring(module, device, non_blocking, pin=True)
        else:
            self._prefetched.discard(id(module))
            return_to(module, self._stashes.pop(id(module), []), device)
        if self.on_move is not None:
            self.on_move(module, device)

    def _evict(self, keep: int) -> None:
        while len(self._on_device) > keep:
            _, old = self._on_device.popitem(last=False)
            self._move(old, self.storage)

    def use(self, module: nn.Module | None) -> None:
        """Make ``module`` resident on the compute device (most recently used)."""
        if module is None:
            return
        key = id(module)
        if key in self._on_device:
            self._on_device.move_to_end(key)
            if key in self._prefetched:
                self._prefetched.discard(key)
                self._copies.hand_over(self._stashes.get(key, []))
            return
        self._evict(self.resident - 1)
        self._move(module, self.device)
        self._on_device[key] = module

    def prefetch(self, module: nn.Module | None) -> None:
        """Start bringing ``module`` to the device ahead of its use (only when a slot is free beyond the block
        in use, so it never evicts the running one)."""
        if module is None or id(module) in self._on_device or self.resident < 2:
            return
        self._evict(self.resident - 1)
        if self._copies is not None:
            with self._copies.copying():
                self._move(module, self.device, non_blocking=True)
            self._prefetched.add(id(module))
        else:
            self._move(module, self.device)
        self._on_device[id(module)] = module

    def close(self) -> None:
        """Every streamed block back to storage."""
        self._evict(0)

    @property
    def on_device(self) -> list[nn.Module]:
        return list(self._on_device.values())


def stream_blocks(streamer: BlockStreamer | None, blocks, kind: str, temporal=None):
    """Yield the UNet ``blocks`` of ``kind`` ("input", "middle", "output") in order, each made resident (with the
    temporal modules of its slot, ``temporal.modules(slot)``, as one unit) just before it runs, and the next unit
    prefetched. Without a streamer the blocks are yielded as they are."""
    blocks = list(blocks)
    if streamer is None:
        yield from blocks
        return
    extra = getattr(temporal, "modules", None)
    units = [nn.ModuleList([b, *(extra((kind, i)) if extra is not None else [])]) for i, b in enumerate(blocks)]
    for i, block in enumerate(blocks):
        streamer.use(units[i])
        if i + 1 < len(units):
            streamer.prefetch(units[i + 1])
        yield block


def call_directly(fn: Callable, *args, **kwargs):
    """A UNet's default ``call_block(fn, *args)``, how it calls the function that runs one block: as it is (under
    block offload a compiled model passes ``compiling.compiled_block_call``, a graph per block)."""
    return fn(*args, **kwargs)
