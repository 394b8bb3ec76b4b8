"""Writing frames to video files: animated GIF, animated WebP and H.264 MP4.

Frames arrive as ComfyUI ``IMAGE`` (``[f, h, w, 3]`` float in [0, 1]);
``to_uint8`` turns them into ``uint8`` arrays and ``write_video`` writes one file.

- **gif** (Pillow): frame durations from fps (GIF stores 1/100 s: each frame starts at its time rounded to
  that, so the mean rate is the fps asked for), loop count in
  the NETSCAPE block, metadata as a JSON comment block.
- **webp** (Pillow, animated; lossy or lossless): metadata in EXIF the way
  ComfyUI's own animated WebP saver writes it (``0x0110 = "prompt:<json>"``,
  other keys from ``0x010F`` downwards as ``"<key>:<json>"``), so ComfyUI can
  load the workflow back from the file.
- **mp4** (the ffmpeg binary of ``imageio-ffmpeg``; PyAV, which ComfyUI itself
  requires, when imageio-ffmpeg is missing): libx264, yuv420p, BT.709, ``crf``; odd sizes are padded by one edge pixel (yuv420p needs even sizes);
  metadata as a ``comment`` tag holding the whole dict as JSON, plus one tag per
  key (``prompt``, ``workflow``) like ComfyUI's SaveVideo.

Every format is written to a hidden temporary file next to the target and moved
into place with ``os.replace``: a reader never sees half a file, and on any
error the temporary file is removed. Given ``next_path``, the move never replaces
a file another writer (a second ComfyUI on the same output folder) put at the
target while this one wrote: the file goes to the next free name instead.

``read_video`` reads frames back (imageio's v3 API): animated GIF / WebP / PNG
(APNG) through Pillow, MP4 / WebM / MOV / MKV through imageio-ffmpeg (or PyAV).
Without imageio (a bare ComfyUI install) it uses Pillow and PyAV directly.
Frames are streamed: with a frame cap, decoding stops at the last frame needed
(an animated image's frame delays are read first, in one pass that keeps no
frame). Every decoded frame is read once, at the file's mean rate (a
variable-rate movie is not padded to a constant rate); an animated image's
frames are repeated to its shortest delay where the delays are whole multiples
of it (``constant_rate``: Pillow's GIF and WebP writers merge repeated frames,
so a saved video reads back frame for frame).
See ``read_video`` for the selection and resize rules.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch

from .errors import KinemaError

logger = logging.getLogger("kinema")

FORMATS: tuple[str, ...] = ("gif", "webp", "mp4")

_WEBP_PROMPT_TAG = 0x0110  # EXIF "Model": ComfyUI puts the prompt here
_WEBP_FIRST_EXTRA_TAG = 0x010F  # EXIF "Make", then downwards: workflow and other extra_pnginfo keys


def check_images(images, what: str, channels: tuple[int, ...] = (3,)) -> None:
    """KinemaError unless ``images`` is a ComfyUI IMAGE: [frames, height, width, c] floats with c in ``channels``
    (e.g. (3, 4) where an alpha channel is dropped). ``what`` (the node or step) starts the messages."""
    shape = f"[frames, height, width, {' or '.join(map(str, channels))}]"
    if not isinstance(images, torch.Tensor):
        raise KinemaError(f"{what} takes an IMAGE tensor {shape}, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[-1] not in channels:
        raise KinemaError(f"{what} takes IMAGE frames {shape}, got shape {list(images.shape)}: convert the frames "
                          "to RGB (drop alpha, expand grayscale)")
    if not images.is_floating_point():
        raise KinemaError(f"{what} takes IMAGE floats in [0, 1], got {images.dtype}: divide 8-bit frames by 255")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise KinemaError(f"{what} got an empty IMAGE batch of shape {list(images.shape)}")


#: frames looked at a time by ``check_finite`` (its working copy is a few frames', not the video's)
FINITE_CHECK_FRAMES = 16


def check_finite(images: torch.Tensor, what: str) -> None:
    """KinemaError unless every value of ``images`` ([frames, ...]) is finite: NaN or infinite pixels make NaN
    latents, hints or embeddings downstream, which is where they would otherwise be noticed."""
    for start in range(0, images.shape[0], FINITE_CHECK_FRAMES):
        chunk = images[start:start + FINITE_CHECK_FRAMES]
        if not bool(torch.isfinite(chunk).all()):
            bad = start + int((~torch.isfinite(chunk)).flatten(1).any(1).nonzero()[0, 0])
            raise KinemaError(f"{what}: frame {bad + 1} holds NaN or infinite values: check the node that made the "
                              "frames")


def _tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    t = torch.nan_to_num(t.to(device="cpu", dtype=torch.float32), nan=0.0)
    return t.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).numpy()


def to_uint8(images) -> np.ndarray:
    """``[f, h, w, c]`` float in [0, 1] (torch or numpy) -> numpy uint8, clamped and rounded.

    A single ``[h, w, c]`` image becomes one frame. uint8 input is returned as is.
    """
    if isinstance(images, torch.Tensor):
        t = images.detach()
        if t.dtype == torch.uint8:
            arr = t.cpu().numpy()
        elif t.ndim == 4 and t.shape[0] > 16:  # long videos: convert a few frames at a time
            arr = np.concatenate([_tensor_to_uint8(t[i:i + 16]) for i in range(0, t.shape[0], 16)])
        else:
            arr = _tensor_to_uint8(t)
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
                raise KinemaError(f"images must be numbers, got dtype {arr.dtype}")
            f = np.nan_to_num(arr.astype(np.float32), nan=0.0)
            arr = np.round(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise KinemaError(f"images must be [frames, height, width, channels], got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _as_rgb(frames: np.ndarray) -> np.ndarray:
    c = frames.shape[-1]
    if c == 3:
        return frames
    if c == 1:
        return np.repeat(frames, 3, axis=-1)
    if c == 4:  # video formats here carry no alpha: drop it
        return np.ascontiguousarray(frames[..., :3])
    raise KinemaError(f"images need 1, 3 or 4 channels, got {c}")


def _temp_path(path: str) -> str:
    """Create an empty hidden file next to ``path`` (normal permissions) and return its name."""
    folder, name = os.path.split(os.path.abspath(path))
    short = name.encode()[:200].decode(errors="ignore")  # the name plus 15 bytes must fit the file system's 255
    while True:
        tmp = os.path.join(folder, f".{short}.{secrets.token_hex(4)}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _frame_durations(count: int, fps: float, unit_ms: int) -> list[int]:
    """Display time of each of ``count`` frames in ms, whole multiples of ``unit_ms`` (GIF stores 1/100 s, WebP
    1 ms), so that frame ``i`` starts at ``i / fps`` rounded to the unit: at 8 fps a GIF's frames show for 120 and
    130 ms in turn (8 fps exactly, where one rounded delay would play 8.33 fps)."""
    step = 1000.0 / (fps * unit_ms)
    starts = [math.floor(i * step + 0.5) for i in range(count + 1)]
    return [max(1, b - a) * unit_ms for a, b in itertools.pairwise(starts)]


def _each(frames, on_frame):
    """The frames one by one, ``on_frame(done, total)`` called before each is handed on and after the last
    (progress; it may raise to stop the write, which then leaves no file)."""
    for i, frame in enumerate(frames):
        if on_frame is not None:
            on_frame(i, len(frames))
        yield frame
    if on_frame is not None:
        on_frame(len(frames), len(frames))


#: GIF stores frame delays in 1/100 s, and players show a delay under 2/100 s for 1/10 s: the fastest GIF rate
GIF_MAX_FPS = 50.0


def _check_gif(frames, fps) -> None:
    h, w = frames.shape[1:3]
    if max(h, w) > 65535:
        raise KinemaError(f"GIF frames can be at most 65535 pixels a side, got {w}x{h}: use mp4")
    if fps > GIF_MAX_FPS:
        raise KinemaError(f"a GIF plays at most {GIF_MAX_FPS:g} fps (its frame delays are in 1/100 s and players slow "
                          f"delays under 2/100 s down to 1/10 s), {fps:g} was asked for: use webp or mp4, or lower "
                          "the fps")
    if 100.0 / fps > 65535:
        raise KinemaError(f"a GIF frame shows at most 655.35 s, {fps:g} fps asks for {1.0 / fps:.0f} s: raise the fps")


def _lazy_frames(frames, on_frame):
    """The uint8 frames as one multi-frame Pillow image whose frames are made as the encoder seeks to them, so that
    ``on_frame(done, total)`` runs while Pillow encodes (progress, and an interrupt that stops the encode midway:
    Pillow's GIF and WebP writers take every frame before they return) and only one frame is converted at a
    time."""
    from PIL import Image

    class LazyFrames(Image.Image):
        def __init__(self):
            super().__init__()
            self.n_frames = len(frames)
            self.is_animated = self.n_frames > 1
            self._index = None
            self._reported = -1
            self.seek(0)

        def seek(self, frame):
            if not 0 <= frame < self.n_frames:
                raise EOFError(f"no frame {frame}")
            if frame == self._index:
                return
            if on_frame is not None and frame > self._reported:  # the writers seek back to 0 when done
                self._reported = frame
                on_frame(frame, self.n_frames)
            vars(self).update(vars(Image.fromarray(frames[frame], "RGB")))  # the pixels, mode and size
            self._index = frame

        def tell(self):
            return self._index

    return LazyFrames()


def _write_gif(tmp, frames, fps, loop, metadata, on_frame=None):
    kwargs = {}
    # ``loop`` is the number of plays (0 = forever); GIF stores repeats after the first play
    if loop == 0:
        kwargs["loop"] = 0
    elif loop > 1:
        kwargs["loop"] = loop - 1
    if metadata:
        kwargs["comment"] = json.dumps(metadata).encode("utf-8")
    durations = _frame_durations(len(frames), fps, 10)
    _lazy_frames(frames, on_frame).save(tmp, format="GIF", save_all=True, duration=durations, disposal=1, **kwargs)
    if on_frame is not None:
        on_frame(len(frames), len(frames))


def _webp_exif(metadata):
    from PIL import Image

    exif = Image.Exif()
    tag = _WEBP_FIRST_EXTRA_TAG
    for key, value in metadata.items():
        text = f"{key}:{json.dumps(value)}"
        if key == "prompt":
            exif[_WEBP_PROMPT_TAG] = text
        else:
            exif[tag] = text
            tag -= 1
    return exif


def _write_webp(tmp, frames, fps, loop, metadata, quality, lossless, method, on_frame=None):
    h, w = frames.shape[1:3]
    if max(h, w) > 16383:
        raise KinemaError(f"WebP frames can be at most 16383 pixels a side, got {w}x{h}: use mp4")
    kwargs = {"exif": _webp_exif(metadata)} if metadata else {}
    durations = _frame_durations(len(frames), fps, 1)
    _lazy_frames(frames, on_frame).save(tmp, format="WEBP", save_all=True, duration=durations, loop=int(loop),
                                        lossless=bool(lossless), quality=int(quality), method=int(method), **kwargs)
    if on_frame is not None:
        on_frame(len(frames), len(frames))


def _ffmpeg_exe() -> str:
    """The ffmpeg binary shipped by ``imageio-ffmpeg`` (or ``IMAGEIO_FFMPEG_EXE``)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise KinemaError("mp4 needs ffmpeg: install the Python package 'imageio-ffmpeg' "
                          "(pip install imageio-ffmpeg), or save as gif/webp") from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:
        raise KinemaError(f"mp4 needs ffmpeg and none was found ({e}): reinstall the Python package "
                          "'imageio-ffmpeg' (pip install --force-reinstall imageio-ffmpeg) or set "
                          "IMAGEIO_FFMPEG_EXE to an ffmpeg binary") from None


def _mp4_backend():
    """``("ffmpeg", exe)`` from imageio-ffmpeg, else ``("av", module)`` (PyAV, which ComfyUI ships)."""
    try:
        return "ffmpeg", _ffmpeg_exe()
    except KinemaError as missing:
        try:
            import av
        except ImportError:
            raise missing from None
        return "av", av


def _ffmeta_escape(text: str) -> str:
    for ch in ("\\", "=", ";", "#", "\n"):
        text = text.replace(ch, "\\" + ch)
    return text


def _mp4_tags(metadata: dict) -> dict[str, str]:
    tags = {}
    for key, value in metadata.items():
        key = "".join(ch for ch in str(key) if ch.isalnum() or ch in "_-")
        if key and key != "comment":
            tags[key] = json.dumps(value)
    tags["comment"] = json.dumps(metadata)
    return tags


def _write_mp4(exe, tmp, frames, fps, metadata, crf, preset, on_frame=None):
    f, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:  # yuv420p needs even sizes: repeat the last row/column
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        h, w = h + pad_h, w + pad_w
    rate = Fraction(fps).limit_denominator(1001)
    cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{rate.numerator}/{rate.denominator}",
           "-i", "-"]
    meta_file = None
    if metadata:
        fd, meta_file = tempfile.mkstemp(prefix="kinema_meta_", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(";FFMETADATA1\n")
            for key, value in _mp4_tags(metadata).items():
                fh.write(f"{_ffmeta_escape(key)}={_ffmeta_escape(value)}\n")
        cmd += ["-f", "ffmetadata", "-i", meta_file, "-map_metadata", "1"]
    cmd += ["-map", "0:v:0", "-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)),
            "-pix_fmt", "yuv420p",
           "-vf", "scale=out_color_matrix=bt709:out_range=tv,"
                  "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv",
            "-movflags", "+faststart" + ("+use_metadata_tags" if metadata else ""),
            "-f", "mp4", tmp]
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            try:
                for frame in _each(frames, on_frame):
                    try:
                        proc.stdin.write(frame.tobytes())
                    except OSError:  # ffmpeg stopped early (a broken pipe): its exit code and message tell why
                        break
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            except BaseException:  # ours (an interrupt, out of memory): ffmpeg is stopped, not waited on
                proc.kill()
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                raise
            finally:
                rc = proc.wait()
            if rc != 0:
                err.seek(0)
                message = err.read().decode("utf-8", "replace").strip()[-2000:]
                raise KinemaError(f"ffmpeg failed to write the mp4 (exit code {rc}): {message or 'no message'}")
    finally:
        if meta_file is not None:
            try:
                os.remove(meta_file)
            except OSError:
                pass


def _av_bt709(av):
    """(reformat kwargs, colour tag): BT.709 limited range where PyAV can, else BT.601 (tag 6)."""
    try:
        from av.video.reformatter import ColorRange, Colorspace

        convert = {"dst_colorspace": Colorspace.ITU709, "dst_color_range": ColorRange.MPEG}
        av.VideoFrame(2, 2, "rgb24").reformat(format="yuv420p", **convert)
        return convert, 1
    except Exception:  # old PyAV: swscale's default matrix is BT.601, so say so
        return {}, 6


def _write_mp4_av(av, tmp, frames, fps, metadata, crf, preset, on_frame=None):
    """The same mp4 as ``_write_mp4`` through PyAV (used when imageio-ffmpeg is missing)."""
    f, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        h, w = h + pad_h, w + pad_w
    rate = Fraction(fps).limit_denominator(1001)
    options = {"movflags": "+faststart" + ("+use_metadata_tags" if metadata else "")}
    stopped = []

    def report(done, total):
        try:
            if on_frame is not None:
                on_frame(done, total)
        except Exception as e:
            stopped.append(e)
            raise

    try:
        with av.open(tmp, mode="w", format="mp4", options=options) as container:
            for key, value in (_mp4_tags(metadata) if metadata else {}).items():
                container.metadata[key] = value
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(int(crf)), "preset": preset}
            convert, tag = _av_bt709(av)
            ctx = stream.codec_context
            for attr in ("color_primaries", "color_trc", "colorspace"):
                try:
                    setattr(ctx, attr, tag)
                except Exception:  # older PyAV: leave untagged
                    pass
            try:
                ctx.color_range = 1  # limited ("tv") range
            except Exception:
                pass
            for i, frame in enumerate(_each(frames, report)):
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", **convert)
                vf.pts = i
                vf.time_base = Fraction(rate.denominator, rate.numerator)
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except KinemaError:
        raise
    except Exception as e:
        if e in stopped:  # the caller's own (an interrupt), not PyAV's
            raise
        raise KinemaError(f"PyAV failed to write the mp4: {e}") from e


def write_video(path: str, images_uint8, fps: float, fmt: str, loop: int = 0, metadata: dict | None = None,
                quality: int = 90, lossless: bool = False, crf: int = 19, webp_method: int = 4,
                preset: str = "medium", on_frame: Callable[[int, int], None] | None = None,
                next_path: Callable[[], str] | None = None) -> str:
    """Write frames ``[f, h, w, 3]`` uint8 (float [0, 1] is converted) to ``path``; return the path.

    fmt: ``gif``, ``webp`` or ``mp4``. fps: frames per second (> 0).
    loop: how many times gif/webp play, 0 = forever (mp4 has no loop flag).
    metadata: a JSON-serialisable dict (ComfyUI: ``{"prompt": ..., "workflow": ...}``) or None.
    quality / lossless / webp_method: WebP encoder (quality 0-100; method 0 fast - 6 small).
    crf / preset: libx264 (crf 0 lossless - 51 worst; 17-23 is visually good).
    on_frame(done, total): called before each frame is handed to the encoder (progress); what it raises (an
    interrupt) stops the write, and no file is left.
    next_path(): a new free name, asked for when ``path`` was created by another writer while this one wrote; the
    path written is returned. None: a file at ``path`` is replaced.
    """
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise KinemaError(f"Unknown video format '{fmt}': choose one of {', '.join(FORMATS)}")
    frames = _as_rgb(to_uint8(images_uint8))
    if frames.shape[0] == 0:
        raise KinemaError("No frames to write: the image batch is empty")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise KinemaError(f"Frames have no pixels (shape {tuple(frames.shape)})")
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise KinemaError(f"fps must be a number, got {fps!r}") from None
    if not math.isfinite(fps) or fps <= 0:
        raise KinemaError(f"fps must be a positive number, got {fps}")
    loop = int(loop)
    if loop < 0:
        raise KinemaError(f"loop must be 0 (forever) or a positive play count, got {loop}")
    if metadata:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise KinemaError(f"metadata must be JSON-serialisable: {e}") from None
    backend = None
    if fmt == "mp4":
        backend = _mp4_backend()  # fail before creating anything
        if not 0 <= int(crf) <= 51:
            raise KinemaError(f"crf must be in 0..51, got {crf}")
    if fmt == "gif":
        _check_gif(frames, fps)
    if fmt == "webp" and not 0 <= int(quality) <= 100:
        raise KinemaError(f"quality must be in 0..100, got {quality}")

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise KinemaError(f"Output folder '{folder}' does not exist")
    tmp = _temp_path(path)
    try:
        if fmt == "gif":
            _write_gif(tmp, frames, fps, loop, metadata, on_frame)
        elif fmt == "webp":
            _write_webp(tmp, frames, fps, loop, metadata, quality, lossless, webp_method, on_frame)
        elif backend[0] == "ffmpeg":
            _write_mp4(backend[1], tmp, frames, fps, metadata, crf, preset, on_frame)
        else:
            _write_mp4_av(backend[1], tmp, frames, fps, metadata, crf, preset, on_frame)
        if os.path.getsize(tmp) == 0:
            raise KinemaError(f"Writing '{os.path.basename(path)}' produced an empty file")
        path = _place(tmp, path, next_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def _place(tmp: str, path: str, next_path: Callable[[], str] | None) -> str:
    """Move the finished ``tmp`` to ``path`` (or, given ``next_path``, to the first of its names no file holds: a
    hard link claims a name only where none is, so two writers never replace each other's files); the path."""
    while next_path is not None:
        try:
            os.link(tmp, path)
        except OSError as e:  # the name is taken, or no hard links on this file system (FAT, some network shares)
            if isinstance(e, FileExistsError) or os.path.lexists(path):
                path = os.path.abspath(next_path())
                continue
            break  # free, without hard links: replace
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return path
    os.replace(tmp, path)
    return path


def _parse_json(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def read_video_metadata(path: str) -> dict | None:
    """The metadata dict ``write_video`` stored in a gif/webp/mp4 file, or None if it has none."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".gif", ".webp"):
        from PIL import Image

        with Image.open(path) as im:
            if ext == ".gif":
                comment = im.info.get("comment")
                if not comment:
                    return None
                value = _parse_json(comment.decode("utf-8", "replace") if isinstance(comment, bytes) else comment)
                return value if isinstance(value, dict) else {"comment": value}
            exif = im.getexif()
            out = {}
            for tag in [_WEBP_PROMPT_TAG] + list(range(_WEBP_FIRST_EXTRA_TAG, 0, -1)):
                text = exif.get(tag)
                if not isinstance(text, str) or ":" not in text:
                    if tag != _WEBP_PROMPT_TAG:
                        break
                    continue
                key, _, value = text.partition(":")
                out[key] = _parse_json(value)
            return out or None
    if ext in (".mp4", ".mov", ".m4v"):
        kind, tool = _mp4_backend()
        if kind == "ffmpeg":
            proc = subprocess.run([tool, "-hide_banner", "-loglevel", "error", "-i", path, "-f", "ffmetadata", "-"],
                                  capture_output=True)
            if proc.returncode != 0:
                raise KinemaError(f"ffmpeg could not read '{path}': "
                                  f"{proc.stderr.decode('utf-8', 'replace')[-500:]}")
            tags = _parse_ffmetadata(proc.stdout.decode("utf-8", "replace"))
        else:
            with tool.open(path) as container:
                tags = dict(container.metadata)
        if "comment" in tags:
            value = _parse_json(tags["comment"])
            if isinstance(value, dict):
                return value
        wanted = {k: _parse_json(v) for k, v in tags.items() if k in ("prompt", "workflow")}
        return wanted or None
    raise KinemaError(f"Cannot read metadata from '{path}': not a gif, webp or mp4 file")


def _parse_ffmetadata(text: str) -> dict[str, str]:
    """Global ``key=value`` tags of ffmpeg's FFMETADATA text (backslash escapes, escaped newlines)."""
    tags: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        if text[i] in ";#[\n":  # comment, section header (streams/chapters: ignored) or blank line
            if text[i] == "[":
                break  # only the global section is wanted
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        parts, cur, seen_eq = [[], []], 0, False
        while i < n:
            ch = text[i]
            i += 1
            if ch == "\\" and i < n:
                parts[cur].append(text[i])
                i += 1
            elif ch == "=" and not seen_eq:
                seen_eq, cur = True, 1
            elif ch == "\n":
                break
            else:
                parts[cur].append(ch)
        if seen_eq:
            tags["".join(parts[0])] = "".join(parts[1])
    return tags


# --- reading --------------------------------------------------------------------------------
#: Extensions ``read_video`` reads: animated images through Pillow, videos through ffmpeg / PyAV.
IMAGE_SEQUENCE_EXTENSIONS: tuple[str, ...] = (".gif", ".webp", ".png", ".apng")
MOVIE_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".m4v")
READ_EXTENSIONS: tuple[str, ...] = MOVIE_EXTENSIONS + IMAGE_SEQUENCE_EXTENSIONS
#: The frame rate assumed when a file does not say (browsers show a GIF frame without a delay for 0.1 s).
DEFAULT_FPS = 10.0


def _supported() -> str:
    return ", ".join(e.lstrip(".") for e in READ_EXTENSIONS)


def _have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fps_or_default(fps) -> float:
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        return DEFAULT_FPS
    return fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def _frame_delays(path: str) -> list[float]:
    """The display time of each frame of an animated GIF / WebP / PNG in ms (0 where the file gives none)."""
    from PIL import Image, ImageSequence

    delays = []
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            frame.load()  # WebP fills in the delay only once a frame is loaded
            d = frame.info.get("duration")
            delays.append(float(d) if isinstance(d, (int, float)) and d > 0 else 0.0)
    return delays


#: how far (in units) a delay may be from a whole number of units and still count as one (GIF's 1/100 s steps)
_UNIT_SLACK = 0.15
#: at most this many frames out for each frame in when frames are repeated to a constant rate
_MAX_REPEAT = 4


def constant_rate(delays: list[float]) -> tuple[float | None, list[int]]:
    """``(fps, copies)``: an animation whose frames show for ``delays`` ms as frames at one constant rate, each
    frame ``copies[i]`` times.

    Encoders merge repeated frames into one longer frame (Pillow's GIF and WebP writers do), and animations hold
    some frames longer: when every delay is a whole number of the shortest one, each frame is repeated that many
    times at the shortest delay's rate, so the frames play as they did (a video whose frames are all the same is
    one frame in the file, and reads back as that one frame). Otherwise (uneven delays, or more than ``_MAX_REPEAT`` frames out a frame in) each frame is
    kept once, at the mean rate, so the video lasts as long. A missing delay counts as the shortest one; no delay
    at all: ``(None, [1, ...])``.
    """
    known = [d for d in delays if d > 0]
    if not known:
        return None, [1] * len(delays)
    shortest = min(known)
    delays = [d if d > 0 else shortest for d in delays]
    # the delays are stored rounded (GIF: to 1/100 s). A writer that keeps the mean rate, as Save Video does,
    # rounds each frame's start, so every delay is less than a step from a whole number of frame times, and the
    # frame time is at least the shortest delay and less than a step more
    step = 10.0 if all(d % 10 == 0 for d in known) else 1.0
    for k in range(9, -1, -1):  # the longest frame time that fits: the fewest repeats
        unit = shortest + step * k / 10
        copies = [max(1, round(d / unit)) for d in delays]
        if all(abs(d - c * unit) < step or abs(d - c * unit) <= _UNIT_SLACK * unit for d, c in zip(delays, copies)) \
                and sum(copies) <= _MAX_REPEAT * len(delays):
            return 1000.0 * sum(copies) / sum(delays), copies
    return 1000.0 * len(delays) / sum(delays), [1] * len(delays)


def _repeated(frames, copies: list[int]):
    for frame, n in zip(frames, copies):
        for _ in range(n):
            yield frame


@functools.lru_cache(maxsize=1)
def _passthrough_option() -> tuple[str, str]:
    """ffmpeg output options that hand on every decoded frame once, at its own time (never duplicated to a
    constant rate: a variable-frame-rate phone video otherwise reads with repeated frames): ``-fps_mode`` since
    ffmpeg 5.1, ``-vsync`` before (ffmpeg 9 no longer knows it)."""
    import imageio_ffmpeg

    try:
        version = imageio_ffmpeg.get_ffmpeg_version()
    except (RuntimeError, OSError):  # no ffmpeg binary: the read that follows says so
        version = ""
    m = re.match(r"n?(\d+)\.(\d+)", version or "")
    old = m is not None and (int(m.group(1)), int(m.group(2))) < (5, 1)
    return ("-vsync", "passthrough") if old else ("-fps_mode", "passthrough")


def _announced(seconds, fps) -> float | None:
    """The frame count a movie's header announces (duration x rate), None when it does not say."""
    try:
        count = float(seconds) * float(fps)
    except (TypeError, ValueError):
        return None
    return count if math.isfinite(count) and count > 0 else None


def _open_frames(path: str, ext: str):
    """``(fps, frames, close, announced)``: the file's frame rate, an iterator of uint8 ``[h, w, 3]`` frames, its
    closer, and the frame count the file announces (None when it does not say; fewer frames decoded than
    announced: the file is cut short).

    Every decoded frame once, at the file's mean frame rate (variable-rate movies are not padded to a constant
    rate); animated images at the rate of ``constant_rate``. imageio's v3 API when installed (Pillow plugin for
    animated images, ffmpeg for movies); PyAV, then Pillow, directly otherwise (what a bare ComfyUI has).
    """
    try:
        import imageio.v3 as iio
    except ImportError:
        iio = None
    if ext in IMAGE_SEQUENCE_EXTENSIONS:
        from PIL import Image

        fps, copies = constant_rate(_frame_delays(path))
        with Image.open(path) as image:
            deep = image.mode.startswith(("I", "F"))  # 16-bit gray (an APNG depth pass): convert("RGB") clips it
        if iio is not None and not deep:
            frames = iio.imiter(path, plugin="pillow", mode="RGB")
            return _fps_or_default(fps), _repeated(frames, copies), frames.close, sum(copies)
        from PIL import ImageSequence

        image = Image.open(path)
        frames = (_pillow_rgb(fr) for fr in ImageSequence.Iterator(image))
        return _fps_or_default(fps), _repeated(frames, copies), image.close, sum(copies)
    if iio is not None and _have("imageio_ffmpeg"):
        meta = iio.immeta(path, plugin="FFMPEG")
        fps = meta.get("fps")  # ffmpeg's mean rate: frames / duration
        frames = iio.imiter(path, plugin="FFMPEG", output_params=list(_passthrough_option()))
        return _fps_or_default(fps), frames, frames.close, _announced(meta.get("duration"), fps)
    if _have("av"):
        import av

        container = av.open(path)
        try:
            stream = container.streams.video[0]
        except IndexError:
            container.close()
            raise KinemaError(f"'{os.path.basename(path)}' has no video stream") from None
        fps = stream.average_rate or stream.guessed_rate
        frames = (_upright(frame) for frame in container.decode(stream))
        seconds = None if stream.duration is None or stream.time_base is None else stream.duration * stream.time_base
        return _fps_or_default(fps), frames, container.close, stream.frames or _announced(seconds, fps)
    raise KinemaError("reading mp4/webm/mov/mkv needs ffmpeg: install the Python packages 'imageio' and "
                      "'imageio-ffmpeg' (pip install imageio imageio-ffmpeg) or 'av', or use a gif/webp/png clip")


def _pillow_rgb(frame) -> np.ndarray:
    """One Pillow frame as ``[h, w, 3]``: uint8, or floats in [0, 1] for 16-bit and float grayscale."""
    if frame.mode.startswith(("I", "F")):
        return _high_depth_gray(np.asarray(frame), frame.mode)[0].numpy()
    return np.asarray(frame.convert("RGB"))


def _upright(frame) -> np.ndarray:
    """A PyAV frame as uint8 ``[h, w, 3]``, turned by its display matrix as ffmpeg shows it (a phone's portrait
    video is stored sideways with a rotation: PyAV, unlike the ffmpeg binary, does not apply it)."""
    arr = frame.to_ndarray(format="rgb24")
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # degrees counter-clockwise
    return np.ascontiguousarray(np.rot90(arr, turns)) if turns else arr


def _floor8(v: int) -> int:
    return v // 8 * 8


def target_size(src_w: int, src_h: int, width: int = 0, height: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((scaled_w, scaled_h), (out_w, out_h))``: the size frames are scaled to, then centre-cropped to.

    - ``width`` and ``height`` 0: no scaling; crop to multiples of 8.
    - one of them 0: scale so the given side matches, keeping the aspect ratio.
    - both given: scale (keeping the aspect ratio) to cover ``width x height``,
      then crop the overflow (nothing is stretched).
    The crop is always to multiples of 8 (rounded down), as the VAE needs.
    """
    if width and height:
        s = max(width / src_w, height / src_h)
        scaled = (max(width, round(src_w * s)), max(height, round(src_h * s)))
        want = (width, height)
    elif width:
        scaled = (width, max(1, round(src_h * width / src_w)))
        want = scaled
    elif height:
        scaled = (max(1, round(src_w * height / src_h)), height)
        want = scaled
    else:
        scaled = want = (src_w, src_h)
    return scaled, (_floor8(want[0]), _floor8(want[1]))


def _int_option(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise KinemaError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < minimum:
        raise KinemaError(f"{name} must be at least {minimum}, got {value}")
    return value


def read_video(path: str, frame_load_cap: int = 0, skip_first_frames: int = 0, select_every_nth: int = 1,
               width: int = 0, height: int = 0,
               on_frame: Callable[[int], None] | None = None) -> tuple[torch.Tensor, float]:
    """Read a video file as IMAGE frames ``[f, h, w, 3]`` float32 in [0, 1], and its frame rate.

    Frames: skip ``skip_first_frames``, then keep every ``select_every_nth``
    frame, stop after ``frame_load_cap`` kept frames (0 = all). The file is
    decoded only up to the last frame kept.

    Size: see ``target_size`` (``width``/``height`` 0 = keep; the result is
    always a multiple of 8 on both sides, centre-cropped). Scaling uses Pillow's
    Lanczos filter. Alpha is dropped.

    Returns ``(frames, fps)``; fps is the rate of the frames returned (the
    file's rate divided by ``select_every_nth``), so they play at the original
    speed. ``on_frame(n)`` is called after each kept frame (progress, interrupts).
    """
    frame_load_cap = _int_option("frame_load_cap", frame_load_cap, 0)
    skip_first_frames = _int_option("skip_first_frames", skip_first_frames, 0)
    select_every_nth = _int_option("select_every_nth", select_every_nth, 1)
    width = _int_option("width", width, 0)
    height = _int_option("height", height, 0)
    for name, v in (("width", width), ("height", height)):
        if 0 < v < 8:
            raise KinemaError(f"{name} must be 0 (keep) or at least 8, got {v}")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise KinemaError("No video file given")
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise KinemaError(f"Video file '{path}' not found")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READ_EXTENSIONS:
        raise KinemaError(f"'{name}' is not a video file Kinema reads: use one of {_supported()}")
    from PIL import Image

    kept: list[np.ndarray] = []
    seen = 0
    size = None
    stopped: BaseException | None = None
    try:
        fps, frames, close, announced = _open_frames(path, ext)
        try:
            for index, frame in enumerate(frames):
                seen = index + 1
                if index < skip_first_frames or (index - skip_first_frames) % select_every_nth:
                    continue
                frame = _as_rgb(to_uint8(np.asarray(frame)))[0]
                if size is None:
                    src_h, src_w = frame.shape[:2]
                    size = target_size(src_w, src_h, width, height)
                    (sw, sh), (ow, oh) = size
                    if ow < 8 or oh < 8:
                        raise KinemaError(
                            f"'{name}' is {src_w}x{src_h}: scaled to {sw}x{sh} that leaves no 8x8 block "
                            "(frames are cropped to multiples of 8); choose a bigger custom width/height")
                (sw, sh), (ow, oh) = size
                if frame.shape[:2] != (sh, sw):
                    frame = np.asarray(Image.fromarray(frame).resize((sw, sh), Image.LANCZOS))
                top, left = (sh - oh) // 2, (sw - ow) // 2
                kept.append(np.ascontiguousarray(frame[top:top + oh, left:left + ow]))
                if on_frame is not None:
                    try:
                        on_frame(len(kept))
                    except BaseException as e:  # the caller's (an interrupt): raised as is, below
                        stopped = e
                        break
                if frame_load_cap and len(kept) >= frame_load_cap:
                    break
            else:  # decoded to the end: as many frames as the file announces?
                if announced and seen < 0.9 * announced - 1:
                    logger.warning("'%s': %d frames decoded where the file announces about %d: it looks cut short "
                                   "(an unfinished download or export); the frames read are used", name, seen,
                                   round(announced))
        finally:
            close()
    except KinemaError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split("\n")[0].split())[:300] or type(e).__name__
        raise KinemaError(f"Cannot read '{name}' as a video ({detail}). Kinema reads {_supported()}; "
                          "is the file complete and really in that format?") from e
    if stopped is not None:
        raise stopped
    if not kept:
        if seen == 0:
            raise KinemaError(f"'{name}' holds no frames")
        raise KinemaError(f"No frames left from '{name}': it has {seen} frame{'s' if seen != 1 else ''}, "
                          f"skip_first_frames is {skip_first_frames}"
                          + (f" and select_every_nth {select_every_nth}" if select_every_nth > 1 else ""))
    images = torch.from_numpy(np.stack(kept)).float().div_(255.0)
    return images, round(fps / select_every_nth, 4)


#: Still-image files ``read_image`` reads (through Pillow).
STILL_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def read_image(path: str) -> torch.Tensor:
    """Read a still image as an IMAGE ``[1, h, w, 3]`` float32 in [0, 1] (the first frame of an animated file;
    EXIF orientation applied; alpha dropped, transparent parts taken as they are stored)."""
    from PIL import Image, ImageOps

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise KinemaError("No image file given")
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise KinemaError(f"Image file '{path}' not found")
    if not path.lower().endswith(STILL_IMAGE_EXTENSIONS):
        raise KinemaError(f"'{name}' is not an image file Kinema reads: use one of "
                          f"{', '.join(e.lstrip('.') for e in STILL_IMAGE_EXTENSIONS)}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith(("I", "F")):  # 16/32-bit grayscale: convert("RGB") would clip it to 255
                return _high_depth_gray(np.asarray(im), im.mode)
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        detail = " ".join(str(e).split("\n")[0].split())[:300] or type(e).__name__
        raise KinemaError(f"Cannot read '{name}' as an image ({detail}): is the file complete?") from e
    return torch.from_numpy(arr.copy()).float().div_(255.0)[None]


def _high_depth_gray(arr: np.ndarray, mode: str) -> torch.Tensor:
    """A grayscale image of PIL mode ``I;16*`` / ``I`` / ``F`` as an IMAGE ``[1, h, w, 3]`` in [0, 1], scaled by its
    bit depth: 16-bit integers (16-bit PNG/TIFF, PIL mode I or I;16) by 65535, wider integers by 2^32 - 1; floats
    as stored when they lie in [0, 1], else by the 8- or 16-bit range their maximum fits."""
    values = arr.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if mode == "F":
        scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    else:
        scale = 65535.0 if top <= 65535.0 else 4294967295.0
    gray = torch.from_numpy(np.nan_to_num(values / scale, nan=0.0).clip(0.0, 1.0).astype(np.float32))
    return gray[None, :, :, None].expand(-1, -1, -1, 3).contiguous()
