"""Loader nodes: SD1.5 checkpoint, AnimateDiff motion module."""
from __future__ import annotations

from ..models import checkpoint, memory, placement
from ..models.motion import MotionModel
from . import host

PRECISION_TOOLTIP = (
    "Weight precision. auto: fp16 on a GPU, fp32 on the CPU, or what ComfyUI's --force-fp32 / --fp16-unet / "
    "--bf16-vae / ... flags ask for. On a CPU with native bf16 (AVX512-BF16 or AMX) bf16 "
    "is faster, with a slightly different video: about 0.6x the time a step on an AMD Zen 4. A VAE call that "
    "overflows in fp16 is run again in fp32 (said in the log).")

CATEGORY = "Kinema/loaders"


class KinemaCheckpointLoader:
    DESCRIPTION = (
        "Loads an SD1.5 single-file checkpoint (.safetensors, or .ckpt holding only tensors) from "
        "models/checkpoints: its UNet, CLIP text encoder and VAE."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("KINEMA_MODEL", "KINEMA_CLIP", "KINEMA_VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = (
        "The SD1.5 UNet; connect it to Apply Motion Module for video.",
        "The CLIP text encoder for the prompts.",
        "The VAE that turns latents into frames.",
    )
    FUNCTION = "load"
    MODEL_INPUTS = {"ckpt_name": "checkpoints"}  # input -> models folder kind (the runner's demo fallback)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {
                    "tooltip": "An SD1.5 checkpoint in models/checkpoints (SDXL, SD2 and SVD files are refused)."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto",
                    "tooltip": PRECISION_TOOLTIP}),
            }
        }

    def load(self, ckpt_name, precision="auto"):
        path = host.resolve_model("checkpoints", ckpt_name)
        dtypes = host.load_dtypes(precision)
        bundle = checkpoint.load_sd15(path, dtype=dtypes.weights, vae_dtype=dtypes.vae, text_dtype=dtypes.encoders)
        video_policy, _ = host.memory_defaults()
        model = MotionModel(unet=bundle.unet, motion=None, beta_schedule="scaled_linear", name=bundle.name,
                            offload=video_policy)
        placement.rest(model, video_policy)
        return (model, host.placed(bundle.clip), host.placed_vae(bundle.vae))


class KinemaMotionModuleLoader:
    DESCRIPTION = (
        "Loads an AnimateDiff SD1.5 motion module (v1, v2 or v3, as published: .ckpt or .safetensors; or a "
        "diffusers MotionAdapter's diffusion_pytorch_model.safetensors, renamed) from models/animatediff_models."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("KINEMA_MOTION_MODULE",)
    RETURN_NAMES = ("motion_module",)
    OUTPUT_TOOLTIPS = ("The motion module; connect it to Apply Motion Module.",)
    FUNCTION = "load"
    MODEL_INPUTS = {"model_name": "animatediff_models"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.list_models("animatediff_models"), {
                    "tooltip": "A motion module in models/animatediff_models, e.g. mm_sd_v15_v2.ckpt or "
                               "v3_sd15_mm.ckpt."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto", "tooltip": "Weight precision; auto follows the device."}),
            }
        }

    def load(self, model_name, precision="auto"):
        path = host.resolve_model("animatediff_models", model_name)
        module = checkpoint.load_motion_module(path, dtype=host.load_dtypes(precision).weights)
        return (module.to(placement.resting_device(host.memory_defaults()[0])),)


NODE_CLASS_MAPPINGS = {
    "KinemaCheckpointLoader": KinemaCheckpointLoader,
    "KinemaMotionModuleLoader": KinemaMotionModuleLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaCheckpointLoader": "Load Checkpoint (Kinema)",
    "KinemaMotionModuleLoader": "Load Motion Module (Kinema)",
}
