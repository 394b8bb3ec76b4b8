"""On a CUDA device: the paths the CPU cannot exercise (skipped without one; CI has none).

- block offload with the prefetch copies on a side stream (``offload.CopyStream``): the same video as the plain
  path, at most ``resident`` blocks on the GPU, pinned storage copies, and nothing left on the GPU after a call;
- model offload: the same video, and the GPU memory back where it was;
- a compiled UNet (inductor) under model and block offload: the same video; a compiled temporal decoder (inductor,
  fp16): the same frames;
- half precision: a finite video close to fp32's, and SVD's temporal decoder in fp16 (CUDA's own GroupNorm kernel:
  float32 statistics);
- a real out-of-memory error during decode (the process's GPU memory capped): retried once with fewer frames;
- an SVD init image already on the GPU (another node's IMAGE): the conditioning of the same image on the CPU;
- ancestral samplers' fresh noise drawn from a generator on the GPU, as ComfyUI's; ComfyUI's --cpu-vae: sampling on
  the GPU, the decode on the CPU.

``KINEMA_TEST_DEVICE`` runs the device-independent parts on another device (``cpu``: a check of the tests
themselves on a machine without a GPU).
"""
import copy
import os

import pytest
import torch
from fixtures import motion_model
from fixtures_offload import Residency
from kinema.models import pipelines
from kinema.models.memory import cast_weights
from kinema.models.offload import OffloadOptions

DEVICE = torch.device(os.environ.get("KINEMA_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
if CUDA and DEVICE.index is None and torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())  # an index: torch.cuda.set_per_process_memory_fraction

pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA device")

HW = 32
FRAMES = 8


def _model(dtype=torch.float32):
    """A private copy of the demo v2 model on the CPU (the tests move its weights; the shared fixture stays put)."""
    model = copy.deepcopy(motion_model("v2"))
    if dtype != torch.float32:
        model = model.with_options(unet=cast_weights(model.unet, dtype), motion=cast_weights(model.motion, dtype))
    return model


def _sample(model, steps=3, sampler="euler"):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg, torch.zeros(FRAMES, 4, HW, HW),
                                      pipelines.SampleOptions(seed=7, steps=steps, cfg=5.0, sampler=sampler))


def _allocated() -> int:
    if CUDA:
        torch.cuda.synchronize(DEVICE)
        return torch.cuda.memory_allocated(DEVICE)
    return 0


def _close(a, b, rel):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.fixture(scope="module")
def plain():
    """The video with everything on the device (offload none)."""
    model = _model()
    return _sample(model.with_options(offload=OffloadOptions(mode="none", device=str(DEVICE), storage=str(DEVICE))))


def _offloaded(mode: str, compile=None, **options):
    """(the video under offload ``mode`` (and ``compile``), the model, its Residency, GPU memory in use before,
    after)."""
    if DEVICE.type == "cpu":
        pytest.skip("on the CPU the storage and the compute device are one memory (tests/test_offload.py)")
    model, watch = _model(), Residency(lambda device: device.type == DEVICE.type != "cpu")
    before = _allocated()
    video = _sample(model.with_options(offload=OffloadOptions(mode=mode, device=str(DEVICE), storage="cpu",
                                                              on_move=watch, **options), compile=compile))
    return video, model, watch, before, _allocated()


@pytest.mark.parametrize("resident", [1, 2, 3])
def test_block_offload_gives_the_plain_video_and_leaves_nothing_on_the_gpu(plain, resident):
    streamed, model, watch, before, after = _offloaded("block", resident=resident)
    assert _close(streamed, plain, 1e-3), float((streamed - plain).abs().max())
    assert watch.most == resident and not watch.on
    assert all(p.device.type == "cpu" for p in (*model.unet.parameters(), *model.motion.parameters()))
    assert all(p.is_pinned() for p in model.unet.parameters())  # the storage copies, pinned on the first stream
    assert after - before < 4 << 20  # no weights left behind


def test_model_offload_gives_the_plain_video_and_gives_the_memory_back(plain):
    whole, model, watch, before, after = _offloaded("model")
    assert _close(whole, plain, 1e-3)
    assert watch.moves == 4 and not watch.on  # UNet and motion module in, then out
    assert all(p.device.type == "cpu" for p in (*model.unet.parameters(), *model.motion.parameters()))
    assert after - before < 4 << 20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_a_finite_video_close_to_fp32(plain, dtype):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 on the CPU is not a path the pack takes (pick_dtype: auto is fp32 there)")
    model = _model(dtype)
    half = _sample(model.with_options(offload=OffloadOptions(mode="none", device=str(DEVICE), storage=str(DEVICE))))
    assert torch.isfinite(half).all()
    assert _close(half, plain, 0.1), float((half - plain).abs().max())  # random weights, 3 steps: rounding only


def _temporal_vae(dtype):
    """The demo SVD file's temporal autoencoder in ``dtype`` on the device (a copy of its own)."""
    from fixtures_svd_pipeline import svd_state_dict
    from kinema.models import checkpoint
    from kinema.models.vae import (
        SVD_VAE_PREFIX,
        TemporalAutoencoder,
        infer_temporal_vae_config,
    )

    sd = {k[len(SVD_VAE_PREFIX):]: v for k, v in svd_state_dict().items() if k.startswith(SVD_VAE_PREFIX)}
    cfg = infer_temporal_vae_config(sd)
    return checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, dtype, "VAE", "demo svd").to(DEVICE)


def test_svd_temporal_decode_in_fp16_is_finite_and_close_to_fp32():
    from kinema.models.vae import decode_frames

    latent = torch.randn(6, 4, 16, 24, generator=torch.Generator().manual_seed(5))
    half = torch.float16 if CUDA else torch.bfloat16  # the CPU only checks the test itself
    frames = {dtype: decode_frames(_temporal_vae(dtype), latent) for dtype in (torch.float32, half)}
    assert torch.isfinite(frames[half]).all()
    tolerance = 0.02 if half == torch.float16 else 0.1  # images in [0, 1]; bf16 keeps 3 fewer mantissa bits
    assert float((frames[half] - frames[torch.float32]).abs().max()) < tolerance


def test_a_real_out_of_memory_during_decode_is_retried_with_fewer_frames(caplog):
    if not CUDA:
        pytest.skip("caps the CUDA caching allocator")
    from fixtures import vae as sd_vae
    from kinema.models.vae import decode_frames

    vae = copy.deepcopy(sd_vae()).to(DEVICE)
    latent = torch.randn(8, 4, 128, 128, generator=torch.Generator().manual_seed(1))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = _allocated()
    decode_frames(vae, latent[:2], chunk=2)
    two = torch.cuda.max_memory_allocated(DEVICE) - base  # the peak of a 2-frame call
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    torch.cuda.empty_cache()
    try:
        # a cap of 2.5 x a 2-frame call's peak: 8 frames a call (about 4 x) cannot fit, the 4-frame retry (2 x) does
        torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 2.5 * two + (64 << 20)) / total), DEVICE)
        with caplog.at_level("WARNING", logger="kinema"):
            images = decode_frames(vae, latent, chunk=8)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
        torch.cuda.empty_cache()
    assert images.shape == (8, 1024, 1024, 3) and torch.isfinite(images).all()
    assert "out of memory" in caplog.text and "retrying once" in caplog.text


def test_ancestral_noise_is_drawn_on_the_device_as_comfyuis(monkeypatch):
    """ComfyUI's ancestral samplers draw their fresh noise from a generator on the latent's device seeded with the
    seed (k-diffusion's ``default_noise_sampler``): on a GPU a CUDA generator, whose numbers are not the CPU's. The
    sampler's latent is on the device, so that is where the pack draws it: the same video for the same seed."""
    from kinema.models import sampling

    like = torch.zeros(2, 4, 8, 8, device=DEVICE)
    draw, gen = sampling.ancestral_noise_sampler(11), torch.Generator(device=DEVICE).manual_seed(11)
    for _ in range(2):  # one generator for the whole sampling, as ComfyUI's
        assert torch.equal(draw(like), torch.randn(like.shape, generator=gen, device=DEVICE))
    drawn_on, real = [], sampling.ancestral_noise_sampler

    def spy(seed):
        inner = real(seed)

        def sample(x):
            drawn_on.append(x.device)
            return inner(x)
        return sample

    monkeypatch.setattr(sampling, "ancestral_noise_sampler", spy)
    model = _model().with_options(offload=OffloadOptions(mode="none", device=str(DEVICE), storage=str(DEVICE)))
    videos = [_sample(model, sampler="euler_ancestral") for _ in range(2)]
    assert len(drawn_on) == 2 * 2 and all(d.type == DEVICE.type for d in drawn_on)  # 3 steps: the last draws none
    assert torch.isfinite(videos[0]).all() and torch.equal(*videos)


def test_a_graph_under_cpu_vae_samples_on_the_gpu_and_decodes_on_the_cpu(monkeypatch, host_dirs):
    """ComfyUI's --cpu-vae on a GPU: the loaders keep the VAE on the CPU (``host.placed_vae``), the sampler runs the
    UNet on the GPU, and VAE Decode Frames decodes the sampled latent on the CPU without bringing the VAE over."""
    import types

    from conftest import load_pack
    from kinema.nodes import host

    mm = types.SimpleNamespace(
        get_torch_device=lambda: DEVICE, unet_offload_device=lambda: torch.device("cpu"),
        vae_device=lambda: torch.device("cpu"), throw_exception_if_processing_interrupted=lambda: None,
        soft_empty_cache=lambda: None)
    monkeypatch.setattr(host, "_comfy_mm", mm)
    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm_v2,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v2.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm_v2, 1.0, "linear")
    assert video.compute_device.type == DEVICE.type
    (pos,), (neg,) = (nodes["KinemaTextEncode"]().encode(clip, text) for text in ("a fox", ""))
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(4, 64, 48)
    ran_on = []
    hook = video.unet.register_forward_pre_hook(lambda m, args: ran_on.append(args[0].device))
    try:
        (out,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, latent, 7, 2, 7.5, "euler", "normal", 1.0)
    finally:
        hook.remove()
    assert ran_on and all(d.type == DEVICE.type for d in ran_on)
    decoded_on = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, args: decoded_on.append(args[0].device))
    before = _allocated()
    try:
        (images,) = nodes["KinemaVAEDecodeFrames"]().decode(vae, out, 4)
    finally:
        hook.remove()
    assert decoded_on and all(d.type == "cpu" for d in decoded_on)
    assert all(p.device.type == "cpu" for p in vae.parameters()) and _allocated() - before < 1 << 20
    assert images.shape == (4, 48, 64, 3) and torch.isfinite(images).all()


@pytest.mark.parametrize("mode", ["model", "block"])
def test_a_compiled_model_under_offload_gives_the_plain_video(plain, mode):
    """Inductor's CUDA kernels on weights that move: model offload between the calls (one graph of the UNet), block
    offload during them (a graph per block, run between the moves). Last in the file: inductor's first compile on a
    fresh machine takes a minute or two."""
    from kinema.models.compiling import CompileOptions

    video, model, watch, before, after = _offloaded(mode, compile=CompileOptions())
    assert _close(video, plain, 1e-3), float((video - plain).abs().max())
    assert not watch.on and after - before < 4 << 20
    assert all(p.device.type == "cpu" for p in model.unet.parameters())


def test_a_compiled_temporal_decoder_gives_the_plain_frames():
    """Inductor's kernels for SVD's temporal decoder in half precision, in two chunk sizes (7 frames: 4 + 3), with
    the VAE under model offload: its weights come to the device for each decode and go back after, so the second
    compiled decode runs on weights moved in again."""
    from kinema.models import placement
    from kinema.models.compiling import CompileOptions
    from kinema.models.vae import decode_frames, with_compiled_decode

    half = torch.float16 if CUDA else torch.bfloat16  # the CPU only checks the test itself
    vae = placement.place(_temporal_vae(half), placement.Placement(device=str(DEVICE), offload=True))
    latent = torch.randn(7, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    plain = decode_frames(vae, latent, chunk=4)
    compiled_vae = with_compiled_decode(vae, CompileOptions())
    first, second = (decode_frames(compiled_vae, latent, chunk=4) for _ in range(2))
    assert torch.isfinite(first).all() and torch.equal(first, second)
    tolerance = 0.02 if half == torch.float16 else 0.1  # images in [0, 1]; fused arithmetic rounds elsewhere
    assert float((first - plain).abs().max()) < tolerance
    assert all(p.device.type == "cpu" for p in vae.parameters())  # back in storage


def test_an_svd_init_image_on_the_gpu_conditions_as_on_the_cpu(tmp_path):
    """An init IMAGE that another node left on the GPU: the same conditioning as that image on the CPU (the
    augmentation noise, drawn on the CPU, was added to it on the CPU: a device mismatch)."""
    from fixtures_svd_pipeline import tiny_img2vid
    from kinema.models import svd_model

    bundle = tiny_img2vid(str(tmp_path), frames=2, size=32)[0]
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    opts = svd_model.ImageConditioningOptions(width=32, height=32, frames=2, augmentation_level=0.1)
    want = svd_model.image_conditioning(bundle.image_encoder, bundle.vae, image, opts)[0]
    got = svd_model.image_conditioning(bundle.image_encoder, bundle.vae, image.to(DEVICE), opts)[0]
    for key in ("context", "concat", "y"):
        assert torch.allclose(got[key].cpu(), want[key].cpu(), rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_a_latent_on_the_gpu_samples_as_on_the_cpu(denoise):
    """A LATENT another node left on the GPU (ComfyUI's --gpu-only puts EmptyLatentImage's and VAEEncode's there):
    the video of the same latent on the CPU (the starting noise, drawn on the CPU, was added to it on the GPU: a
    device mismatch)."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 77, 64, generator=g)
    latent = torch.randn(4, 4, 16, 16, generator=g)
    opts = pipelines.SampleOptions(seed=7, steps=2, cfg=1.0, sampler="euler", denoise=denoise)
    want = pipelines.sample_video(model, pos, None, latent, opts)
    got = pipelines.sample_video(model, pos, None, latent.to(DEVICE), opts)
    assert got.device.type == "cpu" and torch.equal(got, want)
