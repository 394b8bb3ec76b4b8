"""Loading videos (frames, for video-to-video) and still images (init images) from ComfyUI's input folder."""
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


def _bundled(listable=None) -> dict[str, str]:
    """Name -> path of the input files shipped with the pack (videos by default)."""
    listable = listable or _listable
    try:
        names = sorted(os.listdir(BUNDLED_INPUTS_DIR))
    except OSError:
        return {}
    return {n: os.path.join(BUNDLED_INPUTS_DIR, n) for n in names
            if listable(os.path.join(BUNDLED_INPUTS_DIR, n)) and os.path.isfile(os.path.join(BUNDLED_INPUTS_DIR, n))}


def _list_inputs(listable) -> list[str]:
    """Files of the input folder that ``listable(path)`` accepts (subfolders as ``sub/name``, hidden ones
    skipped, links that resolve outside the folder hidden as in the model lists), then the bundled ones of that
    kind."""
    host.share_inputs(_bundled(lambda path: True))  # so the frontend can preview them
    root = host.get_input_directory()
    found = []
    if os.path.isdir(root):
        roots = [os.path.realpath(root)]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, root)
            for f in filenames:
                full = os.path.join(dirpath, f)
                if not f.startswith(".") and host.stays_inside(full, roots) and listable(full):
                    found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    found.sort(key=str.lower)
    bundled = [n for n in _bundled(listable) if n not in found]
    return found + bundled


def _resolve_input(name: str, listable, what: str, extensions: tuple[str, ...], node: str) -> str:
    path = host.resolve_input(name)
    if os.path.isfile(path):
        return path
    bundled = _bundled(listable).get(name)
    if bundled is not None:
        return bundled
    if not name.lower().endswith(extensions):
        raise KinemaError(f"'{name}' is not {what} file: {node} reads "
                          f"{', '.join(e.lstrip('.') for e in extensions)}")
    raise KinemaError(f"{what.split()[-1].capitalize()} '{name}' not found in the input folder "
                      f"{host.get_input_directory()}: upload it, or put it in that folder and refresh the page (R)")


def list_videos() -> list[str]:
    """Video files in the input folder (still PNGs skipped), then the bundled clips."""
    return _list_inputs(_listable)


def resolve_video(name: str) -> str:
    """Path of video ``name``: the input folder first, then the pack's bundled clips. KinemaError if missing."""
    return _resolve_input(name, _listable, "a video", VIDEO_EXTENSIONS, "Load Video")


def _animated_listable(path: str) -> bool:
    return path.lower().endswith(video_io.IMAGE_SEQUENCE_EXTENSIONS) and _listable(path)


def list_animated_images() -> list[str]:
    """GIF / WebP / animated PNG files in the input folder, then the bundled ones."""
    return _list_inputs(_animated_listable)


def resolve_animated_image(name: str) -> str:
    """Path of animated image ``name``: the input folder first, then the pack's bundled clips. A file of another
    kind (a jpg, an mp4) is refused here, before the node runs."""
    path = _resolve_input(name, _animated_listable, "an animated image", video_io.IMAGE_SEQUENCE_EXTENSIONS,
                          "Load Animated Image")
    if not path.lower().endswith(video_io.IMAGE_SEQUENCE_EXTENSIONS):
        raise KinemaError(f"'{name}' is not an animated image: Load Animated Image reads "
                          f"{', '.join(e.lstrip('.') for e in video_io.IMAGE_SEQUENCE_EXTENSIONS)}"
                          " (a video: Load Video; a still image: Load Image)")
    return path


def _image_listable(path: str) -> bool:
    return os.path.basename(path).lower().endswith(video_io.STILL_IMAGE_EXTENSIONS)


def list_images() -> list[str]:
    """Image files in the input folder, then the bundled images."""
    return _list_inputs(_image_listable)


def resolve_image(name: str) -> str:
    """Path of image ``name``: the input folder first, then the pack's bundled images. KinemaError if missing."""
    return _resolve_input(name, _image_listable, "an image", video_io.STILL_IMAGE_EXTENSIONS, "Load Image")


def _file_fingerprint(path_of, name) -> str:
    """Changes when the file does, so ComfyUI reloads it: path, size, modification time, and the inode and its
    change time (a file copied over another with its old modification time kept still gets a new change time),
    without reading a video's content."""
    try:
        path = path_of(name)
        st = os.stat(path)
    except (KinemaError, OSError):
        return f"missing:{name}"
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    return hashlib.sha256(stamp.encode()).hexdigest()


def _frame_options() -> dict:
    """The frame selection and size inputs of Load Video and Load Animated Image."""
    return {
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


def _load_frames(path, frame_load_cap, skip_first_frames, select_every_nth, custom_width, custom_height):
    host.check_interrupt()
    images, fps = video_io.read_video(path, frame_load_cap, skip_first_frames, select_every_nth, custom_width,
                                      custom_height, on_frame=lambda n: host.check_interrupt())
    return (images, images.shape[0], fps)


def _checked_name(resolve, name) -> bool | str:
    """ComfyUI's VALIDATE_INPUTS answer for a file name: True, or the message of what is wrong with it. A name
    linked from another node (None here) is checked when the node runs."""
    if name is None:
        return True
    try:
        resolve(name)
    except KinemaError as e:
        return str(e)
    return True


class KinemaLoadVideo:
    DESCRIPTION = (
        "Loads a video (mp4, webm, mov, mkv, gif, webp, animated png) from the ComfyUI input folder as "
        "frames, for video-to-video. Frames are resized and centre-cropped to multiples of 8 (the VAE's "
        "grid). Every frame is read once at the file's mean rate (a variable-rate phone video too); an "
        "animated image's held frames are repeated to its shortest frame time. The pack's demo clip is always "
        "listed."
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
                                          "tooltip": "A video in the ComfyUI input folder (upload an mp4 or webm "
                                                     "with the button; for a gif, webp or animated png use Load "
                                                     "Animated Image (Kinema), whose button takes them); "
                                                     "kinema_demo_clip.webp ships with the pack."}),
                **_frame_options(),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        return _checked_name(resolve_video, video)

    @classmethod
    def IS_CHANGED(cls, video, **_):
        return _file_fingerprint(resolve_video, video)

    def load(self, video, frame_load_cap=16, skip_first_frames=0, select_every_nth=1, custom_width=0,
             custom_height=0):
        return _load_frames(resolve_video(video), frame_load_cap, skip_first_frames, select_every_nth, custom_width,
                            custom_height)


class KinemaLoadAnimatedImage(KinemaLoadVideo):
    DESCRIPTION = (
        "Loads an animated GIF, WebP or PNG from the ComfyUI input folder as frames, as Load Video (Kinema) does, "
        "with ComfyUI's image upload (ComfyUI's video upload takes mp4 and webm only): drop a GIF, WebP or PNG on "
        "the node, or pick a WebP or PNG with the button; a WebP or PNG plays on the node. The pack's demo clip is "
        "always listed."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": (list_animated_images(),
                          {"image_upload": True, "animated_image_upload": True,
                           "tooltip": "An animated gif, webp or png in the ComfyUI input folder (drop one on the "
                                      "node, or upload a webp or png with the button); kinema_demo_clip.webp ships "
                                      "with the pack."}),
                **_frame_options(),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _checked_name(resolve_animated_image, image)

    @classmethod
    def IS_CHANGED(cls, image, **_):
        return _file_fingerprint(resolve_animated_image, image)

    def load(self, image, frame_load_cap=16, skip_first_frames=0, select_every_nth=1, custom_width=0,
             custom_height=0):
        return _load_frames(resolve_animated_image(image), frame_load_cap, skip_first_frames, select_every_nth,
                            custom_width, custom_height)


class KinemaLoadImage:
    DESCRIPTION = ("Loads a still image (png, jpg, webp, ...) from the ComfyUI input folder, e.g. the init image of "
                   "image-to-video. The pack's demo image is always listed.")
    CATEGORY = "Kinema/video"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The image as an IMAGE batch of one [1, height, width, 3].",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": (list_images(), {"image_upload": True,
                                          "tooltip": "An image in the ComfyUI input folder (upload one with the "
                                                     "button); kinema_demo_image.png ships with the pack."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _checked_name(resolve_image, image)

    @classmethod
    def IS_CHANGED(cls, image, **_):
        return _file_fingerprint(resolve_image, image)

    def load(self, image):
        return (video_io.read_image(resolve_image(image)),)


NODE_CLASS_MAPPINGS = {"KinemaLoadVideo": KinemaLoadVideo, "KinemaLoadAnimatedImage": KinemaLoadAnimatedImage,
                       "KinemaLoadImage": KinemaLoadImage}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaLoadVideo": "Load Video (Kinema)",
                              "KinemaLoadAnimatedImage": "Load Animated Image (Kinema)",
                              "KinemaLoadImage": "Load Image (Kinema)"}
