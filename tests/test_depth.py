"""Depth estimation (DPT, DPT-Hybrid, Depth Anything) against transformers, Gen-1 structure fidelity, the nodes."""
import itertools
import json
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_net_close, load_pack
from fixtures_depth import PREPROCESSORS, smooth_frames, write_folder
from kinema.models import demo
from kinema.models.depth import (
    FIDELITY_FRAMES,
    MAX_FIDELITY_STEPS,
    DepthEstimator,
    DepthModelInfo,
    DepthPreprocess,
    load_depth_model,
    normalize_depth,
    structure_fidelity,
)
from kinema.models.errors import KinemaError, KinemaOutOfMemoryError

DEPTH_KINDS = ("dpt", "dpt_hybrid", "depth_anything")
# the model's input size: frames already this size go through the processor without a resize
NATIVE = {"dpt": (64, 64), "dpt_hybrid": (64, 64), "depth_anything": (56, 98), "depth_anything_metric": (56, 98)}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_models")
    return {kind: write_folder(str(root / kind), kind, seed=i)
            for i, kind in enumerate(("dpt", "dpt_hybrid", "depth_anything", "depth_anything_metric", "clip"))}


@pytest.fixture(scope="session")
def estimators(folders):
    return {kind: load_depth_model(folders[kind]) for kind in folders if kind != "clip"}


def _reference(folder, frames):
    """transformers end to end: the folder's processor on 8-bit frames, the model, post_process_depth_estimation."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    arrays = [(f * 255).round().to(torch.uint8).numpy() for f in frames]
    inputs = processor(images=arrays, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    post = processor.post_process_depth_estimation(out, target_sizes=[tuple(frames.shape[1:3])] * len(frames))
    return torch.stack([p["predicted_depth"] for p in post]), inputs["pixel_values"], processor


# --- parity with transformers -------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*DEPTH_KINDS, "depth_anything_metric"])
def test_predict_matches_transformers_on_frames_of_the_input_size(kind, folders, estimators):
    h, w = NATIVE[kind]
    frames = smooth_frames(3, h, w, seed=1)
    ref, _, _ = _reference(folders[kind], frames)
    ours = estimators[kind].predict(frames, batch_size=2)
    assert float(ref.std()) > 1e-3  # the fixture's prediction is not flat
    assert_net_close(ours, ref, f"{kind} depth at {h}x{w}")


@pytest.mark.parametrize("kind", DEPTH_KINDS)
def test_preprocessing_matches_the_processor_on_non_square_frames(kind, folders, estimators):
    frames = smooth_frames(2, 48, 80, seed=2)
    _, ref_pixels, processor = _reference(folders[kind], frames)
    ours = estimators[kind].preprocess(frames)
    assert ours.shape == ref_pixels.shape  # size, keep_aspect_ratio, ensure_multiple_of as the processor
    # the processor resizes 8-bit images with PIL and rounds back to 8 bits: at most about one level apart
    level = 1 / 255 / min(processor.image_std)
    diff = (ours - ref_pixels).abs()
    assert float(diff.max()) <= 1.5 * level and float(diff.mean()) <= 0.5 * level


def test_resampling_overshoot_is_clipped_like_the_processor(folders, estimators):
    frames = torch.zeros(1, 48, 80, 3)
    frames[:, :, 37:] = 1.0  # a hard edge: bicubic overshoots on both sides of it
    _, ref_pixels, processor = _reference(folders["depth_anything"], frames)
    ours = estimators["depth_anything"].preprocess(frames)
    level = 1 / 255 / min(processor.image_std)
    assert float((ours - ref_pixels).abs().max()) <= 1.5 * level


@pytest.mark.parametrize("kind", DEPTH_KINDS)
def test_post_processing_matches_transformers(kind, folders, estimators):
    from transformers import AutoImageProcessor
    from transformers.modeling_outputs import DepthEstimatorOutput

    frames = smooth_frames(3, 48, 80, seed=3)
    est = estimators[kind]
    with torch.no_grad():
        raw = est.model(pixel_values=est.preprocess(frames)).predicted_depth
    post = AutoImageProcessor.from_pretrained(folders[kind]).post_process_depth_estimation(
        DepthEstimatorOutput(predicted_depth=raw), target_sizes=[(48, 80)] * 3)
    ref = torch.stack([p["predicted_depth"] for p in post])
    assert_net_close(est.predict(frames, batch_size=2), ref, f"{kind} predicted depth at 48x80")


@pytest.mark.parametrize("kind", DEPTH_KINDS)
def test_estimate_follows_transformers_end_to_end(kind, folders, estimators):
    frames = smooth_frames(3, 48, 80, seed=4)
    ref, _, _ = _reference(folders[kind], frames)
    ours = estimators[kind].estimate(frames)
    expected = (ref - ref.min()) / (ref.max() - ref.min())
    assert float((ours - expected).abs().max()) < 0.05  # only the processor's 8-bit rounding differs
    assert float((ours - expected).abs().mean()) < 0.01


@pytest.mark.parametrize("size", [(48, 80), (80, 48), (37, 53), (500, 300), (56, 56), (40, 300)])
def test_input_sizes_are_the_processors(size, folders, estimators):
    from transformers import AutoImageProcessor

    for kind in ("dpt", "depth_anything"):
        processor = AutoImageProcessor.from_pretrained(folders[kind])
        ref = processor(images=[torch.zeros(*size, 3, dtype=torch.uint8).numpy()], return_tensors="pt")
        assert estimators[kind].preprocess.padded_size(*size) == tuple(ref["pixel_values"].shape[-2:]), kind


def test_preprocessor_defaults_without_a_config_file(folders, tmp_path):
    folder = shutil.copytree(folders["depth_anything"], tmp_path / "da")
    os.remove(folder / "preprocessor_config.json")
    pre = load_depth_model(str(folder)).preprocess
    assert (pre.height, pre.width, pre.keep_aspect_ratio, pre.multiple) == (518, 518, True, 14)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225) and pre.resample == 3
    dpt = DepthPreprocess.default("dpt")
    assert (dpt.height, dpt.width, dpt.keep_aspect_ratio, dpt.mean, dpt.std) == (384, 384, False, (0.5,) * 3, (0.5,) * 3)
    # do_rescale false: the model wants 0..255 values; size as [h, w]; padding to a multiple
    pre = DepthPreprocess.from_config({"do_rescale": False, "size": [40, 60], "do_pad": True, "size_divisor": 32,
                                       "do_normalize": False})
    x = pre(torch.full((1, 10, 10, 3), 0.5))
    assert x.shape == (1, 3, 64, 64) and float(x[0, 0, 20, 30]) == pytest.approx(127.5)
    assert float(x[0, 0, 0, 0]) == 0.0 and float(x[0, 0, 63, 63]) == 0.0  # centred zero padding
    # a size_divisor without do_pad pads nothing (transformers pads only when do_pad is set)
    assert DepthPreprocess.from_config({"do_pad": False, "size_divisor": 32, "size": [40, 60]}).pad_multiple == 0
    assert DepthPreprocess.from_config({"size_divisor": 32, "size": [40, 60]}).pad_multiple == 0


def test_estimate_is_normalised_over_the_whole_video(estimators):
    est = estimators["dpt"]
    frames = smooth_frames(5, 48, 80, seed=5)
    raw = est.predict(frames)
    depth = est.estimate(frames, batch_size=2)
    assert depth.shape == (5, 48, 80) and depth.dtype == torch.float32
    assert torch.allclose(depth, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert float(depth.min()) == 0.0 and float(depth.max()) == 1.0
    assert min(float(d.max()) for d in depth) < 1.0  # one scale for all frames, not per frame
    assert torch.allclose(est.estimate(frames, batch_size=1), depth, atol=1e-5)  # batching does not change it
    image = est.estimate_image(frames)
    assert image.shape == (5, 48, 80, 3) and torch.equal(image[..., 0], image[..., 2])


def test_near_is_bright(estimators):
    frames = smooth_frames(2, 56, 98, seed=6)
    rel = estimators["depth_anything"]
    assert torch.allclose(rel.estimate(frames), normalize_depth(rel.predict(frames)), atol=1e-6)  # inverse depth
    metric = estimators["depth_anything_metric"]
    assert metric.info.metric and not rel.info.metric
    metres = metric.predict(frames)
    assert torch.allclose(metric.estimate(frames), normalize_depth(1 / metres), atol=1e-5)  # metres: far is dark
    far, near = metres.argmax(), metres.argmin()
    assert float(metric.estimate(frames).flatten()[far]) < float(metric.estimate(frames).flatten()[near])


class _SharpEdgeMetres(torch.nn.Module):
    """Stands in for a metric Depth Anything: an object 1 m away in front of a 20 m background, with a sharp edge
    (what the bicubic resize of metres undershoots to 0 or negative metres)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        f, _, h, w = pixel_values.shape
        metres = torch.full((f, h, w), 20.0)
        metres[:, h // 4:3 * h // 4, w // 3:2 * w // 3] = 1.0
        return type("Output", (), {"predicted_depth": metres + self.unused})()


def test_metric_depth_is_inverted_before_the_resize():
    est = DepthEstimator(_SharpEdgeMetres(), DepthPreprocess.default("depth_anything"),
                         DepthModelInfo("sharp", "depth_anything", metric=True, patch=14))
    frames = torch.rand(1, 270, 480, 3)
    assert float(est.predict(frames).min()) < 0.5  # the resized metres dip below the object's 1 m
    depth = est.estimate(frames)
    assert float(depth[0, 135, 240]) > 0.8 and float(depth[0, 5, 5]) < 0.05  # object bright, background dark
    inverse = est.predict(frames, inverse=True)
    assert 1 / 20 - 0.01 < float(inverse[0, 5, 5]) < 1 / 20 + 0.01 and float(inverse.max()) < 1.2


def test_frames_holding_nan_are_named(estimators):
    frames = smooth_frames(3, 48, 80, seed=1)
    frames[2, 3, 4, 1] = float("nan")
    with pytest.raises(KinemaError, match="frames 3 to 3 hold NaN or infinite values: check the node"):
        estimators["dpt"].estimate(frames, batch_size=2)


def test_on_batch_reports_progress_and_can_stop(estimators):
    est = estimators["dpt"]
    frames = smooth_frames(5, 32, 32)
    calls = []
    est.predict(frames, batch_size=2, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]

    def stop(done, total):
        calls.append(done)
        raise InterruptedError("stop")

    calls.clear()
    with pytest.raises(InterruptedError):
        est.estimate(frames, batch_size=2, on_batch=stop)
    assert calls == [2]


class OutOfMemoryAbove(torch.nn.Module):
    """A depth network that raises the allocator's error on a batch of more than ``frames`` frames."""

    def __init__(self, net, frames):
        super().__init__()
        self.net, self.frames, self.calls = net, frames, []

    def forward(self, pixel_values):
        self.calls.append(pixel_values.shape[0])
        if pixel_values.shape[0] > self.frames:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(pixel_values=pixel_values)


def test_out_of_memory_retries_with_half_the_batch_then_names_batch_size(estimators, caplog):
    est = estimators["dpt"]
    frames = smooth_frames(5, 32, 32)
    small = DepthEstimator(OutOfMemoryAbove(est.model, 2), est.preprocess, est.info)
    done = []
    with caplog.at_level(logging.WARNING, logger="kinema"):
        got = small.predict(frames, batch_size=4, on_batch=lambda n, total: done.append(n))
    assert torch.allclose(got, est.predict(frames, batch_size=4), atol=1e-5)
    assert small.model.calls == [4, 2, 2, 1] and done == [2, 4, 5]  # the smaller batch holds for the rest
    assert "depth estimation ran out of memory with 4 frame(s) at once; retrying once with 2" in caplog.text
    tiny = DepthEstimator(OutOfMemoryAbove(est.model, 0), est.preprocess, est.info)
    with pytest.raises(KinemaOutOfMemoryError, match="lower batch_size on Depth Estimate"):
        tiny.predict(frames, batch_size=4)
    assert tiny.model.calls == [4, 2]


def test_a_half_precision_folder_loads_in_float32_by_default(tmp_path):
    """A folder saved in fp16 loads as fp32 unless a precision is asked for (transformers 5 would keep the file's
    dtype)."""
    folder = demo.write_demo_depth_model(str(tmp_path / "fp16"), dtype=torch.float16)
    est = load_depth_model(folder)
    assert est.dtype == torch.float32
    assert {p.dtype for p in est.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("kind", ["dpt", "depth_anything"])
def test_a_loaded_depth_model_does_not_read_its_file_again(folders, tmp_path, kind):
    """transformers loads model.safetensors at the file's own precision as tensors that read the file's mapped
    pages: a file rewritten in place afterwards (a download over it) must not change the model ComfyUI keeps
    between runs, and one truncated must not kill the process (SIGBUS) at the next estimate."""
    folder = _copy(folders, kind, tmp_path, f"{kind}_rewritten")
    est = load_depth_model(str(folder))
    frames = smooth_frames(1, *NATIVE[kind])
    before, depth = {k: v.clone() for k, v in est.model.state_dict().items()}, est.predict(frames)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:  # every byte of the file zeroed in place, as an overwrite of the same size
        f.write(bytes(os.path.getsize(path)))
    assert all(torch.equal(v, before[k]) for k, v in est.model.state_dict().items())
    os.truncate(path, 0)
    assert torch.equal(est.predict(frames), depth)


def test_a_flat_depth_map_normalises_to_zeros():
    assert torch.equal(normalize_depth(torch.full((2, 4, 4), 3.0)), torch.zeros(2, 4, 4))


def test_the_fidelity_pyramid_halves_odd_sizes_rounding_up():
    from kinema.models.depth import _reduce

    assert _reduce(torch.zeros(1, 1, 5, 7)).shape == (1, 1, 3, 4)
    assert _reduce(torch.zeros(1, 1, 1, 2)).shape == (1, 1, 1, 1)


def test_fp16_or_bf16_weights_run_and_return_float32(folders):
    est = load_depth_model(folders["dpt"], dtype=torch.bfloat16)
    assert est.dtype == torch.bfloat16
    depth = est.estimate(smooth_frames(2, 48, 80))
    assert depth.dtype == torch.float32 and torch.isfinite(depth).all()


# --- bad inputs ------------------------------------------------------------------------------------
def test_folders_that_are_not_depth_models(folders, tmp_path):
    with pytest.raises(KinemaError, match="'clip_vision_model' model, not a depth model") as e:
        load_depth_model(folders["clip"])
    assert folders["clip"] in str(e.value) and "Intel/dpt-hybrid-midas" in str(e.value)  # the folder and the fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(KinemaError, match="no config.json, found an empty folder"):
        load_depth_model(str(tmp_path / "empty"))
    with pytest.raises(KinemaError, match="is a file, not a depth model folder"):
        load_depth_model(os.path.join(folders["dpt"], "model.safetensors"))
    with pytest.raises(KinemaError, match="does not exist"):
        load_depth_model(str(tmp_path / "nowhere"))
    other = tmp_path / "zoe"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "zoedepth"}))
    with pytest.raises(KinemaError, match="'zoedepth' depth model, which Kinema does not run"):
        load_depth_model(str(other))
    (other / "config.json").write_text("{not json")
    with pytest.raises(KinemaError, match="config.json is not valid JSON"):
        load_depth_model(str(other))


def _copy(folders, kind, tmp_path, name):
    return shutil.copytree(folders[kind], tmp_path / name)


@pytest.mark.parametrize("keep", [100, 0.5])
def test_truncated_weights(folders, tmp_path, keep):
    folder = _copy(folders, "dpt", tmp_path, "cut")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(KinemaError, match="damaged or truncated") as e:
        load_depth_model(str(folder))
    assert str(weights) in str(e.value) and "download the file again" in str(e.value)


def test_missing_weights_and_pickle_weights(folders, tmp_path):
    folder = _copy(folders, "dpt", tmp_path, "noweights")
    os.remove(folder / "model.safetensors")
    with pytest.raises(KinemaError, match="no weights"):
        load_depth_model(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(KinemaError, match="only pickle weights"):
        load_depth_model(str(folder))


def test_weights_of_another_model(folders, tmp_path):
    folder = _copy(folders, "dpt", tmp_path, "mixed")
    shutil.copy(os.path.join(folders["depth_anything"], "model.safetensors"), folder / "model.safetensors")
    with pytest.raises(KinemaError, match="does not match its config.json"):
        load_depth_model(str(folder))


def test_a_config_field_of_the_wrong_type(folders, tmp_path):
    folder = _copy(folders, "dpt", tmp_path, "badfield")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = "big"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KinemaError, match="could not be loaded as DPTForDepthEstimation"):
        load_depth_model(str(folder))


def test_a_dpt_that_is_not_a_depth_estimator(folders, tmp_path):
    folder = _copy(folders, "dpt", tmp_path, "ade")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["DPTForSemanticSegmentation"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KinemaError, match="DPTForSemanticSegmentation, not a depth estimator"):
        load_depth_model(str(folder))


@pytest.mark.parametrize("architectures", [5, [5], "DPTForDepthEstimation"])
def test_architectures_that_are_not_a_list_of_names(folders, tmp_path, architectures):
    folder = _copy(folders, "dpt", tmp_path, "badarch")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KinemaError, match="'architectures' is .*, not a list of class names"):
        load_depth_model(str(folder))


def test_bad_preprocessor_config(folders, tmp_path):
    folder = _copy(folders, "dpt", tmp_path, "badpre")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 384}}))
    with pytest.raises(KinemaError, match="size .* is not what a DPT image processor takes"):
        load_depth_model(str(folder))


@pytest.mark.parametrize("frames,match", [
    (torch.rand(8, 8, 3), r"\[frames, height, width, 3\]"),
    (torch.rand(1, 8, 8, 4), "convert the frames to RGB"),
    (torch.randint(0, 255, (1, 8, 8, 3), dtype=torch.uint8), "divide 8-bit frames by 255"),
    (torch.rand(0, 8, 8, 3), "empty IMAGE"),
    ("frames", "IMAGE tensor"),
])
def test_bad_frames(estimators, frames, match):
    with pytest.raises(KinemaError, match=match):
        estimators["dpt"].estimate(frames)


def test_frames_the_model_cannot_take(folders, estimators, tmp_path):
    with pytest.raises(KinemaError, match="aspect ratio is too extreme"):  # 2 px tall: 0 rows of patches
        estimators["depth_anything"].estimate(torch.rand(1, 2, 400, 3))
    with pytest.raises(KinemaError, match="batch_size"):
        estimators["dpt"].estimate(torch.rand(1, 32, 32, 3), batch_size=0)
    folder = _copy(folders, "dpt_hybrid", tmp_path, "hybrid_aspect")
    pre = dict(PREPROCESSORS["dpt_hybrid"], keep_aspect_ratio=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    hybrid = load_depth_model(str(folder))
    hybrid.estimate(torch.rand(1, 64, 64, 3))  # square frames keep 64x64
    with pytest.raises(KinemaError, match="DPT-Hybrid.*takes exactly 64x64 inputs.*keep_aspect_ratio"):
        hybrid.estimate(torch.rand(1, 48, 80, 3))


# --- structure fidelity ---------------------------------------------------------------------------
def _high_pass_energy(x):
    """Mean squared difference from a 3x3 box blur: the energy of the finest detail."""
    x = x.unsqueeze(1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float(((x - blurred) ** 2).mean())


def test_structure_fidelity_zero_is_the_input():
    depth = torch.rand(3, 37, 53)
    assert structure_fidelity(depth, 0) is depth


def test_structure_fidelity_removes_detail_step_by_step():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 96, 128, generator=g)
    energies = [_high_pass_energy(structure_fidelity(depth, t)) for t in range(MAX_FIDELITY_STEPS + 1)]
    assert all(b < a for a, b in itertools.pairwise(energies[:6])), energies
    assert all(b <= a * 1.0001 for a, b in itertools.pairwise(energies)), energies
    assert energies[3] < 0.01 * energies[0]


def test_structure_fidelity_keeps_shapes_sizes_and_range():
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 37, 53), (2, 64, 64, 3), (1, 1, 9), (1, 5, 3, 1)]:
        depth = torch.rand(*shape, generator=g)
        for t in (1, 3, MAX_FIDELITY_STEPS):
            out = structure_fidelity(depth, t)
            assert out.shape == depth.shape and out.dtype == depth.dtype
            assert float(out.min()) >= float(depth.min()) - 1e-6 and float(out.max()) <= float(depth.max()) + 1e-6
    flat = torch.full((2, 40, 70), 0.3)
    assert torch.allclose(structure_fidelity(flat, 4), flat, atol=1e-6)
    ramp = torch.linspace(0, 1, 96).expand(1, 64, 96).contiguous()  # smooth shapes pass, nothing shifts
    for t in (1, 2, 3):
        margin = 4 * 2**t  # the borders, where blur and upsampling meet the replicated edge
        assert float((structure_fidelity(ramp, t) - ramp)[:, :, margin:-margin].abs().max()) < 1e-5, t


def test_structure_fidelity_is_per_frame_and_per_channel():
    g = torch.Generator().manual_seed(2)
    depth = torch.rand(3, 40, 60, generator=g)
    out = structure_fidelity(depth, 2)
    assert torch.allclose(structure_fidelity(depth[1:2], 2), out[1:2], atol=1e-6)
    image = structure_fidelity(depth.unsqueeze(-1).expand(3, 40, 60, 3).contiguous(), 2)
    assert torch.allclose(image[..., 0], out, atol=1e-6) and torch.equal(image[..., 0], image[..., 2])
    half = structure_fidelity(depth.half(), 2)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), out, atol=2e-3)


def test_structure_fidelity_works_a_few_frames_at_a_time():
    """Frames are degraded FIDELITY_FRAMES at a time (each frame on its own, so the same result); a gray IMAGE's
    one channel is degraded once and copied, a colour one's channels each."""
    g = torch.Generator().manual_seed(3)
    frames = 2 * FIDELITY_FRAMES + 1
    depth = torch.rand(frames, 24, 36, generator=g)
    out = structure_fidelity(depth, 3)
    for i in range(frames):
        assert torch.allclose(structure_fidelity(depth[i:i + 1], 3)[0], out[i], atol=1e-6)
    gray = structure_fidelity(depth.unsqueeze(-1).expand(frames, 24, 36, 3).contiguous(), 3)
    assert all(torch.equal(gray[..., c], out) for c in range(3))
    colour = torch.rand(frames, 24, 36, 3, generator=g)
    degraded = structure_fidelity(colour, 3)
    for c in range(3):
        assert torch.allclose(degraded[..., c], structure_fidelity(colour[..., c].contiguous(), 3), atol=1e-6)


@pytest.mark.parametrize("t_s", [-1, MAX_FIDELITY_STEPS + 1, 1.5, True, "2"])
def test_structure_fidelity_bad_steps(t_s):
    with pytest.raises(KinemaError, match="t_s must be a whole number from 0"):
        structure_fidelity(torch.rand(1, 8, 8), t_s)


def test_structure_fidelity_bad_maps():
    for bad in (torch.rand(8, 8), torch.randint(0, 9, (1, 8, 8)), [[0.5]]):
        with pytest.raises(KinemaError, match="takes depth maps"):
            structure_fidelity(bad, 1)
    with pytest.raises(KinemaError, match="empty"):
        structure_fidelity(torch.rand(0, 8, 8), 1)


# --- demo model, host folders, nodes, runner -------------------------------------------------------
def test_demo_depth_model_is_deterministic_and_fast(tmp_path):
    import time

    from safetensors.torch import load_file

    a = demo.write_demo_depth_model(str(tmp_path / "a"))
    b = demo.write_demo_depth_model(str(tmp_path / "b"), seed=1)
    assert sorted(os.listdir(a)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    sa, sb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    expected = demo.depth_state_dict(0)
    assert sorted(sa) == sorted(expected) and all(torch.equal(sa[k], expected[k]) for k in expected)
    assert not any(torch.equal(sa[k], sb[k]) for k in sa if k.endswith("dense.weight"))  # the seed matters
    est = load_depth_model(a)
    frames = smooth_frames(8, 64, 64)
    start = time.perf_counter()
    depth = est.estimate(frames)
    assert (time.perf_counter() - start) / 8 < 1.0
    assert float(depth.std()) > 0.05  # a visible map, not a flat one


def test_model_dirs_hide_links_outside_the_folders(tmp_path):
    from kinema.nodes import host

    outside = tmp_path / "elsewhere" / "dpt"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    root = tmp_path / "models" / "depth_models"
    (root / "real").mkdir(parents=True)
    (root / "real" / "config.json").write_text("{}")
    os.symlink(outside, root / "linked")
    host.set_models_dir(str(tmp_path / "models"))
    try:
        assert host.list_model_dirs("depth_models") == ["real"]
        with pytest.raises(KinemaError, match="outside the depth_models folder"):
            host.resolve_model_dir("depth_models", "linked")
        with pytest.raises(KinemaError, match="not found.*Available: real"):
            host.resolve_model_dir("depth_models", "missing")
    finally:
        host.set_models_dir(None)


@pytest.fixture(scope="module")
def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


def test_depth_nodes_end_to_end(nodes, host_dirs):
    loader = nodes["KinemaDepthModelLoader"]
    assert demo.DEMO_DEPTH in loader.INPUT_TYPES()["required"]["model_name"][0]
    (model,) = loader().load(demo.DEMO_DEPTH, "fp32")
    assert isinstance(model, DepthEstimator) and model.dtype == torch.float32
    frames = smooth_frames(3, 48, 64)
    (depth,) = nodes["KinemaDepthEstimate"]().estimate(frames, model, 2)
    assert depth.shape == (3, 48, 64, 3) and float(depth.min()) == 0.0 and float(depth.max()) == 1.0
    assert torch.equal(depth[..., 0], depth[..., 1])
    (coarse,) = nodes["KinemaStructureFidelity"]().apply(depth, 3)
    assert coarse.shape == depth.shape and _high_pass_energy(coarse[..., 0]) < _high_pass_energy(depth[..., 0])
    (same,) = nodes["KinemaStructureFidelity"]().apply(depth, 0)
    assert torch.equal(same, depth)
    assert nodes["KinemaStructureFidelity"].INPUT_TYPES()["required"]["t_s"][1]["default"] == 0  # the maps as they are
    for bad in (frames[..., 0], torch.cat([frames, frames[..., :1]], -1), frames[:0], None):  # gray, RGBA, empty
        with pytest.raises(KinemaError, match=r"Depth estimation (takes (an )?IMAGE|got an empty)"):
            nodes["KinemaDepthEstimate"]().estimate(bad, model, 2)
    for cls in ("KinemaDepthModelLoader", "KinemaDepthEstimate", "KinemaStructureFidelity"):
        assert load_pack().NODE_DISPLAY_NAME_MAPPINGS[cls].endswith("(Kinema)")
        assert nodes[cls].CATEGORY.startswith("Kinema/")


def test_depth_loader_refuses_bad_names_and_folders(nodes, host_dirs, folders):
    loader = nodes["KinemaDepthModelLoader"]()
    for name in ("../x", "../depth_models/kinema_demo_dpt", "/etc", ""):
        with pytest.raises(KinemaError):
            loader.load(name, "fp32")
    with pytest.raises(KinemaError, match="not found.*kinema_demo_dpt"):
        loader.load("Intel/dpt-hybrid-midas", "fp32")
    clip = os.path.join(host_dirs.get_models_dir(), "depth_models", "not_depth_clip")
    shutil.copytree(folders["clip"], clip)
    try:
        with pytest.raises(KinemaError, match="not a depth model"):
            loader.load("not_depth_clip", "fp32")
    finally:
        shutil.rmtree(clip)


def test_depth_estimate_node_stops_on_interrupt(nodes, host_dirs, estimators):
    inner = estimators["dpt"]
    calls = []

    class Interrupting(torch.nn.Module):  # cancel arrives while the first batch runs
        def __init__(self):
            super().__init__()
            self.inner = inner.model

        def forward(self, **kwargs):
            calls.append(1)
            host_dirs.request_interrupt()
            return self.inner(**kwargs)

    model = DepthEstimator(Interrupting(), inner.preprocess, inner.info)
    try:
        with pytest.raises(host_dirs.KinemaInterrupted):
            nodes["KinemaDepthEstimate"]().estimate(smooth_frames(6, 32, 32), model, 2)
    finally:
        host_dirs.request_interrupt(False)
    assert len(calls) == 1
    with pytest.raises(KinemaError, match="connect Load Depth Model"):
        nodes["KinemaDepthEstimate"]().estimate(smooth_frames(1, 32, 32), "not a model", 2)


def test_runner_stands_in_the_demo_depth_model(nodes, host_dirs, demo_models_dir, monkeypatch):
    from kinema.nodes import runner

    monkeypatch.setattr(demo, "default_cache_dir", lambda: demo_models_dir)
    prompt = {"1": {"class_type": "KinemaDepthModelLoader",
                    "inputs": {"model_name": "Intel/dpt-hybrid-midas", "precision": "fp32"}},
              "2": {"class_type": "KinemaDepthModelLoader",
                    "inputs": {"model_name": demo.DEMO_DEPTH, "precision": "fp32"}}}
    notes = runner.use_demo_models(prompt, nodes, host_dirs)
    assert prompt["1"]["inputs"]["model_name"] == demo.DEMO_DEPTH
    assert any("'Intel/dpt-hybrid-midas' -> demo model 'kinema_demo_dpt'" in n for n in notes)
    assert not any("node 2" in n for n in notes)  # a listed folder is left alone
    assert demo.substitute("depth_models", "depth-anything/Depth-Anything-V2-Small-hf") == demo.DEMO_DEPTH


def test_depth_graph_runs_headless(nodes, host_dirs):
    from kinema.nodes.runner import run_prompt

    prompt = {
        "1": {"class_type": "KinemaLoadImage", "inputs": {"image": "kinema_demo_image.png"}},
        "2": {"class_type": "KinemaDepthModelLoader", "inputs": {"model_name": demo.DEMO_DEPTH, "precision": "fp32"}},
        "3": {"class_type": "KinemaDepthEstimate", "inputs": {"images": ["1", 0], "depth_model": ["2", 0],
                                                               "batch_size": 4}},
        "4": {"class_type": "KinemaStructureFidelity", "inputs": {"images": ["3", 0], "t_s": 2}},
        "5": {"class_type": "KinemaSaveVideo", "inputs": {"images": ["4", 0], "fps": 8.0, "format": "gif",
                                                          "loop_count": 0, "filename_prefix": "test/depth"}},
    }
    out = run_prompt(prompt, nodes, outputs_only=False, progress=False)
    image, depth = out["1"]["result"][0], out["4"]["result"][0]
    assert depth.shape == image.shape and 0.0 <= float(depth.min()) and float(depth.max()) <= 1.0
    assert out["5"]["ui"]["images"]


# --- preprocessing settings, prediction edge cases, batching ---------------------------------------
def test_nearest_resampling_matches_the_processor():
    """resample 0 (PIL's NEAREST) is torch's "nearest-exact", which picks the source pixel under each output pixel's
    centre as PIL does, not "nearest" (the pixel at its top-left): nothing is rounded, so the pixels are the
    processor's on the same 8-bit frame."""
    from transformers import DPTImageProcessor

    frames = smooth_frames(1, 48, 80, seed=7)
    cfg = {"size": {"height": 64, "width": 64}, "resample": 0}
    arrays = [(f * 255).round().to(torch.uint8).numpy() for f in frames]
    ref = DPTImageProcessor(**cfg)(images=arrays, return_tensors="pt")["pixel_values"]
    assert torch.allclose(DepthPreprocess.from_config(cfg)(frames), ref, rtol=0, atol=1e-6)


def test_a_preprocessor_config_without_keys_takes_the_processor_class_defaults():
    """Keys missing from preprocessor_config.json take DPTImageProcessor's class defaults, as transformers does:
    normalised, no aspect ratio kept (square 384x384 inputs from any frame), bicubic. resample may be written as
    PIL's filter name, in any case."""
    from transformers import DPTImageProcessor

    processor = DPTImageProcessor()
    pre = DepthPreprocess.from_config({})
    assert (pre.do_normalize, pre.keep_aspect_ratio, pre.do_resize, pre.multiple, pre.resample) == (
        processor.do_normalize, processor.keep_aspect_ratio, processor.do_resize, processor.ensure_multiple_of,
        int(processor.resample))
    x = pre(torch.zeros(1, 8, 16, 3))
    assert x.shape == (1, 3, 384, 384) and torch.equal(x, torch.full_like(x, -1.0))  # (0 - 0.5) / 0.5
    for name, code in (("BICUBIC", 3), ("Bilinear", 2), ("nearest", 0)):
        assert DepthPreprocess.from_config({"resample": name}).resample == code, name


class _Predicting(torch.nn.Module):
    """A stand-in depth network: ``predicted_depth`` is ``fn(pixel_values)`` (a parameter gives device and dtype)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        return type("Output", (), {"predicted_depth": self.fn(pixel_values) + self.unused})()


def _object_before_background(pixel_values, near, far):
    """[f, h, w] metres: an object ``near`` metres away (per frame, [f]) before a background ``far`` times as far."""
    f, _, h, w = pixel_values.shape
    metres = torch.full((f, h, w), float(far))
    metres[:, h // 4:3 * h // 4, w // 3:2 * w // 3] = 1.0
    return metres * near.view(f, 1, 1)


_SMALL_DA = DepthPreprocess(56, 56, keep_aspect_ratio=True, multiple=14, mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225))


def test_metric_inverse_depth_is_clipped_to_each_frames_own_range():
    """A metric model's inverse depth is clipped, after the resize, to each frame's own range at the network's
    resolution: the nearest surface is the maximum exactly (no bicubic overshoot above it), and a far frame is not
    clipped to the range of a nearer one in its batch (the result does not depend on the batch size)."""
    def scene(pixel_values):  # a dark frame: 1 m and 20 m; a bright one the same scene twice as far
        return _object_before_background(pixel_values, torch.where(pixel_values.mean(dim=(1, 2, 3)) < 0, 1.0, 2.0), 20)

    info = DepthModelInfo("scene", "depth_anything", metric=True, patch=14)
    est = DepthEstimator(_Predicting(scene), _SMALL_DA, info)
    frames = torch.cat([torch.zeros(1, 100, 180, 3), torch.ones(1, 100, 180, 3)])  # 56x98 inputs, resized up
    together = est.predict(frames, batch_size=2, inverse=True)
    assert [float(d.max()) for d in together] == [1.0, 0.5]
    assert [float(d.min()) for d in together] == pytest.approx([1 / 20, 1 / 40])
    assert torch.equal(est.predict(frames, batch_size=1, inverse=True), together)


def test_a_metric_prediction_of_zero_metres_stays_finite():
    """A metric model may predict 0 m (a sigmoid head saturating): its inverse is taken of at least 1e-6 m, so the
    depth map stays finite with that surface the brightest, instead of an infinity that fails the normalisation."""
    def touching(pixel_values):  # the top half of the frame at 0 m, the rest at 10 m
        f, _, h, w = pixel_values.shape
        metres = torch.full((f, h, w), 10.0)
        metres[:, :h // 2] = 0.0
        return metres

    est = DepthEstimator(_Predicting(touching), DepthPreprocess(56, 56, multiple=14),
                         DepthModelInfo("touching", "depth_anything", metric=True, patch=14))
    frames = torch.rand(1, 56, 56, 3)
    assert float(est.predict(frames, inverse=True).max()) == pytest.approx(1e6)
    depth = est.estimate(frames)
    assert float(depth[0, 0, 0]) == 1.0 and float(depth[0, -1, -1]) == 0.0


def test_non_finite_predictions_are_named():
    """A prediction holding NaN or infinity (damaged weights; an fp16 overflow) is a KinemaError naming the model
    and the fix, not a NaN or black depth map."""
    est = DepthEstimator(_Predicting(lambda pixel_values: pixel_values.mean(1) * float("nan")),
                         DepthPreprocess(56, 56, multiple=14), DepthModelInfo("broken", "dpt", patch=14))
    with pytest.raises(KinemaError, match="^Depth model 'broken' predicted non-finite values: its weights may be "
                                          "damaged, download the folder again$"):
        est.estimate(torch.rand(1, 56, 56, 3))
    with pytest.raises(KinemaError, match="'half' predicted non-finite values in fp16: load it with precision fp32"):
        normalize_depth(torch.tensor([[[0.0, float("inf")]]]), "half", torch.float16)


def test_batch_size_one_runs_one_frame_at_a_time(estimators):
    """batch_size 1, the setting that needs the least memory, gives the network one frame per call."""
    est = estimators["dpt"]
    single = DepthEstimator(OutOfMemoryAbove(est.model, 1), est.preprocess, est.info)
    done = []
    single.predict(smooth_frames(3, 32, 32), batch_size=1, on_batch=lambda n, total: done.append(n))
    assert single.model.calls == [1, 1, 1] and done == [1, 2, 3]


def test_out_of_memory_on_the_last_frame_has_nothing_smaller_to_retry(estimators):
    """Memory that runs out on a batch holding only the last frame (5 frames, batch_size 4) has no smaller batch
    to retry with: the error names batch_size at once instead of running the same one frame again."""
    est = estimators["dpt"]
    tight = DepthEstimator(OutOfMemoryAbove(est.model, 4), est.preprocess, est.info)

    def memory_fills_up(done, total):
        tight.model.frames = 0

    with pytest.raises(KinemaOutOfMemoryError, match="^depth estimation ran out of memory and there is nothing "
                                                     "smaller to retry with: lower batch_size on Depth Estimate"):
        tight.predict(smooth_frames(5, 32, 32), batch_size=4, on_batch=memory_fills_up)
    assert tight.model.calls == [4, 1]


def test_a_dpt_on_a_dinov2_backbone_takes_the_backbones_patch(tmp_path):
    """A DPT head on another backbone (DPT-DINOv2, e.g. facebook/dpt-dinov2-small-nyu) takes inputs down to the
    backbone's patch (DINOv2: 14 pixels), not DPTConfig's own patch_size (16, its ViT's)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    dinov2 = {"model_type": "dinov2", "image_size": 56, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 2, "mlp_ratio": 2, "out_features": ["stage1", "stage2", "stage3", "stage4"],
              "reshape_hidden_states": False}
    cfg = DPTConfig(backbone_config=dinov2, hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                    reassemble_factors=[4, 2, 1, 0.5], image_size=56, architectures=["DPTForDepthEstimation"])
    assert cfg.patch_size == 16 and not cfg.is_hybrid
    folder = tmp_path / "dpt_dinov2"
    DPTForDepthEstimation(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_resize": False}))
    est = load_depth_model(str(folder))
    assert est.info.patch == 14 and est.input_size(14, 56) == (14, 56)


def test_a_non_square_preprocessor_size_is_height_by_width():
    """size as {'height': .., 'width': ..} or [height, width] makes inputs that many rows by that many columns, as
    DPTImageProcessor makes them from the same config."""
    from transformers import DPTImageProcessor

    frames = smooth_frames(1, 30, 50, seed=2)
    ref = DPTImageProcessor(size={"height": 40, "width": 60})(
        images=[(frames[0] * 255).round().to(torch.uint8).numpy()], return_tensors="pt")["pixel_values"]
    assert ref.shape == (1, 3, 40, 60)
    for size in ({"height": 40, "width": 60}, [40, 60]):
        pre = DepthPreprocess.from_config({"size": size})
        assert (pre.height, pre.width) == (40, 60) and pre(frames).shape == ref.shape, size


@pytest.mark.parametrize("cfg", [{"size": True}, {"size": {"height": 0, "width": 64}}, {"size": [64, 0]},
                                 {"image_std": [0.5, 0.0, 0.5]}, {"image_mean": [0.5, 0.5]},
                                 {"image_std": [0.5] * 4}])
def test_preprocessor_values_no_processor_can_use_are_refused(cfg):
    """A bool size, a side of 0 pixels, one zero std (a division by zero) or a mean/std of other than 3 values is a
    KinemaError naming the file, not a model input of 1x1 pixels, infinities or a broadcasting error later."""
    with pytest.raises(KinemaError, match="^preprocessor_config.json: "):
        DepthPreprocess.from_config(cfg)


def test_lanczos_box_and_hamming_resample_as_bicubic():
    """PIL's lanczos (1), box (4) and hamming (5), by code or name, are done as bicubic, as transformers' torch
    backend does them."""
    frames = smooth_frames(1, 48, 80, seed=3)
    bicubic = DepthPreprocess.from_config({"size": [64, 64], "resample": 3})(frames)
    for code in (1, 4, 5, "LANCZOS", "box", "Hamming"):
        assert torch.equal(DepthPreprocess.from_config({"size": [64, 64], "resample": code})(frames), bicubic), code


def test_a_fixed_input_size_is_height_by_width():
    """A DPT-Hybrid of a non-square image_size [height, width] takes inputs of that height and width, not the
    transposed ones."""
    info = DepthModelInfo("hybrid", "dpt", fixed_size=(64, 96))
    est = DepthEstimator(_Predicting(lambda pixel_values: pixel_values.mean(1)), DepthPreprocess(64, 96), info)
    assert est.input_size(30, 30) == (64, 96)
    transposed = DepthEstimator(_Predicting(lambda pixel_values: pixel_values.mean(1)), DepthPreprocess(96, 64), info)
    with pytest.raises(KinemaError, match="takes exactly 64x96 inputs, but its preprocessor_config.json makes 96x64"):
        transposed.input_size(30, 30)


def test_a_sharded_folder_loads_and_a_missing_or_unreadable_index_is_named(folders, estimators, tmp_path):
    """Weights split into shards by model.safetensors.index.json load as one file does; a shard the index lists
    that is not there, or an index that is no JSON, is a KinemaError naming it."""
    from transformers import DPTForDepthEstimation

    folder = _copy(folders, "dpt", tmp_path, "sharded")
    os.remove(folder / "model.safetensors")
    DPTForDepthEstimation.from_pretrained(folders["dpt"]).save_pretrained(str(folder), max_shard_size="20KB")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    frames = smooth_frames(1, 64, 64)
    assert torch.equal(load_depth_model(str(folder)).predict(frames), estimators["dpt"].predict(frames))
    os.remove(folder / shards[-1])
    with pytest.raises(KinemaError, match=f"lacks the weight shards {shards[-1]} that model.safetensors.index.json"):
        load_depth_model(str(folder))
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(KinemaError, match="model.safetensors.index.json is unreadable"):
        load_depth_model(str(folder))


def test_one_fidelity_step_is_the_binomial_blur_then_the_mean_of_each_2x2_block():
    """One step of structure fidelity on an even-sized map: the 5x5 binomial blur [1, 4, 6, 4, 1] / 16 per axis
    (borders replicated), the mean of each 2x2 block, bilinear back to the size (pixel centres)."""
    depth = torch.rand(2, 12, 16, generator=torch.Generator().manual_seed(5))
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    blurred = F.conv2d(F.pad(depth.unsqueeze(1), (2, 2, 2, 2), mode="replicate"), torch.outer(k, k)[None, None])
    want = F.interpolate(F.avg_pool2d(blurred, 2), size=(12, 16), mode="bilinear", align_corners=False).squeeze(1)
    assert torch.allclose(structure_fidelity(depth, 1), want, atol=1e-6)
