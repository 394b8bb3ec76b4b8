"""Copy-on-write copies of a module tree with new weights for some parameters, made now or when first used.

Node outputs are never changed (design rule), so what changes weights (a LoRA merge, a precision cast) returns a
*structural copy*: every module on the way from the root to a changed parameter is shallow-copied (its own tables of
children, parameters, buffers and hooks), every other module and every unchanged parameter is the original object
(every module is copied for a model marked by ``copy_whole``: transformers models). Memory grows by the changed
weights only.

``replace_parameters`` puts the new weights in at once. ``defer`` makes the copy now and computes its new weights
when it is first used (``materialize``): a copy that only feeds another one, such as the output of a LoRA node
chained into a second LoRA node (ComfyUI keeps every node's output), never holds weights of its own. Until then it
holds the original parameter objects, so device moves and dtype/device queries treat it as the model it was made
from; what computes with a module materializes it first (the video model's placement, ``placement.on_device``, the
video model's call; a call of the copy itself does, by a forward pre-hook), and so must anything that reads its
weights directly or calls it through ``torch.func.functional_call`` (which puts its own tensors back after the
call, over the ones the hook made). A copy of a deferred copy (``replace_parameters``: a precision cast) gets the computed weights,
and the deferred copy stays as it is.

Plain attributes named ``_kinema_*`` on a module say how that object was made (what it was merged from, what is
deferred); a structural copy with other weights does not inherit them.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .errors import KinemaError

#: where a deferred copy keeps what ``materialize`` needs: (parameter names, compute, {module path: copied module},
#: the handle of the forward pre-hook that materializes it when it is called)
_PENDING = "_kinema_pending"
_OWN_PREFIX = "_kinema_"
#: a plain attribute, True on a model whose copies copy every module (``copy_whole``); copies inherit it
COPY_WHOLE = "kinema_copy_whole"

Compute = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with ``module``'s attributes and its own tables of children, parameters, buffers and
    hooks, which hold ``module``'s own children, tensors and hook functions: changing the copy's tables or
    attributes leaves ``module`` as it is. A deferred copy is materialized first (its copy would share what
    materializing changes)."""
    return _own_tables(materialize(module))


def _own_tables(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    for name, value in vars(module).items():
        tables = name in ("_modules", "_parameters", "_buffers") or name.endswith("hooks") or "_hooks_" in name
        if tables and isinstance(value, dict):
            clone.__dict__[name] = type(value)(value)
    return clone


def _split(name: str) -> tuple[str, str]:
    path, _, leaf = name.rpartition(".")
    return path, leaf


def copy_whole(module: nn.Module) -> nn.Module:
    """Mark ``module`` (and the copies made of it) as a model whose copies here get every module of their own (the
    tensors are still shared): a model that keeps per-instance state on its submodules, as transformers models do
    (the hooks that capture hidden states, installed on the layers once per model instance: a copy sharing layers
    with the original would collect them twice). Returns ``module``."""
    setattr(module, COPY_WHOLE, True)
    return module


def _structural_copy(root: nn.Module, names: Iterable[str]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A copy of ``root`` with its own modules on the paths to the parameters ``names`` (every module for a model
    marked by ``copy_whole``); also {path: its copy}."""
    whole = bool(getattr(root, COPY_WHOLE, False))
    on_path = {""}
    for name in names:
        parts = _split(name)[0].split(".") if "." in name else []
        on_path.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    copies: dict[str, nn.Module] = {}

    def copy_node(module: nn.Module, prefix: str) -> nn.Module:
        clone = copies[prefix] = _own_tables(module)
        for child_name, child in module._modules.items():
            child_prefix = f"{prefix}.{child_name}" if prefix else child_name
            if child is not None and (whole or child_prefix in on_path):
                clone._modules[child_name] = copy_node(child, child_prefix)
        return clone

    clone = copy_node(root, "")
    if is_deferred(root):  # not the hook that materializes root
        hook_id = vars(root)[_PENDING][3].id
        del clone._forward_pre_hooks[hook_id]
    for attr in [a for a in vars(clone) if a.startswith(_OWN_PREFIX)]:
        del clone.__dict__[attr]
    return clone, copies


def _current(copies: Mapping[str, nn.Module], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The parameters ``names`` as the copy holds them now; KinemaError for a name the model does not have."""
    out = {}
    for name in names:
        path, leaf = _split(name)
        module = copies.get(path)
        param = None if module is None else module._parameters.get(leaf)
        if param is None:
            raise KinemaError(f"internal error: the model has no parameter '{name}' to patch")
        out[name] = param
    return out


def _put(copies: Mapping[str, nn.Module], new: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in new.items():
        path, leaf = _split(name)
        copies[path]._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def replace_parameters(root: nn.Module, new: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``root`` whose parameters ``new`` (dotted names) are replaced; everything else is shared.

    ``root`` and all its tensors are left untouched. From a deferred copy, the new copy holds its deferred weights
    where ``new`` does not replace them, computed for it (``root`` stays deferred).
    """
    if not new:
        return root
    if is_deferred(root) and any(n not in new for n in vars(root)[_PENDING][0]):
        new = {**deferred_weights(root), **new}
    clone, copies = _structural_copy(root, new)
    _current(copies, new)  # every name is a parameter
    _put(copies, new)
    return clone


def defer(root: nn.Module, names: Iterable[str], compute: Compute) -> nn.Module:
    """A copy of ``root`` whose parameters ``names`` become ``compute(current)`` when it is first used.

    ``current`` maps each name to the parameter the copy holds until then (``root``'s own, wherever moves have put
    it since); ``compute`` returns the new tensors for every name, on that device. ``root`` is materialized first.
    """
    materialize(root)
    names = tuple(dict.fromkeys(names))
    if not names:
        return root
    clone, copies = _structural_copy(root, names)
    _current(copies, names)  # every name is a parameter: an error now, not at the first use
    hook = clone.register_forward_pre_hook(_materialize_first)  # a call of the copy itself is a use
    object.__setattr__(clone, _PENDING, (names, compute, copies, hook))  # a plain attribute, not a submodule
    return clone


def _materialize_first(module: nn.Module, args) -> None:
    materialize(module)


def is_deferred(module: nn.Module | None) -> bool:
    """True while ``module`` is a ``defer`` copy whose new weights are not computed yet."""
    return _PENDING in getattr(module, "__dict__", {})


def materialize(module: nn.Module | None) -> nn.Module | None:
    """Compute a deferred copy's new weights and put them in (at once, after all are computed: an error, such as
    running out of memory, leaves it deferred and whole). Anything else is returned as it is."""
    if not is_deferred(module):
        return module
    new = deferred_weights(module)
    _, _, copies, hook = vars(module)[_PENDING]
    _put(copies, new)
    del module.__dict__[_PENDING]
    hook.remove()
    return module


def deferred_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A deferred copy's new weights, computed for the caller and not kept in it; {} for any other module."""
    if not is_deferred(module):
        return {}
    names, compute, copies, _ = vars(module)[_PENDING]
    new = compute(_current(copies, names))
    missing = [n for n in names if n not in new]
    if missing:
        raise KinemaError(f"internal error: no new weight was computed for '{missing[0]}'")
    return {n: new[n] for n in names}
