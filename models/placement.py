"""Model offload: where a model's weights rest and where they compute.

A ``Placement`` is attached to a loaded model by ``place(obj, placement)``. With ``offload`` on, the weights rest
in ``storage`` (system memory) and ``on_device(obj)`` brings them to ``device`` for the duration of a call, then
back: the VAE, text and image encoders and depth models use the accelerator only while they run, so the video
model's sampling finds the memory free (and the other way round). Without ``offload`` the weights live on
``device``. Objects without a placement are left where they are (the plain path the tests compare against).

The video model is placed per sampling call by ``video_model_on_device`` after its ``OffloadOptions``: mode
``model`` brings the UNet, motion modules and add-ons (ControlNets, IP-Adapters) to the device for the whole
sampling and back after; ``block`` streams the UNet's blocks (``offload.BlockStreamer``) and brings only the
add-ons; ``none`` moves nothing.

Moves are reference-counted, so nested uses of one model move it once. A host (ComfyUI) may register
``set_make_room(fn)``: ``fn(bytes, device)`` is asked to free that much before a model is brought in (ComfyUI
unloads its own idle models then), and everything it can after an out-of-memory error (``make_room_all``). Every move is reported to ``on_move(module, device)`` when given (the tests
count moves this way; it works with a CPU "compute device" too).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import KinemaOutOfMemoryError, is_out_of_memory
from .offload import OffloadOptions, Stash, bring, compute_device, return_to
from .patching import materialize

logger = logging.getLogger("kinema")

ATTR = "kinema_placement"
OnMove = Callable[[nn.Module, torch.device], None]


@dataclass(frozen=True)
class Placement:
    """``device``: where the model computes; ``offload``: rests in ``storage`` between uses."""

    device: str = "cpu"
    offload: bool = False
    storage: str = "cpu"
    on_move: OnMove | None = None  # instrumentation: called after every move


_make_room: Callable[[int, torch.device], None] | None = None
#: What ``make_room_all`` asks the host to free: more than any device has (ComfyUI then unloads every idle model).
ALL_BYTES = 1 << 62
_users: dict[int, int] = {}  # id(weights) -> calls using them now


def set_make_room(fn: Callable[[int, torch.device], None] | None) -> None:
    """Register the host's ``fn(bytes, device)`` that frees memory on ``device`` before a model is brought in."""
    global _make_room
    _make_room = fn


def weights_of(obj) -> nn.Module:
    """The module holding ``obj``'s weights: ``obj`` itself, or the ``.model`` of an encoder wrapper."""
    return obj if isinstance(obj, nn.Module) else obj.model


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def placement_of(obj) -> Placement | None:
    return getattr(obj, ATTR, None)


def _moved(module: nn.Module, device: torch.device, on_move: OnMove | None) -> None:
    """Report a move to the instrumentation, if any."""
    if on_move is not None:
        on_move(module, device)


def _move(module: nn.Module, device: torch.device, on_move: OnMove | None) -> None:
    """``module`` to ``device`` to stay (``_bring`` without keeping the storage copies)."""
    _bring(module, device, on_move)


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask the host to free ``nbytes`` on ``device`` (ComfyUI unloads idle models until that much is free)."""
    if _make_room is not None and torch.device(device).type != "cpu":
        _make_room(nbytes, torch.device(device))


def _room_for(module: nn.Module, device: torch.device) -> None:
    make_room(module_bytes(module), device)


def make_room_all(device: torch.device) -> None:
    """Ask the host to free everything it holds idle on ``device`` (after an out-of-memory error: ComfyUI unloads
    its own loaded models, Kinema's are not among them)."""
    if _make_room is not None and device.type != "cpu":
        _make_room(ALL_BYTES, device)


#: what to do when a model does not fit on the device
MOVE_REMEDY = ("free GPU memory (other programs using it), use block offload for the video model (Memory Policy "
               "(Kinema): offload block, or start ComfyUI with --lowvram), or load the models in fp16 (the loaders' "
               "precision)")


def _bring(module: nn.Module, device: torch.device, on_move: OnMove | None) -> Stash:
    """``module`` to ``device`` for a while (room made first); its storage copies are kept (``offload.bring``).
    Out of memory: once more after asking the host to free everything it can (said in the log), then a
    ``KinemaOutOfMemoryError`` naming the size and ``MOVE_REMEDY``; nothing of ``module`` stays on the device.
    A deferred LoRA merge is made first: until then it holds the original weights, which would move with it."""
    materialize(module)
    _room_for(module, device)
    try:
        stash = bring(module, device)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        stash = None
    if stash is None:  # out of the except block: the failed copies are released before the retry
        logger.warning("the %s (%s) did not fit on %s; freeing what the host holds and trying once more",
                       type(module).__name__, gib(module_bytes(module)), device)
        make_room_all(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            stash = bring(module, device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise KinemaOutOfMemoryError(
                f"the {type(module).__name__} ({gib(module_bytes(module))} of weights) does not fit in the free "
                f"memory of {device}: {MOVE_REMEDY}") from exc
    _moved(module, device, on_move)
    return stash


def _send_back(module: nn.Module, stash: Stash, storage: torch.device, on_move: OnMove | None) -> None:
    """``module`` back to ``storage``: the kept copies put back (no copy from the device), the rest moved."""
    return_to(module, stash, storage)
    _moved(module, storage, on_move)


def place(obj, placement: Placement):
    """Attach ``placement`` to ``obj`` (a module or an encoder wrapper with ``.model``) and move its weights to
    where they rest: ``storage`` when offloaded, else ``device``. Returns ``obj``."""
    setattr(obj, ATTR, placement)
    if _users.get(id(weights_of(obj)), 0) == 0:
        target = placement.storage if placement.offload else placement.device
        _move(weights_of(obj), torch.device(target), placement.on_move)
    return obj


@contextmanager
def _using(modules: list[nn.Module], device: torch.device, storage: torch.device, on_move: OnMove | None
           ) -> Iterator[None]:
    """``modules`` on ``device`` inside the block (moved once however deeply nested), back to ``storage`` after,
    also when the block fails."""
    entered: list[tuple[nn.Module, Stash | None]] = []
    try:
        for m in modules:
            key = id(m)
            stash = _bring(m, device, on_move) if _users.get(key, 0) == 0 else None
            _users[key] = _users.get(key, 0) + 1
            entered.append((m, stash))
        yield
    finally:
        for m, stash in reversed(entered):
            key = id(m)
            _users[key] -= 1
            if _users[key] == 0:
                del _users[key]
                _send_back(m, stash or [], storage, on_move)


@contextmanager
def on_device(*objs) -> Iterator[None]:
    """Every offloaded model of ``objs`` (None and unplaced ones are skipped) on its compute device inside the
    block; see the module doc."""
    with ExitStack() as stack:
        for obj in objs:
            # a deferred LoRA merge: its weights made before any move (also where the object has no placement)
            materialize(obj if isinstance(obj, nn.Module) else getattr(obj, "model", None))
            p = None if obj is None else placement_of(obj)
            if p is not None and p.offload:
                stack.enter_context(_using([weights_of(obj)], torch.device(p.device), torch.device(p.storage),
                                           p.on_move))
        yield


def addon_modules(model) -> list[nn.Module]:
    """The networks a video model runs besides its UNet: ControlNets and IP-Adapters."""
    nets = [c.controlnet for c in getattr(model, "controls", ())]
    nets += [c.adapter for c in getattr(model, "contents", ())]
    return nets


@contextmanager
def video_model_on_device(model) -> Iterator[None]:
    """A video model (``MotionModel``, ``SVDModel``) ready to sample under its ``offload`` options (see the
    module doc). Under none, the UNet and motion module are moved to the policy's device if they are elsewhere
    (the UNet's device when it names none) and stay there; add-ons follow their own placement."""
    opts: OffloadOptions = model.offload
    motion = getattr(model, "motion", None)
    for m in (model.unet, motion):
        materialize(m)  # a deferred LoRA merge: its weights made before any move, where the weights are
    with ExitStack() as stack:
        if opts.mode == "model":
            core = [m for m in (model.unet, motion) if m is not None]
            stack.enter_context(_using(core, torch.device(opts.device), torch.device(opts.storage), opts.on_move))
        elif opts.mode == "none":
            target = compute_device(model.unet, opts)
            for m in (model.unet, motion):  # every tensor looked at: a LoRA'd or recast copy shares modules (the
                # motion module's positional tables) with another model, which another policy may have moved
                if m is not None and _users.get(id(m), 0) == 0 and not _all_on(m, target):
                    _move(m, target, opts.on_move)
        for net in addon_modules(model):
            if opts.mode != "none":  # with the video model for the run, back to where its own placement keeps it
                stack.enter_context(_using([net], torch.device(opts.device), _resting_place(net, opts), opts.on_move))
            else:
                stack.enter_context(on_device(net))
        yield


def _all_on(module: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))


def _resting_place(net: nn.Module, opts: OffloadOptions) -> torch.device:
    """Where an add-on waits after a run under model or block offload: its placement's storage (offloaded) or
    device (kept there: ComfyUI's --highvram), an unplaced one the video model's storage."""
    p = placement_of(net)
    if p is None:
        return torch.device(opts.storage)
    return torch.device(p.storage if p.offload else p.device)


def resting_device(opts: OffloadOptions) -> torch.device:
    """Where a video model's UNet and motion modules wait between calls under ``opts``: the device for none,
    storage for model and block offload."""
    if opts.mode == "none":
        return torch.device(opts.device) if opts.device is not None else torch.device("cpu")
    return torch.device(opts.storage)


def rest(model, opts: OffloadOptions) -> None:
    """Move a video model's UNet and motion modules to where ``opts`` keeps them between calls (the loaders and
    the Memory Policy node call this; add-ons keep their own placement)."""
    if opts.mode == "none" and opts.device is None:
        return  # stays where it is
    for m in (model.unet, getattr(model, "motion", None)):
        if m is not None and _users.get(id(m), 0) == 0:
            _move(m, resting_device(opts), opts.on_move)
