"""The memory policy node: how a video model uses the compute device's memory."""
from __future__ import annotations

from ..models import memory, placement
from ..models.offload import OFFLOAD_MODES, OffloadOptions
from . import host

KEEP = "keep"


class KinemaMemoryPolicy:
    DESCRIPTION = (
        "How a video model (AnimateDiff or SVD) uses GPU memory. offload auto: from ComfyUI's VRAM mode (normal: "
        "model, --lowvram: block, --novram: block with one block resident, --highvram: none). none: the UNet "
        "and motion module stay on the GPU (fastest between runs). model: they rest in system memory and are "
        "moved to the GPU for each sampling run (under a second over PCIe), leaving the memory free for the VAE "
        "and other nodes. block: each UNet block (with its motion module) is moved to the GPU just before it "
        "runs, the next one copied while the current one computes; at most resident_blocks are on the GPU at "
        "once, so VRAM holds a few blocks plus activations instead of the whole UNet; slower by the copies. "
        "Also the precision, attention chunking and cond/uncond batching. The video is the same with every "
        "setting (precision aside)."
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
                "offload": (["auto", *OFFLOAD_MODES], {
                    "default": "auto",
                    "tooltip": "auto: from ComfyUI's VRAM mode; none: all on the GPU; model: on the GPU only "
                               "while sampling; block: blocks streamed in."}),
                "resident_blocks": ("INT", {"default": 2, "min": 1, "max": 64,
                                            "tooltip": "block offload: blocks kept on the GPU at once (2 lets the "
                                                       "next one load while one runs). With offload auto, at most "
                                                       "the VRAM mode's own (2 under --lowvram, 1 under "
                                                       "--novram)."}),
                "attention_chunk": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64,
                                            "tooltip": "Attention in chunks: this many queries (spatial) or pixel "
                                                       "positions (temporal) at once; 0 = all. The same video; less "
                                                       "memory only where PyTorch's attention holds the whole "
                                                       "score matrix (e.g. Apple MPS), not on CUDA or the CPU. A "
                                                       "nonzero value on the Video Sampler wins. "
                                                       "With Compile Model (Kinema), small chunks make the first "
                                                       "compile much longer."}),
                "batch_cond": ("BOOLEAN", {"default": True,
                                           "tooltip": "Run cond and uncond in one batch (faster) or one after the "
                                                      "other (about half the activation memory). Off here or on "
                                                      "the sampler: one after the other; offload auto under "
                                                      "--novram: one after the other too."}),
            },
            "optional": {
                "precision": ([KEEP, "fp32", "fp16", "bf16"], {
                    "default": KEEP,
                    "tooltip": "Weight and compute precision of the UNet and motion module (place this node after "
                               "Apply Motion Module and the LoRAs, which then merge at the loaded precision; "
                               "ControlNets and IP-Adapters keep their loaders' precision, "
                               "each network computing in its own). keep: as loaded (the "
                               "loader's precision: fp16 on a GPU). Another value makes a converted copy, which "
                               "costs its size in system memory: prefer the loader's precision where it has one. "
                               "fp16 halves memory; bf16 where fp16 overflows; fp32 on the CPU, or bf16 on a CPU "
                               "with native bf16 (AVX512-BF16 or AMX): about 0.6x the time a step on an AMD Zen "
                               "4."}),
            },
        }

    def apply(self, model, offload="auto", resident_blocks=2, attention_chunk=0, batch_cond=True, precision=KEEP):
        default, _ = host.memory_defaults()
        mode = default.mode if offload == "auto" else offload
        resident = int(resident_blocks) if offload != "auto" else min(int(resident_blocks), default.resident)
        opts = OffloadOptions(mode=mode, device=str(host.compute_device()), storage=str(host.offload_device()),
                              resident=resident, attn_chunk=int(attention_chunk),
                              batch_cond=bool(batch_cond) and (offload != "auto" or default.batch_cond))
        opts.validate()
        changes = {"offload": opts}
        if precision != KEEP:
            dtype = host.load_dtypes(precision, opts.device).weights
            changes["unet"] = memory.cast_weights(model.unet, dtype)
            if getattr(model, "motion", None) is not None:
                changes["motion"] = memory.cast_weights(model.motion, dtype)
        new = model.with_options(**changes)
        placement.rest(new, opts)
        return (new,)


NODE_CLASS_MAPPINGS = {"KinemaMemoryPolicy": KinemaMemoryPolicy}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaMemoryPolicy": "Memory Policy (Kinema)"}
