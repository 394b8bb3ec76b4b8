"""Node classes called directly, without ComfyUI: the text-to-video graph by hand, and bad inputs."""
import logging
import os

import pytest
import torch

from conftest import load_pack
from kinema.models.errors import KinemaError


@pytest.fixture(scope="module")
def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


def test_every_node_is_a_documented_v1_class(nodes):
    display = load_pack().NODE_DISPLAY_NAME_MAPPINGS
    assert set(nodes) == set(display)
    for node_id, cls in nodes.items():
        assert node_id.startswith("Kinema") and display[node_id].endswith("(Kinema)")
        assert cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        assert hasattr(cls, cls.FUNCTION)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) == 2 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        for t in cls.RETURN_TYPES:
            assert t in ("IMAGE", "LATENT", "CONDITIONING", "INT", "FLOAT") or t.startswith("KINEMA_")


@pytest.mark.parametrize("node_id,name,key,want", [
    # SVD's reference settings: 14 frames (SVD; SVD-XT 25), fps 7 (the model is given fps - 1 = 6, the
    # reference script's fps_id), motion bucket 127 and augmentation 0.02 (its cond_aug), as trained
    ("KinemaSVDConditioning", "video_frames", "default", 14),
    ("KinemaSVDConditioning", "fps", "default", 7),
    ("KinemaSVDConditioning", "motion_bucket_id", "default", 127),
    ("KinemaSVDConditioning", "augmentation_level", "default", 0.02),
    # AnimateDiff was trained on linear betas (ComfyUI's sqrt_linear); motion scale goes up to twice the trained one
    ("KinemaApplyMotionModule", "beta_schedule", "default", "linear"),
    ("KinemaApplyMotionModule", "motion_scale", "max", 2.0),
    # a window may be one frame, overlap may be none, up to 8 stride levels; FreeNoise on by default
    ("KinemaContextOptions", "context_length", "min", 1),
    ("KinemaContextOptions", "context_overlap", "min", 0),
    ("KinemaContextOptions", "context_stride", "max", 8),
    ("KinemaContextOptions", "freenoise", "default", True),
    # KSampler's: 20 steps, 64-bit seeds, denoise at most 1
    ("KinemaVideoSampler", "steps", "default", 20),
    ("KinemaVideoSampler", "seed", "max", 0xFFFFFFFFFFFFFFFF),
    ("KinemaVideoSampler", "denoise", "max", 1.0),
])
def test_input_defaults_and_ranges_that_matter(nodes, node_id, name, key, want):
    assert nodes[node_id].INPUT_TYPES()["required"][name][1][key] == want


def test_context_options_default_to_the_widgets_freenoise(nodes):
    widget = nodes["KinemaContextOptions"].INPUT_TYPES()["required"]["freenoise"][1]["default"]
    (opts,) = nodes["KinemaContextOptions"]().build(16, 4, "uniform_standard")
    assert opts.freenoise is widget


def test_the_svd_loader_gives_the_model_the_hosts_memory_policy(nodes, host_dirs):
    from kinema.nodes import host

    model, _, _ = nodes["KinemaSVDLoader"]().load("kinema_demo_svd.safetensors", "fp32")
    assert model.offload == host.memory_defaults()[0]


def test_loaders_list_the_models_folders(nodes, host_dirs):
    ckpts = nodes["KinemaCheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    mms = nodes["KinemaMotionModuleLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "kinema_demo_sd15.safetensors" in ckpts
    assert {"kinema_demo_mm_v1.safetensors", "kinema_demo_mm_v2.safetensors", "kinema_demo_mm_v3.safetensors"} <= set(mms)


def test_txt2vid_graph_by_hand(nodes, host_dirs, caplog):
    model, clip, vae = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v3.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")
    assert model.motion is None and video.motion is mm  # the loaded model is left as it was
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "a (red:1.2) fox running")
    (neg,) = nodes["KinemaTextEncode"]().encode(clip, "")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(6, 64, 48)
    assert latent["samples"].shape == (6, 4, 6, 8)
    (out,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, latent, 7, 3, 7.5, "euler_ancestral", "normal", 1.0)
    assert out["samples"].shape == (6, 4, 6, 8) and torch.isfinite(out["samples"]).all()
    assert not torch.equal(out["samples"], latent["samples"])
    (again,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, latent, 7, 3, 7.5, "euler_ancestral", "normal", 1.0)
    assert torch.equal(again["samples"], out["samples"])  # same seed, same video
    masked = {**latent, "noise_mask": torch.ones(6, 1, 48, 64)}  # e.g. from core's SetLatentNoiseMask
    with caplog.at_level(logging.WARNING, logger="kinema"):
        (unmasked,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, {**masked, "note": 1}, 7, 1, 7.5,
                                                            "euler", "normal", 1.0)
    assert "noise_mask is ignored" in caplog.text
    assert "noise_mask" not in unmasked and unmasked["note"] == 1  # not handed on to a core sampler downstream
    # frames 6-11 of a longer batch (core's Latent From Batch): their noise, as ComfyUI's KSampler draws it
    part = {**latent, "batch_index": list(range(6, 12))}
    (later,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, part, 7, 3, 7.5, "euler_ancestral", "normal", 1.0)
    assert later["batch_index"] == part["batch_index"] and not torch.equal(later["samples"], out["samples"])
    for bad in ([0, 1], [0, 1, 2, 3, 4, -5], [0.5] * 6, "012345"):
        with pytest.raises(KinemaError, match="batch_index must list 6 whole numbers"):
            nodes["KinemaVideoSampler"]().sample(video, pos, neg, {**latent, "batch_index": bad}, 7, 1, 7.5,
                                                 "euler", "normal", 1.0)
    (images,) = nodes["KinemaVAEDecodeFrames"]().decode(vae, out, 4)
    assert images.shape == (6, 48, 64, 3) and images.min() >= 0 and images.max() <= 1
    ui = nodes["KinemaSaveVideo"]().save(images, 8.0, "gif", 0, "test/txt2vid")
    saved = ui["ui"]["images"][0]
    path = os.path.join(host_dirs.get_output_directory(), saved["subfolder"], saved["filename"])
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("node_id,args,match", [
    ("KinemaApplyMotionModule", (None, None, float("nan"), "linear"),
     r"Apply Motion Module \(Kinema\): input 'motion_scale': expected a finite number, got nan"),
    ("KinemaApplyMotionModule", (None, None, 1.0, "bogus"), r"input 'beta_schedule': 'bogus' is not one of"),
    ("KinemaTemporalGuidance", (None, float("inf")), r"input 'temporal_scale': expected a finite number"),
    ("KinemaTemporalGuidance", (None, 10**400), r"input 'temporal_scale': expected a finite number, got one of 401"),
    ("KinemaPerFrameGuidance", (None, "linear", float("nan"), 1.0), r"input 'min_cfg': expected a finite number"),
    ("KinemaPerFrameGuidance", (None, "bogus", 1.0, 1.0), r"input 'mode': 'bogus' is not one of"),
    ("KinemaEmptyVideoLatent", (2.5, 64, 64), r"input 'frames': expected an integer, got 2.5"),
    ("KinemaEmptyVideoLatent", ("8", 64, 64), r"input 'frames': expected an integer, got str '8'"),
    ("KinemaVideoSampler", (None, None, None, None, 2**64, 3, 7.5, "euler", "normal", 1.0),
     r"input 'seed': 18446744073709551616 is bigger than the maximum"),
    ("KinemaVideoSampler", (None, None, None, None, 0, float("nan"), 7.5, "euler", "normal", 1.0),
     r"input 'steps': expected an integer, got nan"),
    ("KinemaVideoSampler", (None, None, None, None, 0, 3, 7.5, "euler", "normal", 1.0, True),
     r"input 'attention_chunk': expected an integer, got bool True"),
    ("KinemaSaveVideo", (None, 8.0, "gif", float("inf"), "v"), r"input 'loop_count': expected an integer, got inf"),
    ("KinemaMemoryPolicy", (None, "block", float("nan")), r"input 'resident_blocks': expected an integer"),
    ("KinemaTemporalGuidance", (None, -0.5), r"Temporal Guidance \(Kinema\): input 'temporal_scale': -0.5 is smaller"),
    ("KinemaPromptSchedule", (None, "0: a", "cubic"), r"input 'interpolation': 'cubic' is not one of"),
])
def test_widget_values_are_checked_before_a_node_runs(nodes, node_id, args, match):
    """ComfyUI lets NaN through a FLOAT's min/max, and Python or API callers reach a node unchecked: every node's
    widget values are checked against its INPUT_TYPES first (nodes/inputs.py), naming the node and the input."""
    with pytest.raises(KinemaError, match=match):
        getattr(nodes[node_id](), nodes[node_id].FUNCTION)(*args)


def test_every_node_checks_its_widget_values(nodes):
    for cls in nodes.values():
        assert getattr(getattr(cls, cls.FUNCTION), "_kinema_inputs_checked", False), cls.__name__


@pytest.mark.parametrize("frames,width,height,match", [
    (0, 64, 64, "input 'frames': 0 is smaller than the minimum 1"),
    (4, 60, 64, "width must be a positive multiple of 8"),
    (4, 64, 30, "height must be a positive multiple of 8"),
])
def test_empty_latent_bad_sizes(nodes, frames, width, height, match):
    with pytest.raises(KinemaError, match=match):
        nodes["KinemaEmptyVideoLatent"]().make(frames, width, height)


def test_text_encode_reads_embeddings_from_the_embeddings_folder(nodes, host_dirs, tmp_path, monkeypatch, caplog):
    """embedding:name finds models/embeddings/name(.safetensors|.pt|.bin): the vectors of "red fox" from the
    token table encode as the words, in Text Encode and in Prompt Schedule; an unknown name is dropped with a
    warning; a name leaving the folder is not looked up outside it."""
    from kinema.models import encoders
    from safetensors.torch import save_file

    _, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    table = encoders._transformer(clip.model).embeddings.token_embedding.weight
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": table[encoders.tokenize("red fox")].detach().clone()}, str(folder / "fox.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((folder / "fox.safetensors").read_bytes())
    monkeypatch.setattr(host_dirs, "_extra_model_folders", {"embeddings": [str(folder)]})
    (got,) = nodes["KinemaTextEncode"]().encode(clip, "a photo of embedding:fox, snow")
    (want,) = nodes["KinemaTextEncode"]().encode(clip, "a photo of red fox, snow")
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[0][1]["pooled_output"], want[0][1]["pooled_output"])
    (travel,) = nodes["KinemaPromptSchedule"]().encode(clip, "0: embedding:fox\n8: a dog")
    (plain,) = nodes["KinemaPromptSchedule"]().encode(clip, "0: red fox\n8: a dog")
    assert torch.equal(travel[0][0], plain[0][0])
    with caplog.at_level(logging.WARNING, logger="kinema"):
        (missing,) = nodes["KinemaTextEncode"]().encode(clip, "a photo of embedding:../outside snow")
    assert "'embedding:../outside' in the prompt was not found" in caplog.text
    assert torch.equal(missing[0][0], nodes["KinemaTextEncode"]().encode(clip, "a photo of snow")[0][0][0])


def test_empty_latent_takes_the_size_of_frames(nodes):
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(1, 8, 8, size_of=torch.rand(3, 24, 40, 3))
    assert latent["samples"].shape == (3, 4, 3, 5)
    with pytest.raises(KinemaError, match="size_of frames are 60x24.*resize or crop the frames"):
        nodes["KinemaEmptyVideoLatent"]().make(1, 8, 8, size_of=torch.rand(3, 24, 60, 3))


def test_loader_refuses_names_outside_the_models_folder(nodes, host_dirs):
    for name in ("../checkpoints/kinema_demo_sd15.safetensors", "/etc/passwd", "../../secret.safetensors"):
        with pytest.raises(KinemaError):
            nodes["KinemaCheckpointLoader"]().load(name, "fp32")


def test_loaders_refuse_the_wrong_kind_of_file(nodes, host_dirs):
    import shutil

    folder = os.path.join(host_dirs.get_models_dir(), "checkpoints")
    wrong = os.path.join(folder, "actually_a_motion_module.safetensors")
    shutil.copy(os.path.join(host_dirs.get_models_dir(), "animatediff_models", "kinema_demo_mm_v2.safetensors"), wrong)
    try:
        with pytest.raises(KinemaError, match="is an AnimateDiff motion module, not an SD1.5 checkpoint"):
            nodes["KinemaCheckpointLoader"]().load("actually_a_motion_module.safetensors", "fp32")
    finally:
        os.remove(wrong)
    mm_folder = os.path.join(host_dirs.get_models_dir(), "animatediff_models")
    wrong = os.path.join(mm_folder, "actually_a_checkpoint.safetensors")
    shutil.copy(os.path.join(folder, "kinema_demo_sd15.safetensors"), wrong)
    try:
        with pytest.raises(KinemaError, match="is an SD1.5 checkpoint, not an AnimateDiff motion module"):
            nodes["KinemaMotionModuleLoader"]().load("actually_a_checkpoint.safetensors", "fp32")
    finally:
        os.remove(wrong)


def test_too_many_frames_for_the_motion_module(nodes, host_dirs):
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v1.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "x")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(25, 16, 16)
    with pytest.raises(KinemaError, match="kinema_demo_mm_v1.safetensors' sees at most 24 frames"):
        nodes["KinemaVideoSampler"]().sample(video, pos, pos, latent, 0, 1, 7.5, "euler", "normal", 1.0)


def test_the_motion_module_loader_loads_in_its_precision(nodes, host_dirs):
    loader = nodes["KinemaMotionModuleLoader"]()
    for precision, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        (mm,) = loader.load("kinema_demo_mm_v2.safetensors", precision)
        assert {p.dtype for p in mm.parameters()} == {dtype}, precision

def test_interrupt_stops_the_sampler_within_a_step(nodes, host_dirs):
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "x")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(2, 16, 16)
    calls = []
    real_call = type(model).__call__

    def counting(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            host_dirs.request_interrupt()
        return real_call(self, *a, **k)

    type(model).__call__ = counting
    try:
        with pytest.raises(host_dirs.KinemaInterrupted):
            nodes["KinemaVideoSampler"]().sample(model, pos, pos, latent, 0, 50, 1.0, "euler", "normal", 1.0)
    finally:
        type(model).__call__ = real_call
        host_dirs.request_interrupt(False)
    assert len(calls) == 2  # stopped right after the step during which Cancel came


def test_sd15_only_nodes_refuse_an_svd_model(nodes, host_dirs):
    """Apply Motion Module and Load LoRA name what they take instead of a raw TypeError / a silent SD1.5 merge."""
    svd_model, _, _ = nodes["KinemaSVDLoader"]().load("kinema_demo_svd.safetensors", "fp32")
    _, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v2.safetensors", "fp32")
    with pytest.raises(KinemaError, match=r"Apply Motion Module \(Kinema\).*Stable Video Diffusion model.*motion "
                                          r"modules are for SD1.5 models from Load Checkpoint \(Kinema\)"):
        nodes["KinemaApplyMotionModule"]().apply(svd_model, mm, 1.0, "linear")
    with pytest.raises(KinemaError, match=r"Load LoRA \(Kinema\) works on SD1.5 models.*Stable Video Diffusion"):
        nodes["KinemaLoRALoader"]().apply(svd_model, clip, "kinema_demo_lora_sd15.safetensors", 1.0, 1.0)


def test_vae_tiling_is_checked_in_the_pixels_entered(nodes, host_dirs, caplog):
    _, _, vae = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    # an overlap of half the tile or more (the default 64 with a small tile) is lowered to a quarter of the tile
    decode = nodes["KinemaVAEDecodeFrames"]().decode
    latent_big = {"samples": torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(0))}
    with caplog.at_level(logging.WARNING, logger="kinema"):
        (lowered,) = decode(vae, latent_big, 0, 96, 64)
    assert "VAE Decode Frames (Kinema): tile_overlap 64 pixels is not under half of tile_size 96; using 24" \
        in caplog.text
    (explicit,) = decode(vae, latent_big, 0, 96, 24)
    (other,) = decode(vae, latent_big, 0, 96, 8)
    assert torch.equal(lowered, explicit) and not torch.equal(lowered, other)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        (small,) = decode(vae, latent_big, 0, 64)  # the node's default overlap, 64
    assert "tile_overlap 64 pixels is not under half of tile_size 64; using 16" in caplog.text
    assert torch.equal(small, decode(vae, latent_big, 0, 64, 16)[0])
    with pytest.raises(KinemaError, match=r"multiples of 8 pixels.*got 100 and 16"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, latent, 0, 100, 16)
    with pytest.raises(KinemaError, match=r"multiples of 8 pixels.*got 96 and 12"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, latent, 0, 96, 12)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        (encoded,) = nodes["KinemaVAEEncodeFrames"]().encode(vae, torch.rand(1, 64, 64, 3), 1, 64, 32)
    assert "VAE Encode Frames (Kinema): tile_overlap 32 pixels is not under half of tile_size 64; using 16" \
        in caplog.text and encoded["samples"].shape == (1, 4, 8, 8)
    with pytest.raises(KinemaError, match=r"tile_size must be 0 \(off\) or at least 64 pixels, got 32"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, latent, 0, 32, 8)
    with pytest.raises(KinemaError, match=r"input 'tile_size': expected an integer, got 64.5"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, latent, 0, 64.5, 8)


def test_latent_and_image_and_text_inputs_are_checked(nodes, host_dirs):
    model, clip, vae = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "x")
    sampler = nodes["KinemaVideoSampler"]()
    with pytest.raises(KinemaError, match=r"Video Sampler \(Kinema\): the latent input is a dict without 'samples'"):
        sampler.sample(model, pos, pos, {}, 0, 1, 7.5, "euler", "normal", 1.0)
    with pytest.raises(KinemaError, match=r"the latent's 'samples' is a list, not a tensor"):
        sampler.sample(model, pos, pos, {"samples": [[0.0]]}, 0, 1, 7.5, "euler", "normal", 1.0)
    with pytest.raises(KinemaError, match=r"VAE Decode Frames \(Kinema\): the latent holds 0 frames"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, {"samples": torch.zeros(0, 4, 8, 8)}, 0)
    with pytest.raises(KinemaError, match=r"VAE Decode Frames \(Kinema\): the latent is 8x0 latent pixels, an empty"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, {"samples": torch.zeros(2, 4, 0, 8)}, 0)
    with pytest.raises(KinemaError, match=r"the latent holds NaN or infinite values.*precision to bf16 or fp32"):
        nodes["KinemaVAEDecodeFrames"]().decode(vae, {"samples": torch.full((1, 4, 8, 8), float("nan"))}, 0)
    with pytest.raises(KinemaError, match=r"VAE Encode Frames \(Kinema\) takes IMAGE floats in \[0, 1\], got "
                                          r"torch.uint8: divide 8-bit frames by 255"):
        nodes["KinemaVAEEncodeFrames"]().encode(vae, torch.full((1, 64, 64, 3), 200, dtype=torch.uint8), 1)
    with pytest.raises(KinemaError, match=r"Text Encode \(Kinema\): 'text' must be text, got NoneType"):
        nodes["KinemaTextEncode"]().encode(clip, None)
    with pytest.raises(KinemaError, match=r"prompt weight nan in '\(fox:nan\)'"):
        nodes["KinemaTextEncode"]().encode(clip, "a (fox:nan)")


def test_frames_holding_nan_are_refused_where_they_enter(nodes):
    """NaN or infinite pixels would become NaN latents, hints or depth maps, noticed (if at all) nodes later."""
    from fixtures import vae
    from kinema.models import addons
    from kinema.models import vae as vae_ops

    frames = torch.rand(3, 16, 16, 3)
    frames[1, 2, 3, 0] = float("nan")
    with pytest.raises(KinemaError, match="VAE encoding: frame 2 holds NaN or infinite values"):
        vae_ops.encode_frames(vae(), frames)
    with pytest.raises(KinemaError, match="ControlNet: frame 2 holds NaN or infinite values"):
        addons.control_hint(None, frames)
    with pytest.raises(KinemaError, match=r"Structure Fidelity \(Kinema\): frame 2 holds NaN"):
        nodes["KinemaStructureFidelity"]().apply(frames, 1)
    with pytest.raises(KinemaError, match="convert the frames to RGB"):
        nodes["KinemaStructureFidelity"]().apply(torch.rand(3, 16, 16, 4), 1)
    with pytest.raises(KinemaError, match="divide 8-bit images by 255"):
        addons.control_hint(None, (frames.nan_to_num() * 255).to(torch.uint8))


def test_an_interrupt_before_the_sampler_starts_runs_no_step(nodes, host_dirs, monkeypatch):
    """Cancel pressed while the nodes before it ran: the sampler stops before its first model call."""
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "x")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(2, 16, 16)
    calls = []
    real_call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    host_dirs.request_interrupt()
    try:
        with pytest.raises(host_dirs.KinemaInterrupted):
            nodes["KinemaVideoSampler"]().sample(model, pos, pos, latent, 0, 3, 1.0, "euler", "normal", 1.0)
    finally:
        host_dirs.request_interrupt(False)
    assert calls == []


def test_the_functions_defaults_are_the_widgets_defaults(nodes):
    """A Python or API caller that leaves an input out (an API workflow, one saved before the input existed) gets
    the widget's default, not another value of the function's own; an optional link, None."""
    import inspect

    for node_id, cls in nodes.items():
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for name, (_, spec) in cls.INPUT_TYPES().get(section, {}).items():
                default = params[name].default
                if section == "optional" or ("default" in spec and default is not inspect.Parameter.empty):
                    assert default == spec.get("default"), f"{node_id}.{name}"


def test_apply_controlnet_and_ip_adapter_refuse_an_svd_model(nodes, host_dirs):
    """Named at the node, not a raw AttributeError (an SVD model has no controls / contents) or a silent attach."""
    svd_model, _, _ = nodes["KinemaSVDLoader"]().load("kinema_demo_svd.safetensors", "fp32")
    (controlnet,) = nodes["KinemaControlNetLoader"]().load("kinema_demo_controlnet_depth.safetensors", "fp32")
    (ip_adapter,) = nodes["KinemaIPAdapterLoader"]().load("kinema_demo_ip_adapter_sd15.safetensors", "fp32")
    (clip_vision,) = nodes["KinemaCLIPVisionLoader"]().load("kinema_demo_clip_vision.safetensors", "fp32")
    image = torch.zeros(1, 64, 64, 3)
    with pytest.raises(KinemaError, match=r"Apply ControlNet \(Kinema\) works on SD1.5 models.*Stable Video Diff"):
        nodes["KinemaApplyControlNet"]().apply(svd_model, controlnet, image)
    with pytest.raises(KinemaError, match=r"Apply IP-Adapter \(Kinema\) works on SD1.5 models.*SVD Image Cond"):
        nodes["KinemaApplyIPAdapter"]().apply(svd_model, ip_adapter, clip_vision, image)


def test_apply_ip_adapter_stops_on_cancel_before_encoding_the_image(nodes, host_dirs, monkeypatch):
    """Cancel pressed before it runs: the CLIP vision encoder (the node's cost) is not run."""
    from kinema.models import addons

    model, _, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (ip_adapter,) = nodes["KinemaIPAdapterLoader"]().load("kinema_demo_ip_adapter_sd15.safetensors", "fp32")
    (clip_vision,) = nodes["KinemaCLIPVisionLoader"]().load("kinema_demo_clip_vision.safetensors", "fp32")
    encoded = []
    monkeypatch.setattr(addons, "image_content", lambda *a, **k: encoded.append(a))
    host_dirs.request_interrupt()
    try:
        with pytest.raises(host_dirs.KinemaInterrupted):
            nodes["KinemaApplyIPAdapter"]().apply(model, ip_adapter, clip_vision, torch.zeros(1, 64, 64, 3))
    finally:
        host_dirs.request_interrupt(False)
    assert encoded == []
