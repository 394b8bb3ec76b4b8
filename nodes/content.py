"""Content from an image: CLIP vision and IP-Adapter nodes (Gen-1's content, on open SD1.5 models)."""
from __future__ import annotations

import os

from ..models import addons, checkpoint, memory
from . import host
from .checks import require_sd15_model

PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


class KinemaCLIPVisionLoader:
    DESCRIPTION = (
        "Loads a CLIP image encoder from models/clip_vision (transformers or open_clip layout), e.g. "
        "clip_vision_h.safetensors (ViT-H/14, what the SD1.5 IP-Adapter and SVD were trained with)."
    )
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The CLIP image encoder; connect it to Apply IP-Adapter (Kinema).",)
    FUNCTION = "load"
    MODEL_INPUTS = {"clip_name": "clip_vision"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (host.list_models("clip_vision"), {
                    "tooltip": "A CLIP vision file in models/clip_vision."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto", "tooltip": "Weight precision; auto follows the device."}),
            }
        }

    def load(self, clip_name, precision="auto"):
        path = host.resolve_model("clip_vision", clip_name)
        return (host.placed(checkpoint.load_clip_vision(path, host.load_dtypes(precision).encoders)),)


class KinemaIPAdapterLoader:
    DESCRIPTION = (
        "Loads an SD1.5 IP-Adapter as published (ip-adapter_sd15.safetensors / .bin, ip-adapter_sd15_light) from "
        "models/ipadapter: the image projection and the per-layer image keys/values of the cross-attention."
    )
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_IPADAPTER",)
    RETURN_NAMES = ("ip_adapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter; connect it to Apply IP-Adapter (Kinema).",)
    FUNCTION = "load"
    MODEL_INPUTS = {"ipadapter_name": "ipadapter"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter_name": (host.list_models("ipadapter"), {
                    "tooltip": "An SD1.5 IP-Adapter in models/ipadapter (plus / face / SDXL variants are refused)."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto", "tooltip": "Weight precision; auto follows the device."}),
            }
        }

    def load(self, ipadapter_name, precision="auto"):
        from ..models.ip_adapter import load_ip_adapter

        path = host.resolve_model("ipadapter", ipadapter_name)
        return (host.placed(load_ip_adapter(path, dtype=host.load_dtypes(precision).weights)),)


class KinemaApplyIPAdapter:
    DESCRIPTION = (
        "Takes the video's content from an image (Gen-1's content guidance on SD1.5): the image's CLIP embedding, "
        "through the IP-Adapter, becomes extra image tokens every cross-attention layer attends to next to the "
        "prompt. Several images are averaged into one content. The unconditional side sees the tokens of no image, "
        "as the IP-Adapter was trained. Chain several to mix contents."
    )
    CATEGORY = "Kinema/content"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this content image; connect it to the Video Sampler or another Apply node.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An SD1.5 / AnimateDiff model."}),
                "ip_adapter": ("KINEMA_IPADAPTER", {"tooltip": "From Load IP-Adapter (Kinema)."}),
                "clip_vision": ("KINEMA_CLIP_VISION", {"tooltip": "From Load CLIP Vision (Kinema): the encoder the "
                                                                  "IP-Adapter was trained with (ViT-H/14)."}),
                "image": ("IMAGE", {"tooltip": "The content image (several: their mean embedding)."}),
                "weight": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 5.0, "step": 0.01,
                                     "tooltip": "How strongly the image's content counts next to the prompt."}),
                "start_percent": ("FLOAT", {"default": 0.0, **PERCENT,
                                            "tooltip": "Where in the sampling the content starts (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, **PERCENT,
                                          "tooltip": "Where it stops (1 = last step)."}),
            }
        }

    def apply(self, model, ip_adapter, clip_vision, image, weight=0.8, start_percent=0.0, end_percent=1.0):
        require_sd15_model(model, "Apply IP-Adapter (Kinema)",
                           "for SVD connect a content image to SVD Image Conditioning (Kinema)")
        ip_adapter.check_unet(model.unet.cfg)
        host.check_interrupt()
        name = os.path.basename(getattr(ip_adapter, "source", "") or "")
        content = addons.image_content(ip_adapter, clip_vision, image, weight, start_percent, end_percent, name)
        return (model.with_options(contents=model.contents + (content,)),)


NODE_CLASS_MAPPINGS = {
    "KinemaCLIPVisionLoader": KinemaCLIPVisionLoader,
    "KinemaIPAdapterLoader": KinemaIPAdapterLoader,
    "KinemaApplyIPAdapter": KinemaApplyIPAdapter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaCLIPVisionLoader": "Load CLIP Vision (Kinema)",
    "KinemaIPAdapterLoader": "Load IP-Adapter (Kinema)",
    "KinemaApplyIPAdapter": "Apply IP-Adapter (Kinema)",
}
