"""Loading a video file from ComfyUI's input folder as frames (IMAGE), for video-to-video."""
from __future__ import annotations

import hashlib
import os
import struct

from ..models import video_io
from ..models.errors import KinemaError
from . import host

#: The pack's own input clips (``workflows/inputs``): listed when the input folder has no file of that name.
BUNDLED_INPUTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "inputs")
VIDEO_EXTENSIONS: tuple[str, ...] = video_io.READ_EXTENSIONS


def _is_apng(path: str) -> bool:
    """True for an animated PNG (an ``acTL`` chunk before the image data); plain PNG images are not listed."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            for _ in range(64):
                head = fh.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind == b"acTL":
                    return True
                if kind in (b"IDAT", b"IEND"):
                    return False
                fh.seek(length + 4, os.SEEK_CUR)  # chunk data and CRC
    except OSError:
        return False
    return False


def _listable(path: str) -> bool:
    name = os.path.basename(path)
    if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
        return False
    return not name.lower().endswith(".png") or _is_apng(path)


def _bundled() -> dict[str, str]:
    """Name -> path of the clips shipped with the pack."""
    try:
        names = sorted(os.listdir(BUNDLED_INPUTS_DIR))
    except OSError:
        return {}
    return {n: os.path.join(BUNDLED_INPUTS_DIR, n) for n in names
            if _listable(os.path.join(BUNDLED_INPUTS_DIR, n)) and os.path.isfile(os.path.join(BUNDLED_INPUTS_DIR, n))}


def list_videos() -> list[str]:
    """Video files in the input folder (subfolders as ``sub/name``, hidden ones and still PNGs skipped),
    then the bundled clips."""
    root = host.get_input_directory()
    found = []
    if os.path.isdir(root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            for f in filenames:
                if _listable(os.path.join(dirpath, f)):
                    found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    found.sort(key=str.lower)
    bundled = [n for n in _bundled() if n not in found]
    return found + bundled


def resolve_video(name: str) -> str:
    """Path of video ``name``: the input folder first, then the pack's bundled clips. KinemaError if missing."""
    path = host.resolve_input(name)
    if os.path.isfile(path):
        return path
    bundled = _bundled().get(name)
    if bundled is not None:
        return bundled
    if not name.lower().endswith(VIDEO_EXTENSIONS):
        raise KinemaError(f"'{name}' is not a video file: Load Video reads "
                          f"{', '.join(e.lstrip('.') for e in VIDEO_EXTENSIONS)}")
    raise KinemaError(f"Video '{name}' not found in the input folder {host.get_input_directory()}: "
                      "upload it, or put it in that folder and refresh the page (R)")


class KinemaLoadVideo:
    DESCRIPTION = (
        "Loads a video (mp4, webm, mov, mkv, gif, webp, animated png) from the ComfyUI input folder as "
        "frames, for video-to-video. Frames are resized and centre-cropped to multiples of 8 (the VAE's "
        "grid). The pack's demo clip is always listed."
    )
    CATEGORY = "Kinema/video"
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT")
    RETURN_NAMES = ("images", "frame_count", "fps")
    OUTPUT_TOOLTIPS = (
        "The frames as an IMAGE batch [frames, height, width, 3].",
        "How many frames were loaded.",
        "Frame rate of the loaded frames: the file's rate divided by select_every_nth, so they play at "
        "the original speed.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": (list_videos(), {"video_upload": True,
                                          "tooltip": "A video in the ComfyUI input folder (upload one with the "
                                                     "button); kinema_demo_clip.webp ships with the pack."}),
                "frame_load_cap": ("INT", {"default": 16, "min": 0, "max": 100000,
                                           "tooltip": "Load at most this many frames (0 = all). Motion modules "
                                                      "see at most 24 (v1) or 32 (v2/v3) frames at once."}),
                "skip_first_frames": ("INT", {"default": 0, "min": 0, "max": 1000000,
                                              "tooltip": "Frames to skip at the start of the video."}),
                "select_every_nth": ("INT", {"default": 1, "min": 1, "max": 1000,
                                             "tooltip": "Keep one frame in n (2 = every other frame); the fps "
                                                        "output is divided by n."}),
                "custom_width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                         "tooltip": "Width to scale to (0 = keep; with height 0 the aspect ratio "
                                                    "is kept). Both set: scale to cover, then centre-crop. The "
                                                    "result is always cropped to multiples of 8."}),
                "custom_height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                          "tooltip": "Height to scale to (0 = keep; with width 0 the aspect ratio "
                                                     "is kept)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        if video is None:  # linked from another node: checked when it runs
            return True
        try:
            resolve_video(video)
        except KinemaError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, video, **_):
        """Changes when the file does (path, size, modification time), so ComfyUI reloads it."""
        try:
            path = resolve_video(video)
            st = os.stat(path)
        except (KinemaError, OSError):
            return f"missing:{video}"
        return hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()

    def load(self, video, frame_load_cap=16, skip_first_frames=0, select_every_nth=1, custom_width=0,
             custom_height=0):
        path = resolve_video(video)
        host.check_interrupt()
        images, fps = video_io.read_video(path, frame_load_cap, skip_first_frames, select_every_nth,
                                          custom_width, custom_height, on_frame=lambda n: host.check_interrupt())
        return (images, images.shape[0], fps)


NODE_CLASS_MAPPINGS = {"KinemaLoadVideo": KinemaLoadVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaLoadVideo": "Load Video (Kinema)"}
