"""Writing videos: what Save Video (Kinema) does with its frames and prefix, models/video_io.py's channel handling,
metadata, mp4 layout and argument bounds, and models/demo_media.py's clip and image. Files are read back with
Pillow, imageio-ffmpeg and the pack's own metadata reader."""
import json
import logging
import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import ROOT
from kinema.models import demo_media, video_io
from kinema.models.errors import KinemaError
from kinema.nodes import video_output
from PIL import Image

#: three keys: ComfyUI's prompt and workflow, and one more extra_pnginfo key after them
METADATA3 = {"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}},
             "workflow": {"nodes": [{"id": 3}], "links": []},
             "extra": {"note": "a third key"}}


def _read_rgb(path) -> np.ndarray:
    """Every frame of an animated gif/webp as uint8 RGB [f, h, w, 3] (Pillow)."""
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def _saved(output_dir, out) -> str:
    entry = out["ui"]["images"][0]
    return str(output_dir / entry["subfolder"] / entry["filename"])


def _noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- Save Video (Kinema) -------------------------------------------------------------------------------------------

def test_the_prefix_gets_the_frames_width_and_height_in_that_order(output_dir):
    """%width% and %height% (ComfyUI's prefix variables) are the frames' width and height: 24 wide, 16 high."""
    out = video_output.KinemaSaveVideo().save(torch.rand(2, 16, 24, 3), 8.0, "gif", 0, "%width%x%height%/v")
    assert out["ui"]["images"][0]["subfolder"] == "24x16"
    assert out["ui"]["images"][0]["filename"] == "v_00001_.gif"
    assert os.path.isfile(output_dir / "24x16" / "v_00001_.gif")


def test_rgba_and_gray_frames_are_saved_as_rgb(output_dir):
    """An IMAGE with alpha (a Load Image of a PNG) is saved with the alpha dropped and the colours kept; a
    1-channel IMAGE is saved as gray. Flat colours, so the gif's palette holds them exactly."""
    rgba = torch.zeros(2, 8, 8, 4)
    rgba[..., 0], rgba[..., 3] = 1.0, 0.5  # opaque-half red
    rgba[1, :, :4, 2] = 1.0  # magenta on the left of frame 2
    node = video_output.KinemaSaveVideo()
    got = _read_rgb(_saved(output_dir, node.save(rgba, 8.0, "gif", 0, "rgba")))
    assert np.array_equal(got, video_io.to_uint8(rgba)[..., :3])
    assert got[1, 0, 0].tolist() == [255, 0, 255] and got[0, 0, 0].tolist() == [255, 0, 0]
    gray = torch.zeros(2, 8, 8, 1)
    gray[1] = 0.4
    got = _read_rgb(_saved(output_dir, node.save(gray, 8.0, "gif", 0, "gray")))
    assert got.shape == (2, 8, 8, 3) and np.array_equal(got, np.repeat(video_io.to_uint8(gray), 3, axis=-1))


def test_nan_frames_are_saved_with_a_warning(output_dir, caplog):
    """NaN pixels (an fp16 decode gone wrong) are saved as black, and the log says where to look; clean frames
    save without it."""
    node = video_output.KinemaSaveVideo()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        node.save(torch.rand(2, 8, 8, 3), 8.0, "gif", 0, "clean")
    assert "NaN" not in caplog.text
    frames = torch.rand(2, 8, 8, 3)
    frames[1, 2, 3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = node.save(frames, 8.0, "gif", 0, "nan")
    assert "Save Video (Kinema): the frames hold NaN or infinite values" in caplog.text
    assert os.path.isfile(_saved(output_dir, out))


# -- video_io.write_video: channels --------------------------------------------------------------------------------

def test_a_file_another_writer_saves_under_the_same_name_meanwhile_is_kept(output_dir, monkeypatch):
    """A second ComfyUI on the same output folder saves race_00001_.gif while this Save Video encodes under that
    name: its file stays as it was, and this one lands at the next counter, the UI result naming it."""
    from kinema.nodes import host

    other = output_dir / "race_00001_.gif"

    class Bar:  # the progress bar the node reports each frame to: the other writer saves at the first frame
        def __init__(self, *args, **kwargs):
            pass

        def update_absolute(self, done, total=None):
            if not other.exists():
                other.parent.mkdir(parents=True, exist_ok=True)
                other.write_bytes(b"the other writer's video")

    monkeypatch.setattr(host, "ProgressBar", Bar)
    frames = torch.rand(3, 8, 8, 3)
    out = video_output.KinemaSaveVideo().save(frames, 8.0, "gif", 0, "race")
    assert other.read_bytes() == b"the other writer's video"
    assert out["ui"]["images"][0]["filename"] == "race_00002_.gif"
    assert _read_rgb(_saved(output_dir, out)).shape == (3, 8, 8, 3)
    assert sorted(os.listdir(output_dir)) == ["race_00001_.gif", "race_00002_.gif"]  # no temporary file left


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_write_video_with_next_path_never_replaces_a_file(tmp_path, monkeypatch, links):
    """With ``next_path``, a file that appears at the target during the write is kept (a hard link claims the
    name; where the file system has none, a check before the move); without it the target is replaced."""
    if not links:
        def no_links(src, dst):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    target, spare = tmp_path / "v.gif", tmp_path / "v2.gif"

    def appear(done, total):
        if not target.exists():
            target.write_bytes(b"other")

    got = video_io.write_video(str(target), _noise((2, 8, 8, 3)), 8, "gif", on_frame=appear,
                               next_path=lambda: str(spare))
    assert got == str(spare) and target.read_bytes() == b"other" and spare.stat().st_size > 0
    assert sorted(os.listdir(tmp_path)) == ["v.gif", "v2.gif"]
    assert video_io.write_video(str(target), _noise((2, 8, 8, 3)), 8, "gif") == str(target)
    assert target.read_bytes() != b"other"


def test_write_video_drops_alpha_and_expands_gray_exactly(tmp_path):
    """Lossless webp reads back the very pixels: RGBA keeps R, G and B (the alpha, not the red, is dropped); one
    channel is repeated into three."""
    rgba = _noise((2, 8, 8, 4), seed=1)
    p = video_io.write_video(str(tmp_path / "rgba.webp"), rgba, 8, "webp", lossless=True)
    assert np.array_equal(_read_rgb(p), rgba[..., :3])
    gray = _noise((2, 8, 8, 1), seed=2)
    p = video_io.write_video(str(tmp_path / "gray.webp"), gray, 8, "webp", lossless=True)
    assert np.array_equal(_read_rgb(p), np.repeat(gray, 3, axis=-1))


# -- metadata ------------------------------------------------------------------------------------------------------

def test_webp_metadata_with_a_third_key_round_trips(tmp_path):
    """ComfyUI's EXIF layout: prompt at 0x0110, then the other keys from 0x010F downwards (workflow 0x010F, the
    next 0x010E): a third key lands below the workflow, never on the prompt's tag."""
    p = video_io.write_video(str(tmp_path / "m.webp"), _noise((2, 8, 8, 3)), 8, "webp", metadata=METADATA3)
    assert video_io.read_video_metadata(p) == METADATA3
    with Image.open(p) as im:
        exif = im.getexif()
    assert exif[0x010E] == "extra:" + json.dumps(METADATA3["extra"])


def test_mp4_metadata_has_a_comment_and_a_tag_per_key(tmp_path):
    """The mp4 holds the whole dict as JSON in its comment (how every key, the third too, comes back) and one tag
    per key besides, like ComfyUI's SaveVideo (custom mp4 tags are kept only with +use_metadata_tags)."""
    p = video_io.write_video(str(tmp_path / "m.mp4"), _noise((2, 8, 8, 3)), 8, "mp4", metadata=METADATA3)
    assert video_io.read_video_metadata(p) == METADATA3
    text = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", p, "-f", "ffmetadata", "-"],
                          capture_output=True, check=True).stdout.decode("utf-8")
    tags = video_io._parse_ffmetadata(text)
    assert {k: json.loads(tags[k]) for k in ("prompt", "workflow", "extra")} == METADATA3
    assert json.loads(tags["comment"]) == METADATA3


# -- mp4 layout ----------------------------------------------------------------------------------------------------

def test_mp4_is_yuv420p_and_pads_only_the_odd_side(tmp_path):
    """4:2:0 (what every player decodes; libx264 would pick 4:4:4 for RGB input) needs even sizes: frames 15 wide
    and 20 high are padded to 16x20, the height left as it is."""
    p = video_io.write_video(str(tmp_path / "odd.mp4"), torch.rand(2, 20, 15, 3), 8, "mp4")
    frames = imageio_ffmpeg.read_frames(p)
    meta = next(frames)
    frames.close()
    assert meta["pix_fmt"].split("(")[0] == "yuv420p"
    assert tuple(meta["size"]) == (16, 20)  # width, height


# -- write_video's bounds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, images, kwargs, match", [
    ("webp", np.zeros((1, 1, 16384, 3), np.uint8), {}, r"WebP frames can be at most 16383 pixels a side, got 16384x1"),
    ("mp4", np.zeros((1, 8, 8, 3), np.uint8), {"crf": 60}, r"crf must be in 0\.\.51, got 60"),
    ("mp4", np.zeros((1, 8, 8, 3), np.uint8), {"crf": -1}, r"crf must be in 0\.\.51, got -1"),
    ("webp", np.zeros((1, 8, 8, 3), np.uint8), {"quality": 150}, r"quality must be in 0\.\.100, got 150"),
    ("gif", np.zeros((2, 0, 8, 3), np.uint8), {}, r"Frames have no pixels \(shape \(2, 0, 8, 3\)\)"),
    ("webp", np.zeros((2, 8, 0, 3), np.uint8), {}, r"Frames have no pixels \(shape \(2, 8, 0, 3\)\)"),
])
def test_write_video_refuses_out_of_range_settings_before_encoding(tmp_path, fmt, images, kwargs, match):
    with pytest.raises(KinemaError, match=match):
        video_io.write_video(str(tmp_path / f"x.{fmt}"), images, 8, fmt, **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
def test_a_keyboard_interrupt_during_the_write_leaves_no_file(tmp_path, fmt):
    """Ctrl+C (not an Exception) while frames are handed over: the hidden .part file is removed all the same."""
    def interrupt(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        video_io.write_video(str(tmp_path / f"k.{fmt}"), _noise((3, 8, 8, 3)), 8, fmt, on_frame=interrupt)
    assert os.listdir(tmp_path) == []


# -- models/demo_media.py ------------------------------------------------------------------------------------------

def test_write_demo_clip_is_lossless_and_loops_forever(tmp_path):
    """The written clip decodes to the generator's pixels exactly and plays forever at the demo fps."""
    p = demo_media.write_demo_clip(str(tmp_path / "demo.webp"), frames=4, size=32)
    assert p == str(tmp_path / "demo.webp")
    assert np.array_equal(_read_rgb(p), demo_media.demo_clip_frames(4, 32))
    with Image.open(p) as im:
        assert im.info["loop"] == 0
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # Pillow reads a WebP frame's duration with its pixels
            durations.append(im.info["duration"])
    assert durations == [1000 / demo_media.DEMO_CLIP_FPS] * 4


def test_demo_image_is_the_bundled_png():
    """The bundled init image is the clip's first frame drawn at 512 and centre-cropped to 512x288."""
    with Image.open(os.path.join(ROOT, "workflows", "inputs", demo_media.DEMO_IMAGE_NAME)) as im:
        bundled = np.asarray(im.convert("RGB"))
    image = demo_media.demo_image()
    assert image.shape == (288, 512, 3) and np.array_equal(image, bundled)
    assert np.array_equal(image, demo_media.demo_clip_frames(1, 512)[0, 112:400])


@pytest.mark.parametrize("frames, size", [(1, 8), (1, 15), (0, 64)])
def test_the_demo_clip_needs_a_frame_and_16_pixels(frames, size):
    with pytest.raises(ValueError, match="at least 1 frame and 16 pixels a side"):
        demo_media.demo_clip_frames(frames, size)
    assert demo_media.demo_clip_frames(1, 16).shape == (1, 16, 16, 3)


def test_a_prefix_too_long_for_the_file_system_is_refused_and_one_that_fits_saves(output_dir):
    """A file or folder name is at most 255 bytes: a longer prefix is refused naming the limit (not the file
    system's raw error), and the longest that fits with its counter and extension saves (its temporary file's
    name is kept short enough too)."""
    frames = torch.rand(2, 16, 16, 3)
    for prefix in ("x" * 300, "sub/" + "y" * 250, "é" * 125):
        with pytest.raises(KinemaError, match=r"filename_prefix has a folder or file name too long .* at most 255"):
            video_output.KinemaSaveVideo().save(frames, 8.0, "webp", 0, prefix)
    saved = video_output.KinemaSaveVideo().save(frames, 8.0, "webp", 0, "z" * 242)["ui"]["images"][0]
    assert saved["filename"] == "z" * 242 + "_00001_.webp" and os.listdir(output_dir) == [saved["filename"]]


# -- what a mutation audit of the writers slipped past -------------------------------------------------------------

def test_the_temp_file_never_takes_over_a_file_already_there(tmp_path, monkeypatch):
    """The hidden .part name is created exclusively: a file of that name (another write's) is left alone and the
    next random name is taken."""
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(video_io.secrets, "token_hex", lambda n: next(names))
    other = tmp_path / ".v.gif.aaaaaaaa.part"
    other.write_bytes(b"another write's")
    video_io.write_video(str(tmp_path / "v.gif"), _noise((2, 8, 8, 3)), 8, "gif")
    assert other.read_bytes() == b"another write's"
    assert sorted(os.listdir(tmp_path)) == [".v.gif.aaaaaaaa.part", "v.gif"]


def test_a_webp_faster_than_1000_fps_shows_every_frame_for_a_millisecond_at_least():
    """Delays are whole milliseconds: at 2000 fps frames start 0.5 ms apart, and none is given no time at all."""
    assert video_io._frame_durations(6, 2000.0, 1) == [1, 1, 1, 1, 1, 1]
    assert video_io._frame_durations(4, 250.0, 10) == [10, 10, 10, 10]


def test_webp_quality_and_method_reach_the_encoder(tmp_path):
    """A lossy webp at quality 10 is much smaller than at 95; method 0 (fast) and 6 (small) give different files."""
    frames = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))

    def write(name, **kwargs):
        with open(video_io.write_video(str(tmp_path / name), frames, 8, "webp", **kwargs), "rb") as f:
            return f.read()

    assert 2 * len(write("q10.webp", quality=10)) < len(write("q95.webp", quality=95))
    assert write("m0.webp", webp_method=0) != write("m6.webp", webp_method=6)


def _ffmetadata(path) -> dict:
    text = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, check=True).stdout.decode("utf-8")
    return video_io._parse_ffmetadata(text)


def test_mp4_tag_names_keep_underscores_and_hyphens(tmp_path):
    """A key's letters, digits, '_' and '-' make its tag name; other characters are dropped."""
    p = video_io.write_video(str(tmp_path / "m.mp4"), _noise((2, 8, 8, 3)), 8, "mp4",
                             metadata={"my_key-1": 5, "a b!": [1]})
    tags = _ffmetadata(p)
    assert tags["my_key-1"] == "5" and tags["ab"] == "[1]"


def _fake_ffmpeg(tmp_path, monkeypatch, script: str):
    exe = tmp_path / "fake_ffmpeg"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    monkeypatch.setattr(video_io, "_ffmpeg_exe", lambda: str(exe))
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for ffmpeg")
def test_ffmpeg_failing_before_it_reads_the_frames_is_reported_with_its_message(tmp_path, monkeypatch):
    """ffmpeg that exits at once (the pipe breaks under frames larger than its buffer) is reported with its exit
    code and its last words, not as a broken pipe; no file is left."""
    out = _fake_ffmpeg(tmp_path, monkeypatch, "echo \"Unknown encoder 'libx264'\" >&2; exit 3")
    with pytest.raises(KinemaError, match=r"ffmpeg failed to write the mp4 \(exit code 3\): Unknown encoder 'libx264'"):
        video_io.write_video(str(out / "x.mp4"), _noise((4, 256, 256, 3)), 8, "mp4")
    assert os.listdir(out) == []


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for ffmpeg")
def test_ffmpeg_killed_by_a_signal_is_reported_as_failed(tmp_path, monkeypatch):
    """A negative exit code (ffmpeg killed: out of memory, a crash) is a failure too, named as such."""
    out = _fake_ffmpeg(tmp_path, monkeypatch, "kill -9 $$")
    with pytest.raises(KinemaError, match=r"ffmpeg failed to write the mp4 \(exit code -9\): no message"):
        video_io.write_video(str(out / "x.mp4"), _noise((2, 8, 8, 3)), 8, "mp4")
    assert os.listdir(out) == []


def test_mp4_crf_reaches_pyav(tmp_path, monkeypatch):
    """Without imageio-ffmpeg the crf still sets the quality: lossless noise is several times crf 40's size."""
    av = pytest.importorskip("av")
    monkeypatch.setattr(video_io, "_mp4_backend", lambda: ("av", av))
    frames = _noise((4, 32, 48, 3))
    sizes = [os.path.getsize(video_io.write_video(str(tmp_path / f"crf{crf}.mp4"), frames, 8, "mp4", crf=crf))
             for crf in (0, 40)]
    assert sizes[0] > 3 * sizes[1]


@pytest.mark.parametrize("fmt", [".GIF", "WebP", "Mp4"])
def test_the_format_may_have_a_dot_and_any_case(tmp_path, fmt):
    p = video_io.write_video(str(tmp_path / "v.x"), _noise((2, 8, 8, 3)), 8, fmt)
    assert os.path.getsize(p) > 0 and os.listdir(tmp_path) == ["v.x"]


@pytest.mark.parametrize("fmt, kwargs, match", [
    ("mp4", {"crf": 52}, r"crf must be in 0\.\.51, got 52"),
    ("webp", {"quality": 101}, r"quality must be in 0\.\.100, got 101"),
])
def test_crf_and_quality_are_refused_just_past_their_ends(tmp_path, fmt, kwargs, match):
    with pytest.raises(KinemaError, match=match):
        video_io.write_video(str(tmp_path / f"x.{fmt}"), _noise((1, 8, 8, 3)), 8, fmt, **kwargs)
    assert os.listdir(tmp_path) == []
    extreme = {"crf": 51} if fmt == "mp4" else {"quality": 100}
    assert os.path.isfile(video_io.write_video(str(tmp_path / f"x.{fmt}"), _noise((1, 8, 8, 3)), 8, fmt, **extreme))


def test_a_gif_comment_that_is_no_json_object_is_read_as_a_comment(tmp_path):
    """A GIF comment written by another tool is no dict of ours: it comes back under "comment"."""
    for name, comment, want in (("t.gif", b"made by hand", "made by hand"), ("l.gif", b"[1, 2]", [1, 2])):
        Image.new("RGB", (4, 4)).save(tmp_path / name, comment=comment)
        assert video_io.read_video_metadata(str(tmp_path / name)) == {"comment": want}


def test_webp_metadata_stops_at_the_first_missing_tag_below_the_prompt(tmp_path):
    """ComfyUI's layout fills the tags from 0x010F downwards without a gap: a tag further down, past one missing,
    is someone else's."""
    exif = Image.Exif()
    exif[0x010F] = 'workflow:{"nodes": []}'
    exif[0x010D] = "stray:1"
    Image.new("RGB", (4, 4)).save(tmp_path / "s.webp", exif=exif)
    assert video_io.read_video_metadata(str(tmp_path / "s.webp")) == {"workflow": {"nodes": []}}


def test_mp4_prompt_and_workflow_tags_are_read_without_a_comment(tmp_path):
    """An mp4 with ComfyUI SaveVideo's tags (prompt, workflow) and no comment: those two keys, no other tag."""
    plain = video_io.write_video(str(tmp_path / "plain.mp4"), _noise((2, 8, 8, 3)), 8, "mp4")
    tagged = str(tmp_path / "tagged.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", plain, "-c", "copy",
                    "-metadata", 'prompt={"1": {"inputs": {}}}', "-metadata", 'workflow={"nodes": []}',
                    "-metadata", "title=not ours", "-movflags", "+use_metadata_tags", tagged], check=True)
    assert video_io.read_video_metadata(tagged) == {"prompt": {"1": {"inputs": {}}}, "workflow": {"nodes": []}}


def test_ffmetadata_values_keep_an_unescaped_equals_sign():
    assert video_io._parse_ffmetadata(";FFMETADATA1\na=b=c\n") == {"a": "b=c"}


@pytest.mark.parametrize("ext", [".mov", ".m4v"])
def test_mov_and_m4v_metadata_is_read_like_an_mp4s(tmp_path, ext):
    p = video_io.write_video(str(tmp_path / "m.mp4"), _noise((2, 8, 8, 3)), 8, "mp4", metadata=METADATA3)
    os.rename(p, tmp_path / f"m{ext}")
    assert video_io.read_video_metadata(str(tmp_path / f"m{ext}")) == METADATA3


def test_mp4_colours_survive_pyav(tmp_path, monkeypatch):
    """PyAV converts with the BT.709 matrix the file is tagged with: flat patches read back within 3 levels."""
    av = pytest.importorskip("av")
    monkeypatch.setattr(video_io, "_mp4_backend", lambda: ("av", av))
    if video_io._av_bt709(av)[1] != 1:
        pytest.skip("this PyAV converts with BT.601 only")
    colours = torch.tensor([[0.8, 0.2, 0.4], [0.1, 0.9, 0.3], [0.95, 0.95, 0.1], [0.2, 0.3, 0.9]])
    imgs = colours[:, None, None, :].repeat_interleave(32, 1).repeat_interleave(32, 2)
    imgs = torch.cat([imgs[:2], imgs[2:]], dim=2).repeat(3, 1, 1, 1)  # 6 frames of 32x64, two patches each
    p = video_io.write_video(str(tmp_path / "c.mp4"), imgs, 8, "mp4")
    got = video_io.to_uint8(video_io.read_video(p)[0]).astype(int)
    want = video_io.to_uint8(imgs).astype(int)
    centre = (slice(None), slice(8, 24), slice(8, 56))
    assert np.abs(got[centre] - want[centre]).mean() < 3


def test_write_demo_clip_takes_its_fps(tmp_path):
    """The fps argument sets the frames' durations: at 4 fps each frame shows for 250 ms."""
    p = demo_media.write_demo_clip(str(tmp_path / "slow.webp"), frames=2, size=16, fps=4.0)
    with Image.open(p) as im:
        im.seek(1)
        im.load()
        assert im.info["duration"] == 250
