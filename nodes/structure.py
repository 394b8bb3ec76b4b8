"""ControlNet nodes: structure from per-frame hints (depth maps, edges, poses) for AnimateDiff."""
from __future__ import annotations

import os

from ..models import addons, memory
from . import host
from .checks import require_sd15_model

PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


class KinemaControlNetLoader:
    DESCRIPTION = (
        "Loads an SD1.5 ControlNet as published (lllyasviel's .pth/.safetensors with or without the "
        "'control_model.' prefix, and the fp16 repacks) from models/controlnet, e.g. control_v11f1p_sd15_depth."
    )
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_CONTROLNET",)
    RETURN_NAMES = ("controlnet",)
    OUTPUT_TOOLTIPS = ("The ControlNet; connect it to Apply ControlNet (Kinema).",)
    FUNCTION = "load"
    MODEL_INPUTS = {"controlnet_name": "controlnet"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "controlnet_name": (host.list_models("controlnet"), {
                    "tooltip": "An SD1.5 ControlNet in models/controlnet (SDXL and SD2 ControlNets are refused)."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto", "tooltip": "Weight precision; auto follows the device."}),
            }
        }

    def load(self, controlnet_name, precision="auto"):
        from ..models.controlnet import load_controlnet

        path = host.resolve_model("controlnet", controlnet_name)
        return (host.placed(load_controlnet(path, dtype=host.load_dtypes(precision).weights)),)


class KinemaApplyControlNet:
    DESCRIPTION = (
        "Adds a ControlNet with its hint images to an AnimateDiff model: one hint per frame (a depth video from "
        "Depth Estimate, for example). Fewer hints than frames are spread evenly (n hints over F frames: each "
        "holds for F/n consecutive frames; one hint holds for all), more are cut to the frame count. Hints are "
        "resized to the video size when the aspect ratio matches. Under context windows each window gets the "
        "hints of its frames. Chain several of these nodes to stack ControlNets (their residuals add up). The "
        "ControlNet works on the cond and the uncond side, between start and end percent of the sampling."
    )
    CATEGORY = "Kinema/structure"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this ControlNet; connect it to the Video Sampler or another Apply node.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An SD1.5 / AnimateDiff model (Apply Motion Module)."}),
                "controlnet": ("KINEMA_CONTROLNET", {"tooltip": "From Load ControlNet (Kinema)."}),
                "hints": ("IMAGE", {"tooltip": "Hint frames (e.g. depth maps, near = bright), one per video frame."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Multiplies the ControlNet's residuals (0 = off)."}),
                "start_percent": ("FLOAT", {"default": 0.0, **PERCENT,
                                            "tooltip": "Where in the sampling the ControlNet starts (0 = first "
                                                       "step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, **PERCENT,
                                          "tooltip": "Where it stops (1 = last step); lower lets the last steps "
                                                     "add free detail."}),
            }
        }

    def apply(self, model, controlnet, hints, strength=1.0, start_percent=0.0, end_percent=1.0):
        require_sd15_model(model, "Apply ControlNet (Kinema)",
                           "connect Load Checkpoint (Kinema) or Apply Motion Module (Kinema)")
        controlnet.check_unet(model.unet.cfg)
        name = os.path.basename(getattr(controlnet, "name", "") or "")
        hint = addons.control_hint(controlnet, hints, strength, start_percent, end_percent, name)
        return (model.with_options(controls=model.controls + (hint,)),)


NODE_CLASS_MAPPINGS = {
    "KinemaControlNetLoader": KinemaControlNetLoader,
    "KinemaApplyControlNet": KinemaApplyControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaControlNetLoader": "Load ControlNet (Kinema)",
    "KinemaApplyControlNet": "Apply ControlNet (Kinema)",
}
