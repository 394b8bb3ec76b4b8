"""VAE frame decoding."""
from __future__ import annotations

from ..models import vae as vae_ops
from . import host


class KinemaVAEDecodeFrames:
    DESCRIPTION = "Decodes a latent video into frames, a chunk of frames at a time (smaller chunks use less memory)."
    CATEGORY = "Kinema/vae"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch [frames, height, width, 3].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("KINEMA_VAE", {"tooltip": "The VAE from Load Checkpoint (Kinema)."}),
                "samples": ("LATENT", {"tooltip": "The latent video from the Video Sampler."}),
                "frame_chunk": ("INT", {"default": 8, "min": 1, "max": 4096,
                                        "tooltip": "Frames decoded at once; lower it if the GPU runs out of memory."}),
            }
        }

    def decode(self, vae, samples, frame_chunk=8):
        latent = samples["samples"]
        bar = host.ProgressBar(latent.shape[0])
        images = vae_ops.decode_frames(vae, latent, frame_chunk,
                                       on_chunk=lambda done, total: bar.update_absolute(done, total))
        return (images,)


NODE_CLASS_MAPPINGS = {"KinemaVAEDecodeFrames": KinemaVAEDecodeFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaVAEDecodeFrames": "VAE Decode Frames (Kinema)"}
