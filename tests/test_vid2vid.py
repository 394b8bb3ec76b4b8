"""Video-to-video: reading clips (models/video_io.read_video), Load Video and VAE Encode Frames nodes, sampling."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, load_pack
from kinema.models import demo_media, video_io
from kinema.models.errors import KinemaError

FORMATS = ["gif", "webp", pytest.param("mp4", marks=pytest.mark.skipif(
    not (shutil.which("ffmpeg") or __import__("importlib").util.find_spec("imageio_ffmpeg")),
    reason="no ffmpeg (imageio-ffmpeg) to read mp4"))]
# how far a decoded frame may be from what was written (mp4 is lossy; gif/webp flat greys are exact)
TOLERANCE = {"gif": 1 / 255, "webp": 1 / 255, "mp4": 12 / 255}


def _grey_clip(frames=10, w=56, h=40):
    """Frame i is a flat grey of level 20 * i + 10: which frames were read is visible from their means."""
    levels = (np.arange(frames) * 20 + 10).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, h, w, 3)).copy()


def _write(tmp_path, fmt, clip=None, fps=12.0, name="clip"):
    clip = _grey_clip() if clip is None else clip
    kwargs = {"lossless": True} if fmt == "webp" else {}
    return video_io.write_video(str(tmp_path / f"{name}.{fmt}"), clip, fps, fmt, **kwargs)


def _levels(images):
    return (images.mean(dim=(1, 2, 3)) * 255).round().tolist()


@pytest.fixture()
def input_dir(tmp_path):
    from kinema.nodes import host

    folder = tmp_path / "input"
    folder.mkdir()
    host.set_input_dir(str(folder))
    yield folder
    host.set_input_dir(None)


# -- read_video ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_read_video_reads_every_frame_and_the_rate(tmp_path, fmt):
    path = _write(tmp_path, fmt, fps=12.5)
    images, fps = video_io.read_video(path)
    assert images.dtype == torch.float32 and images.shape == (10, 40, 56, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    want = torch.from_numpy(_grey_clip()).float() / 255
    assert (images - want).abs().mean() <= TOLERANCE[fmt]
    assert fps == pytest.approx(12.5, rel=0.04)  # webp stores whole milliseconds per frame


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_nth_and_cap_select_frames(tmp_path, fmt):
    path = _write(tmp_path, fmt, fps=12.5)
    images, fps = video_io.read_video(path, frame_load_cap=3, skip_first_frames=1, select_every_nth=2)
    assert images.shape[0] == 3
    assert _levels(images) == pytest.approx([30, 70, 110], abs=255 * TOLERANCE[fmt])  # frames 1, 3, 5
    assert fps == pytest.approx(6.25, rel=0.04)  # the rate of the frames returned: every 2nd of 12.5 fps
    images, _ = video_io.read_video(path, skip_first_frames=8)
    assert _levels(images) == pytest.approx([170, 190], abs=255 * TOLERANCE[fmt])


def test_a_frame_cap_stops_decoding(tmp_path, monkeypatch):
    import imageio.v3 as iio

    path = _write(tmp_path, "gif")
    pulled = []
    real = iio.imiter

    def counting(*args, **kwargs):
        for frame in real(*args, **kwargs):
            pulled.append(1)
            yield frame

    monkeypatch.setattr(iio, "imiter", counting)
    images, _ = video_io.read_video(path, frame_load_cap=2, skip_first_frames=1)
    assert images.shape[0] == 2 and len(pulled) == 3


@pytest.mark.parametrize("fmt", ["gif", "webp", pytest.param("mp4", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("av"), reason="PyAV is not installed"))])
def test_read_video_without_imageio_uses_pillow_and_pyav(tmp_path, fmt, monkeypatch):
    """A bare ComfyUI has Pillow and PyAV but not imageio: reading still works, with the same results."""
    import sys

    path = _write(tmp_path, fmt, fps=12.5)
    want, want_fps = video_io.read_video(path, frame_load_cap=3, skip_first_frames=1, width=64)
    for name in [m for m in sys.modules if m == "imageio" or m.startswith("imageio.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "imageio", None)  # import imageio -> ImportError
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    got, fps = video_io.read_video(path, frame_load_cap=3, skip_first_frames=1, width=64)
    assert got.shape == want.shape and (got - want).abs().mean() <= TOLERANCE[fmt]
    assert fps == pytest.approx(want_fps, rel=0.01)
    broken = tmp_path / f"broken.{fmt}"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(KinemaError, match="broken"):
        video_io.read_video(str(broken))


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_held_frames_read_back_as_every_frame_at_the_rate(tmp_path, fmt):
    """Pillow merges repeated frames into one longer frame when it writes a GIF or WebP: reading repeats them
    to the file's shortest delay, so a video reads back frame for frame at its rate (a video of one still frame
    is one frame in the file: it reads back as that one frame)."""
    clip = _grey_clip()[[0, 0, 1, 2, 2, 2, 3, 4]]
    images, fps = video_io.read_video(_write(tmp_path, fmt, clip, fps=8.0))
    assert _levels(images) == pytest.approx([10, 10, 30, 50, 50, 50, 70, 90], abs=1)
    assert fps == pytest.approx(8.0, rel=0.05)
    still, _ = video_io.read_video(_write(tmp_path, fmt, _grey_clip()[[3] * 8], fps=8.0, name="still"))
    assert still.shape[0] == 1


def test_constant_rate_of_frame_delays():
    assert video_io.constant_rate([125, 250, 125, 375]) == (8.0, [1, 2, 1, 3])
    assert video_io.constant_rate([120, 250]) == (pytest.approx(1000 * 3 / 370), [1, 2])  # GIF's 1/100 s steps
    assert video_io.constant_rate([100, 0, 100]) == (10.0, [1, 1, 1])  # a missing delay: the shortest
    assert video_io.constant_rate([40, 0, 40]) == (25.0, [1, 1, 1])  # (not GIF's customary 100 ms)
    # uneven delays, or too many repeats: each frame once, lasting as long as the file
    assert video_io.constant_rate([30, 40, 30]) == (pytest.approx(30.0), [1, 1, 1])
    assert video_io.constant_rate([20, 400, 20, 400]) == (pytest.approx(4000 / 840), [1, 1, 1, 1])
    # Save Video's GIFs: each frame starts at its time rounded to 1/100 s, and a repeated frame is stored once with
    # the delays of its copies added (15 fps: 70 and 60 ms in turn, a frame held twice 130 ms)
    assert video_io.constant_rate([70, 130, 70, 60, 70]) == (pytest.approx(15.0), [1, 2, 1, 1, 1])
    assert video_io.constant_rate([30, 50, 20]) == (pytest.approx(40.0), [1, 2, 1])  # 40 fps: 30, 20, ... a hold
    assert video_io.constant_rate([0, 0]) == (None, [1, 1])


def test_constant_rate_allows_exactly_four_frames_out_for_each_frame_in():
    """The repeat limit is inclusive: 100 and 700 ms are 1 + 7 = 8 frames of 100 ms for 2 in (4 each), so 10 fps;
    100 and 800 ms (9 for 2) keep each frame once at the mean rate, 2 frames in 0.9 s."""
    assert video_io.constant_rate([100, 700]) == (pytest.approx(10.0), [1, 7])
    assert video_io.constant_rate([100, 800]) == (pytest.approx(2000 / 900), [1, 1])


def test_an_animation_without_frame_delays_reads_at_10_fps(tmp_path):
    """A GIF whose frames carry no delay plays at 10 fps in browsers (0.1 s a frame): read at that rate."""
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    path = str(tmp_path / "no_delay.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    images, fps = video_io.read_video(path)
    assert images.shape == (3, 16, 16, 3) and fps == 10.0


def test_variable_frame_rate_mp4_reads_each_frame_once_at_its_mean_rate(tmp_path):
    """A phone's variable-rate video: every decoded frame once (not padded with repeats to a constant rate),
    at ffmpeg's mean rate, so the frames last as long as the video."""
    import subprocess

    import imageio_ffmpeg

    path = str(tmp_path / "vfr.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc=size=64x48:rate=10", "-frames:v", "20",
                    "-vf", "setpts='if(lt(N,10),N,10+(N-10)*4)/10/TB'", video_io._passthrough_option()[0], "vfr",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", path], check=True)
    images, fps = video_io.read_video(path)
    assert images.shape[0] == 20
    assert all(float((images[i] - images[i - 1]).abs().max()) > 0 for i in range(1, 20))  # no repeats
    assert images.shape[0] / fps == pytest.approx(4.0, rel=0.05)  # 10 frames at 10 fps, 10 at 2.5 fps


def test_a_movie_cut_short_reads_with_a_warning(tmp_path, caplog):
    """An mp4 with its index first (faststart) and its data cut off decodes the frames before the cut: they are
    used, with a warning that the file looks cut short. A whole file gives none."""
    import logging
    import subprocess

    import imageio_ffmpeg

    path = tmp_path / "whole.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                    "-i", "testsrc=size=64x48:rate=24", "-frames:v", "60", "-pix_fmt", "yuv420p", "-c:v", "libx264",
                    "-movflags", "+faststart", str(path)], check=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with caplog.at_level(logging.WARNING, logger="kinema"):
        whole, _ = video_io.read_video(str(path))
        assert whole.shape[0] == 60 and "cut short" not in caplog.text
        part, _ = video_io.read_video(str(cut))
    assert 0 < part.shape[0] < 60
    assert f"'cut.mp4': {part.shape[0]} frames decoded where the file announces about 60" in caplog.text


def test_an_interrupt_while_reading_is_not_reported_as_a_bad_file(tmp_path):
    path = _write(tmp_path, "gif")

    def stop(n):
        if n == 2:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError, match="stop"):
        video_io.read_video(path, on_frame=stop)


@pytest.mark.parametrize("src, req, scaled, out", [
    ((56, 40), (0, 0), (56, 40), (56, 40)),
    ((60, 44), (0, 0), (60, 44), (56, 40)),      # no scaling; centre-crop to multiples of 8
    ((60, 44), (64, 0), (64, 47), (64, 40)),     # width given: keep aspect, crop the height
    ((60, 44), (0, 32), (44, 32), (40, 32)),     # height given
    ((60, 44), (64, 64), (87, 64), (64, 64)),    # both: scale to cover, crop the overflow
    ((128, 128), (100, 60), (100, 100), (96, 56)),  # sizes that are no multiple of 8 round down
])
def test_target_size_rules(src, req, scaled, out):
    assert video_io.target_size(*src, *req) == (scaled, out)


def test_read_video_resizes_and_crops_to_multiples_of_8(tmp_path):
    clip = np.zeros((2, 44, 60, 3), np.uint8)
    clip[:, :, 30:] = 255  # left half black, right half white: the crop stays centred
    clip[1, :, 30:] = 250  # (identical frames would be merged into one by the WebP encoder)
    path = _write(tmp_path, "webp", clip)
    images, _ = video_io.read_video(path)
    assert images.shape == (2, 40, 56, 3)
    assert images[:, :, :28].max() < 0.05 and images[:, :, 28:].min() > 0.95
    for (w, h), shape in (((64, 0), (2, 40, 64, 3)), ((0, 32), (2, 32, 40, 3)), ((64, 64), (2, 64, 64, 3))):
        images, _ = video_io.read_video(path, width=w, height=h)
        assert images.shape == shape
        assert abs(images[:, :, : shape[2] // 2 - 2].mean()) < 0.05 and images[:, :, shape[2] // 2 + 2:].min() > 0.9


def test_read_video_crops_rows_from_the_middle(tmp_path):
    """Top half black, bottom half white: scaled 60x44 -> 64x47 and cropped to 64x40, 3 rows off the top and 4
    off the bottom, so the edge (row 23.5 of the scaled frame) sits at row 20.5, not at the uncropped 23.5."""
    clip = np.zeros((2, 44, 60, 3), np.uint8)
    clip[:, 22:] = 255
    clip[1, 22:] = 250  # (identical frames would be merged into one by the WebP encoder)
    images, _ = video_io.read_video(_write(tmp_path, "webp", clip), width=64)
    assert images.shape == (2, 40, 64, 3)
    rows = images[0, :, :, 0].mean(dim=1)
    edge = int((rows > 0.5).nonzero()[0])  # the first bright row
    assert edge in (20, 21) and float(rows[:18].max()) < 0.05 and float(rows[23:].min()) > 0.9


def test_read_video_reads_animated_png(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (16, 24), (v, v, v)) for v in (0, 100, 200)]
    path = str(tmp_path / "clip.png")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125)
    images, fps = video_io.read_video(path)
    assert images.shape == (3, 24, 16, 3) and _levels(images) == [0, 100, 200] and fps == pytest.approx(8.0)


@pytest.mark.parametrize("ext, data", [
    (".gif", b"GIF89a\x10\x00 not really a gif"),
    (".webp", b"RIFF\x00\x00\x00\x00WEBPVP8 broken"),
    (".mp4", b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64),
    (".png", b"\x89PNG\r\n\x1a\n truncated"),
])
def test_corrupt_files_name_the_file_and_the_formats(tmp_path, ext, data):
    path = tmp_path / f"broken{ext}"
    path.write_bytes(data)
    with pytest.raises(KinemaError, match=rf"broken\{ext}.*gif, webp"):
        video_io.read_video(str(path))


def test_bad_inputs_raise_kinema_errors(tmp_path):
    with pytest.raises(KinemaError, match="not found"):
        video_io.read_video(str(tmp_path / "missing.gif"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(KinemaError, match="notes.txt.*mp4"):
        video_io.read_video(str(tmp_path / "notes.txt"))
    path = _write(tmp_path, "gif")
    with pytest.raises(KinemaError, match="No frames left.*10 frames.*skip_first_frames is 10"):
        video_io.read_video(path, skip_first_frames=10)
    for kwargs, message in (({"frame_load_cap": -1}, "frame_load_cap"), ({"select_every_nth": 0}, "select_every_nth"),
                            ({"skip_first_frames": 1.5}, "whole number"), ({"width": 4}, "at least 8"),
                            ({"height": -8}, "height")):
        with pytest.raises(KinemaError, match=message):
            video_io.read_video(path, **kwargs)
    tiny = _write(tmp_path, "gif", np.zeros((2, 4, 4, 3), np.uint8), name="tiny")
    with pytest.raises(KinemaError, match="multiples of 8"):
        video_io.read_video(tiny)


# -- the bundled clip ------------------------------------------------------------------------------------------------

def test_bundled_demo_clip_is_what_the_generator_makes():
    path = os.path.join(ROOT, "workflows", "inputs", demo_media.DEMO_CLIP_NAME)
    assert os.path.getsize(path) < 300_000
    images, fps = video_io.read_video(path)
    want = demo_media.demo_clip_frames()
    assert want.shape == (demo_media.DEMO_CLIP_FRAMES, demo_media.DEMO_CLIP_SIZE, demo_media.DEMO_CLIP_SIZE, 3)
    assert np.array_equal(video_io.to_uint8(images), want)  # lossless: regenerate with python -m models.demo_media
    assert fps == pytest.approx(demo_media.DEMO_CLIP_FPS)


def test_demo_clip_is_deterministic_and_moves():
    a, b = demo_media.demo_clip_frames(8, 64), demo_media.demo_clip_frames(8, 64)
    assert np.array_equal(a, b)
    assert all(not np.array_equal(a[i], a[i + 1]) for i in range(7))
    assert max(demo_media._triangle(t, 5, 10) for t in range(5)) == 10  # an odd period reaches its top, not past


# -- Load Video node -------------------------------------------------------------------------------------------------

def test_load_video_lists_the_input_folder_and_the_bundled_clip(input_dir, tmp_path):
    from PIL import Image

    from kinema.nodes.video_input import KinemaLoadVideo

    (input_dir / "sub").mkdir()
    _write(input_dir / "sub", "gif", name="walk")
    _write(input_dir, "webp", name="b_clip")
    Image.new("RGB", (8, 8)).save(input_dir / "still.png")  # a plain image, not a video
    frames = [Image.new("RGB", (8, 8), (v, 0, 0)) for v in (0, 255)]
    frames[0].save(input_dir / "anim.png", save_all=True, append_images=frames[1:])
    (input_dir / "notes.txt").write_text("x")
    (input_dir / ".hidden.gif").write_bytes(b"x")
    options, opts = KinemaLoadVideo.INPUT_TYPES()["required"]["video"]
    assert options == ["anim.png", "b_clip.webp", "sub/walk.gif", "kinema_demo_clip.webp"]
    assert opts.get("video_upload") is True
    spec = KinemaLoadVideo.INPUT_TYPES()["required"]
    assert all(o.get("tooltip") for _, o in spec.values())
    assert KinemaLoadVideo.CATEGORY == "Kinema/video" and KinemaLoadVideo.DESCRIPTION
    assert load_pack().NODE_DISPLAY_NAME_MAPPINGS["KinemaLoadVideo"] == "Load Video (Kinema)"


def test_load_video_node_loads_frames(input_dir):
    from kinema.nodes.video_input import KinemaLoadVideo

    (input_dir / "sub").mkdir()
    _write(input_dir / "sub", "gif", name="walk", fps=12.5)
    images, count, fps = KinemaLoadVideo().load("sub/walk.gif", frame_load_cap=4, skip_first_frames=2,
                                                select_every_nth=1, custom_width=64, custom_height=0)
    assert images.shape == (4, 40, 64, 3) and count == 4 and fps == pytest.approx(12.5)
    assert KinemaLoadVideo.VALIDATE_INPUTS("sub/walk.gif") is True


def test_load_video_counts_the_frames_it_read_not_the_cap(input_dir):
    from kinema.nodes.video_input import KinemaLoadVideo

    _write(input_dir, "gif", name="short")  # 10 frames
    images, count, _ = KinemaLoadVideo().load("short.gif", frame_load_cap=25, skip_first_frames=3)
    assert images.shape[0] == count == 7


def test_load_video_stops_on_cancel_while_decoding(input_dir, monkeypatch):
    from kinema.nodes import host
    from kinema.nodes.video_input import KinemaLoadVideo

    _write(input_dir, "gif", name="long")
    decoded, checks = [], []
    read = video_io.read_video
    monkeypatch.setattr(video_io, "read_video", lambda *a, on_frame=None, **k: read(
        *a, on_frame=lambda n: (decoded.append(n), on_frame(n)), **k))

    def check_interrupt():  # Cancel pressed while the third frame is decoded
        checks.append(1)
        if len(checks) == 4:
            raise InterruptedError("cancelled")

    monkeypatch.setattr(host, "check_interrupt", check_interrupt)
    with pytest.raises(InterruptedError):
        KinemaLoadVideo().load("long.gif", frame_load_cap=0)
    assert len(decoded) == 3  # one check before reading, then one a frame


def test_load_video_reads_the_bundled_clip_unless_the_input_folder_has_one(input_dir):
    from kinema.nodes.video_input import KinemaLoadVideo

    images, count, fps = KinemaLoadVideo().load("kinema_demo_clip.webp", 8, 0, 1, 64, 0)
    assert images.shape == (8, 64, 64, 3) and count == 8 and fps == pytest.approx(8.0)
    _write(input_dir, "webp", name="kinema_demo_clip")  # the user's own file of that name wins
    images, count, _ = KinemaLoadVideo().load("kinema_demo_clip.webp", 0, 0, 1, 0, 0)
    assert images.shape == (10, 40, 56, 3)
    from kinema.nodes.video_input import list_videos

    assert list_videos().count("kinema_demo_clip.webp") == 1


@pytest.mark.parametrize("name", ["../outside.gif", "sub/../../outside.gif", "/etc/passwd", "C:\\x.gif", ""])
def test_load_video_refuses_names_outside_the_input_folder(input_dir, name):
    from kinema.nodes.video_input import KinemaLoadVideo

    _write(input_dir.parent, "gif", name="outside")
    with pytest.raises(KinemaError):
        KinemaLoadVideo().load(name, 0, 0, 1, 0, 0)
    assert isinstance(KinemaLoadVideo.VALIDATE_INPUTS(name), str)


def test_load_video_refuses_links_out_of_the_input_folder(input_dir, monkeypatch):
    from kinema.nodes.video_input import KinemaLoadVideo

    target = _write(input_dir.parent, "gif", name="outside")
    try:
        os.symlink(target, input_dir / "link.gif")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    monkeypatch.delenv("KINEMA_ALLOW_SYMLINKS", raising=False)
    with pytest.raises(KinemaError, match="outside the input folder"):
        KinemaLoadVideo().load("link.gif", 0, 0, 1, 0, 0)


def test_load_video_missing_file(input_dir):
    from kinema.nodes.video_input import KinemaLoadVideo

    with pytest.raises(KinemaError, match="not found in the input folder"):
        KinemaLoadVideo().load("nope.mp4", 0, 0, 1, 0, 0)
    assert "not found" in KinemaLoadVideo.VALIDATE_INPUTS("nope.mp4")
    assert KinemaLoadVideo.VALIDATE_INPUTS(None) is True  # a linked value is checked when it runs


def test_load_video_is_changed_follows_the_file(input_dir):
    from kinema.nodes.video_input import KinemaLoadVideo

    path = _write(input_dir, "gif", name="clip")
    first = KinemaLoadVideo.IS_CHANGED(video="clip.gif", frame_load_cap=0)
    assert KinemaLoadVideo.IS_CHANGED(video="clip.gif", frame_load_cap=0) == first
    _write(input_dir, "gif", _grey_clip(frames=4), name="clip")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert KinemaLoadVideo.IS_CHANGED(video="clip.gif", frame_load_cap=0) != first
    # another file of the same size copied over it with the old modification time kept (cp -p): still seen
    second = KinemaLoadVideo.IS_CHANGED(video="clip.gif", frame_load_cap=0)
    st = os.stat(path)
    other = _write(input_dir, "gif", _grey_clip(frames=4)[::-1].copy(), name="other")
    assert os.path.getsize(other) == st.st_size
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert KinemaLoadVideo.IS_CHANGED(video="clip.gif", frame_load_cap=0) != second


def test_load_animated_image_takes_uploads_of_gif_webp_and_apng(input_dir):
    """ComfyUI's video upload button takes mp4 / webm only; this node's image upload takes animated images."""
    from PIL import Image

    from kinema.nodes.video_input import KinemaLoadAnimatedImage, KinemaLoadVideo

    _write(input_dir, "gif", name="walk", fps=12.5)
    _write(input_dir, "webp", name="b_clip")
    Image.new("RGB", (8, 8)).save(input_dir / "still.png")
    frames = [Image.new("RGB", (8, 8), (v, 0, 0)) for v in (0, 255)]
    frames[0].save(input_dir / "anim.png", save_all=True, append_images=frames[1:])
    (input_dir / "clip.mp4").write_bytes(b"x")
    spec = KinemaLoadAnimatedImage.INPUT_TYPES()["required"]
    options, opts = spec["image"]
    assert options == ["anim.png", "b_clip.webp", "walk.gif", "kinema_demo_clip.webp"]
    assert opts.get("image_upload") is True and opts.get("animated_image_upload") is True and "video_upload" not in opts
    assert list(spec)[1:] == list(KinemaLoadVideo.INPUT_TYPES()["required"])[1:]
    assert all(o.get("tooltip") for _, o in spec.values())
    assert load_pack().NODE_DISPLAY_NAME_MAPPINGS["KinemaLoadAnimatedImage"] == "Load Animated Image (Kinema)"
    got = KinemaLoadAnimatedImage().load("walk.gif", 4, 2, 1, 64, 0)
    want = KinemaLoadVideo().load("walk.gif", 4, 2, 1, 64, 0)
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:] == (4, pytest.approx(12.5))
    every_2nd = KinemaLoadAnimatedImage().load("walk.gif", 3, 1, 2, 0, 48)  # every widget reaches the reader
    assert every_2nd[0].shape[:3] == (3, 48, 64) and every_2nd[1:] == (3, pytest.approx(6.25))
    assert torch.equal(every_2nd[0], KinemaLoadVideo().load("walk.gif", 3, 1, 2, 0, 48)[0])
    assert KinemaLoadAnimatedImage.VALIDATE_INPUTS("walk.gif") is True
    assert "not found" in KinemaLoadAnimatedImage.VALIDATE_INPUTS("gone.gif")
    assert "not an animated image" in KinemaLoadAnimatedImage.VALIDATE_INPUTS("gone.jpg")
    (input_dir / "pic.jpg").write_bytes(b"x")
    assert "not an animated image" in KinemaLoadAnimatedImage.VALIDATE_INPUTS("pic.jpg")
    assert "not an animated image: Load Animated Image reads gif" in KinemaLoadAnimatedImage.VALIDATE_INPUTS("clip.mp4")
    assert isinstance(KinemaLoadAnimatedImage.VALIDATE_INPUTS("../walk.gif"), str)
    assert KinemaLoadAnimatedImage.IS_CHANGED(image="walk.gif") == KinemaLoadVideo.IS_CHANGED(video="walk.gif")


def test_bundled_inputs_are_copied_into_comfyuis_input_folder_for_previews(input_dir, tmp_path, monkeypatch):
    """ComfyUI's /view serves its input folder only: the demo clip and image are copied there (once, never over a
    file of that name, never half-written) so the frontend can show them; outside ComfyUI nothing is written."""
    import types

    from kinema.nodes import host
    from kinema.nodes.video_input import BUNDLED_INPUTS_DIR, list_images, list_videos

    list_videos()  # the headless runner: read from the pack, nothing copied
    assert os.listdir(input_dir) == []
    comfy_input = tmp_path / "comfy_input"
    monkeypatch.setattr(host, "_folder_paths", types.SimpleNamespace(get_input_directory=lambda: str(comfy_input)))
    monkeypatch.setattr(host, "_shared_input_dirs", set())
    comfy_input.mkdir()
    (comfy_input / "kinema_demo_image.png").write_bytes(b"the user's own")
    assert "kinema_demo_clip.webp" in list_videos()
    assert sorted(os.listdir(comfy_input)) == ["kinema_demo_clip.webp", "kinema_demo_image.png"]  # no .part left
    with open(comfy_input / "kinema_demo_clip.webp", "rb") as a, \
            open(os.path.join(BUNDLED_INPUTS_DIR, "kinema_demo_clip.webp"), "rb") as b:
        assert a.read() == b.read()
    assert (comfy_input / "kinema_demo_image.png").read_bytes() == b"the user's own"
    os.remove(comfy_input / "kinema_demo_clip.webp")  # once per folder and process: a file deleted stays deleted
    assert list_images().count("kinema_demo_image.png") == 1 and list_videos().count("kinema_demo_clip.webp") == 1
    assert not (comfy_input / "kinema_demo_clip.webp").exists()
    readonly = tmp_path / "readonly"  # a folder that cannot be written (chmod does not stop root: the copy fails)
    monkeypatch.setattr(host, "_folder_paths", types.SimpleNamespace(get_input_directory=lambda: str(readonly)))

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(host.shutil, "copyfile", refused)
    assert "kinema_demo_clip.webp" in list_videos()  # still listed, read from the pack
    assert not readonly.exists() or os.listdir(readonly) == []


# -- VAE Encode Frames -----------------------------------------------------------------------------------------------

def test_vae_encode_frames_node(host_dirs):
    from fixtures import vae

    from kinema.models import vae as vae_ops
    from kinema.nodes.vae import KinemaVAEDecodeFrames, KinemaVAEEncodeFrames

    assert load_pack().NODE_DISPLAY_NAME_MAPPINGS["KinemaVAEEncodeFrames"] == "VAE Encode Frames (Kinema)"
    assert all(o.get("tooltip") for _, o in KinemaVAEEncodeFrames.INPUT_TYPES()["required"].values())
    pixels = torch.rand(5, 32, 48, 3)
    (latent,) = KinemaVAEEncodeFrames().encode(vae(), pixels, frame_chunk=2)
    assert set(latent) == {"samples"} and latent["samples"].shape == (5, 4, 4, 6)
    whole = vae_ops.encode_frames(vae(), pixels, chunk=8)
    assert torch.allclose(latent["samples"], whole, atol=1e-5)  # chunking changes nothing
    (images,) = KinemaVAEDecodeFrames().decode(vae(), latent, 3)
    assert images.shape == pixels.shape
    with pytest.raises(KinemaError, match="multiple of 8"):
        KinemaVAEEncodeFrames().encode(vae(), torch.rand(2, 30, 48, 3), 8)


def _cancel_at(monkeypatch, value: int) -> list:
    """Cancel requested when the progress bar reaches ``value``; the (value, total) of each update, in a list."""
    from kinema.nodes import host

    seen = []
    real = host.ProgressBar.update_absolute

    def spy(self, at, total=None, preview=None):
        seen.append((at, total))
        if at >= value:
            host.request_interrupt()
        real(self, at, total, preview)

    monkeypatch.setattr(host.ProgressBar, "update_absolute", spy)
    return seen


def test_vae_encode_frames_reports_progress_and_stops_on_interrupt(host_dirs, monkeypatch):
    from fixtures import vae

    from kinema.nodes import host
    from kinema.nodes.vae import KinemaVAEEncodeFrames

    seen = _cancel_at(monkeypatch, 2)
    with pytest.raises(host.KinemaInterrupted):
        KinemaVAEEncodeFrames().encode(vae(), torch.rand(6, 16, 16, 3), frame_chunk=2)
    assert seen == [(2, 6)]  # stopped after the first chunk


# -- sampling from a video -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def video_latent():
    from fixtures import vae

    from kinema.models import vae as vae_ops

    clip, _ = video_io.read_video(os.path.join(ROOT, "workflows", "inputs", demo_media.DEMO_CLIP_NAME),
                                  frame_load_cap=8, width=32)
    return vae_ops.encode_frames(vae(), clip)


def _sample(latent, denoise, seed=3):
    from fixtures import motion_model

    from kinema.models import pipelines

    model = motion_model("v2")
    g = torch.Generator().manual_seed(0)
    positive = torch.randn(1, 4, model.unet.cfg.context_dim, generator=g)
    opts = pipelines.SampleOptions(seed=seed, steps=3, cfg=1.0, sampler="euler", denoise=denoise)
    return pipelines.sample_video(model, positive, None, latent, opts)


def test_vid2vid_lower_denoise_stays_closer_to_the_input(video_latent):
    assert video_latent.shape == (8, 4, 4, 4)
    dist = {d: (_sample(video_latent, d) - video_latent).pow(2).mean().sqrt().item() for d in (0.3, 0.6, 1.0)}
    assert dist[0.3] < dist[0.6] < dist[1.0]
    out = _sample(video_latent, 0.6)
    assert out.shape == video_latent.shape and torch.isfinite(out).all()


def test_vid2vid_denoise_zero_returns_the_input(video_latent):
    out = _sample(video_latent, 0.0)
    assert torch.equal(out, video_latent.float())


def test_frames_too_small_for_an_8x8_block_are_refused_as_such_on_either_side(tmp_path):
    """A clip under 8 pixels on just one side (wide and flat) is refused with the size and the fix, not read as
    frames 0 pixels high, and not reported as an unreadable file."""
    for name, (h, w) in (("flat", (4, 64)), ("thin", (64, 4))):
        path = _write(tmp_path, "gif", np.zeros((2, h, w, 3), np.uint8), name=name)
        with pytest.raises(KinemaError) as info:
            video_io.read_video(path)
        msg = str(info.value)
        assert msg.startswith(f"'{name}.gif' is {w}x{h}") and "bigger custom width/height" in msg
        assert "Cannot read" not in msg


def test_frame_options_refuse_booleans(tmp_path):
    """A boolean is no frame count (True would silently mean 1): refused like any non-whole number."""
    path = _write(tmp_path, "gif")
    for kwargs in ({"frame_load_cap": True}, {"select_every_nth": True}, {"width": False}):
        with pytest.raises(KinemaError, match="whole number"):
            video_io.read_video(path, **kwargs)


def test_no_path_and_a_zero_rate_are_handled_as_the_pack_says(tmp_path):
    """An empty path is the pack's own error (ComfyUI shows its message), and a file announcing 0 fps is read at
    the default rate rather than reported as 0 fps."""
    with pytest.raises(KinemaError, match="No video file given"):
        video_io.read_video("")
    assert video_io._fps_or_default(0) == video_io._fps_or_default(float("nan")) == video_io.DEFAULT_FPS


def test_vae_decode_frames_reports_progress_and_stops_on_interrupt(host_dirs, monkeypatch):
    """VAE Decode Frames moves the bar after each chunk and stops on Cancel between chunks, and before the first
    chunk without decoding it (a chunk can take a while)."""
    from fixtures import vae
    from kinema.nodes import host
    from kinema.nodes.vae import KinemaVAEDecodeFrames

    seen = _cancel_at(monkeypatch, 4)
    latent = {"samples": torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(21))}
    with pytest.raises(host.KinemaInterrupted):
        KinemaVAEDecodeFrames().decode(vae(), latent, frame_chunk=2)
    assert seen == [(2, 6), (4, 6)]  # stopped after the second chunk
    seen.clear()
    host.request_interrupt()
    with pytest.raises(host.KinemaInterrupted):
        KinemaVAEDecodeFrames().decode(vae(), latent, frame_chunk=2)
    assert seen == []  # stopped before the first chunk


def test_vae_encode_frames_takes_rgba_as_its_rgb_and_stops_on_cancel_before_encoding(host_dirs, monkeypatch):
    """RGBA frames (a PNG sequence with alpha) are encoded as their RGB; Cancel before the node runs stops it
    before the first chunk is encoded."""
    from fixtures import vae
    from kinema.models import vae as vae_ops
    from kinema.nodes import host
    from kinema.nodes.vae import KinemaVAEEncodeFrames

    frames = torch.rand(2, 32, 32, 4, generator=torch.Generator().manual_seed(22))
    rgba = KinemaVAEEncodeFrames().encode(vae(), frames, 1)[0]["samples"]
    rgb = KinemaVAEEncodeFrames().encode(vae(), frames[..., :3].contiguous(), 1)[0]["samples"]
    assert torch.equal(rgba, rgb)
    calls = []
    monkeypatch.setattr(vae_ops, "encode_frames", lambda *a, **k: calls.append(a))
    host.request_interrupt()
    with pytest.raises(host.KinemaInterrupted):
        KinemaVAEEncodeFrames().encode(vae(), frames, 1)
    assert calls == []
