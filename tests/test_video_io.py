"""models/video_io.py and the KinemaSaveVideo node: files read back with Pillow / imageio."""
import json
import os
import signal
import subprocess
import sys
import threading
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from kinema.models import video_io
from kinema.models.errors import KinemaError
from kinema.nodes import host
from kinema.nodes import video_output

METADATA = {
    "prompt": {"3": {"class_type": "KSampler", "inputs": {"text": "a=b; #c \\ d\nnew line, caf\u00e9 \u2603"}}},
    "workflow": {"nodes": [{"id": 3, "type": "KSampler"}], "links": [], "version": 0.4, "big": "x" * 150_000},
}


def _frames(f=5, h=24, w=32, seed=0):
    """Distinct, smooth-ish frames (so lossy codecs stay close) as IMAGE float [f, h, w, 3]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(f, h // 16 + 2, w // 16 + 2, 3, generator=g)
    up = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                         align_corners=False)
    return up.permute(0, 2, 3, 1).contiguous()


def _pil_frames(path):
    out = []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            out.append((np.asarray(im.convert("RGB")), im.info.get("duration")))
        info = dict(im.info)
    return out, info


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".part") or n.startswith(".")]


# --- to_uint8 ---------------------------------------------------------------------------------
def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([[[[-0.5, 0.0, 1.0], [2.0, 0.5 / 255, 0.49 / 255], [127.6 / 255, float("nan"), 0.999]]]])
    got = video_io.to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (1, 1, 3, 3)
    assert got.tolist() == [[[[0, 0, 255], [255, 0, 0], [128, 0, 255]]]]
    # ties to even for exactly .5 is fine; 1.5/255 -> 2
    assert video_io.to_uint8(np.full((1, 1, 1, 3), 1.5 / 255, np.float64)).tolist() == [[[[2, 2, 2]]]]


def test_to_uint8_long_video_in_chunks_matches():
    x = torch.rand(37, 5, 6, 3, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    want = np.round(np.clip(x.numpy(), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(video_io.to_uint8(x), want)
    assert np.array_equal(video_io.to_uint8(x.double()), want)


@pytest.mark.parametrize("frames", [17, 32, 33])
def test_to_uint8_keeps_every_frame_of_a_long_video(frames):
    """A long video converted 16 frames at a time keeps a last chunk of one frame, and exact multiples of 16."""
    x = torch.arange(frames, dtype=torch.float32).reshape(frames, 1, 1, 1).expand(frames, 2, 2, 3) / 255
    got = video_io.to_uint8(x)
    assert got.shape == (frames, 2, 2, 3) and got[:, 0, 0, 0].tolist() == list(range(frames))


def test_to_uint8_accepts_numpy_uint8_and_single_image():
    u = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert video_io.to_uint8(u).shape == (1, 2, 2, 3)
    assert video_io.to_uint8(torch.from_numpy(u)).tolist() == [u.tolist()]
    with pytest.raises(KinemaError):
        video_io.to_uint8(torch.zeros(3))


# --- the three formats ---------------------------------------------------------------------
def test_gif_frames_size_timing_loop_and_metadata(tmp_path):
    imgs = _frames(5, 24, 32)
    p = video_io.write_video(str(tmp_path / "a.gif"), video_io.to_uint8(imgs), 8, "gif", loop=0, metadata=METADATA)
    frames, info = _pil_frames(p)
    assert len(frames) == 5 and frames[0][0].shape == (24, 32, 3)
    assert [d for _, d in frames] == [130, 120, 130, 120, 130]  # frames start at i/8 s in GIF's 1/100 s units
    assert info.get("loop") == 0
    assert video_io.read_video_metadata(p) == METADATA
    err = np.abs(np.stack([f for f, _ in frames]).astype(int) - video_io.to_uint8(imgs).astype(int)).mean()
    assert err < 12  # 256-colour palette
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt, unit", [("gif", 10), ("webp", 1)])
@pytest.mark.parametrize("fps", [8, 12, 15, 24, 30, 7.5])
def test_gif_and_webp_play_at_the_fps_asked_for(tmp_path, fmt, unit, fps):
    """Frame delays are stored in whole units (GIF 1/100 s): each frame starts at its time rounded to one, so the
    file plays at the fps asked for (one delay rounded for all made a 15 fps GIF play at 16.7) and reads back so."""
    n = 48
    imgs = torch.rand(n, 8, 8, 3, generator=torch.Generator().manual_seed(1))  # no two frames alike (none merged)
    p = video_io.write_video(str(tmp_path / f"r.{fmt}"), imgs, fps, fmt, lossless=True)
    delays = [d for _, d in _pil_frames(p)[0]]
    assert len(delays) == n and all(d % unit == 0 and abs(d - 1000 / fps) < unit for d in delays)
    assert abs(sum(delays) - n * 1000 / fps) <= unit / 2
    frames, read_fps = video_io.read_video(p)
    assert frames.shape[0] == n and abs(read_fps - fps) <= fps * fps * unit / (2 * n * 1000) + 1e-9


@pytest.mark.parametrize("fmt", ["gif", "webp"])
@pytest.mark.parametrize("fps", [8, 15, 24, 29.97])
def test_held_frames_read_back_frame_for_frame(tmp_path, fmt, fps):
    """The encoders store a repeated frame once with the delays of its copies added; read back, it is repeated
    again: the frames and the rate come back as they were saved (a GIF's delays are whole 1/100 s)."""
    imgs = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(2))[[0, 1, 1, 2, 3, 3, 3, 4, 5, 5]]
    p = video_io.write_video(str(tmp_path / f"h.{fmt}"), imgs, fps, fmt, lossless=True)
    assert len(_pil_frames(p)[0]) == 6  # the holds merged in the file
    frames, read_fps = video_io.read_video(p)
    unit = 10 if fmt == "gif" else 1  # the length of the whole is rounded to that
    assert frames.shape[0] == 10 and abs(read_fps - fps) <= fps * fps * unit / (2 * 10 * 1000) + 1e-9
    if fmt == "webp":  # lossless: the very frames
        assert np.array_equal(video_io.to_uint8(frames), video_io.to_uint8(imgs))


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_held_frames_read_back_frame_for_frame_without_imageio(tmp_path, fmt, monkeypatch):
    """A bare ComfyUI (Pillow, no imageio) repeats the held frames as well."""
    import sys

    imgs = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(2))[[0, 1, 1, 2, 3, 3, 3, 4, 5, 5]]
    p = video_io.write_video(str(tmp_path / f"h.{fmt}"), imgs, 15, fmt, lossless=True)
    want, want_fps = video_io.read_video(p)
    for name in [m for m in sys.modules if m == "imageio" or m.startswith("imageio.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "imageio", None)  # import imageio -> ImportError
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    frames, fps = video_io.read_video(p)
    assert frames.shape[0] == 10 and fps == want_fps and torch.equal(frames, want)


@pytest.mark.parametrize("loop, stored", [(1, None), (3, 2)])
def test_gif_loop_count_is_number_of_plays(tmp_path, loop, stored):
    p = video_io.write_video(str(tmp_path / "l.gif"), _frames(2), 8, "gif", loop=loop)
    _, info = _pil_frames(p)
    assert info.get("loop") == stored
    assert video_io.read_video_metadata(p) is None


def test_webp_animated_lossless_exact_with_exif_metadata(tmp_path):
    imgs = _frames(4, 20, 36)
    p = video_io.write_video(str(tmp_path / "a.webp"), imgs, 10, "webp", loop=2, metadata=METADATA, lossless=True)
    frames, info = _pil_frames(p)
    assert len(frames) == 4 and frames[0][0].shape == (20, 36, 3)
    assert np.array_equal(np.stack([f for f, _ in frames]), video_io.to_uint8(imgs))
    assert info.get("loop") == 2
    assert [d for _, d in frames] == [100] * 4
    with Image.open(p) as im:  # ComfyUI's layout: 0x0110 prompt, 0x010F workflow
        exif = im.getexif()
        assert exif[0x0110].startswith("prompt:") and json.loads(exif[0x0110][7:]) == METADATA["prompt"]
        assert exif[0x010F].startswith("workflow:") and json.loads(exif[0x010F][9:]) == METADATA["workflow"]
    assert video_io.read_video_metadata(p) == METADATA


def test_webp_lossy_is_close(tmp_path):
    imgs = _frames(3, 32, 32)
    p = video_io.write_video(str(tmp_path / "b.webp"), imgs, 8, "webp", quality=90)
    frames, _ = _pil_frames(p)
    err = np.abs(np.stack([f for f, _ in frames]).astype(int) - video_io.to_uint8(imgs).astype(int)).mean()
    assert len(frames) == 3 and err < 5


def test_mp4_frames_size_fps_and_metadata(tmp_path):
    imgs = _frames(6, 32, 48)
    p = video_io.write_video(str(tmp_path / "a.mp4"), imgs, 12, "mp4", metadata=METADATA)
    arr = iio.imread(p, index=None, plugin="FFMPEG")
    assert arr.shape == (6, 32, 48, 3)
    assert abs(iio.immeta(p, plugin="FFMPEG")["fps"] - 12) < 1e-6
    assert np.abs(arr.astype(int) - video_io.to_uint8(imgs).astype(int)).mean() < 8  # tiny frames, 4:2:0
    assert video_io.read_video_metadata(p) == METADATA
    assert _leftovers(tmp_path) == []


def test_mp4_rates_crf_progress_and_no_metadata_file_left(tmp_path, monkeypatch):
    """ffmpeg gets the exact rate (7.5, NTSC's 24000/1001: not rounded to whole frames a second), the crf asked
    for, progress up to (n, n), and its metadata file is removed afterwards."""
    if video_io._mp4_backend()[0] != "ffmpeg":
        pytest.skip("no ffmpeg executable (imageio-ffmpeg)")
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    frames = video_io.to_uint8(torch.rand(6, 32, 48, 3, generator=torch.Generator().manual_seed(0)))
    for fps in (7.5, 24000 / 1001):
        calls = []
        p = video_io.write_video(str(tmp_path / f"{fps}.mp4"), frames, fps, "mp4", metadata=METADATA,
                                 on_frame=lambda done, total, calls=calls: calls.append((done, total)))
        assert video_io.read_video(p)[1] == pytest.approx(fps, abs=0.005)
        assert calls == [(i, 6) for i in range(7)]
    assert os.listdir(tmp_path / "tmp") == []
    sizes = [os.path.getsize(video_io.write_video(str(tmp_path / f"crf{crf}.mp4"), frames, 8, "mp4", crf=crf))
             for crf in (0, 40)]
    assert sizes[0] > 3 * sizes[1]  # noise: lossless is several times the size of crf 40


def test_the_temp_file_is_hidden_beside_the_target(tmp_path):
    seen = []
    video_io.write_video(str(tmp_path / "v.gif"), _frames(3), 8, "gif",
                         on_frame=lambda done, total: seen.append(os.listdir(tmp_path)))
    assert seen and all(len(names) == 1 and names[0].startswith(".v.gif.") and names[0].endswith(".part")
                        for names in seen)
    assert os.listdir(tmp_path) == ["v.gif"]


def test_an_encoder_that_writes_nothing_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_write_gif", lambda *a, **k: None)
    with pytest.raises(KinemaError, match="'v.gif' produced an empty file"):
        video_io.write_video(str(tmp_path / "v.gif"), _frames(2), 8, "gif")
    assert os.listdir(tmp_path) == []


def test_a_gif_plays_at_50_fps_at_most(tmp_path):
    """50 fps is a GIF's shortest delay, 2/100 s a frame: allowed (above it is refused: the errors test)."""
    frames, _ = _pil_frames(video_io.write_video(str(tmp_path / "v.gif"), _frames(3), 50, "gif"))
    assert [duration for _, duration in frames] == [20, 20, 20]


def test_image_checks_name_the_frame_and_refuse_empty_batches():
    video = torch.zeros(40, 8, 8, 3)
    video[20, 1, 2, 0] = float("nan")  # in the second chunk of FINITE_CHECK_FRAMES
    with pytest.raises(KinemaError, match="X: frame 21 holds NaN"):
        video_io.check_finite(video, "X")
    for shape in ((0, 8, 8, 3), (2, 0, 8, 3), (2, 8, 0, 3)):
        with pytest.raises(KinemaError, match="X got an empty IMAGE batch"):
            video_io.check_images(torch.zeros(shape), "X")


def test_mp4_colours_survive(tmp_path):
    # flat patches: a wrong colour matrix or range shows as a shift of 5-20 levels
    colours = torch.tensor([[0.8, 0.2, 0.4], [0.1, 0.9, 0.3], [0.95, 0.95, 0.1], [0.2, 0.3, 0.9]])
    imgs = colours[:, None, None, :].repeat_interleave(32, 1).repeat_interleave(32, 2)
    imgs = torch.cat([imgs[:2], imgs[2:]], dim=2).repeat(3, 1, 1, 1)  # 6 frames of 32x64, two patches each
    p = video_io.write_video(str(tmp_path / "c.mp4"), imgs, 8, "mp4")
    arr = iio.imread(p, index=None, plugin="FFMPEG").astype(int)
    want = video_io.to_uint8(imgs).astype(int)
    centre = (slice(None), slice(8, 24), slice(8, 56))
    assert np.abs(arr[centre] - want[centre]).mean() < 3


def test_mp4_odd_size_is_padded_by_edge_pixels(tmp_path):
    imgs = torch.zeros(3, 15, 21, 3)
    imgs[..., 0] = 1.0  # red everywhere, so the padded row/column must be red too
    p = video_io.write_video(str(tmp_path / "odd.mp4"), imgs, 8, "mp4")
    arr = iio.imread(p, index=None, plugin="FFMPEG")
    assert arr.shape == (3, 16, 22, 3)
    assert arr[:, -1, :, 0].min() > 200 and arr[:, :, -1, 1].max() < 60
    assert video_io.read_video_metadata(p) is None


def test_mp4_through_pyav_when_imageio_ffmpeg_is_missing(tmp_path, monkeypatch):
    av = pytest.importorskip("av")  # ComfyUI ships PyAV; this environment may not

    def missing():
        raise KinemaError("mp4 needs ffmpeg: install the Python package 'imageio-ffmpeg'")

    monkeypatch.setattr(video_io, "_ffmpeg_exe", missing)
    imgs = _frames(5, 31, 45)
    p = video_io.write_video(str(tmp_path / "av.mp4"), imgs, 12, "mp4", metadata=METADATA)
    with av.open(p) as c:
        stream = c.streams.video[0]
        arr = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(stream)])
        assert stream.codec_context.name == "h264" and abs(float(stream.average_rate) - 12) < 1e-6
    assert arr.shape == (5, 32, 46, 3)
    assert np.abs(arr[:, :31, :45].astype(int) - video_io.to_uint8(imgs).astype(int)).mean() < 8
    assert video_io.read_video_metadata(p) == METADATA
    assert _leftovers(tmp_path) == []


def test_write_replaces_existing_target_atomically(tmp_path):
    target = tmp_path / "v.gif"
    target.write_bytes(b"old")
    video_io.write_video(str(target), _frames(2), 8, "gif")
    with Image.open(target) as im:
        assert im.n_frames == 2


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"images_uint8": np.zeros((0, 8, 8, 3), np.uint8)}, "No frames"),
    ({"fmt": "avi"}, "Unknown video format"),
    ({"fps": 0}, "fps"),
    ({"fps": float("nan")}, "fps"),
    ({"loop": -1}, "loop"),
    ({"metadata": {"x": object()}}, "JSON"),
    ({"images_uint8": np.zeros((2, 8, 8, 2), np.uint8)}, "channels"),
    ({"fps": 60}, "a GIF plays at most 50 fps.*use webp or mp4"),
    ({"fps": 0.001}, "a GIF frame shows at most 655.35 s"),
    ({"images_uint8": np.zeros((1, 1, 65536, 3), np.uint8)}, "GIF frames can be at most 65535 pixels"),
])
def test_bad_arguments_raise_kinema_error(tmp_path, kwargs, match):
    args = {"path": str(tmp_path / "x.gif"), "images_uint8": np.zeros((2, 8, 8, 3), np.uint8), "fps": 8,
            "fmt": "gif"}
    args.update(kwargs)
    with pytest.raises(KinemaError, match=match):
        video_io.write_video(**args)
    assert os.listdir(tmp_path) == []


def test_missing_output_folder(tmp_path):
    with pytest.raises(KinemaError, match="does not exist"):
        video_io.write_video(str(tmp_path / "nope" / "x.gif"), _frames(1), 8, "gif")


def test_missing_ffmpeg_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    monkeypatch.setitem(sys.modules, "av", None)  # and no PyAV to fall back on
    with pytest.raises(KinemaError, match="imageio-ffmpeg"):
        video_io.write_video(str(tmp_path / "x.mp4"), _frames(2), 8, "mp4")
    assert os.listdir(tmp_path) == []


def test_ffmpeg_without_binary_names_the_package(tmp_path, monkeypatch):
    import imageio_ffmpeg

    def no_binary():
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(KinemaError, match="imageio-ffmpeg"):
        video_io.write_video(str(tmp_path / "x.mp4"), _frames(2), 8, "mp4")
    assert os.listdir(tmp_path) == []


def test_failing_encoder_leaves_no_temp_file_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "v.gif"
    target.write_bytes(b"old")

    def broken(tmp, *args, **kwargs):
        with open(tmp, "wb") as f:
            f.write(b"GIF89a half")
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "_write_gif", broken)
    with pytest.raises(OSError, match="disk full"):
        video_io.write_video(str(target), _frames(2), 8, "gif")
    assert sorted(os.listdir(tmp_path)) == ["v.gif"] and target.read_bytes() == b"old"


def test_failing_ffmpeg_process_leaves_nothing(tmp_path, monkeypatch):
    false = "/bin/false" if os.path.exists("/bin/false") else "/usr/bin/false"
    if not os.path.exists(false):
        pytest.skip("no 'false' binary")
    monkeypatch.setattr(video_io, "_ffmpeg_exe", lambda: false)
    with pytest.raises(KinemaError, match="ffmpeg failed"):
        video_io.write_video(str(tmp_path / "x.mp4"), _frames(2), 8, "mp4", metadata={"a": 1})
    assert os.listdir(tmp_path) == []


def _bounded(write, seconds: float = 60) -> list[BaseException]:
    """``write()`` in a thread; fails the test if it has not returned after ``seconds`` (a writer waiting on ffmpeg
    forever), killing any ffmpeg left; returns what it raised."""
    errors = []

    def run():
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - what the writer raised, for the test to check
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        subprocess.run(["pkill", "-f", "ffmpeg.*rawvideo"], check=False)
        pytest.fail("the writer hung waiting for ffmpeg")
    return errors


def test_an_error_of_ours_while_feeding_ffmpeg_stops_it_and_leaves_nothing(tmp_path, monkeypatch):
    """Not ffmpeg's failure but ours (out of memory, an interrupt) after some frames: ffmpeg is stopped instead
    of waited on (it would wait for more frames forever), the error passes, no file is left."""
    if video_io._mp4_backend()[0] != "ffmpeg":
        pytest.skip("no ffmpeg executable (imageio-ffmpeg)")
    procs = []

    class Pipe:
        def __init__(self, real):
            self.real, self.writes = real, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise MemoryError("simulated: out of memory after 2 frames")
            return self.real.write(data)

        def close(self):
            self.real.close()

    def popen(*args, **kwargs):
        proc = subprocess.Popen(*args, **kwargs)
        proc.stdin = Pipe(proc.stdin)
        procs.append(proc)
        return proc

    monkeypatch.setattr(video_io, "subprocess", types.SimpleNamespace(
        Popen=popen, PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL))
    errors = _bounded(lambda: video_io.write_video(str(tmp_path / "x.mp4"), _frames(5), 8, "mp4",
                                                   metadata={"a": 1}))
    assert len(errors) == 1 and isinstance(errors[0], MemoryError)
    assert os.listdir(tmp_path) == [] and procs[0].returncode is not None
    if os.name == "posix":  # killed, not left to finish the file
        assert procs[0].returncode == -signal.SIGKILL


def test_ffmetadata_parser_handles_escapes():
    text = ";FFMETADATA1\nk\\=ey=va\\;l\\#u\\\\e\\\nnext\n[STREAM]\nignored=1\n"
    assert video_io._parse_ffmetadata(text) == {"k=ey": "va;l#u\\e\nnext"}


# --- the node -------------------------------------------------------------------------------
def test_node_declaration():
    cls = video_output.KinemaSaveVideo
    assert video_output.NODE_CLASS_MAPPINGS == {"KinemaSaveVideo": cls}
    assert video_output.NODE_DISPLAY_NAME_MAPPINGS["KinemaSaveVideo"] == "Save Video (Kinema)"
    assert cls.CATEGORY == "Kinema/video" and cls.OUTPUT_NODE is True and cls.RETURN_TYPES == ()
    assert cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["images", "fps", "format", "loop_count", "filename_prefix"]
    for name, (kind, opts) in spec["required"].items():
        assert opts.get("tooltip"), name
    assert spec["required"]["format"][0] == ["gif", "webp", "mp4"]
    assert spec["required"]["format"][1]["default"] == "webp"
    assert spec["required"]["fps"][1]["default"] == 8.0
    assert spec["required"]["filename_prefix"][1]["default"] == "Kinema/video"
    assert spec["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@pytest.mark.parametrize("fmt", ["webp", "gif", "mp4"])
def test_node_saves_and_returns_ui(output_dir, fmt):
    node = video_output.KinemaSaveVideo()
    imgs = _frames(4, 16, 24)
    prompt = {"1": {"class_type": "KinemaSaveVideo", "inputs": {}}}
    extra = {"workflow": {"nodes": [], "links": []}}
    out = node.save(imgs, 8.0, fmt, 0, "Kinema/video", prompt=prompt, extra_pnginfo=extra)
    assert out == {"ui": {"images": [{"filename": f"video_00001_.{fmt}", "subfolder": "Kinema", "type": "output"}],
                          "animated": (True,)}}
    path = output_dir / "Kinema" / f"video_00001_.{fmt}"
    assert path.is_file()
    assert video_io.read_video_metadata(str(path)) == {"prompt": prompt, "workflow": extra["workflow"]}
    again = node.save(imgs, 8.0, fmt, 0, "Kinema/video")
    assert again["ui"]["images"][0]["filename"] == f"video_00002_.{fmt}"
    assert _leftovers(output_dir / "Kinema") == []


@pytest.mark.parametrize("fmt", ["webp", "gif", "mp4"])
def test_a_single_frame_is_shown_as_a_still_except_an_mp4(output_dir, fmt):
    """The frontend shows an mp4 in a video player only when it is marked animated, even with one frame."""
    out = video_output.KinemaSaveVideo().save(_frames(1, 16, 24), 8.0, fmt, 0, "v")
    assert out["ui"]["animated"] == (fmt == "mp4",)


@pytest.mark.parametrize("fmt,backend", [("webp", None), ("gif", None), ("mp4", "ffmpeg"), ("mp4", "av")])
def test_cancel_stops_the_node_between_frames_and_leaves_no_file(output_dir, monkeypatch, fmt, backend):
    if backend == "av":
        pytest.importorskip("av")
        monkeypatch.setattr(video_io, "_mp4_backend", lambda: ("av", __import__("av")))
    elif backend == "ffmpeg" and video_io._mp4_backend()[0] != "ffmpeg":
        pytest.skip("no ffmpeg executable (imageio-ffmpeg)")
    checks = []

    def check_interrupt():  # Cancel pressed while the third frame is handed over
        checks.append(1)
        if len(checks) == 3:
            raise InterruptedError("cancelled")

    monkeypatch.setattr(host, "check_interrupt", check_interrupt)
    errors = _bounded(lambda: video_output.KinemaSaveVideo().save(_frames(6, 16, 24), 8.0, fmt, 0, "Kinema/video"))
    assert len(errors) == 1 and isinstance(errors[0], InterruptedError)  # an OSError: not taken for ffmpeg's
    assert len(checks) == 3
    assert not (output_dir / "Kinema").exists() or os.listdir(output_dir / "Kinema") == []  # no temp file either


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_progress_runs_while_pillow_encodes(tmp_path, monkeypatch, fmt):
    """Pillow's GIF and WebP writers take all frames in one call: the frames are handed over as the encoder seeks
    to them, so progress (and Cancel) comes between the encoder's frames, and the file is byte for byte the one
    a list of images gives."""
    from PIL import GifImagePlugin, Image, WebPImagePlugin

    frames = video_io.to_uint8(_frames(5, 16, 24))
    events = []
    module, name = (GifImagePlugin, "_normalize_palette") if fmt == "gif" else (WebPImagePlugin, "_convert_frame")
    encode = getattr(module, name)
    monkeypatch.setattr(module, name, lambda im, *a, **k: (events.append("encode"), encode(im, *a, **k))[1])
    path = str(tmp_path / f"v.{fmt}")
    video_io.write_video(path, frames, 8.0, fmt, on_frame=lambda done, total: events.append(done))
    assert events == [0, "encode", 1, "encode", 2, "encode", 3, "encode", 4, "encode", 5]
    monkeypatch.setattr(module, name, encode)
    listed = [Image.fromarray(f, "RGB") for f in frames]
    reference = tmp_path / f"listed.{fmt}"
    options = {"disposal": 1, "loop": 0} if fmt == "gif" else {"loop": 0, "lossless": False, "quality": 90, "method": 4}
    durations = [130, 120, 130, 120, 130] if fmt == "gif" else [125] * 5  # frames start at i/8 s (GIF: 1/100 s)
    listed[0].save(reference, format=fmt.upper(), save_all=True, append_images=listed[1:], duration=durations,
                   **options)
    assert (tmp_path / f"v.{fmt}").read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_node_passes_fps_and_loop_count(output_dir, fmt):
    out = video_output.KinemaSaveVideo().save(_frames(3), 12.0, fmt, 3, "v")
    frames, info = _pil_frames(str(output_dir / out["ui"]["images"][0]["filename"]))
    assert info.get("loop") == (2 if fmt == "gif" else 3)  # a GIF stores the repeats after the first play
    assert abs(sum(d for _, d in frames) - 250) <= (5 if fmt == "gif" else 1)  # 3 frames at 12 fps


def test_node_metadata_can_be_disabled(output_dir, monkeypatch):
    monkeypatch.setenv("KINEMA_DISABLE_METADATA", "1")
    out = video_output.KinemaSaveVideo().save(_frames(2), 8.0, "webp", 0, "v", prompt={"a": 1})
    assert video_io.read_video_metadata(str(output_dir / out["ui"]["images"][0]["filename"])) is None


def test_node_does_not_change_its_input(output_dir):
    imgs = _frames(2)
    before = imgs.clone()
    video_output.KinemaSaveVideo().save(imgs, 8.0, "gif", 0, "v")
    assert torch.equal(imgs, before)


def test_node_refuses_bad_input(output_dir):
    node = video_output.KinemaSaveVideo()
    with pytest.raises(KinemaError):
        node.save(torch.zeros(0, 8, 8, 3), 8.0, "gif", 0, "v")
    with pytest.raises(KinemaError):
        node.save(torch.zeros(8, 8, 3), 8.0, "gif", 0, "v")
    with pytest.raises(KinemaError):
        node.save(_frames(2), 8.0, "gif", 0, "../outside")
    with pytest.raises(KinemaError, match="takes IMAGE floats in \\[0, 1\\], got torch.int64"):
        node.save(torch.full((2, 8, 8, 3), 200), 8.0, "gif", 0, "v")
    assert not output_dir.exists() or list(output_dir.rglob("*.*")) == []
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "taken").write_text("a file where the prefix wants a folder")
    with pytest.raises(KinemaError, match="cannot save into the output folder.*taken.*choose another filename_prefix"):
        node.save(_frames(2), 8.0, "gif", 0, "taken/v")
    assert sorted(p.name for p in output_dir.iterdir()) == ["taken"]


def test_read_image_scales_16_bit_and_float_grayscale_by_their_depth(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) is not clipped to white by convert('RGB'); float TIFFs are kept."""
    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(levels).save(tmp_path / "depth16.png")
    assert Image.open(tmp_path / "depth16.png").mode.startswith("I")
    img = video_io.read_image(str(tmp_path / "depth16.png"))
    assert img.shape == (1, 3, 4, 3) and img.dtype == torch.float32
    assert torch.allclose(img[0, 0, :, 0], torch.tensor(levels[0] / 65535.0, dtype=torch.float32), atol=1e-6)
    assert torch.equal(img[..., 0], img[..., 2])  # gray in all three channels
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32)).save(tmp_path / "depth.tiff")
    img = video_io.read_image(str(tmp_path / "depth.tiff"))
    assert torch.allclose(img[0, 0, :, 1], torch.tensor([0.0, 0.25, 1.0]))


def _without_imageio(monkeypatch):
    """Reading as a bare ComfyUI does: Pillow and PyAV, no imageio."""
    for name in [m for m in sys.modules if m == "imageio" or m.startswith("imageio.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)


@pytest.mark.parametrize("imageio", [True, False])
def test_a_16_bit_grayscale_animated_png_is_read_by_its_depth_not_as_white(tmp_path, monkeypatch, imageio):
    """A depth pass saved as a 16-bit gray APNG (PIL mode I;16) reads as its levels, as Load Image reads a still
    one; convert('RGB') clipped every value above 255 to white."""
    import imageio_ffmpeg

    levels = np.array([0, 16384, 32768, 65535], dtype="<u2")
    raw = tmp_path / "depth.raw"
    raw.write_bytes(np.repeat(levels, 16 * 24).tobytes())  # four constant 24x16 frames
    path = tmp_path / "depth.png"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
                    "-pix_fmt", "gray16le", "-s", "24x16", "-r", "10", "-i", str(raw), "-pix_fmt", "gray16be",
                    "-plays", "0", "-f", "apng", str(path)], check=True)
    with Image.open(path) as im:
        assert im.mode.startswith("I") and im.n_frames == 4
    if not imageio:
        _without_imageio(monkeypatch)
    images, fps = video_io.read_video(str(path))
    assert images.shape == (4, 16, 24, 3) and fps == pytest.approx(10.0)
    want = torch.tensor(np.round(levels / 65535 * 255) / 255, dtype=torch.float32)
    assert torch.allclose(images.mean(dim=(1, 2, 3)), want, atol=1e-6)


def test_a_rotated_phone_video_reads_upright_without_imageio(tmp_path, monkeypatch):
    """A portrait phone video is stored sideways with a display rotation; ffmpeg turns it, PyAV (a bare ComfyUI's
    reader) hands it on as stored: both must give the same upright frames."""
    pytest.importorskip("av")
    import imageio_ffmpeg

    frames = torch.zeros(4, 32, 48, 3)
    frames[:, :, :24, 0] = 1.0  # red left half, green bottom half: any turn or flip shows
    frames[:, 16:, :, 1] = 1.0
    base = video_io.write_video(str(tmp_path / "base.mp4"), frames, 10, "mp4")
    want_turned = {}
    for degrees in (90, 180, 270):
        rotated = tmp_path / f"rotated{degrees}.mp4"
        done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
                               "-display_rotation", str(degrees), "-i", base, "-c", "copy", str(rotated)], check=False)
        if done.returncode != 0:
            pytest.skip("this ffmpeg cannot set a display rotation")
        want_turned[degrees] = video_io.read_video(str(rotated))[0]
    assert want_turned[90].shape == (4, 48, 32, 3)  # ffmpeg turns it upright
    _without_imageio(monkeypatch)
    for degrees, want in want_turned.items():
        got, fps = video_io.read_video(str(tmp_path / f"rotated{degrees}.mp4"))
        assert got.shape == want.shape and (got - want).abs().mean() < 0.02 and fps == pytest.approx(10.0)
