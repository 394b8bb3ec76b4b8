"""Empty video latent."""
from __future__ import annotations

from ..models import pipelines, video_io
from ..models.errors import KinemaError


class KinemaEmptyVideoLatent:
    DESCRIPTION = ("An empty latent video: frames x height x width (multiples of 8), to sample from; or the size of "
                   "connected frames.")
    CATEGORY = "Kinema/latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros [frames, 4, height/8, width/8], the LATENT layout of ComfyUI's frame batches.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("INT", {"default": 16, "min": 1, "max": 4096,
                                   "tooltip": "Number of frames. Motion modules see at most 24 (v1) or 32 (v2/v3)."}),
                "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8,
                                  "tooltip": "Width in pixels, a multiple of 8."}),
                "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8,
                                   "tooltip": "Height in pixels, a multiple of 8."}),
            },
            "optional": {
                "size_of": ("IMAGE", {"tooltip": "Optional frames (e.g. the source video of structure guidance): "
                                                 "when connected, their count, width and height replace the three "
                                                 "values above."}),
            },
        }

    def make(self, frames, width, height, size_of=None):
        if size_of is not None:
            video_io.check_images(size_of, "Empty Video Latent (Kinema): size_of", (1, 3, 4))
            frames, height, width = (int(v) for v in size_of.shape[:3])
            if width % 8 or height % 8:
                raise KinemaError(f"Empty Video Latent (Kinema): the size_of frames are {width}x{height}, and a "
                                  "latent needs multiples of 8: resize or crop the frames (Load Video (Kinema) "
                                  "crops to multiples of 8), or disconnect size_of and set width and height")
        return ({"samples": pipelines.empty_video_latent(frames, width, height)},)


NODE_CLASS_MAPPINGS = {"KinemaEmptyVideoLatent": KinemaEmptyVideoLatent}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaEmptyVideoLatent": "Empty Video Latent (Kinema)"}
