"""Apply an AnimateDiff motion module to an SD1.5 model."""
from __future__ import annotations

from ..models.motion import parse_scale
from ..models.sampling import BETA_SCHEDULES
from .checks import require_sd15_model


class KinemaApplyMotionModule:
    DESCRIPTION = (
        "Turns an SD1.5 model into a video model with an AnimateDiff motion module. The loaded checkpoint is "
        "not changed: the result is a new model that shares its weights."
    )
    CATEGORY = "Kinema/animatediff"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The video model; connect it to the Video Sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An SD1.5 model from Load Checkpoint (Kinema)."}),
                "motion_module": ("KINEMA_MOTION_MODULE", {"tooltip": "From Load Motion Module (Kinema)."}),
                "motion_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                    "tooltip": "Strength of the motion: scales what the motion module adds (1 = as trained, "
                               "0 = no motion module layers; with v1, whose UNet normalises across frames, the "
                               "frames still share those statistics). Not AnimateDiff-Evolved's motion scale, "
                               "which scales the attention keys."}),
                "beta_schedule": (list(BETA_SCHEDULES), {
                    "default": "linear",
                    "tooltip": "Noise schedule of the sampler. linear: AnimateDiff's, as trained (betas linear from "
                               "0.00085 to 0.012; ComfyUI and AnimateDiff-Evolved call it sqrt_linear). "
                               "scaled_linear: SD1.5's own (ComfyUI's linear)."}),
            },
            "optional": {
                "motion_scale_per_frame": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Optional: one motion scale per frame, e.g. '1.0, 1.0, 0.9, 0.8' (the last value "
                               "holds for the frames after it). Overrides motion_scale when set."}),
            },
        }

    def apply(self, model, motion_module, motion_scale=1.0, beta_schedule="linear", motion_scale_per_frame=""):
        require_sd15_model(model, "Apply Motion Module (Kinema)",
                           "motion modules are for SD1.5 models from Load Checkpoint (Kinema). An SVD model makes "
                           "video on its own: connect Load SVD Checkpoint (Kinema) straight to the Video Sampler")
        motion_module.check_unet(model.unet.cfg)
        name = getattr(motion_module, "source", "") or motion_module.version
        scale = parse_scale(motion_scale_per_frame or "") or float(motion_scale)
        return (model.with_options(motion=motion_module, scale=scale, beta_schedule=beta_schedule, name=name),)


NODE_CLASS_MAPPINGS = {"KinemaApplyMotionModule": KinemaApplyMotionModule}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaApplyMotionModule": "Apply Motion Module (Kinema)"}
