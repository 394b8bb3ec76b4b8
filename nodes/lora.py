"""LoRA nodes: AnimateDiff MotionLoRAs on a motion module, SD1.5 LoRAs on the model and the text encoder."""
from __future__ import annotations

from ..models import lora
from . import host
from .checks import require_sd15_model


class KinemaMotionLoRALoader:
    DESCRIPTION = (
        "Applies an AnimateDiff MotionLoRA (camera motions such as v2_lora_ZoomIn.ckpt, from "
        "models/animatediff_motion_lora) to a motion module. The loaded motion module is not changed: the result is "
        "a copy holding new tensors only for the patched attention weights, merged when it is first used. Chain "
        "several of these nodes to stack MotionLoRAs (only the last, which runs, holds merged weights). Weights for motion modules the target does not have (a v2 MotionLoRA's mid block on v1/v3) are "
        "skipped with a warning."
    )
    CATEGORY = "Kinema/animatediff"
    RETURN_TYPES = ("KINEMA_MOTION_MODULE",)
    RETURN_NAMES = ("motion_module",)
    OUTPUT_TOOLTIPS = ("The motion module with the MotionLoRA merged; connect it to Apply Motion Module or to "
                       "another Load MotionLoRA.",)
    FUNCTION = "apply"
    MODEL_INPUTS = {"lora_name": "animatediff_motion_lora"}  # input -> models folder kind (the runner's demo fallback)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_module": ("KINEMA_MOTION_MODULE", {
                    "tooltip": "From Load Motion Module (Kinema) or another Load MotionLoRA (Kinema). MotionLoRAs "
                               "were trained on the v2 motion module (mm_sd_v15_v2.ckpt)."}),
                "lora_name": (host.list_models("animatediff_motion_lora"), {
                    "tooltip": "A MotionLoRA in models/animatediff_motion_lora, e.g. v2_lora_ZoomIn.ckpt. Other "
                               "files (the v3 adapter, SD LoRAs, motion modules) are refused with the node to use."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01,
                    "tooltip": "How much of the MotionLoRA to add (1 = as trained, 0 = none; negative values push "
                               "the other way, e.g. a zoom-in LoRA at -1 zooms out)."}),
            }
        }

    def apply(self, motion_module, lora_name, strength=1.0):
        if float(strength) == 0.0:
            return (motion_module,)
        path = host.resolve_model("animatediff_motion_lora", lora_name)
        sd = lora.load_motion_lora(path)
        return (lora.apply_motion_loras(motion_module, [(sd, float(strength), lora_name)]),)


class KinemaLoRALoader:
    DESCRIPTION = (
        "Applies an SD1.5 LoRA from models/loras to the model's UNet and to the CLIP text encoder, with separate "
        "strengths. Reads kohya / LDM-named files (LoCon convs included) and the AnimateDiff v3 adapter "
        "(v3_sd15_adapter.ckpt). The inputs are not changed: the results share every weight the LoRA does not touch, "
        "and merge the touched ones when first used (in a chain, a node that only feeds the next holds none). SDXL LoRAs and LoRAs whose shapes do not fit are refused."
    )
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_MODEL", "KINEMA_CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA merged into its UNet (a motion module already applied is kept).",
                       "The text encoder with the LoRA merged.")
    FUNCTION = "apply"
    MODEL_INPUTS = {"lora_name": "loras"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {
                    "tooltip": "From Load Checkpoint (Kinema) or Apply Motion Module (Kinema)."}),
                "clip": ("KINEMA_CLIP", {"tooltip": "The text encoder from Load Checkpoint (Kinema)."}),
                "lora_name": (host.list_models("loras"), {
                    "tooltip": "An SD1.5 LoRA in models/loras (kohya/LDM names, or the v3_sd15_adapter.ckpt "
                               "layout). MotionLoRAs go to Load MotionLoRA (Kinema)."}),
                "strength_model": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "How much of the LoRA to add to the UNet (1 = as trained, 0 = none)."}),
                "strength_clip": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "How much of the LoRA to add to the text encoder (1 = as trained, 0 = none)."}),
            }
        }

    def apply(self, model, clip, lora_name, strength_model=1.0, strength_clip=1.0):
        require_sd15_model(model, "Load LoRA (Kinema)",
                           "it merges SD1.5 LoRAs into models from Load Checkpoint (Kinema) or Apply Motion Module "
                           "(Kinema); an SD1.5 LoRA does not fit an SVD model")
        if float(strength_model) == 0.0 and float(strength_clip) == 0.0:
            return (model, clip)
        path = host.resolve_model("loras", lora_name)
        sd = lora.load_sd15_lora(path)
        unet, new_clip = lora.apply_sd15_loras(
            model.unet, clip, [(sd, float(strength_model), float(strength_clip), lora_name)])
        new_model = model if unet is model.unet else model.with_options(unet=unet)
        return (new_model, new_clip)


NODE_CLASS_MAPPINGS = {
    "KinemaMotionLoRALoader": KinemaMotionLoRALoader,
    "KinemaLoRALoader": KinemaLoRALoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaMotionLoRALoader": "Load MotionLoRA (Kinema)",
    "KinemaLoRALoader": "Load LoRA (Kinema)",
}
