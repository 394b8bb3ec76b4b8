"""Depth nodes: depth maps from frames (Gen-1's structure) and the structure-fidelity control."""
from __future__ import annotations

from typing import ClassVar

from ..models import memory
from ..models.depth import (
    MAX_FIDELITY_STEPS,
    load_depth_model,
    structure_fidelity,
)
from ..models.video_io import check_finite, check_images
from . import host

CATEGORY = "Kinema/structure"


class KinemaDepthModelLoader:
    DESCRIPTION = (
        "Loads a depth estimator from a transformers model folder in models/depth_models (config.json, "
        "model.safetensors, preprocessor_config.json), as published on the Hugging Face hub: DPT-Hybrid / MiDaS v3 "
        "(Intel/dpt-hybrid-midas), DPT-Large (Intel/dpt-large), Depth Anything v1 and v2 "
        "(LiheYoung/depth-anything-small-hf, depth-anything/Depth-Anything-V2-Small-hf, ...)."
    )
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_DEPTH_MODEL",)
    RETURN_NAMES = ("depth_model",)
    OUTPUT_TOOLTIPS = ("The depth estimator; connect it to Depth Estimate (Kinema).",)
    FUNCTION = "load"
    MODEL_INPUTS: ClassVar[dict] = {"model_name": "depth_models"}  # input -> models folder kind (the runner's demo fallback)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.list_model_dirs("depth_models"), {
                    "tooltip": "A depth model folder in models/depth_models (the whole downloaded repository, e.g. "
                               "models/depth_models/dpt-hybrid-midas/ with its config.json)."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto",
                    "tooltip": "Weight precision; auto: fp16 on a GPU, fp32 on the CPU, or what ComfyUI's "
                               "--force-fp32 / --fp16-unet / ... flags ask for."}),
            }
        }

    def load(self, model_name, precision="auto"):
        folder = host.resolve_model_dir("depth_models", model_name)
        return (host.placed(load_depth_model(folder, dtype=host.load_dtypes(precision).weights)),)


class KinemaDepthEstimate:
    DESCRIPTION = (
        "Estimates a depth map for every frame (Gen-1's structure representation; also a hint for a depth "
        "ControlNet): the model's own preprocessing, a batch of frames at a time, the prediction resized back to the "
        "frame size. Near is bright; one brightness scale for the whole video (not one per frame, which would flicker)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("depth",)
    OUTPUT_TOOLTIPS = (("Gray depth maps [frames, height, width, 3] in [0, 1], near = bright; preview them or "
                        "connect them to Structure Fidelity or Apply ControlNet (Kinema)."),)
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames (e.g. from Load Video (Kinema)), any size."}),
                "depth_model": ("KINEMA_DEPTH_MODEL", {"tooltip": "From Load Depth Model (Kinema)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                                       "tooltip": "Frames run through the model at once: higher is faster and "
                                                  "uses more memory; the result is the same."}),
            }
        }

    def estimate(self, images, depth_model, batch_size=4):
        check_images(images, "Depth estimation")
        host.check_interrupt()
        bar = host.ProgressBar(images.shape[0], "Kinema depth")
        depth = depth_model.estimate_image(images, batch_size, on_batch=bar.update_absolute)
        return (depth,)


class KinemaStructureFidelity:
    DESCRIPTION = (
        "Gen-1's structure fidelity: blurs and halves the depth maps t_s times and scales them back, so the "
        "video follows the source's shapes less closely. 0 keeps the depth maps as they are (exact structure); each "
        "step keeps only coarser shapes (1-2: details go; 4 and more: only the rough layout)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("depth",)
    OUTPUT_TOOLTIPS = ("The depth maps at their size with detail removed; connect them where the depth maps went.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Depth maps, e.g. from Depth Estimate (Kinema)."}),
                "t_s": ("INT", {"default": 0, "min": 0, "max": MAX_FIDELITY_STEPS,
                                "tooltip": "Structure steps: 0 = exact structure; each step blurs and halves "
                                           "the resolution once (coarser shapes)."}),
            }
        }

    def apply(self, images, t_s=0):
        check_images(images, "Structure Fidelity (Kinema)")
        check_finite(images, "Structure Fidelity (Kinema)")
        return (structure_fidelity(images, t_s),)


NODE_CLASS_MAPPINGS = {
    "KinemaDepthModelLoader": KinemaDepthModelLoader,
    "KinemaDepthEstimate": KinemaDepthEstimate,
    "KinemaStructureFidelity": KinemaStructureFidelity,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaDepthModelLoader": "Load Depth Model (Kinema)",
    "KinemaDepthEstimate": "Depth Estimate (Kinema)",
    "KinemaStructureFidelity": "Structure Fidelity (Kinema)",
}
