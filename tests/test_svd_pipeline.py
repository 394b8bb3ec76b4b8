"""Stable Video Diffusion end to end: the loader on the published layout, the image conditioning, a whole
sampled video against the diffusers SVD pipeline on the same weights, the nodes and their bad inputs.

The checkpoint is the pack's demo SVD (``models/demo.py``: the published key layout at a tiny width, random
weights). diffusers gets the same tensors through the tests' own key mappings (``fixtures_svd_unet``,
``fixtures_temporal_vae``), with sgm's ResBlock GroupNorm eps (diffusers' differs, see fixtures_svd_unet).
"""
import copy
from types import SimpleNamespace
import os
import logging

import pytest
import torch

from conftest import load_pack
from fixtures_svd_pipeline import svd_state_dict, write_svd
from kinema.models import checkpoint, demo, pipelines, svd_model
from kinema.models.errors import KinemaError, KinemaOutOfMemoryError
from kinema.models.sampling import initial_noise
from kinema.models.vae import decode_frames

FRAMES, W, H = 6, 64, 48
VIDEO_TOL = 1e-4  # relative to max |reference|


@pytest.fixture(scope="module")
def svd_path(tmp_path_factory):
    return write_svd(str(tmp_path_factory.mktemp("svd") / "svd_xt_tiny.safetensors"))


@pytest.fixture(scope="module")
def bundle(svd_path):
    return checkpoint.load_svd(svd_path)


def _image_uint8():
    """The demo image at the video size, 8-bit (what a PNG holds): [H, W, 3]."""
    from kinema.models.demo_media import demo_image

    big = torch.from_numpy(demo_image()).float().div(255)[None]
    return (svd_model.fit_image(big, W, H)[0] * 255).round().to(torch.uint8)


def _image():
    return _image_uint8().float().div(255)[None]


def _conditioning(bundle, **kw):
    opts = svd_model.ImageConditioningOptions(width=W, height=H, frames=FRAMES, **kw)
    return svd_model.image_conditioning(bundle.image_encoder, bundle.vae, _image(), opts)


# -- loading -------------------------------------------------------------------------------------------------------

def test_loader_reads_the_published_layout(bundle):
    assert bundle.model.variant == "svd_xt" and bundle.model.guidance_min == 1.5
    assert bundle.model.unet.cfg.in_channels == 8 and bundle.model.unet.cfg.context_dim == 64
    assert hasattr(bundle.vae, "quant_conv")  # the conditioning encoder's quant_conv is used for encoding
    assert bundle.image_encoder.embed_dim == 64 and bundle.image_encoder.image_size == 224


def test_loader_takes_the_clip_vision_from_models_clip_vision(tmp_path):
    sd = {k: v for k, v in svd_state_dict().items() if not k.startswith("conditioner.embedders.0.")}
    path = str(tmp_path / "svd_no_clip.safetensors")
    demo._save(sd, path)
    with pytest.raises(KinemaError, match="clip_vision"):
        checkpoint.load_svd(path)
    clip_path = str(tmp_path / "clip_vision_h.safetensors")
    demo._save(demo.clip_vision_state_dict(0, torch.float32), clip_path)
    b = checkpoint.load_svd(path, clip_vision_path=clip_path)
    assert b.model.variant == "svd" and b.image_encoder.source == "clip_vision_h.safetensors"
    half = checkpoint.load_svd(path, dtype=torch.bfloat16, clip_vision_path=clip_path, encoder_dtype=torch.float32)
    assert half.image_encoder.dtype == torch.float32
    assert {p.dtype for p in half.model.unet.parameters()} == {torch.bfloat16}
    assert checkpoint.load_svd(path, dtype=torch.bfloat16, clip_vision_path=clip_path).image_encoder.dtype \
        == torch.bfloat16


def test_a_clip_vision_of_another_width_is_refused_by_name(tmp_path, bundle):
    """An image encoder whose embeddings the UNet cannot take (e.g. SD1.5's ViT-L, 768, where SVD takes 1024) is
    refused when loaded with the checkpoint, and a conditioning made with one is refused before sampling."""
    from dataclasses import replace

    narrow = replace(demo.DemoSizes(), clip_hidden=32)
    clip_path = str(tmp_path / "clip_vision_vit_l.safetensors")
    demo._save(demo.clip_vision_state_dict(0, torch.float32, narrow), clip_path)
    svd_path = str(tmp_path / "svd_tiny.safetensors")
    demo._save(svd_state_dict(), svd_path)
    with pytest.raises(KinemaError, match="'clip_vision_vit_l.safetensors' gives 32-wide image embeddings and the "
                                          "UNet of 'svd_tiny.safetensors' takes 64-wide"):
        checkpoint.load_svd(svd_path, clip_vision_path=clip_path)
    cond, uncond = _conditioning(bundle)
    cond = {**cond, "context": cond["context"][..., :32]}  # what the narrower encoder would have given
    with pytest.raises(KinemaError, match="positive image conditioning holds 32-wide .* takes 64-wide"):
        pipelines.sample_img2vid(bundle.model, cond, uncond, pipelines.empty_video_latent(FRAMES, W, H),
                                 pipelines.SampleOptions(steps=1))


def test_sd15_file_in_the_svd_loader_says_where_it_goes(tmp_path):
    path = str(tmp_path / "v1-5.safetensors")
    demo._save(demo.sd15_state_dict(0, torch.float32), path)
    with pytest.raises(KinemaError, match="SD1.5 checkpoint.*Load Checkpoint"):
        checkpoint.load_svd(path)


def test_svd_file_in_the_sd15_loader_says_where_it_goes(svd_path):
    with pytest.raises(KinemaError, match="Stable Video Diffusion.*Load SVD Checkpoint"):
        checkpoint.load_sd15(svd_path)


def test_an_sv3d_file_is_refused_by_name(tmp_path):
    """SV3D (orbital views) has SVD's UNet with another conditioning vector: 256 (sv3d_u) or 1280 (sv3d_p) wide."""
    sd = dict(svd_state_dict())
    key = "model.diffusion_model.label_emb.0.0.weight"
    sd[key] = sd[key][:, :256].contiguous()
    path = str(tmp_path / "sv3d_u.safetensors")
    demo._save(sd, path)
    with pytest.raises(KinemaError, match="'sv3d_u.safetensors' is not a Stable Video Diffusion image-to-video.*SV3D"):
        checkpoint.load_svd(path)


def test_truncated_svd_file_is_named(tmp_path, svd_path):
    data = open(svd_path, "rb").read()
    bad = tmp_path / "svd_cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(KinemaError, match="truncated"):
        checkpoint.load_svd(str(bad))


# -- conditioning --------------------------------------------------------------------------------------------------

def test_image_conditioning_follows_the_original(bundle):
    cond, uncond = _conditioning(bundle, fps=7, motion_bucket_id=127, augmentation_level=0.0)
    assert cond["context"].shape == (1, 1, 64) and cond["concat"].shape == (1, 4, H // 8, W // 8)
    assert cond["y"].shape == (1, 768)
    assert torch.equal(cond["y"], svd_model.micro_conditioning(6, 127, 0.0, 1))  # fps_id = fps - 1
    assert torch.equal(uncond["y"], cond["y"])
    assert not uncond["context"].any() and not uncond["concat"].any()
    # the concat latents: the VAE encoding (unscaled mean) of the image at the video size
    frame = svd_model.fit_image(_image(), W, H)
    px = frame.permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(cond["concat"], bundle.vae.encode(px), atol=1e-6)
    # the CLIP embedding of the clean image
    assert torch.allclose(cond["context"][:, 0], bundle.image_encoder.encode(frame), atol=1e-6)


def test_augmentation_noises_the_concat_latents_only(bundle):
    clean, _ = _conditioning(bundle, augmentation_level=0.0)
    noised, _ = _conditioning(bundle, augmentation_level=0.5, seed=3)
    again, _ = _conditioning(bundle, augmentation_level=0.5, seed=3)
    other, _ = _conditioning(bundle, augmentation_level=0.5, seed=4)
    assert torch.equal(noised["context"], clean["context"])
    assert not torch.allclose(noised["concat"], clean["concat"])
    assert torch.equal(noised["concat"], again["concat"]) and not torch.equal(noised["concat"], other["concat"])
    assert not torch.equal(noised["y"], clean["y"])  # cond_aug is part of the micro-conditioning
    # the noise: augmentation_level times a standard normal draw from the seed, added to the pixels in [-1, 1]
    from kinema.models.vae import encode_pixels

    pixels = svd_model.fit_image(_image(), W, H).permute(0, 3, 1, 2) * 2 - 1
    draw = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(3))
    want = encode_pixels(bundle.vae, pixels + 0.5 * draw, "test", "")
    assert torch.allclose(noised["concat"], want, atol=1e-5)


class OutOfMemoryAbove:
    """An encoder (VAE or CLIP vision) that raises the allocator's error on inputs of more than ``pixels``."""

    def __init__(self, net, pixels):
        self.net, self.pixels, self.calls = net, pixels, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def encode(self, x):
        self.calls.append(tuple(x.shape))
        if x.shape[-2] * x.shape[-1] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net.encode(x)


def test_the_init_image_encode_retries_in_tiles_then_names_the_size(bundle, caplog):
    opts = svd_model.ImageConditioningOptions(width=128, height=128, frames=FRAMES)
    vae = OutOfMemoryAbove(bundle.vae, 128 * 128 - 1)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        cond, _ = svd_model.image_conditioning(bundle.image_encoder, vae, _image(), opts)
    assert cond["concat"].shape == (1, 4, 16, 16) and bool(torch.isfinite(cond["concat"]).all())
    assert vae.calls[0] == (1, 3, 128, 128) and vae.calls[1] == (1, 3, 64, 64)
    assert "encoding the init image ran out of memory" in caplog.text and "tiles of 64" in caplog.text
    with pytest.raises(KinemaOutOfMemoryError, match="lower width and height on SVD Image Conditioning"):
        svd_model.image_conditioning(bundle.image_encoder, OutOfMemoryAbove(bundle.vae, 0), _image(), opts)
    encoder = copy.copy(bundle.image_encoder)  # its tower runs out of memory (the bundle's stays as it is)
    encoder.model = copy.copy(encoder.model)

    def out_of_memory(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    encoder.model.forward = out_of_memory
    # SVD encodes one image: the remedy is the loader's precision (its encoder is fp32 here) or free memory
    with pytest.raises(KinemaOutOfMemoryError, match=r"CLIP vision encoding ran out of memory: free GPU memory \(other "
                                                     r"programs using it\), or set precision to fp16 on Load SVD "
                                                     r"Checkpoint \(Kinema\)$"):
        svd_model.image_conditioning(encoder, bundle.vae, _image(), opts)
    assert svd_model._image_encode_remedy(SimpleNamespace(dtype=torch.float16)) == \
        "free GPU memory (other programs using it)"  # in fp16 already


@pytest.mark.parametrize("kw,match", [({"width": 60}, "multiple of 8"), ({"height": 4}, "multiple of 8"),
                                      ({"frames": 0}, "frames"), ({"fps": 0}, "fps"),
                                      ({"motion_bucket_id": -1}, "motion_bucket_id"),
                                      ({"motion_bucket_id": 1024}, "motion_bucket_id must be between 0 and 1023"),
                                      ({"augmentation_level": -0.01}, "augmentation_level must be between 0 and 10"),
                                      ({"augmentation_level": 10.5}, "augmentation_level")])
def test_bad_conditioning_options(bundle, kw, match):
    opts = dict(width=W, height=H, frames=FRAMES) | kw
    with pytest.raises(KinemaError, match=match):
        svd_model.image_conditioning(bundle.image_encoder, bundle.vae, _image(),
                                     svd_model.ImageConditioningOptions(**opts))


def test_conditioning_options_at_their_bounds_are_taken():
    for kw in ({"motion_bucket_id": 0}, {"motion_bucket_id": 1023}, {"augmentation_level": 0.0},
               {"augmentation_level": 10.0}, {"fps": 1}, {"frames": 1}):
        svd_model.ImageConditioningOptions(**kw).validate()


# -- a whole video against diffusers ------------------------------------------------------------------------------

def _diffusers_pipeline(bundle):
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures_svd_pipeline import diffusers_svd_pipeline

    return diffusers_svd_pipeline(bundle)


def test_sampled_video_matches_the_diffusers_svd_pipeline(bundle):
    pipe = _diffusers_pipeline(bundle)
    steps, seed = 4, 11
    cond, uncond = _conditioning(bundle, fps=7, motion_bucket_id=127, augmentation_level=0.0)
    latent = pipelines.empty_video_latent(FRAMES, W, H)
    ours = pipelines.sample_img2vid(
        bundle.model.with_options(cfg_mode="linear", min_cfg=1.0), cond, uncond, latent,
        pipelines.SampleOptions(seed=seed, steps=steps, cfg=2.5, sampler="euler", scheduler="karras"))
    noise = initial_noise(seed, tuple(latent.shape))
    from PIL import Image

    frame = Image.fromarray(_image_uint8().numpy())  # diffusers resizes only PIL input for CLIP
    with torch.no_grad():
        ref = pipe(frame, height=H, width=W, num_frames=FRAMES, num_inference_steps=steps, min_guidance_scale=1.0,
                   max_guidance_scale=2.5, fps=7, motion_bucket_id=127, noise_aug_strength=0.0,
                   decode_chunk_size=FRAMES, latents=noise[None], output_type="latent").frames[0]
    ours_scaled = ours * svd_model.SVD_LATENT_SCALE
    diff = float((ours_scaled - ref).abs().max())
    scale = float(ref.abs().max())
    print(f"SVD video: max |diff| {diff:.3g}, max |value| {scale:.3g}")
    assert diff <= VIDEO_TOL * scale
    # and the temporal decode of it, with the original chunking, matches diffusers' decode_latents
    with torch.no_grad():
        ref_px = pipe.decode_latents(ref[None], FRAMES, decode_chunk_size=FRAMES)[0]  # [c, f, H, W] in [-1, 1]
    ours_px = decode_frames(bundle.vae, ours, chunk=FRAMES)
    ref_img = ((ref_px.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    assert float((ours_px - ref_img).abs().max()) < 1e-4


def test_guidance_modes_change_the_video(bundle):
    cond, uncond = _conditioning(bundle)
    latent = pipelines.empty_video_latent(3, W, H)
    opts = pipelines.SampleOptions(seed=1, steps=2, cfg=3.0, scheduler="karras")
    lin = pipelines.sample_img2vid(bundle.model.with_options(cfg_mode="linear"), cond, uncond, latent, opts)
    tri = pipelines.sample_img2vid(bundle.model.with_options(cfg_mode="triangle"), cond, uncond, latent, opts)
    const = pipelines.sample_img2vid(bundle.model.with_options(cfg_mode="constant"), cond, uncond, latent, opts)
    assert not torch.allclose(lin, tri) and not torch.allclose(lin, const)


def test_long_svd_with_context_windows(bundle):
    from kinema.models.context import ContextOptions

    frames = 9
    cond, uncond = _conditioning(bundle)
    latent = pipelines.empty_video_latent(frames, W, H)
    windows = []
    ctx = ContextOptions(context_length=4, overlap=1, schedule="uniform_standard", fuse="pyramid", freenoise=True)
    out = pipelines.sample_img2vid(bundle.model, cond, uncond, latent,
                                   pipelines.SampleOptions(seed=2, steps=2, cfg=2.0, scheduler="karras", context=ctx),
                                   on_window=lambda: windows.append(1))
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert len(windows) >= 2 * 3  # at least 3 windows of 4 frames cover 9 frames, for each of the 2 steps


def test_a_conditioning_for_another_size_is_refused(bundle):
    cond, uncond = _conditioning(bundle)
    with pytest.raises(KinemaError, match="latent of the same conditioning node"):
        pipelines.sample_img2vid(bundle.model, cond, uncond, pipelines.empty_video_latent(2, 64, 64),
                                 pipelines.SampleOptions(steps=1))


@pytest.mark.parametrize("which, key", [("positive", "context"), ("negative", "concat"), ("positive", "y")])
def test_an_image_conditioning_holding_nan_is_refused_before_sampling(bundle, monkeypatch, which, key):
    cond, uncond = _conditioning(bundle)
    bad = dict(cond if which == "positive" else uncond)
    bad[key] = bad[key].clone().flatten().index_fill(0, torch.tensor([1]), float("nan")).view_as(bad[key])
    cond, uncond = (bad, uncond) if which == "positive" else (cond, bad)
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(KinemaError, match=f"the {which} conditioning holds NaN or infinite values"):
        pipelines.sample_img2vid(bundle.model, cond, uncond, pipelines.empty_video_latent(FRAMES, W, H),
                                 pipelines.SampleOptions(steps=1))


@pytest.mark.parametrize("key", ["context", "concat", "y"])
def test_an_image_conditioning_for_another_frame_count_is_refused(bundle, monkeypatch, key):
    """One image (batch 1, spread over the frames) or one entry per frame; any other batch (a conditioning built by
    hand, or edited by another pack) is named before sampling instead of failing in the UNet."""
    cond, uncond = _conditioning(bundle)
    cond = {**cond, key: torch.cat([cond[key]] * 2)}
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(KinemaError, match=f"the positive image conditioning's '{key}' has 2 entries for a video of "
                                          f"{FRAMES} frames"):
        pipelines.sample_img2vid(bundle.model, cond, uncond, pipelines.empty_video_latent(FRAMES, W, H),
                                 pipelines.SampleOptions(steps=1))


def test_an_svd_sampling_that_makes_nan_is_named_at_the_sampler(bundle, monkeypatch):
    cond, uncond = _conditioning(bundle)
    monkeypatch.setattr(pipelines, "_run_sampler", lambda *a, **k: torch.full((2,), float("inf")))
    with pytest.raises(KinemaError, match="sampling produced NaN or infinite values"):
        pipelines.sample_img2vid(bundle.model, cond, uncond, pipelines.empty_video_latent(FRAMES, W, H),
                                 pipelines.SampleOptions(steps=1))


# -- nodes ---------------------------------------------------------------------------------------------------------

def _node(name):
    return load_pack().NODE_CLASS_MAPPINGS[name]()


def test_nodes_image_to_video(bundle, previews):
    positive, negative, latent = _node("KinemaSVDConditioning").encode(
        bundle.image_encoder, bundle.vae, _image(), W, H, 3, 7, 127, 0.02, 0)
    assert latent["samples"].shape == (3, 4, H // 8, W // 8)
    # the node's fps, motion bucket and augmentation reach the micro-conditioning (fps - 1, as sgm), both sides;
    # the negative side has the image embedding and latents zeroed
    from kinema.models.svd import micro_conditioning

    want, _ = _conditioning(bundle, fps=7, motion_bucket_id=127, augmentation_level=0.02, seed=0)
    cond, uncond = positive[0][1]["kinema_image_conditioning"], negative[0][1]["kinema_image_conditioning"]
    assert torch.equal(cond["y"], micro_conditioning(6, 127, 0.02, 1)) and torch.equal(uncond["y"], cond["y"])
    assert torch.equal(cond["concat"], want["concat"]) and torch.equal(cond["context"], want["context"])
    assert not cond["concat"].eq(0).all() and uncond["concat"].eq(0).all() and uncond["context"].eq(0).all()
    (model,) = _node("KinemaPerFrameGuidance").apply(bundle.model, "triangle", 1.2, 1.0)
    assert model.cfg_mode == "triangle" and model.guidance_min == 1.2 and bundle.model.cfg_mode == "linear"
    (out,) = _node("KinemaVideoSampler").sample(model, positive, negative, latent, 0, 2, 2.5, "euler", "karras", 1.0)
    assert out["samples"].shape == latent["samples"].shape
    recorder, shown = previews  # one step preview each: the 3 frames, 2 x 2 (test_preview.py)
    assert shown == [("JPEG", 1, 512), ("JPEG", 2, 512)]
    assert [tuple(x.shape) for x in recorder.latents] == [(1, 4, 2 * H // 8, 2 * W // 8)] * 2
    (images,) = _node("KinemaVAEDecodeFrames").decode(bundle.vae, out, 0)
    assert images.shape == (3, H, W, 3)


def test_svd_nodes_pass_every_setting(bundle, svd_path, host_dirs, monkeypatch):
    """Values other than the defaults reach the engine: motion bucket, augmentation seed, Per-frame Guidance's
    period, VAE Decode Frames' frame chunk (which changes a temporal decode), the loader's VAE precision."""
    positive, _, _ = _node("KinemaSVDConditioning").encode(
        bundle.image_encoder, bundle.vae, _image(), W, H, FRAMES, 10, 40, 0.5, 3)
    cond = positive[0][1]["kinema_image_conditioning"]
    want, _ = _conditioning(bundle, fps=10, motion_bucket_id=40, augmentation_level=0.5, seed=3)
    assert torch.equal(cond["y"], want["y"]) and torch.equal(cond["concat"], want["concat"])
    other, _ = _conditioning(bundle, fps=10, motion_bucket_id=127, augmentation_level=0.5, seed=0)
    assert not torch.equal(cond["y"], other["y"]) and not torch.equal(cond["concat"], other["concat"])
    (model,) = _node("KinemaPerFrameGuidance").apply(bundle.model, "triangle", 1.2, 0.5)
    assert (model.cfg_mode, model.guidance_min, model.cfg_period) == ("triangle", 1.2, 0.5)
    latent = {"samples": torch.randn(8, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(1))}
    (chunked,) = _node("KinemaVAEDecodeFrames").decode(bundle.vae, latent, 4)
    assert torch.equal(chunked, decode_frames(bundle.vae, latent["samples"], 4))
    assert not torch.allclose(chunked, decode_frames(bundle.vae, latent["samples"], 8), atol=1e-4)
    import types

    from kinema.nodes import host

    monkeypatch.setattr(host, "_comfy_args", types.SimpleNamespace(bf16_vae=True))
    import shutil

    shutil.copy(svd_path, os.path.join(host.get_models_dir(), "checkpoints", "svd_xt_plumbing.safetensors"))
    try:
        model, _, vae = _node("KinemaSVDLoader").load("svd_xt_plumbing.safetensors", "auto")
        from kinema.models import placement
        from kinema.models.offload import OffloadOptions
        from kinema.models.placement import Placement

        moved = []  # the loader puts the UNet where the VRAM mode's policy keeps it between runs
        monkeypatch.setattr(placement, "_move", lambda m, device, on_move: moved.append((m, device)))
        monkeypatch.setattr(host, "memory_defaults", lambda: (
            OffloadOptions(mode="model", device="cpu", storage="cpu:1"), Placement(device="cpu", storage="cpu:1")))
        rested, _, _ = _node("KinemaSVDLoader").load("svd_xt_plumbing.safetensors", "auto")
    finally:
        os.remove(os.path.join(host.get_models_dir(), "checkpoints", "svd_xt_plumbing.safetensors"))
    assert next(vae.parameters()).dtype == torch.bfloat16 and next(model.unet.parameters()).dtype == torch.float32
    assert any(m is rested.unet and device == torch.device("cpu:1") for m, device in moved)


def test_text_conditioning_on_the_svd_model_is_refused(bundle):
    text = [[torch.zeros(1, 77, 64), {}]]
    latent = {"samples": pipelines.empty_video_latent(2, W, H)}
    with pytest.raises(KinemaError, match="SVD Image Conditioning"):
        _node("KinemaVideoSampler").sample(bundle.model, text, text, latent, 0, 1, 2.5, "euler", "karras", 1.0)


@pytest.mark.parametrize("name,variant", [
    ("svd.safetensors", "svd"), ("svd_image_decoder.safetensors", "svd"), ("svd_xt.safetensors", "svd_xt"),
    ("SVD_XT_1_1.safetensors", "svd_xt"), ("svd_xt_image_decoder.safetensors", "svd_xt"),
    ("sub/stableVideoDiffusion_img2vidXt11.safetensors", "svd_xt"), ("svd-xt.sft", "svd_xt"),
    ("svd_extended_ft.safetensors", "svd"), ("svd_next.safetensors", "svd"), ("svd_mixture.safetensors", "svd"),
])
def test_the_variant_is_read_from_xt_as_a_word_of_the_name(name, variant):
    assert svd_model.variant_of(name) == variant


def test_the_variants_guidance_ramps(bundle):
    """SVD's per-frame cfg ramps from 1.0, SVD-XT's from 1.5 (the releases' sampling configs)."""
    assert bundle.model.with_options(variant="svd").guidance_min == 1.0
    assert bundle.model.with_options(variant="svd_xt").guidance_min == 1.5
    assert svd_model.VARIANTS["svd"].frames == 14 and svd_model.VARIANTS["svd_xt"].frames == 25


def test_per_frame_guidance_keeps_the_checkpoints_min_cfg_by_default(bundle):
    """The node's default min_cfg (-1) is the checkpoint's own (1.0 for SVD, 1.5 for SVD-XT): putting the node in
    an SVD-XT graph to change the mode does not change XT's minimum."""
    node = _node("KinemaPerFrameGuidance")
    default = node.INPUT_TYPES()["required"]["min_cfg"][1]["default"]
    for variant in ("svd", "svd_xt"):
        source = bundle.model.with_options(variant=variant)
        (model,) = node.apply(source, "triangle", default, 1.0)
        assert model.cfg_mode == "triangle" and model.guidance_min == source.defaults.min_cfg
    assert node.apply(bundle.model, "linear", 0.0, 1.0)[0].guidance_min == 0.0
    with pytest.raises(KinemaError, match="min_cfg is -0.5: give 0 or more, or -1"):
        node.apply(bundle.model, "linear", -0.5, 1.0)


def test_per_frame_guidance_refuses_an_animatediff_model():
    from fixtures import motion_model

    with pytest.raises(KinemaError, match="image-to-video"):
        _node("KinemaPerFrameGuidance").apply(motion_model("v3"), "linear", 1.0, 1.0)


def test_too_many_frames_are_refused_before_allocation(bundle):
    with pytest.raises(KinemaError, match="lower the frame count"):
        _node("KinemaSVDConditioning").encode(bundle.image_encoder, bundle.vae, _image(), 8192, 8192, 4096, 7, 127,
                                              0.02, 0)


def test_fp16_file_loads_as_published(tmp_path):
    path = str(tmp_path / "svd_fp16.safetensors")
    demo._save({k: v.half() for k, v in svd_state_dict().items()}, path)
    kept = checkpoint.load_svd(path)  # dtype None: the file's
    assert kept.model.unet.dtype == torch.float16
    b = checkpoint.load_svd(path, dtype=torch.float32, vae_dtype=torch.float32)
    assert b.model.unet.dtype == torch.float32 and b.vae.dtype == torch.float32
    assert b.image_encoder.dtype == torch.float32


def test_the_image_decoder_release_decodes_every_frame_with_the_sd_vae(tmp_path, bundle):
    """svd_image_decoder / svd_xt_image_decoder: the same UNet and conditioning, and sgm's AutoencoderKL as the first
    stage: the frames are decoded one by one as diffusers' AutoencoderKL decodes them, on the file's weights."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from fixtures import diffusers_vae_config
    from kinema.models.vae import SVD_VAE_PREFIX, AutoencoderKL

    full = demo.svd_state_dict(image_decoder=True)
    path = str(tmp_path / "svd_xt_image_decoder.safetensors")
    demo._save(full, path)
    image_release = checkpoint.load_svd(path)
    assert isinstance(image_release.vae, AutoencoderKL) and image_release.model.variant == "svd_xt"
    ref_vae = DiffusersVAE(**diffusers_vae_config(checkpoint.sub_state_dict(full, SVD_VAE_PREFIX)))
    ref_vae.load_state_dict(convert_ldm_vae_checkpoint(full, ref_vae.config), strict=True)
    ref_vae.eval()
    # the conditioning: the CLIP embedding and micro-conditioning of the temporal release (the same tensors), the
    # init image's latents from the conditioning encoder (in the demo file a copy of the first stage's, as published)
    (cond, _), (cond_t, _) = (_conditioning(b, augmentation_level=0.0) for b in (image_release, bundle))
    assert torch.equal(cond["context"], cond_t["context"]) and torch.equal(cond["y"], cond_t["y"])
    with torch.no_grad():
        pixels = _image().permute(0, 3, 1, 2) * 2 - 1
        assert float((cond["concat"] - ref_vae.encode(pixels).latent_dist.mean).abs().max()) <= 1e-4
    latent = torch.randn(3, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        frames = decode_frames(image_release.vae, latent, chunk=3)
        one_by_one = torch.cat([decode_frames(image_release.vae, latent[i : i + 1], chunk=1) for i in range(3)])
        ref = ref_vae.decode(latent).sample.clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1)
    assert float((frames - one_by_one).abs().max()) <= 1e-5
    assert float((frames - ref).abs().max()) <= 1e-4
    out = _node("KinemaVAEDecodeFrames").decode(image_release.vae, {"samples": latent}, 0)[0]
    assert out.shape == (3, H, W, 3)


@pytest.fixture
def input_dir(tmp_path):
    from kinema.nodes import host

    folder = tmp_path / "input"
    folder.mkdir()
    host.set_input_dir(str(folder))
    yield folder
    host.set_input_dir(None)


def test_load_image_node_reads_the_input_folder_and_the_bundled_image(input_dir, tmp_path):
    from PIL import Image

    node = load_pack().NODE_CLASS_MAPPINGS["KinemaLoadImage"]
    assert "kinema_demo_image.png" in node.INPUT_TYPES()["required"]["image"][0]
    (img,) = node().load("kinema_demo_image.png")
    assert img.shape == (1, 288, 512, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(input_dir / "red.png")
    assert "red.png" in node.INPUT_TYPES()["required"]["image"][0]
    (red,) = node().load("red.png")
    assert red.shape == (1, 10, 20, 3) and float(red[..., 0].min()) == 1.0
    assert node.VALIDATE_INPUTS("missing.png") is not True
    assert node.VALIDATE_INPUTS("../etc/passwd") is not True
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(KinemaError, match="Cannot read"):
        from kinema.models.video_io import read_image

        read_image(str(tmp_path / "bad.png"))


def test_the_guidance_period_reaches_the_sampler(bundle, monkeypatch):
    """Per-frame Guidance's period is part of the guidance the sampler runs with, not only an attribute of the
    model: the per-frame scales handed to CFG are the triangle of that period."""
    from kinema.models.guidance import per_frame_cfg

    seen = []

    class Stop(Exception):
        pass

    def capture(denoiser, cond, uncond, cfg, temporal_scale=1.0):
        seen.append(cfg)
        raise Stop  # before sampling

    monkeypatch.setattr(pipelines, "CFGDenoiser", capture)
    cond, uncond = _conditioning(bundle)
    for period in (1.0, 0.5):
        with pytest.raises(Stop):
            pipelines.sample_img2vid(bundle.model.with_options(cfg_mode="triangle", min_cfg=1.0, cfg_period=period),
                                     cond, uncond, pipelines.empty_video_latent(FRAMES, W, H),
                                     pipelines.SampleOptions(steps=1, cfg=3.0))
    torch.testing.assert_close(seen[0], per_frame_cfg("triangle", 1.0, 3.0, FRAMES, 1.0))
    torch.testing.assert_close(seen[1], per_frame_cfg("triangle", 1.0, 3.0, FRAMES, 0.5))
    assert not torch.allclose(seen[0], seen[1])


def test_the_conditioning_node_takes_the_content_image(bundle):
    """SVD Image Conditioning's content_image gives the CLIP image context (the init image still gives the first
    frame's latent), as image_conditioning does."""
    content = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(2))
    positive, _, _ = _node("KinemaSVDConditioning").encode(
        bundle.image_encoder, bundle.vae, _image(), W, H, FRAMES, 7, 127, 0.0, 0, content_image=content)
    cond = positive[0][1]["kinema_image_conditioning"]
    opts = svd_model.ImageConditioningOptions(width=W, height=H, frames=FRAMES, fps=7, motion_bucket_id=127,
                                              augmentation_level=0.0, seed=0)
    want, _ = svd_model.image_conditioning(bundle.image_encoder, bundle.vae, _image(), opts, content_image=content)
    plain, _ = svd_model.image_conditioning(bundle.image_encoder, bundle.vae, _image(), opts)
    assert torch.equal(cond["context"], want["context"]) and not torch.equal(cond["context"], plain["context"])
    assert torch.equal(cond["concat"], plain["concat"])


@pytest.mark.parametrize("h, w, ok", [(1, 5, False), (5, 1, False), (2, 2, True)])
def test_an_init_image_of_one_pixel_row_or_column_is_refused(h, w, ok):
    image = torch.rand(1, h, w, 3)
    if ok:
        assert svd_model.fit_image(image, 16, 16).shape == (1, 16, 16, 3)
        return
    with pytest.raises(KinemaError, match=f"the init image is {w}x{h}: too small to start a video from"):
        svd_model.fit_image(image, 16, 16)


def test_the_sampler_hands_the_svd_pipeline_each_side_and_its_hooks(bundle, monkeypatch):
    """Positive and negative image conditionings reach the image-to-video pipeline on their own sides, with the
    step callback and the per-window hook (progress and Cancel under context windows)."""
    from kinema.nodes.sampler import IMAGE_CONDITIONING

    seen = {}

    def spy(model, positive, negative, latent, opts, callback=None, on_window=None):
        seen.update(positive=positive, negative=negative, callback=callback, on_window=on_window)
        return latent

    monkeypatch.setattr(pipelines, "sample_img2vid", spy)
    sides = [{"context": torch.randn(1, 1, 64), "concat": torch.zeros(1, 4, H // 8, W // 8)} for _ in range(2)]
    positive, negative = ([[c["context"], {IMAGE_CONDITIONING: c}]] for c in sides)
    latent = {"samples": pipelines.empty_video_latent(2, W, H)}
    _node("KinemaVideoSampler").sample(bundle.model, positive, negative, latent, 0, 1, 2.5, "euler", "karras", 1.0)
    assert seen["positive"] is sides[0] and seen["negative"] is sides[1]
    assert callable(seen["callback"]) and callable(seen["on_window"])
