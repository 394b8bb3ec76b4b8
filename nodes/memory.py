"""The memory policy node: how a video model uses the compute device's memory."""
from __future__ import annotations

from ..models.errors import KinemaError
from ..models.motion import MotionModel
from ..models.offload import OFFLOAD_MODES, OffloadOptions
from ..models.svd_model import SVDModel
from . import host


class KinemaMemoryPolicy:
    DESCRIPTION = (
        "How a video model (AnimateDiff or SVD) uses GPU memory. offload none: the UNet (and motion module) stay on "
        "the GPU (fastest). block: they rest in system memory and each UNet block (with its motion module) is moved "
        "to the GPU "
        "just before it runs, the next one copied while the current one computes; at most resident_blocks are on "
        "the GPU at once, so VRAM holds a few blocks plus activations instead of the whole UNet. Slower by the "
        "copies (PCIe bandwidth); the video is the same. Also the attention chunking and cond/uncond batching the "
        "sampler uses when its own are left at their defaults."
    )
    CATEGORY = "Kinema/sampling"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this policy; connect it to the Video Sampler (Kinema).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An AnimateDiff model (Apply Motion Module) or an SVD model."}),
                "offload": (list(OFFLOAD_MODES), {"default": "none",
                                                  "tooltip": "none: all on the GPU; block: blocks streamed in."}),
                "resident_blocks": ("INT", {"default": 2, "min": 1, "max": 64,
                                            "tooltip": "block offload: blocks kept on the GPU at once (2 lets the "
                                                       "next one load while one runs)."}),
                "attention_chunk": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64,
                                            "tooltip": "Attention in chunks: this many queries (spatial) or pixel "
                                                       "positions (temporal) at once; 0 = all. The same video, "
                                                       "less memory. A nonzero value on the Video Sampler wins."}),
                "batch_cond": ("BOOLEAN", {"default": True,
                                           "tooltip": "Run cond and uncond in one batch (faster) or one after the "
                                                      "other (about half the activation memory). Off here or on "
                                                      "the sampler: one after the other."}),
            }
        }

    def apply(self, model, offload="none", resident_blocks=2, attention_chunk=0, batch_cond=True):
        if not isinstance(model, (MotionModel, SVDModel)):
            raise KinemaError("Memory Policy (Kinema) takes a video model: connect Apply Motion Module (Kinema) or "
                              "Load SVD Checkpoint (Kinema)")
        opts = OffloadOptions(mode=offload, device=str(host.compute_device()), storage="cpu",
                              resident=int(resident_blocks), attn_chunk=int(attention_chunk),
                              batch_cond=bool(batch_cond))
        opts.validate()
        return (model.with_options(offload=opts),)


NODE_CLASS_MAPPINGS = {"KinemaMemoryPolicy": KinemaMemoryPolicy}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaMemoryPolicy": "Memory Policy (Kinema)"}
