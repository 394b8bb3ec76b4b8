"""Saving frames as a video file in ComfyUI's output folder, with a preview in the UI."""
from __future__ import annotations

import logging
import os

import torch

from ..models import video_io
from ..models.errors import KinemaError
from . import host

logger = logging.getLogger("kinema")


class KinemaSaveVideo:
    """Write an IMAGE batch (the frames of one video) as an animated webp/gif or an H.264 mp4."""

    DESCRIPTION = (
        "Saves the frames as one video file in the ComfyUI output folder and previews it. "
        "webp and gif are animated images (repeated frames are stored once, shown longer); mp4 is H.264 for "
        "players and editors. The workflow is embedded in each: dropping a webp or mp4 on ComfyUI loads it back "
        "(ComfyUI reads no workflow from a gif)."
    )
    CATEGORY = "Kinema/video"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames of the video, in order (an IMAGE batch)."}),
                "fps": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 240.0, "step": 0.01,
                                  "tooltip": "Frames per second of the saved video. AnimateDiff models "
                                             "are trained around 8; SVD around 6-8. A gif plays at most 50."}),
                "format": (list(video_io.FORMATS), {"default": "webp",
                                                    "tooltip": "webp: animated image, good colours, previewed "
                                                               "in ComfyUI. gif: widest support, 256 colours. "
                                                               "mp4: H.264 video, smallest file."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 1000,
                                       "tooltip": "How many times a webp/gif plays: 0 = forever. "
                                                  "Ignored for mp4."}),
                "filename_prefix": ("STRING", {"default": "Kinema/video",
                                               "tooltip": "Name of the file in the output folder; may hold "
                                                          "a subfolder (Kinema/video). A counter is added so "
                                                          "nothing is overwritten."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps, format, loop_count, filename_prefix, prompt=None, extra_pnginfo=None):
        video_io.check_images(images, "Save Video (Kinema)", (1, 3, 4))
        if not bool(torch.isfinite(images).all()):
            logger.warning("Save Video (Kinema): the frames hold NaN or infinite values, saved as black or clamped: "
                           "the node that made them (a decode in fp16?) produced them")
        if format not in video_io.FORMATS:
            raise KinemaError(f"Unknown format '{format}': choose one of {', '.join(video_io.FORMATS)}")
        frames = video_io.to_uint8(images)
        height, width = frames.shape[1:3]

        metadata = None
        if host.metadata_enabled():
            metadata = {}
            if prompt is not None:
                metadata["prompt"] = prompt
            if isinstance(extra_pnginfo, dict):
                metadata.update(extra_pnginfo)
            metadata = metadata or None

        full_path, subfolder, filename = host.save_path(filename_prefix, format, width, height)
        bar = host.ProgressBar(frames.shape[0], "Kinema save")
        # the bar checks for Cancel: it stops the write between frames (no file is left)
        # a file another writer saved under this name meanwhile (a second ComfyUI on the same output folder) is
        # kept: this one takes the next counter
        full_path = video_io.write_video(full_path, frames, fps, format, loop=loop_count, metadata=metadata,
                                         on_frame=bar.update_absolute,
                                         next_path=lambda: host.save_path(filename_prefix, format, width, height)[0])
        filename = os.path.basename(full_path)
        logger.info("Kinema: saved %d frames (%dx%d, %g fps) to %s", frames.shape[0], width, height, fps, full_path)

        result = {"filename": filename, "subfolder": subfolder, "type": "output"}
        # ComfyUI shows webp/gif as animated images and mp4 in a video player from this same shape
        animated = format == "mp4" or frames.shape[0] > 1
        return {"ui": {"images": [result], "animated": (animated,)}}


NODE_CLASS_MAPPINGS = {"KinemaSaveVideo": KinemaSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaSaveVideo": "Save Video (Kinema)"}
