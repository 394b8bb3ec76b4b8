"""Every node's widget inputs checked against its own ``INPUT_TYPES`` before it runs.

ComfyUI checks widget values before a node runs, but lets NaN through a FLOAT's min/max (NaN compares false),
and calls from Python or from an API prompt the headless runner has not validated reach the node as they are. A
node class wrapped by ``check_widget_inputs`` refuses, as a ``KinemaError`` naming the node and the input, any
INT that is not a whole number within its min/max, any FLOAT that is not a finite number within them, any
BOOLEAN that is not true or false, and any choice not in its list. Inputs that are links (models, images,
conditionings) are the node's own to check, and so are the lists of files (a loader's model name, an uploaded
video), whose own errors say where the file was looked for.
"""
from __future__ import annotations

import functools
import inspect

from ..models.errors import KinemaError
from . import workflow_format as wf

_WRAPPED = "_kinema_inputs_checked"


def _checked_specs(cls) -> dict:
    """The widget inputs of ``cls`` that are checked here, by name (read once: the file lists are not checked)."""
    files = set(getattr(cls, "MODEL_INPUTS", {}))
    return {s.name: s for s in wf.input_specs(cls)
            if s.category != "hidden" and s.is_widget and s.type != "STRING" and s.name not in files
            and not s.is_upload}


def check_widget_inputs(cls, display_name: str):
    """Wrap ``cls``'s function (``cls.FUNCTION``) so that its widget inputs are checked first (see the module
    doc); once per class."""
    fn = getattr(cls, cls.FUNCTION)
    if getattr(fn, _WRAPPED, False):
        return cls
    signature = inspect.signature(fn)
    specs: dict | None = None

    @functools.wraps(fn)
    def checked(self, *args, **kwargs):
        nonlocal specs
        if specs is None:
            specs = _checked_specs(cls)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise KinemaError(f"{display_name}: {e}") from None
        for name, value in list(bound.arguments.items()):
            spec = specs.get(name)
            if spec is None:
                continue
            try:
                bound.arguments[name] = wf.check_value(spec, value, check_range=True)
            except ValueError as e:
                raise KinemaError(f"{display_name}: input '{name}': {e}") from None
        return fn(*bound.args, **bound.kwargs)

    setattr(checked, _WRAPPED, True)
    setattr(cls, cls.FUNCTION, checked)
    return cls
