"""Every node's widget inputs checked against its own ``INPUT_TYPES`` before it runs.

ComfyUI checks widget values before a node runs, but lets NaN through a FLOAT's min/max (NaN compares false),
and calls from Python or from an API prompt the headless runner has not validated reach the node as they are. A
node class wrapped by ``check_widget_inputs`` refuses, as a ``KinemaError`` naming the node and the input, any
INT that is not a whole number within its min/max, any FLOAT that is not a finite number within them, any
BOOLEAN that is not true or false, any choice not in its list, and any STRING that is not text. A link to one of
the pack's own sockets (``KINEMA_MODEL``, ``KINEMA_VAE``, ...) must hold what that socket carries: ComfyUI
refuses a link between sockets of different types when the prompt is queued, but not the value an any-type node
(a switch, a reroute of another pack) passes on, nor a call from Python. Other links (images, latents,
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


@functools.cache
def _socket_kinds() -> dict[str, tuple[tuple[type, ...], str]]:
    """The pack's socket types: (the classes a value may be, where such a value comes from)."""
    from ..models.clip_vision import ImageEncoder
    from ..models.context import ContextOptions
    from ..models.controlnet import ControlNet
    from ..models.depth import DepthEstimator
    from ..models.encoders import TextEncoder
    from ..models.ip_adapter import IPAdapter
    from ..models.motion import MotionModel, MotionModuleSet
    from ..models.svd_model import SVDModel
    from ..models.vae import AutoencoderKL, ImageEncoderKL, TemporalAutoencoder

    return {
        "KINEMA_MODEL": ((MotionModel, SVDModel), "the model output of Load Checkpoint, Apply Motion Module or "
                         "Load SVD Checkpoint (Kinema), or of a node after them"),
        "KINEMA_CLIP": ((TextEncoder,), "the clip output of Load Checkpoint (Kinema)"),
        "KINEMA_VAE": ((AutoencoderKL, TemporalAutoencoder, ImageEncoderKL),
                       "the vae output of Load Checkpoint (Kinema) or Load SVD Checkpoint (Kinema)"),
        "KINEMA_MOTION_MODULE": ((MotionModuleSet,), "Load Motion Module (Kinema) or Load MotionLoRA (Kinema)"),
        "KINEMA_CLIP_VISION": ((ImageEncoder,), "Load CLIP Vision (Kinema) or Load SVD Checkpoint (Kinema)"),
        "KINEMA_CONTROLNET": ((ControlNet,), "Load ControlNet (Kinema)"),
        "KINEMA_IPADAPTER": ((IPAdapter,), "Load IP-Adapter (Kinema)"),
        "KINEMA_DEPTH_MODEL": ((DepthEstimator,), "Load Depth Model (Kinema)"),
        "KINEMA_CONTEXT_OPTIONS": ((ContextOptions,), "Context Options (Kinema)"),
    }


def _check_link(display_name: str, spec, value) -> None:
    """KinemaError unless ``value`` is what the pack's socket ``spec.type`` carries (an optional input may be
    None: not connected)."""
    classes, source = _socket_kinds()[spec.type]
    if isinstance(value, classes) or (value is None and spec.category == "optional"):
        return
    found = "nothing" if value is None else type(value).__name__
    raise KinemaError(f"{display_name}: input '{spec.name}' takes a {spec.type}, got {found}: connect {source}")


def check_widget_inputs(cls, display_name: str):
    """Wrap ``cls``'s function (``cls.FUNCTION``) so that its widget inputs are checked first (see the module
    doc); once per class."""
    fn = getattr(cls, cls.FUNCTION)
    if getattr(fn, _WRAPPED, False):
        return cls
    signature = inspect.signature(fn)
    specs: dict | None = None
    others: dict | None = None

    @functools.wraps(fn)
    def checked(self, *args, **kwargs):
        nonlocal specs, others
        if specs is None:
            specs = _checked_specs(cls)
            others = {s.name: s for s in wf.input_specs(cls) if s.category != "hidden" and s.name not in specs
                      and isinstance(s.type, str) and (s.type == "STRING" or s.type in _socket_kinds())}
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise KinemaError(f"{display_name}: {e}") from None
        for name, value in list(bound.arguments.items()):  # the node's own widgets first, then what links bring
            if name in specs:
                try:
                    bound.arguments[name] = wf.check_value(specs[name], value, check_range=True)
                except ValueError as e:
                    raise KinemaError(f"{display_name}: input '{name}': {e}") from None
        for name, value in bound.arguments.items():
            other = others.get(name)
            if other is None:
                continue
            if other.type != "STRING":
                _check_link(display_name, other, value)
            elif not isinstance(value, str):
                raise KinemaError(f"{display_name}: '{name}' must be text, got {type(value).__name__}: type it in "
                                  "the widget or connect a STRING")
        return fn(*bound.args, **bound.kwargs)

    setattr(checked, _WRAPPED, True)
    setattr(cls, cls.FUNCTION, checked)
    return cls
