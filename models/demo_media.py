"""The pack's demo inputs: a short, seamlessly looping video of moving coloured shapes, and a still of it.

``demo_clip_frames()`` draws it with integer arithmetic only (no trigonometry,
no resampling), so every machine makes exactly the same pixels.
``write_demo_clip(path)`` saves it as a lossless animated WebP: decoding the
file gives those pixels back exactly. The pack ships the result as
``workflows/inputs/kinema_demo_clip.webp`` (the video-to-video workflow's
input), and its first frame as ``workflows/inputs/kinema_demo_image.png`` (the
image-to-video workflows' init image); regenerate both with::

    python -m models.demo_media            # from the pack's root folder

"""
from __future__ import annotations

import numpy as np

DEMO_CLIP_NAME = "kinema_demo_clip.webp"
DEMO_CLIP_FRAMES = 24
DEMO_CLIP_SIZE = 256  # width and height in pixels (a multiple of 8)
DEMO_CLIP_FPS = 8.0
DEMO_IMAGE_NAME = "kinema_demo_image.png"
DEMO_IMAGE_SIZE = (512, 288)  # width, height: 16:9 like Stable Video Diffusion's 1024x576


def _triangle(t: int, period: int, amplitude: int) -> int:
    """0 -> amplitude -> 0 over ``period`` (integer triangle wave)."""
    phase = t % period
    half = period // 2
    return amplitude * (phase if phase <= half else period - phase) // half


def demo_clip_frames(frames: int = DEMO_CLIP_FRAMES, size: int = DEMO_CLIP_SIZE) -> np.ndarray:
    """The demo clip as uint8 ``[frames, size, size, 3]``; it loops without a jump after ``frames``.

    A sky gradient, a green hill, a sun crossing the sky, a red ball bouncing on
    the hill and a purple box sliding the other way.
    """
    if frames < 1 or size < 16:
        raise ValueError("the demo clip needs at least 1 frame and 16 pixels a side")
    s = size
    y, x = np.mgrid[0:s, 0:s].astype(np.int64)
    # sky: deep blue at the top to warm orange at the horizon
    sky = np.stack([40 + 200 * y // s, 70 + 110 * y // s, 200 - 120 * y // s], axis=-1)
    # hill: a low peak in the middle, darker green towards the bottom
    hill = y >= (s * 3) // 4 - (s // 2 - np.abs(x - s // 2)) // 6
    grass = np.stack([np.full_like(y, 50), 150 - 60 * (y - s // 2) // s, np.full_like(y, 60)], axis=-1)
    base = np.where(hill[..., None], grass, sky)
    base = np.clip(base, 0, 255).astype(np.uint8)
    out = np.empty((frames, s, s, 3), np.uint8)
    for t in range(frames):
        img = base.copy()
        # sun: crosses the sky once per loop (wraps around), radius s/10
        r = s // 10
        cx = ((s + 2 * r) * t // frames + s // 5) % (s + 2 * r) - r
        cy = s // 5
        sun = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) & ~hill
        img[sun] = (255, 220, 60)
        # red ball: bounces (|triangle| keeps the contact with the hill), 2 bounces a loop
        br = s // 12
        bx = s // 3
        by = (s * 3) // 4 - (s // 2 - abs(bx - s // 2)) // 6 - br - _triangle(t, max(2, frames // 2), s // 3)
        ball = (x - bx) ** 2 + (y - by) ** 2 <= br * br
        img[ball] = (220, 40, 40)
        # purple box: slides right to left across the lower sky, wrapping around
        bw = s // 6
        left = s - (s + bw) * t // frames
        box = (x >= left) & (x < left + bw) & (y >= s // 2 - bw // 2) & (y < s // 2 + bw // 2)
        img[box & ~ball] = (140, 60, 200)
        out[t] = img
    return out


def write_demo_clip(path: str, frames: int = DEMO_CLIP_FRAMES, size: int = DEMO_CLIP_SIZE,
                    fps: float = DEMO_CLIP_FPS) -> str:
    """Write the demo clip to ``path`` as a lossless animated WebP (loops forever); return the path."""
    from .video_io import write_video

    return write_video(path, demo_clip_frames(frames, size), fps, "webp", loop=0, lossless=True, webp_method=6)


def demo_image(width: int = DEMO_IMAGE_SIZE[0], height: int = DEMO_IMAGE_SIZE[1]) -> np.ndarray:
    """The demo init image, uint8 ``[height, width, 3]``: the clip's first frame drawn at ``max(width, height)``
    and centre-cropped."""
    side = max(width, height)
    frame = demo_clip_frames(1, side)[0]
    top, left = (side - height) // 2, (side - width) // 2
    return np.ascontiguousarray(frame[top:top + height, left:left + width])


def write_demo_image(path: str) -> str:
    """Write the demo init image to ``path`` as PNG; return the path."""
    from PIL import Image

    Image.fromarray(demo_image()).save(path, format="PNG", optimize=True)
    return path


if __name__ == "__main__":  # pragma: no cover - regeneration helper: python -m models.demo_media [PATH]
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inputs = os.path.join(here, "workflows", "inputs")
    print(write_demo_clip(sys.argv[1] if len(sys.argv) > 1 else os.path.join(inputs, DEMO_CLIP_NAME)))
    print(write_demo_image(sys.argv[2] if len(sys.argv) > 2 else os.path.join(inputs, DEMO_IMAGE_NAME)))
