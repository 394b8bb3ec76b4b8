"""Gen-1's temporal guidance as a model option."""
from __future__ import annotations

from ..models.errors import KinemaError


class KinemaTemporalGuidance:
    DESCRIPTION = (
        "Gen-1 temporal guidance: trades temporal consistency against per-frame detail. Each step also runs the "
        "same network with its temporal layers off (AnimateDiff: motion modules bypassed; SVD: temporal mixing "
        "set to the pure spatial path), an image model whose frames are independent, and mixes: "
        "x0 = x0_image + w_t (x0_video - x0_image), composed with CFG on the unconditional side as in the paper. "
        "1 is exactly the plain video model; below 1 frames get more individual detail and flicker more; above 1 "
        "the video is pushed toward more consistency. Costs one extra (cheaper, temporal-free) model evaluation "
        "per step when not 1."
    )
    CATEGORY = "Kinema/sampling"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with temporal guidance; connect it to the Video Sampler (Kinema).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An AnimateDiff model (Apply Motion Module) or an SVD model."}),
                "temporal_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "round": 0.01,
                    "tooltip": "w_t: 1 = the plain video model; 0 = the negative side from the image model (frames "
                               "independent only without a negative: the cfg term, also at cfg 1, comes from the "
                               "video model); 1.2-2 = smoother, more consistent motion."}),
            }
        }

    def apply(self, model, temporal_scale=1.0):
        if not hasattr(model, "temporal_scale"):
            raise KinemaError("Temporal Guidance (Kinema) needs a video model: connect Apply Motion Module (Kinema) "
                              "or Load SVD Checkpoint (Kinema)")
        if getattr(model, "motion", True) is None:
            raise KinemaError("Temporal Guidance (Kinema): this model has no motion module, so it has no temporal "
                              "layers to guide with; connect Apply Motion Module (Kinema) first")
        return (model.with_options(temporal_scale=float(temporal_scale)),)


NODE_CLASS_MAPPINGS = {"KinemaTemporalGuidance": KinemaTemporalGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaTemporalGuidance": "Temporal Guidance (Kinema)"}
