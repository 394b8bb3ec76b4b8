"""GPU benchmark at the real architecture sizes (random weights): Kinema's memory policies vs diffusers, fp16.

    python bench/bench_gpu.py                                # CUDA: real sizes, every policy, both models
    python bench/bench_gpu.py --device cpu --scale tiny      # a smoke run on the CPU (tiny sizes, 4 steps)

Two workloads, each with random weights built in memory in the published key layouts and loaded through the
pack's own model classes (``checkpoint.build_on_meta``, as its loaders do) and, for diffusers, converted to the
same tensors with diffusers' single-file converters (AnimateDiff) or the tests' key mapping (SVD, as
``bench_svd.py``):

- AnimateDiff: the SD1.5 UNet (320 channels, channel_mult (1, 2, 4, 4), context 768) + the v2 motion module,
  16 frames at 512x512, 20 Euler steps, cfg 7.5 (cond and uncond in one batch), random prompt embeddings, the
  SD VAE decode;
- SVD-XT: the VideoUNet at its published size (320 channels, context 1024), the CLIP ViT-H/14 image encoder
  and the temporal VAE, 25 frames at 1024x576, 25 Euler steps (karras EDM), per-frame guidance 1.5 -> 3.0, the
  image conditioning and the temporal VAE decode.

Kinema runs each video under each memory policy (``model.with_options(offload=OffloadOptions(...))``):
``none`` (everything resident on the GPU), ``compiled`` (``none`` with the UNet through ``torch.compile``, the
pack's ``CompileOptions``: ``--compile-backend`` / ``--compile-mode``, and the VAE's decoder too, as Compile VAE
does, unless ``--no-compile-decode``; compiled by a one-step video and its decode first, whose time is reported
apart; on the CPU only when asked for), ``model`` (UNet and motion module brought to the GPU for each sampling
call; VAE and image encoder only while they run), ``block`` (UNet blocks streamed, ``--resident`` resident),
``block-chunk`` (block offload + attention in chunks of ``--attn-chunk`` queries + the VAE decoded in tiles of
``--tile`` pixels), ``block-compiled`` (``block`` with the UNet compiled block by block, and the decoder, compiled
by a one-step video first as ``compiled``; on the CPU only when asked for). A policy the engine does not know
(``OffloadOptions.validate`` raises) is skipped with its message. diffusers runs ``AnimateDiffPipeline`` /
``StableVideoDiffusionPipeline`` on the same weights: ``plain`` (``pipe.to(device)``), ``chunked``
(``unet.enable_forward_chunking()``, 2 frames decoded a call, AnimateDiff's VAE tiled as Kinema's),
``model-offload`` (``enable_model_cpu_offload``) and ``sequential-offload`` (``enable_sequential_cpu_offload``).

Reported per run: the median step after the warm-up step, the sampling time (SVD: with the image
conditioning), the decode time, the time per video, the peak memory while sampling, while decoding and overall
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the peak RSS), the
achieved TFLOP/s and its fraction of the device's peak: FLOPs of one sampling step (one UNet call on the
cond + uncond batch, counted once per implementation with ``torch.utils.flop_counter.FlopCounterMode`` on the
inputs the UNet got in the warm-up video; Kinema's count for every row, the work the video needs: diffusers'
own count, also printed, is higher where it repeats work, e.g. the text keys and values for every frame) / the
median step time / ``--peak-tflops`` (default: the H200's dense fp16/bf16 tensor-core peak, 989.4 TFLOP/s).
With ``--profile N``, the N first kernels (CPU: operators) of one UNet call of each implementation by time. Also
how far each final latent is from diffusers' plain one (fp16 random weights: a rough check that both computed the
same video).

Without a CUDA device and without ``--device cpu`` the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (
    EDM_LEAP_NOTE,
    SCHEDULE_NOTE,
    check_at_least,
    command_line,
    cpu_name,
    edm_leap,
    integer_schedule,
    register_pack,
    release_heap,
    reset_peak_rss,
    rss_kib,
)

#: NVIDIA H200 SXM: 1,979 TFLOP/s fp16/bf16 tensor core with 2:4 sparsity, so 989.4 dense (the H100 SXM's too)
H200_DENSE_FP16_TFLOPS = 989.4
POLICIES = ("none", "compiled", "model", "block", "block-chunk", "block-compiled")
COMPILED = ("compiled", "block-compiled")  # the policies with the UNet through torch.compile
DIFFUSERS_CONFIGS = ("plain", "chunked", "model-offload", "sequential-offload")
MODELS = ("animatediff", "svd")
SD_LATENT_SCALE = 0.18215
AD_CFG, SVD_MIN_CFG, SVD_MAX_CFG, SVD_FPS, SVD_MOTION_BUCKET = 7.5, 1.5, 3.0, 6, 127
SVD_DECODE_CHUNK, LOW_DECODE_CHUNK = 14, 2


def ad_decode_chunk(height: int, width: int) -> int:
    """Frames a decode call of the SD VAE: Kinema's default at that size (4 at 512x512), given to diffusers too."""
    from kinema.models.vae import frames_per_call

    return frames_per_call(height, width)


@dataclass(frozen=True)
class Scale:
    """Network widths and the default video of one ``--scale``."""

    unet_channels: int  # SD1.5 UNet (AnimateDiff)
    unet_mult: tuple
    text_context: int
    sd_vae_ch: int
    svd_channels: int  # SVD VideoUNet (heads of 64 channels: a multiple of 64)
    svd_mult: tuple
    image_context: int  # CLIP image embedding width = SVD cross-attention context
    vae_mult: tuple
    svd_vae_ch: int
    vision_hidden: int  # CLIP ViT (patch 14, 224 px)
    vision_layers: int
    ad_video: tuple  # frames, width, height, steps
    svd_video: tuple
    tile: int  # VAE decode tile and overlap, pixels
    overlap: int
    attn_chunk: int
    description: str = ""


SCALES = {
    "real": Scale(320, (1, 2, 4, 4), 768, 128, 320, (1, 2, 4, 4), 1024, (1, 2, 4, 4), 128, 1280, 32,
                  (16, 512, 512, 20), (25, 1024, 576, 25), 256, 64, 1024,
                  "the published sizes: SD1.5 UNet 320 channels, context 768, v2 motion module, SD VAE 128; SVD-XT "
                  "VideoUNet 320 channels, context 1024, CLIP ViT-H/14 (1280 wide, 32 layers), temporal VAE 128"),
    "medium": Scale(160, (1, 2, 4, 4), 384, 64, 128, (1, 2, 4, 4), 512, (1, 2, 4, 4), 64, 64, 2,
                    (16, 256, 256, 10), (14, 512, 288, 10), 128, 32, 512,
                    "the real block structure at reduced width: SD1.5 UNet 160 channels, context 384, VAE 64; "
                    "SVD VideoUNet 128 channels, context 512, VAE 64; a 2-layer CLIP ViT 64 wide"),
    "tiny": Scale(32, (1, 2, 2, 2), 64, 32, 32, (1, 2, 2, 2), 64, (1, 2, 2, 2), 32, 64, 2,
                  (8, 64, 64, 4), (4, 64, 64, 4), 32, 8, 16,
                  "the demo sizes: 32 channels, context 64, VAE 32, a 2-layer CLIP ViT 64 wide"),
}


# -- measuring ----------------------------------------------------------------------------------------------------

class Meter:
    """Peak memory of a phase: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS elsewhere."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.what = "VRAM" if self.cuda else "RSS"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def clear(self) -> None:
        release_heap()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def now(self) -> int | None:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device)
        kib = rss_kib("VmRSS")
        return None if kib is None else kib * 1024

    def peak(self) -> int | None:
        self.sync()
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device)
        kib = rss_kib("VmHWM")
        return None if kib is None else kib * 1024


@dataclass
class Run:
    """One video: times in seconds, memory in bytes."""

    impl: str
    config: str
    steps: list = field(default_factory=list)
    sampling: float | None = None
    decode: float | None = None
    total: float | None = None
    peak_sampling: int | None = None
    peak_decode: int | None = None
    start_memory: int | None = None
    latent: object = None
    compile: float | None = None  # Kinema compiled: the one-step video that compiled the UNet, seconds
    note: str = ""  # skipped / failed: why

    @property
    def median(self) -> float | None:
        import statistics

        rest = self.steps[1:] if len(self.steps) > 1 else self.steps
        return statistics.median(rest) if rest else None

    @property
    def peak(self) -> int | None:
        values = [v for v in (self.peak_sampling, self.peak_decode) if v is not None]
        return max(values) if values else None


class StepClock:
    """Step times from the sampler's per-step callbacks (synchronised with the device first)."""

    def __init__(self, meter: Meter):
        self.meter, self.stamps = meter, []

    def start(self) -> None:
        self.meter.sync()
        self.stamps = [time.perf_counter()]

    def tick(self, *_args) -> dict:
        self.meter.sync()
        self.stamps.append(time.perf_counter())
        return {}  # diffusers' callback_on_step_end expects a dict

    def steps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]


def count_flops(module, args: tuple, kwargs: dict) -> int:
    """FLOPs of ``module(*args, **kwargs)`` (matmuls, convolutions, attention) by ``FlopCounterMode``; the CPU's
    fused attention kernel, which the counter does not know, counted as the two matmuls it does."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        custom[cpu_op] = cpu_sdpa
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def profile_call(module, args: tuple, kwargs: dict, device, top: int) -> list[tuple[str, float, float]]:
    """The operators and kernels of one ``module(*args, **kwargs)`` by self time, most first: (name, seconds,
    share of the call). Under ``torch.profiler`` after one call to warm up; on CUDA the kernels' device time."""
    import torch
    from torch.profiler import ProfilerActivity

    cuda = torch.device(device).type == "cuda"
    with torch.no_grad():
        module(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            module(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize(device)
    events = prof.key_averages()
    if cuda:  # the kernels (not the operators launching them, nor the profiler's own events): device time
        times = [(e.key, e.self_device_time_total / 1e6) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        times = [(e.key, e.self_cpu_time_total / 1e6) for e in events]
    total = sum(t for _, t in times) or 1.0
    return [(k, t, t / total) for k, t in sorted(times, key=lambda kt: -kt[1])[:top]]


class CallRecorder:
    """Records the inputs of ``module``'s calls (a forward pre-hook) while active: for the FLOP count."""

    def __init__(self, module):
        self.module, self.calls = module, []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def remove(self) -> None:
        self.handle.remove()


# -- random weights in the published layouts ----------------------------------------------------------------------

def shapes_of(factory) -> dict:
    """{key: (shape, dtype)} of the state dict of ``factory()`` (made on the meta device)."""
    import torch

    with torch.device("meta"):
        module = factory()
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _is_norm(key: str) -> bool:
    parts = key.split(".")
    return any("norm" in p for p in parts) or key.endswith(
        ("in_layers.0.weight", "in_layers.0.bias", "out_layers.0.weight", "out_layers.0.bias",
         "diffusion_model.out.0.weight", "diffusion_model.out.0.bias"))


def random_state_dict(shapes: dict, seed: int, device, dtype, prefix: str = "") -> dict:
    """Random tensors for ``shapes`` (drawn on ``device``, stored on the CPU in ``dtype``): norms near 1, zero norm
    biases, small other biases and embeddings, fan-in scaled weights, blend factors ~N(0, 1) (the scheme of the
    pack's demo weights, so fp16 activations stay in range)."""
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape, kind = shapes[key]
        if not kind.is_floating_point:
            out[prefix + key] = torch.zeros(shape, dtype=kind)
            continue
        t = torch.randn(shape, generator=gen, device=device)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "mix_factor":
            pass
        elif leaf == "bias":
            t = torch.zeros_like(t) if _is_norm(key) else t * 0.02
        elif _is_norm(key) and len(shape) == 1:
            t = 1.0 + 0.05 * t
        elif "embedding" in key:
            t = t * 0.02
        else:
            t = t / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else shape[0])
        out[prefix + key] = t.to(dtype).cpu()
    return out


def params(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"


@dataclass
class Workload:
    """One benchmark's models and inputs (Kinema and diffusers on the same tensors)."""

    kind: str  # animatediff | svd
    title: str
    model: object  # MotionModel / SVDModel
    vae: object
    frames: int
    width: int
    height: int
    steps: int
    weights_note: str
    image_encoder: object = None
    positive: object = None
    negative: object = None
    image: object = None  # IMAGE [1, h, w, 3]
    image_u8: object = None
    state_dicts: dict = field(default_factory=dict)
    noise: object = None


def build_animatediff(sc: Scale, args, dtype, vae_dtype, gen_device) -> Workload:
    import torch
    from kinema.models import checkpoint
    from kinema.models.motion import (
        MotionConfig,
        MotionModel,
        MotionModuleSet,
        infer_motion_config,
        sinusoidal_table,
    )
    from kinema.models.sampling import initial_noise
    from kinema.models.unet import UNetConfig, UNetModel, infer_unet_config
    from kinema.models.vae import AutoencoderKL, VAEConfig, infer_vae_config

    frames, width, height, steps = _video(sc.ad_video, args)
    ucfg = UNetConfig(model_channels=sc.unet_channels, channel_mult=sc.unet_mult, context_dim=sc.text_context)
    unet_sd = random_state_dict(shapes_of(lambda: UNetModel(ucfg)), args.seed, gen_device, dtype)
    vcfg = VAEConfig(ch=sc.sd_vae_ch, ch_mult=sc.vae_mult)
    vae_sd = random_state_dict(shapes_of(lambda: AutoencoderKL(vcfg)), args.seed + 1, gen_device, vae_dtype)
    mcfg = MotionConfig(down_channels=tuple(sc.unet_channels * m for m in sc.unet_mult), modules_per_down=2,
                        modules_per_up=3, has_mid=True, max_len=32)  # v2: a mid-block module, 32 positions
    mm_shapes = shapes_of(lambda: MotionModuleSet(mcfg))
    pe = {k: s for k, s in mm_shapes.items() if k.endswith("pos_encoder.pe")}
    mm_sd = random_state_dict({k: s for k, s in mm_shapes.items() if k not in pe}, args.seed + 2, gen_device, dtype)
    mm_sd.update({k: sinusoidal_table(s[0][1], s[0][2]).to(dtype) for k, s in pe.items()})
    name = f"random_sd15_{args.scale}"
    unet = checkpoint.build_on_meta(lambda: UNetModel(infer_unet_config(unet_sd)), unet_sd, dtype, "UNet", name)
    vae = checkpoint.build_on_meta(lambda: AutoencoderKL(infer_vae_config(vae_sd)), vae_sd, vae_dtype, "VAE", name)
    motion = checkpoint.build_on_meta(lambda: MotionModuleSet(infer_motion_config(mm_sd)), mm_sd, dtype,
                                      "motion module", "random_v2")
    model = MotionModel(unet, motion, beta_schedule="linear", name=f"{name} + v2")
    g = torch.Generator().manual_seed(1234)
    positive = torch.randn(1, 77, sc.text_context, generator=g)
    negative = torch.randn(1, 77, sc.text_context, generator=g)
    lat = (frames, 4, height // 8, width // 8)
    return Workload(
        kind="animatediff", model=model, vae=vae, frames=frames, width=width, height=height, steps=steps,
        title=f"AnimateDiff: SD1.5 UNet + v2 motion module ({args.scale}), {frames} frames {width}x{height}, "
              f"{steps} steps",
        weights_note=(f"UNet {params(unet)} parameters, motion module {params(motion)} ({_dtype_name(dtype)}), VAE "
                      f"{params(vae)} ({_dtype_name(vae_dtype)}); Euler, cfg {AD_CFG} with cond and uncond in one "
                      f"batch ({2 * frames} UNet images a call), random prompt embeddings [1, 77, "
                      f"{sc.text_context}], the VAE decode {ad_decode_chunk(height, width)} frames a call"),
        positive=positive, negative=negative, noise=initial_noise(args.seed, lat),
        state_dicts={"unet": unet_sd, "vae": vae_sd, "motion": mm_sd})


def build_svd(sc: Scale, args, dtype, vae_dtype, gen_device) -> Workload:
    import torch
    from kinema.models import checkpoint, svd_model
    from kinema.models.clip_vision import heads_for_width, load_image_encoder
    from kinema.models.demo_media import demo_image
    from kinema.models.sampling import initial_noise
    from kinema.models.svd import SVDUNet, SVDUNetConfig, infer_svd_unet_config
    from kinema.models.vae import (
        TemporalAutoencoder,
        TemporalVAEConfig,
        infer_temporal_vae_config,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    frames, width, height, steps = _video(sc.svd_video, args)
    ucfg = SVDUNetConfig(model_channels=sc.svd_channels, channel_mult=sc.svd_mult, context_dim=sc.image_context)
    unet_sd = random_state_dict(shapes_of(lambda: SVDUNet(ucfg)), args.seed, gen_device, dtype)
    vcfg = TemporalVAEConfig(ch=sc.svd_vae_ch, ch_mult=sc.vae_mult, quant_conv=True)  # as load_svd builds it
    vae_sd = random_state_dict(shapes_of(lambda: TemporalAutoencoder(vcfg)), args.seed + 1, gen_device, vae_dtype)
    hidden = sc.vision_hidden
    vision_cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=sc.vision_layers, num_attention_heads=heads_for_width(hidden),
                                  image_size=224, patch_size=14, projection_dim=sc.image_context, hidden_act="gelu",
                                  layer_norm_eps=1e-5)
    vision_sd = random_state_dict(shapes_of(lambda: CLIPVisionModelWithProjection(vision_cfg)), args.seed + 3,
                                  gen_device, dtype)
    name = f"random_svd_xt_{args.scale}"
    unet = checkpoint.build_on_meta(lambda: SVDUNet(infer_svd_unet_config(unet_sd)), unet_sd, dtype, "UNet", name)
    vae_cfg = replace(infer_temporal_vae_config(vae_sd), quant_conv=True)
    vae = checkpoint.build_on_meta(lambda: TemporalAutoencoder(vae_cfg), vae_sd, vae_dtype, "VAE", name)
    encoder = load_image_encoder(vision_sd, None, dtype, name)
    model = svd_model.SVDModel(unet=unet, variant="svd_xt", cfg_mode="linear", min_cfg=SVD_MIN_CFG, name=name)
    big = torch.from_numpy(demo_image()).float().div(255)[None]
    image_u8 = (svd_model.fit_image(big, width, height)[0] * 255).round().to(torch.uint8)
    return Workload(
        kind="svd", model=model, vae=vae, image_encoder=encoder, frames=frames, width=width, height=height,
        steps=steps,
        title=f"SVD-XT ({args.scale}), {frames} frames {width}x{height}, {steps} steps",
        weights_note=(f"VideoUNet {params(unet)} parameters, CLIP image encoder {params(encoder.model)} "
                      f"({_dtype_name(dtype)}), temporal VAE {params(vae)} ({_dtype_name(vae_dtype)}); Euler on the "
                      f"karras EDM schedule, per-frame guidance {SVD_MIN_CFG} -> {SVD_MAX_CFG} with cond and uncond "
                      f"in one batch ({2 * frames} UNet images a call), fps {SVD_FPS}, motion bucket "
                      f"{SVD_MOTION_BUCKET}, augmentation 0, the temporal decode {min(frames, SVD_DECODE_CHUNK)} frames "
                      "a call"),
        image=image_u8.float().div(255)[None], image_u8=image_u8,
        noise=initial_noise(args.seed, (frames, 4, height // 8, width // 8)),
        state_dicts={"unet": unet_sd, "vae": vae_sd})


def _video(default: tuple, args) -> tuple[int, int, int, int]:
    frames, width, height, steps = default
    if args.frames is not None:
        frames = args.frames
    if args.steps is not None:
        steps = args.steps
    return frames, width, height, steps


def _dtype_name(dtype) -> str:
    """fp32, fp16, bf16: the names the options take."""
    name = str(dtype).removeprefix("torch.")
    return "bf16" if name == "bfloat16" else name.replace("float", "fp")


# -- Kinema --------------------------------------------------------------------------------------------------------

def default_policies(device) -> list[str]:
    """Every policy; on the CPU all but the compiled ones (inductor's C++ compile takes minutes there)."""
    return [p for p in POLICIES if p not in COMPILED or device.type == "cuda"]


def policy_options(policy: str, args, device):
    from kinema.models.offload import OffloadOptions

    mode = {"none": "none", "compiled": "none", "model": "model", "block": "block", "block-chunk": "block",
            "block-compiled": "block"}[policy]
    opts = OffloadOptions(mode=mode, device=str(device), storage="cpu", resident=args.resident,
                          attn_chunk=args.attn_chunk if policy == "block-chunk" else 0)
    opts.validate()  # a mode the engine does not have raises KinemaError: the policy is skipped
    return opts


def _aux_models(w: Workload) -> list:
    return [m for m in (w.vae, w.image_encoder) if m is not None]


def _park(w: Workload, device) -> None:
    """Every model of ``w`` back in system memory (between runs)."""
    from kinema.models import placement
    from kinema.models.offload import OffloadOptions

    placement.rest(w.model, OffloadOptions(mode="model", device=str(device), storage="cpu"))
    for m in _aux_models(w):
        placement.place(m, placement.Placement(device=str(device), offload=True, storage="cpu"))


def _sample(w: Workload, model, sample_opts, callback):
    """The workload's sampling run (SVD: with the image conditioning) -> the final latent."""
    import torch
    from kinema.models import pipelines, svd_model

    if w.kind == "animatediff":
        return pipelines.sample_video(model, w.positive, w.negative, torch.zeros(w.noise.shape), sample_opts,
                                      callback=callback)
    cond, uncond = svd_model.image_conditioning(
        w.image_encoder, w.vae, w.image,
        svd_model.ImageConditioningOptions(width=w.width, height=w.height, frames=w.frames, fps=SVD_FPS,
                                           motion_bucket_id=SVD_MOTION_BUCKET, augmentation_level=0.0))
    return pipelines.sample_img2vid(model, cond, uncond, pipelines.empty_video_latent(w.frames, w.width, w.height),
                                    sample_opts, callback=callback)


def kinema_video(w: Workload, policy: str, args, device, meter: Meter, steps: int | None = None,
                 decode: bool = True, recorder_for=None) -> Run:
    """One Kinema video under ``policy``; ``steps``/``decode`` shorten it (the warm-up), ``recorder_for(unet)``
    attaches a ``CallRecorder`` for the FLOP count. ``compiled`` / ``block-compiled``: policy none / block with the
    UNet (and, unless ``--no-compile-decode``, the VAE's decoder) through torch.compile, compiled by a one-step
    video first with its decode (its time is ``Run.compile``, not in the row's times)."""
    import torch
    from kinema.models import pipelines, placement
    from kinema.models.compiling import CompileOptions
    from kinema.models.tiling import TileOptions
    from kinema.models.vae import decode_frames, with_compiled_decode

    run = Run("Kinema", policy)
    opts = policy_options(policy, args, device)
    compile = CompileOptions(args.compile_backend, args.compile_mode) if policy in COMPILED else None
    model = w.model.with_options(offload=opts, compile=compile)
    vae = with_compiled_decode(w.vae, compile) if compile is not None and args.compile_decode else w.vae
    placement.rest(model, opts)
    aux = placement.Placement(device=str(device)) if opts.mode == "none" else placement.Placement(
        device=str(device), offload=True, storage="cpu")
    for m in _aux_models(w):
        placement.place(m, aux)
    tiles = TileOptions(args.tile // 8, args.tile_overlap // 8) if policy == "block-chunk" else TileOptions()
    sample_opts = pipelines.SampleOptions(seed=args.seed, steps=steps or w.steps, sampler="euler",
                                          scheduler="normal" if w.kind == "animatediff" else "karras",
                                          cfg=AD_CFG if w.kind == "animatediff" else SVD_MAX_CFG)
    clock = StepClock(meter)
    recorder = recorder_for(model.unet) if recorder_for else None
    try:
        with torch.no_grad():
            if compile is not None:
                meter.sync()
                t0 = time.perf_counter()
                warm = _sample(w, model, replace(sample_opts, steps=1), None)
                if decode:
                    decode_frames(vae, warm, chunk=None, tiles=tiles)
                meter.sync()
                run.compile = time.perf_counter() - t0
            meter.clear()
            run.start_memory = meter.now()
            meter.reset()
            clock.start()
            t0 = clock.stamps[0]
            latent = _sample(w, model, sample_opts, clock.tick)
            meter.sync()
            t1 = time.perf_counter()
            run.steps, run.sampling = clock.steps(), t1 - t0
            run.peak_sampling = meter.peak()
            if decode:
                meter.reset()
                decode_frames(vae, latent, chunk=None, tiles=tiles)
                meter.sync()
                run.decode = time.perf_counter() - t1
                run.peak_decode = meter.peak()
            run.total = time.perf_counter() - t0
        run.latent = latent.float().cpu() * SD_LATENT_SCALE
    finally:
        if recorder is not None:
            recorder.remove()
        _park(w, device)
        meter.clear()
    return run


# -- diffusers -----------------------------------------------------------------------------------------------------

def diffusers_animatediff(w: Workload, dtype, vae_dtype, build_device):
    """``AnimateDiffPipeline`` on the tensors of ``w`` (converted by diffusers' single-file converters), its motion
    GroupNorm per frame as the original (``tests/fixtures.py``); resting on the CPU."""
    import fixtures
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        EulerDiscreteScheduler,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import (
        convert_animatediff_checkpoint_to_diffusers,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sds = w.state_dicts
    full = {fixtures.UNET_PREFIX + k: v for k, v in sds["unet"].items()}
    full.update({fixtures.VAE_PREFIX + k: v for k, v in sds["vae"].items()})
    with torch.device(build_device):
        unet2d = UNet2DConditionModel(**fixtures.diffusers_unet_config(sds["unet"]))
        fixtures._load(unet2d, convert_ldm_unet_checkpoint(full, unet2d.config))
        adapter = MotionAdapter(**fixtures.motion_adapter_config(sds["motion"]))
        fixtures._load(adapter, convert_animatediff_checkpoint_to_diffusers(dict(sds["motion"])),
                       allowed_missing="pos_embed.pe")
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        del unet2d, adapter
        vae = DiffusersVAE(**fixtures.diffusers_vae_config(sds["vae"]))
        fixtures._load(vae, convert_ldm_vae_checkpoint(full, vae.config))
    unet = unet.to(dtype).eval().requires_grad_(False)
    fixtures.per_frame_motion_norms(unet)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="linear", timestep_spacing="linspace", steps_offset=0)
    pipe = AnimateDiffPipeline(vae=vae.to(vae_dtype), text_encoder=None, tokenizer=None, unet=unet,
                               motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def diffusers_svd(w: Workload, dtype, vae_dtype, build_device):
    """``StableVideoDiffusionPipeline`` on the tensors of ``w`` (``tests/fixtures_svd_pipeline.py``'s mapping),
    sharing Kinema's CLIP image tower module; resting on the CPU."""
    from fixtures_svd_pipeline import diffusers_svd_pipeline
    from kinema.models.vae import SVD_COND_ENCODER_PREFIX, SVD_VAE_PREFIX

    sds = w.state_dicts
    sd = {"model.diffusion_model." + k: v for k, v in sds["unet"].items()}
    for k, v in sds["vae"].items():
        sd[(SVD_VAE_PREFIX if k.startswith("decoder.") else SVD_COND_ENCODER_PREFIX) + k] = v
    bundle = SimpleNamespace(model=w.model, vae=w.vae, image_encoder=w.image_encoder)
    pipe = diffusers_svd_pipeline(bundle, sd, build_device=str(build_device))
    pipe.unet.to(dtype)
    pipe.vae.to(vae_dtype)
    return pipe.to("cpu")


def _set_feed_forward_chunking(unet, on: bool) -> None:
    if on:
        unet.enable_forward_chunking()
    elif hasattr(unet, "disable_forward_chunking"):
        unet.disable_forward_chunking()
    else:  # diffusers' SVD UNet has no disable: chunk size None switches it off
        for m in unet.modules():
            if hasattr(m, "set_chunk_feed_forward"):
                m.set_chunk_feed_forward(chunk_size=None, dim=0)


def _set_vae_tiling(vae, on: bool, args) -> None:
    """diffusers' AutoencoderKL tiling with Kinema's tile size and overlap (the SVD temporal VAE has none)."""
    if not hasattr(vae, "enable_tiling") or not hasattr(vae, "tile_sample_min_size"):
        return
    if on:
        vae.enable_tiling()
        vae.tile_sample_min_size = args.tile
        vae.tile_latent_min_size = args.tile // 8
        vae.tile_overlap_factor = args.tile_overlap / args.tile
    else:
        vae.disable_tiling()


def diffusers_video(w: Workload, pipe, config: str, args, device, meter: Meter, steps: int | None = None,
                    decode: bool = True, recorder_for=None) -> Run:
    import torch
    from einops import rearrange
    from PIL import Image

    run = Run("diffusers", config)
    chunked = config == "chunked"
    if config in ("plain", "chunked"):
        pipe.to(device)
    elif config == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    _set_feed_forward_chunking(pipe.unet, chunked)
    _set_vae_tiling(pipe.vae, chunked, args)
    chunk = LOW_DECODE_CHUNK if chunked else (
        ad_decode_chunk(w.height, w.width) if w.kind == "animatediff" else SVD_DECODE_CHUNK)
    n_steps = steps or w.steps
    clock = StepClock(meter)
    recorder = recorder_for(pipe.unet) if recorder_for else None
    meter.clear()
    run.start_memory = meter.now()
    meter.reset()
    try:
        with torch.no_grad():
            clock.start()
            t0 = clock.stamps[0]
            if w.kind == "animatediff":
                # ComfyUI's start sqrt(1 + sigma_max^2) * noise, as Kinema; diffusers multiplies by init_noise_sigma
                pipe.scheduler.set_timesteps(n_steps)
                sigma_max = float(pipe.scheduler.sigmas.max())
                start = rearrange(w.noise, "f c h w -> 1 c f h w") * (
                    math.sqrt(1 + sigma_max**2) / float(pipe.scheduler.init_noise_sigma))
                latent = pipe(prompt_embeds=w.positive.to(device, pipe.unet.dtype),
                              negative_prompt_embeds=w.negative.to(device, pipe.unet.dtype), num_frames=w.frames,
                              height=w.height, width=w.width, num_inference_steps=n_steps, guidance_scale=AD_CFG,
                              latents=start.to(device, pipe.unet.dtype), output_type="latent",
                              callback_on_step_end=clock.tick).frames
            else:
                latent = pipe(Image.fromarray(w.image_u8.numpy()), height=w.height, width=w.width,
                              num_frames=w.frames, num_inference_steps=n_steps, min_guidance_scale=SVD_MIN_CFG,
                              max_guidance_scale=SVD_MAX_CFG, fps=SVD_FPS, motion_bucket_id=SVD_MOTION_BUCKET,
                              noise_aug_strength=0.0, decode_chunk_size=chunk,
                              latents=w.noise[None].to(device, pipe.unet.dtype),
                              output_type="latent", callback_on_step_end=clock.tick).frames
            meter.sync()
            t1 = time.perf_counter()
            run.steps, run.sampling = clock.steps(), t1 - t0
            run.peak_sampling = meter.peak()
            if decode:
                meter.reset()
                z = latent.to(pipe.vae.dtype)
                if w.kind == "animatediff":
                    pipe.decode_latents(z, chunk)
                else:
                    pipe.decode_latents(z, w.frames, decode_chunk_size=chunk)
                meter.sync()
                run.decode = time.perf_counter() - t1
                run.peak_decode = meter.peak()
            run.total = time.perf_counter() - t0
        pattern = "1 c f h w -> f c h w" if w.kind == "animatediff" else "1 f c h w -> f c h w"
        run.latent = rearrange(latent.float().cpu(), pattern)
    finally:
        if recorder is not None:
            recorder.remove()
        _set_feed_forward_chunking(pipe.unet, False)
        _set_vae_tiling(pipe.vae, False, args)
        if config == "model-offload":
            pipe.remove_all_hooks()
        if config != "sequential-offload":  # sequential offload leaves the weights on the meta device: the last run
            pipe.to("cpu")
        meter.clear()
    return run


# -- one workload --------------------------------------------------------------------------------------------------

def _attempt(make, impl: str, config: str) -> Run:
    """``make()``, or a Run saying why it was skipped or failed."""
    import torch
    from kinema.models.errors import KinemaError

    try:
        return make()
    except KinemaError as e:
        print(f"  {impl} {config}: skipped ({e})", file=sys.stderr)
        return Run(impl, config, note=f"skipped: {e}")
    except torch.OutOfMemoryError as e:
        print(f"  {impl} {config}: out of memory", file=sys.stderr)
        return Run(impl, config, note="out of memory: " + str(e).splitlines()[0][:120])
    except Exception as e:  # noqa: BLE001 -- a broken configuration is reported; the others still run
        traceback.print_exc()
        return Run(impl, config, note=f"failed: {_first_line(e)}")


def bench_workload(w: Workload, args, device, meter: Meter, dtype, vae_dtype, on_run=None,
                   deadline: float | None = None) -> dict:
    """Warm up and count FLOPs (Kinema policy none, diffusers plain), then every Kinema policy and diffusers
    config: the first of each first (the speed comparison), then the other policies, then diffusers' others.

    ``on_run(out)`` is called after each run (the caller rewrites the report: a run cut off later keeps what it
    measured). ``deadline`` (``time.monotonic()``): a run that would likely end after it, judged by the longest
    run so far (at first the warm-up's), is skipped with a note instead of being started; diffusers' pipeline is
    not built where twice the warm-up's time is not left. A FLOP count, profile or pipeline build that fails is
    printed and the runs go on. ``out["setup_s"]``: the seconds before the first run."""
    out = {"workload": w, "runs": [], "flops": {}, "profile": {}}
    recorders = []
    began = time.monotonic()

    def record(unet):
        recorders.append(CallRecorder(unet))
        return recorders[-1]

    print(f"{w.title}: Kinema warm-up and FLOP count ...", file=sys.stderr, flush=True)
    warm = _attempt(lambda: kinema_video(w, "none", args, device, meter, steps=1, decode=True, recorder_for=record),
                    "Kinema", "warm-up")
    warm_s = time.monotonic() - began
    if not warm.note and recorders and recorders[-1].calls:
        from kinema.models import placement

        model = w.model.with_options(offload=policy_options("none", args, device))
        placement.rest(model, model.offload)
        _measure_call(out, "Kinema", model.unet, recorders, args, device)
        _park(w, device)
        meter.clear()
    pipe = None
    if args.diffusers and deadline is not None and time.monotonic() + 2 * warm_s >= deadline:
        out["runs"].append(Run("diffusers", "-", note="skipped: the time budget (--time-budget) would run out "
                                                      "building its pipeline"))
    elif args.diffusers:
        try:
            pipe = _diffusers_pipeline(w, args, device, meter, dtype, vae_dtype, out, record, recorders)
        except Exception as e:  # noqa: BLE001 -- Kinema's runs are still worth making and reporting
            traceback.print_exc()
            out["runs"].append(Run("diffusers", "-", note=f"failed: building its pipeline: {_first_line(e)}"))
            meter.clear()
    kinema = [("Kinema", policy) for policy in args.policies]
    theirs = [("diffusers", config) for config in args.diffusers] if pipe is not None else []
    # the longest run so far without its compile (at first the one-step warm-up: a run takes at least that long);
    # a compile's length
    longest, compiling = warm_s, args.compile_allowance
    out["setup_s"] = time.monotonic() - began
    for impl, config in kinema[:1] + theirs[:1] + kinema[1:] + theirs[1:]:
        compiled = impl == "Kinema" and config in COMPILED
        if deadline is not None and time.monotonic() + longest + (compiling if compiled else 0.0) > deadline:
            note = "skipped: the time budget (--time-budget) would run out"
            out["runs"].append(Run(impl, config, note=note + (f" (with a compile of about {compiling:.0f} s)"
                                                              if compiled else "")))
        elif impl == "diffusers" and config.endswith("offload") and device.type != "cuda":
            out["runs"].append(Run(impl, config, note="skipped: needs a CUDA device"))
        else:
            print(f"{w.title}: {impl} {config} ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            if impl == "Kinema":
                out["runs"].append(_attempt(lambda p=config: kinema_video(w, p, args, device, meter), impl, config))
            else:
                out["runs"].append(_attempt(lambda c=config: diffusers_video(w, pipe, c, args, device, meter),
                                            impl, config))
            took = out["runs"][-1].compile
            if took is not None:
                compiling = took  # the next compiled run's is likely alike
            longest = max(longest, time.monotonic() - start - (took or 0.0))
        if on_run is not None:
            on_run(out)
    meter.clear()
    return out


def _diffusers_pipeline(w: Workload, args, device, meter: Meter, dtype, vae_dtype, out: dict, record, recorders):
    """diffusers' pipeline on the workload's weights, warmed up, its FLOPs counted into ``out``; None (with a note
    in ``out``) when diffusers is not installed."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        out["runs"].append(Run("diffusers", "-", note="skipped: diffusers is not installed (pip install diffusers "
                                                      "accelerate)"))
        return None
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    print(f"{w.title}: building the diffusers pipeline ...", file=sys.stderr, flush=True)
    build = diffusers_animatediff if w.kind == "animatediff" else diffusers_svd
    pipe = build(w, dtype, vae_dtype, device)
    meter.clear()
    print(f"{w.title}: diffusers warm-up and FLOP count ...", file=sys.stderr, flush=True)
    warm = _attempt(lambda: diffusers_video(w, pipe, "plain", args, device, meter, steps=1, recorder_for=record),
                    "diffusers", "warm-up")
    if not warm.note and recorders and recorders[-1].calls:
        pipe.to(device)
        _measure_call(out, "diffusers", pipe.unet, recorders, args, device)
        pipe.to("cpu")
        meter.clear()
    return pipe


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _measure_call(out: dict, impl: str, unet, recorders: list, args, device) -> None:
    """FLOPs of ``impl``'s warm-up step (its first recorded UNet call, times the calls) into ``out["flops"]`` and,
    with --profile, that call's profile; a failure is printed and leaves them out, the runs still go on."""
    try:
        a, k = recorders[-1].calls[0]
        out["flops"][impl] = count_flops(unet, a, k) * len(recorders[-1].calls)
        if args.profile:
            out["profile"][impl] = profile_call(unet, a, k, device, args.profile)
    except Exception:  # noqa: BLE001 -- a FLOP count or profile is not worth the runs
        traceback.print_exc()
    finally:
        recorders.clear()


# -- report --------------------------------------------------------------------------------------------------------

def _flop(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _s(v, fmt=".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def workload_report(res: dict, args, meter: Meter) -> list[str]:
    w, runs, flops = res["workload"], res["runs"], res["flops"]
    step_flops = flops.get("Kinema", flops.get("diffusers"))
    ref = next((r for r in runs if r.impl == "diffusers" and r.config == "plain" and r.latent is not None), None)
    counted = ", ".join(f"{impl} {_flop(f)}" for impl, f in flops.items()) or "not counted"
    lines = [
        f"## {w.title}",
        "",
        f"Weights (random, published layout): {w.weights_note}.",
        "",
        (f"FLOPs of one step (one UNet call on the cond + uncond batch): {counted}. TFLOP/s = "
         f"{'Kinema' if 'Kinema' in flops else 'diffusers'}'s count / median step; of peak = TFLOP/s / "
         f"{args.peak_tflops:g}."),
        "",
        (f"| implementation | memory policy | step (s) | sampling (s) | decode (s) | s / video "
         f"| peak {meter.what} sampling (GiB) | peak {meter.what} decode (GiB) | peak {meter.what} (GiB) "
         f"| {meter.what} at start (GiB) | TFLOP/s | of peak | latents vs diffusers plain |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {("Kinema", c): i for i, c in enumerate(POLICIES)}
    order.update({("diffusers", c): len(POLICIES) + i for i, c in enumerate(DIFFUSERS_CONFIGS)})
    for r in sorted(runs, key=lambda r: order.get((r.impl, r.config), len(order))):  # in the order they ran otherwise
        if r.note:
            lines.append(f"| {r.impl} | {r.config} | {r.note} | | | | | | | | | | |")
            continue
        rate = step_flops / r.median / 1e12 if step_flops and r.median else None
        diff = None
        if ref is not None and r.latent is not None and r.latent.shape == ref.latent.shape:
            diff = float((r.latent - ref.latent).abs().max() / ref.latent.abs().max())
        lines.append(
            f"| {r.impl} | {r.config} | {_s(r.median, '.3f')} | {_s(r.sampling)} | {_s(r.decode)} | {_s(r.total)} "
            f"| {_gib(r.peak_sampling)} | {_gib(r.peak_decode)} | {_gib(r.peak)} | {_gib(r.start_memory)} "
            f"| {_s(rate, '.3g')} | {_s(rate and rate / args.peak_tflops, '.3g')} | {_s(diff, '.1e')} |")
    if w.kind == "animatediff" and ref is not None and not integer_schedule(w.steps):
        lines += ["", f"Latents vs diffusers plain: {SCHEDULE_NOTE}."]
    if w.kind == "svd" and ref is not None and (leap := edm_leap(w.steps)) is not None:
        lines += ["", f"Latents vs diffusers plain: {EDM_LEAP_NOTE.format(to=leap)}."]
    for impl, rows in res.get("profile", {}).items():
        where = "kernels by device time" if meter.cuda else "operators by self CPU time"
        title = (f"{impl}, one UNet call of the warm-up step under torch.profiler: the {len(rows)} first {where} "
                 f"(--profile)")
        lines += ["", title, "", "| name | ms | share |", "|---|---:|---:|"]
        lines += [f"| {name[:120].replace('|', '/')} | {t * 1e3:.2f} | {100 * share:.1f} % |"
                  for name, t, share in rows]
    compiled = [r for r in runs if r.compile is not None]
    if compiled:
        lines += ["", "Compiling (the one-step video and its decode, run first): " + "; ".join(
            f"{r.impl} {r.config} {r.compile:.1f} s" for r in compiled) + "."]
    return lines


DECODER_NOTE = " and the VAE's decoder (Compile VAE)"
POLICY_NOTES = {
    "none": "UNet, motion module, VAE and image encoder resident on the device",
    "compiled": "none + the UNet (with the motion modules){decoder} through torch.compile (backend "
                "{compile_backend}, mode {compile_mode}), compiled by a one-step video first (not in the row)",
    "model": "UNet and motion module brought to the device for each sampling call; VAE and image encoder only "
             "while they run",
    "block": "UNet blocks (with their motion modules) streamed, {resident} resident; VAE and image encoder only "
             "while they run",
    "block-chunk": "block offload + attention in chunks of {attn_chunk} queries + VAE decoded in tiles of {tile} px "
                   "overlapping {tile_overlap}",
    "block-compiled": "block + the UNet compiled block by block{decoder} (torch.compile, backend {compile_backend}, "
                      "mode {compile_mode}), compiled by a one-step video first (not in the row)",
}
DIFFUSERS_NOTES = {
    "plain": "pipe.to(device)",
    "chunked": "pipe.to(device), unet.enable_forward_chunking(), 2 frames decoded a call (AnimateDiff: vae tiling "
               "with the same tiles as Kinema)",
    "model-offload": "pipe.enable_model_cpu_offload()",
    "sequential-offload": "pipe.enable_sequential_cpu_offload()",
}


def report(args, argv: list[str], results: list[dict], device, meter: Meter, dtype, vae_dtype,
           pending: str = "") -> list[str]:
    import torch

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, host "
                 f"{cpu_name()}")
    else:
        where = f"CPU ({cpu_name()}, {torch.get_num_threads()} threads): a smoke run, the timings mean little"
    lines = [
        "```", command_line("bench/bench_gpu.py", argv), "```", "",
        (f"{where}; Python {platform.python_version()}, torch {torch.__version__}, diffusers {dv}. Scale "
         f"{args.scale}: {SCALES[args.scale].description}. UNet precision {_dtype_name(dtype)}, VAE "
         f"{_dtype_name(vae_dtype)}. One process; every run starts with the models in system memory except what "
         f"its policy keeps resident (the '{meter.what} at start' column), after a warm-up video of one step. "
         f"Peak memory: {'torch.cuda.max_memory_allocated' if meter.cuda else 'the process peak RSS (VmHWM)'} after "
         f"a reset at the start of each phase{'' if meter.cuda else CPU_RSS_NOTE}. Step: median after the first "
         f"step (which also holds the conditioning of diffusers' SVD). Sampling: SVD with the image conditioning. Peak FLOP/s: "
         f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)."),
        "",
        "Kinema memory policies: " + "; ".join(
            f"{p}: {POLICY_NOTES[p].format(**vars(args), decoder=DECODER_NOTE if args.compile_decode else '')}"
            for p in args.policies) + ".",
        "diffusers: " + "; ".join(f"{c}: {DIFFUSERS_NOTES[c]}" for c in args.diffusers) + "." if args.diffusers
        else "diffusers: not run.",
        "",
    ]
    for res in results:
        lines += workload_report(res, args, meter) + [""]
    lines += [f"Not run: {kind} ({why}).\n" for kind, why in getattr(args, "not_run", [])]
    if pending:
        lines.append(f"In progress: this report was written after a run; {pending} to come (a report cut short "
                     "here is missing them).\n")
    return lines


# -- main ----------------------------------------------------------------------------------------------------------

#: on the CPU one process holds both implementations' weights, so its peak RSS does not tell them apart
CPU_RSS_NOTE = (" (one process holds both implementations' weights and diffusers' pipeline, so on the CPU these "
                "columns do not separate the two: bench_all.py's, one process each, do)")

NO_CUDA = ("bench_gpu.py measures the real-size models on a CUDA GPU and there is none here ({why}). For a smoke "
           "run on the CPU: python bench/bench_gpu.py --device cpu --scale tiny")


def build_parser() -> argparse.ArgumentParser:
    register_pack()
    from kinema.models.compiling import COMPILE_BACKENDS, COMPILE_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one, else say so and exit)")
    p.add_argument("--scale", choices=tuple(SCALES), default="real",
                   help="network sizes: " + "; ".join(f"{k}: {v.description}" for k, v in SCALES.items()))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which workloads")
    p.add_argument("--policies", nargs="+", choices=POLICIES,
                   help="Kinema memory policies (default: all; on the CPU all but the compiled ones, whose C++ "
                        "compile by inductor takes minutes there)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one UNet call of each implementation (torch.profiler) and list its N first "
                        "kernels (CUDA) or operators (CPU) by time")
    p.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                   help="the compiled policies' torch.compile backend (the pack's CompileOptions; eager: dynamo's "
                        "capture alone)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="the compiled policies' torch.compile mode (inductor)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="the compiled policies also decode through torch.compile (the pack's Compile VAE); "
                        "--no-compile-decode: the UNet alone")
    p.add_argument("--diffusers", nargs="*", choices=DIFFUSERS_CONFIGS, default=list(DIFFUSERS_CONFIGS),
                   help="diffusers configurations (none given: diffusers is not run; the offloads need CUDA)")
    p.add_argument("--frames", type=int, help="frames (default: the scale's: real 16 AnimateDiff, 25 SVD-XT)")
    p.add_argument("--steps", type=int, help="steps (default: the scale's: real 20 AnimateDiff, 25 SVD-XT)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                   help="UNet, motion module and image encoder precision (default: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--vae-dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="VAE precision, the same for both implementations (auto: the UNet's, as the pack's "
                        "loaders; Kinema reruns a VAE call that overflows in fp16 in fp32)")
    p.add_argument("--resident", type=int, default=2, help="block offload: blocks resident on the device")
    p.add_argument("--attn-chunk", type=int, help="block-chunk: attention queries at once (default: the scale's, "
                                                   "real 1024)")
    p.add_argument("--tile", type=int, help="block-chunk: VAE decode tile in pixels (default: the scale's, real 256)")
    p.add_argument("--tile-overlap", type=int, help="VAE decode tile overlap in pixels (default: the scale's, real 64)")
    p.add_argument("--peak-tflops", type=float, default=H200_DENSE_FP16_TFLOPS,
                   help="the device's peak dense tensor-core TFLOP/s at --dtype, for the fraction of peak (H200 / "
                        "H100 SXM fp16/bf16: 989.4; A100: 312; L40S: 362)")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", help="also write the report to this file (rewritten after every run)")
    p.add_argument("--time-budget", type=float, help="seconds from the start: a run that would likely end later "
                                                      "(judged by the longest run of its workload so far, plus a "
                                                      "compile for the compiled policies) is skipped with a note, so "
                                                      "the report is complete when a limit is near")
    p.add_argument("--compile-allowance", type=float, default=150.0,
                   help="with --time-budget: the seconds a compiled policy's compile is expected to take until one "
                        "has been measured (an H200 compiled SD1.5 + v2 in 123 s)")
    return p


def budget_deadline(budget: float | None, started: float) -> float | None:
    """The ``time.monotonic()`` by which ``budget`` seconds are up (None: no budget), counted from the device
    command's start where ``gpu_run.sh`` exported it (``KINEMA_BENCH_STARTED``, seconds since the epoch: the
    wheels and the tests before the bench count), else from ``started`` (the bench's own start, monotonic)."""
    if not budget:
        return None
    since = os.environ.get("KINEMA_BENCH_STARTED")
    if since:
        try:
            started -= max(0.0, time.time() - float(since))
        except ValueError:
            raise ValueError(f"KINEMA_BENCH_STARTED must be the seconds since the epoch (date +%s), not "
                             f"{since!r}") from None
    return started + budget


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    try:
        deadline = budget_deadline(args.time_budget, started)
    except ValueError as e:
        p.error(str(e))
    # diffusers' sequential offload leaves its weights on the meta device, hooked: it must run last
    args.diffusers = sorted(dict.fromkeys(args.diffusers), key=DIFFUSERS_CONFIGS.index)
    check_at_least(p, args, 2, "steps")  # the first is the warm-up step, left out of the median
    check_at_least(p, args, 1, "frames", "resident", "attn_chunk", "tile")
    if not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be above 0, not {args.peak_tflops:g}")
    import torch

    if args.device is None or args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(NO_CUDA.format(why=f"torch {torch.__version__}: torch.cuda.is_available() is False"))
            return 0
        args.device = args.device or "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    args.policies = args.policies or default_policies(device)
    sc = SCALES[args.scale]
    args.attn_chunk = sc.attn_chunk if args.attn_chunk is None else args.attn_chunk
    args.tile = sc.tile if args.tile is None else args.tile
    args.tile_overlap = sc.overlap if args.tile_overlap is None else args.tile_overlap
    if args.tile % 8 or args.tile_overlap % 8 or args.tile_overlap * 2 >= args.tile:
        p.error("--tile and --tile-overlap must be multiples of 8 pixels, the overlap less than half the tile")
    register_pack()
    from kinema.models import memory

    precision = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = memory.pick_dtype(precision, device)
    vae_dtype = dtype if args.vae_dtype == "auto" else memory.pick_dtype(args.vae_dtype, device)
    meter = Meter(device)
    gen_device = device  # random weights drawn where they compute (fast on a GPU), kept on the CPU
    results = []

    def write(partial: list[dict], pending: str = "") -> str:
        text = "\n".join(report(args, argv, partial, device, meter, dtype, vae_dtype, pending)).rstrip() + "\n"
        if args.output:  # after each run: a run cut off later keeps what it measured
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    args.not_run = []
    setup = 0.0  # the last workload's setup (weights, warm-ups, FLOP counts): the next one's is likely alike
    for i, kind in enumerate(args.models):
        later = args.models[i + 1:]
        if deadline is not None and time.monotonic() + setup > deadline:
            args.not_run.append((kind, "the time budget, --time-budget, ran out before it"))
            continue
        print(f"building the {kind} weights ({args.scale}) ...", file=sys.stderr, flush=True)
        start = time.monotonic()

        def on_run(out, later=later):
            write([*results, out], pending="more runs" + (f" and workloads ({', '.join(later)})" if later else ""))

        try:
            build = build_animatediff if kind == "animatediff" else build_svd
            w = build(sc, args, dtype, vae_dtype, gen_device)
            built = time.monotonic() - start
            try:
                results.append(bench_workload(w, args, device, meter, dtype, vae_dtype, deadline=deadline,
                                              on_run=on_run))
                setup = built + results[-1]["setup_s"]
            finally:
                w.state_dicts.clear()
        except Exception as e:  # noqa: BLE001 -- one workload failing outside its runs keeps the others
            traceback.print_exc()
            args.not_run.append((kind, f"failed: {_first_line(e)}"))
        meter.clear()
    text = write(results)
    print(text, end="")
    failed = [r for res in results for r in res["runs"] if r.note.startswith("failed")]
    return 1 if failed or any(why.startswith("failed") for _, why in args.not_run) else 0


if __name__ == "__main__":
    sys.exit(main())
