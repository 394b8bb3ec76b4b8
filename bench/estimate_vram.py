"""Peak GPU memory of the real-size workloads, estimated on a machine without a GPU.

    python bench/estimate_vram.py                       # AnimateDiff and SVD-XT at the published sizes
    python bench/estimate_vram.py --model svd --frames 14

The pack's own code runs at the sizes ``bench_gpu.py --scale real`` builds (SD1.5 UNet + v2 motion module,
16 frames at 512x512; SVD-XT, 25 frames at 1024x576; fp16) with PyTorch's ``meta`` device as the compute device:
tensors with shapes and dtypes but no data, so a whole UNet call takes seconds on a CPU. A ``TorchDispatchMode``
follows every storage made on that device from the op that makes it until its last reference is dropped, and
keeps the peak of their sum: the quantity ``torch.cuda.max_memory_allocated`` reports, under these assumptions:

- **Attention**: on CUDA, fp16 SDPA runs the flash kernel, which allocates its output and one fp32 logsumexp per
  query; on ``meta`` SDPA takes the math path, which materializes the scores. A ``TorchFunctionMode`` stands in
  for SDPA with the flash kernel's two allocations.
- **cuDNN's layout copies**: a half-precision convolution of an NCHW tensor copies its input to NHWC and makes
  its output there (``CudaKernels``); GroupNorm of a non-contiguous tensor makes a contiguous copy; the pack's
  CUDA-only paths (CUDA's own GroupNorm kernel, temporal convolutions in bands) are taken.
- **Not counted**: cuBLAS / cuDNN's other workspaces, the caching allocator's rounding and fragmentation (and the
  CUDA context, which ``max_memory_allocated`` leaves out too). A real run reports somewhat more: check the
  figures with ``bench_gpu.py`` on a GPU.

Phases, each its own peak: **encode** (the text encoder, or SVD's CLIP image encoder and the VAE encode of the
init image), **sample** (one model call on the largest batch the sampler gives it: cond and uncond together
unless the policy runs them one after the other; the sampler's own latents are a few MiB), **decode** (one VAE
decode chunk). Policies, as the pack places models (README, "Low memory"):

- ``none`` (``--highvram``): every model lives on the GPU; each phase adds its activations to all the weights;
- ``model`` (the default): the UNet and motion module on the GPU while sampling, the VAE and encoders only while
  they run;
- ``block`` (``--lowvram``): UNet blocks streamed, 2 resident: the code's own ``BlockStreamer`` decides what is
  resident when; its ``on_move`` instrumentation adds a block's bytes when it comes in and takes them off when it
  leaves (storage and compute device are both ``meta`` here, so nothing is copied);
- ``block-1-seq`` (``--novram``): 1 resident block, cond and uncond one after the other;
- ``block-tiles``: ``block`` + attention chunks + the VAE decoded in tiles (``--tile``, ``--tile-overlap``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import weakref
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn.functional as F
from _measure import command_line, register_pack
from bench_gpu import SCALES, SVD_DECODE_CHUNK, ad_decode_chunk
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEVICE = "meta"
GIB = 1024 ** 3


@dataclass(frozen=True)
class Policy:
    name: str
    mode: str  # offload mode of the video model
    resident: int = 2
    batch_cond: bool = True
    tiles: bool = False
    comfy: str = ""


@dataclass(frozen=True)
class DiffusersConfig:
    """How diffusers' pipeline would run: ``resident`` everything on the GPU (``pipe.to("cuda")``) or
    ``enable_model_cpu_offload`` (each model on the GPU while it runs); ``chunking``
    (``unet.enable_forward_chunking()``); ``decode_chunk`` frames a VAE call (None: the pipeline's default)."""

    name: str
    resident: bool
    chunking: bool = False
    decode_chunk: int | None = None


DIFFUSERS = (
    DiffusersConfig("plain", resident=True),
    DiffusersConfig("model-offload", resident=False),
    DiffusersConfig("model-offload + chunking", resident=False, chunking=True, decode_chunk=2),
)


POLICIES = (
    Policy("none", "none", comfy="--highvram"),
    Policy("model", "model", comfy="default"),
    Policy("block", "block", comfy="--lowvram"),
    Policy("block-1-seq", "block", resident=1, batch_cond=False, comfy="--novram"),
    Policy("block-tiles", "block", tiles=True),
)


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage alive on ``device``: ``now`` and the ``peak`` since ``reset``; ``base`` bytes
    (weights resident for the whole phase, made outside the mode) are added to both.

    A storage is counted from the op that makes it (not a view op: a view shares its input's storage) until the last
    tensor using it is freed (each tensor an op returns holds a reference, released by a ``weakref.finalize``)."""

    def __init__(self, device: str = DEVICE, base: int = 0):
        super().__init__()
        self.device, self.base = torch.device(device), base
        self.users: dict[int, int] = {}  # storage (its C pointer) -> tensors alive using it
        self.sizes: dict[int, int] = {}
        self.now = self.peak = base
        self.resident: set[int] = set()

    def _release(self, key: int) -> None:
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.now -= self.sizes.pop(key)

    def _hold(self, t: torch.Tensor, new: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.users:
            if not new:  # a view of a storage made before the count (a weight): no new memory
                return
            self.users[key], self.sizes[key] = 0, storage.nbytes()
            self.now += storage.nbytes()
        self.users[key] += 1
        weakref.finalize(t, self._release, key)

    def moved(self, module, device) -> None:
        """``OffloadOptions.on_move``: a streamed block comes in (first call) or leaves (the next)."""
        size = nbytes(module)
        if id(module) in self.resident:
            self.resident.discard(id(module))
            self.now -= size
        else:
            self.resident.add(id(module))
            self.now += size
            self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = not func.is_view
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                self._hold(t, new)
        self.peak = max(self.peak, self.now)
        return out


def _channels_last(x: torch.Tensor) -> bool:
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return layout is not None and x.is_contiguous(memory_format=layout)


class CudaKernels(TorchFunctionMode):
    """What CUDA's kernels allocate that the meta device's do not:

    - SDPA: the flash kernel's output and a float32 logsumexp per query (on ``meta`` SDPA would take the math path
      and hold the scores);
    - a half-precision convolution of a tensor not in channels_last: cuDNN's tensor-core kernels work in NHWC, so
      the call copies its input to NHWC and makes its output there before copying it back (an H200 profile of the
      SVD decoder shows the ``nchwToNhwc`` / ``nhwcToNchw`` kernels around the convolutions): an input-size and an
      output-size buffer while the call runs;
    - GroupNorm of a tensor not contiguous (the temporal layers' frames seen as a video): a contiguous copy first.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2]
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            del lse
            return out
        if func in (F.conv2d, F.conv3d) and args[0].dtype in (torch.float16, torch.bfloat16) \
                and not _channels_last(args[0]):
            staged_in = torch.empty(args[0].shape, dtype=args[0].dtype, device=args[0].device)
            out = func(*args, **kwargs)
            staged_out = torch.empty_like(out, memory_format=torch.contiguous_format)
            del staged_in, staged_out
            return out
        if func is F.group_norm and not args[0].is_contiguous():
            return func(args[0].contiguous(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def measure(fn, base: int = 0) -> int:
    """Peak bytes on the meta device while ``fn(live)`` runs, ``base`` included; the pack's CUDA-only choices
    (GroupNorm kernels, temporal convolutions in bands) are made as on CUDA."""
    from kinema.models import layers, vae

    devices = vae.NATIVE_HALF_GROUP_NORM
    vae.NATIVE_HALF_GROUP_NORM = devices | {DEVICE}
    try:
        assert DEVICE not in layers.UNBANDED_DEVICES | layers.FRAME_CONV_2D_DEVICES  # bands and Conv3d, as on CUDA
        with torch.no_grad(), CudaKernels(), LiveBytes(base=base) as live:
            fn(live)
    finally:
        vae.NATIVE_HALF_GROUP_NORM = devices
    return live.peak


def streamed(p: Policy, chunk: int, live: LiveBytes):
    """The block-offload options of ``p``, residency counted by ``live``."""
    from kinema.models.offload import OffloadOptions

    return OffloadOptions(mode="block", device=DEVICE, storage=DEVICE, resident=p.resident, attn_chunk=chunk,
                          batch_cond=p.batch_cond, on_move=live.moved)


def nbytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in (*m.parameters(), *m.buffers()))




# -- workloads ----------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    title: str
    weights: dict  # name -> bytes
    phases: dict = field(default_factory=dict)  # policy name -> {phase: bytes}
    diffusers: dict = field(default_factory=dict)  # DiffusersConfig name -> {phase: bytes}
    diffusers_note: str = ""


def _meta(factory):
    """``factory()`` built on the meta device, in fp16."""
    with torch.device(DEVICE):
        return factory().to(torch.float16)


def _sample_peak(p: Policy, make_model, call, resident_weights: int, all_weights: int, args) -> int:
    """Peak of one model call under ``p``: ``make_model(offload)`` gives the video model (offload None: the
    weights resident, ``resident_weights`` bytes, ``all_weights`` under ``none``), ``call(model, videos, chunk)``
    runs it on a batch of ``videos`` (2: cond and uncond together)."""
    chunk = args.attn_chunk if p.tiles else 0
    videos = 2 if p.batch_cond else 1
    if p.mode == "block":
        return measure(lambda live: call(make_model(streamed(p, chunk, live)), videos, chunk))
    base = all_weights if p.mode == "none" else resident_weights
    model = make_model(None)
    return measure(lambda live: call(model, videos, chunk), base)


def animatediff(sc, frames: int, width: int, height: int, args) -> Workload:
    from kinema.models.layers import SharedContext
    from kinema.models.motion import MotionConfig, MotionModel, MotionModuleSet
    from kinema.models.unet import UNetConfig, UNetModel
    from kinema.models.vae import AutoencoderKL, VAEConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _meta(lambda: UNetModel(UNetConfig(model_channels=sc.unet_channels, channel_mult=sc.unet_mult,
                                              context_dim=sc.text_context)))
    motion = _meta(lambda: MotionModuleSet(MotionConfig(
        down_channels=tuple(sc.unet_channels * m for m in sc.unet_mult), modules_per_down=2, modules_per_up=3,
        has_mid=True, max_len=32)))  # v2: a mid-block module, 32 positions
    vae = _meta(lambda: AutoencoderKL(VAEConfig(ch=sc.sd_vae_ch, ch_mult=sc.vae_mult)))
    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(hidden_size=sc.text_context, intermediate_size=4 * sc.text_context,
                                                      num_hidden_layers=12, num_attention_heads=12,
                                                      max_position_embeddings=77)))
    lat_h, lat_w = height // 8, width // 8
    w = Workload(f"AnimateDiff: SD1.5 UNet + v2 motion module, {frames} frames {width}x{height}, fp16",
                 {"UNet": nbytes(unet), "motion module": nbytes(motion), "VAE": nbytes(vae),
                  "CLIP text": nbytes(text)})
    everything = sum(w.weights.values())
    tokens = torch.zeros(2, 77, dtype=torch.long, device=DEVICE)
    text_peak = measure(lambda live: text(input_ids=tokens), w.weights["CLIP text"])

    def make_model(offload):
        return MotionModel(unet, motion) if offload is None else MotionModel(unet, motion, offload=offload)

    def call(model, videos, chunk):
        context = SharedContext(torch.empty(videos, 77, sc.text_context, dtype=torch.float16, device=DEVICE),
                                torch.arange(videos, device=DEVICE).repeat_interleave(frames))
        x = torch.empty(videos * frames, 4, lat_h, lat_w, dtype=torch.float16, device=DEVICE)
        model(x, torch.empty(videos * frames, device=DEVICE), context, frames, attn_chunk=chunk)

    for p in POLICIES:
        rest = everything - w.weights["CLIP text"] - w.weights["VAE"] if p.mode == "none" else 0
        w.phases[p.name] = {
            "encode": text_peak + (w.weights["VAE"] + rest if p.mode == "none" else 0),
            "sample": _sample_peak(p, make_model, call, w.weights["UNet"] + w.weights["motion module"], everything,
                                   args),
            "decode": _decode(vae, (min(frames, ad_decode_chunk(lat_h * 8, lat_w * 8)), 4, lat_h, lat_w), p, args)
                      + (everything - w.weights["VAE"] if p.mode == "none" else 0),
        }
    if args.diffusers:
        _diffusers_animatediff(w, sc, frames, lat_h, lat_w, unet, motion, vae, text_peak)
    return w


def _diffusers_animatediff(w: Workload, sc, frames: int, lat_h: int, lat_w: int, unet, motion, vae,
                           text_peak: int) -> None:
    """diffusers' ``AnimateDiffPipeline`` on the same structure: ``UNetMotionModel.from_unet2d`` of the SD1.5
    UNet and the v2 ``MotionAdapter`` and its ``AutoencoderKL`` (configs read off the same shapes, as
    ``tests/fixtures.py`` builds them for the parity tests), the same CLIP text model. As the pipeline runs: the
    prompt embeddings repeated per frame, cond and uncond in one UNet batch, the VAE decoding
    ``decode_chunk_size`` frames a call (16 by default) and the decoded frames gathered on the GPU."""
    import fixtures
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with torch.device(DEVICE):
        unet2d = UNet2DConditionModel(**fixtures.diffusers_unet_config(unet.state_dict()))
        adapter = MotionAdapter(**fixtures.motion_adapter_config(motion.state_dict()))
        d_unet = UNetMotionModel.from_unet2d(unet2d, adapter).to(DEVICE, torch.float16).eval()
        d_vae = DiffusersVAE(**fixtures.diffusers_vae_config(vae.state_dict())).to(DEVICE, torch.float16).eval()
    del unet2d, adapter
    sizes = {"UNet + motion": nbytes(d_unet), "VAE": nbytes(d_vae), "CLIP text": w.weights["CLIP text"]}
    everything = sum(sizes.values())
    x = torch.empty(2, 4, frames, lat_h, lat_w, dtype=torch.float16, device=DEVICE)
    context = torch.empty(2 * frames, 77, sc.text_context, dtype=torch.float16, device=DEVICE)
    t = torch.full((), 500.0, device=DEVICE)
    for cfg in DIFFUSERS:
        if cfg.chunking:
            d_unet.enable_forward_chunking()
        else:
            d_unet.disable_forward_chunking()
        sample = measure(lambda live: d_unet(x, t, context), everything if cfg.resident else sizes["UNet + motion"])
        chunk = cfg.decode_chunk or 16  # AnimateDiffPipeline's decode_chunk_size
        decode = measure(lambda live, chunk=chunk: _diffusers_decode(lambda z: d_vae.decode(z).sample, frames, chunk,
                                                                     (4, lat_h, lat_w)),
                         everything if cfg.resident else sizes["VAE"])
        encode = text_peak + (everything - sizes["CLIP text"] if cfg.resident else 0)
        w.diffusers[cfg.name] = {"encode": encode, "sample": sample, "decode": decode}
    w.diffusers_note = "diffusers weights: " + ", ".join(f"{k} {_g(v)}" for k, v in sizes.items()) + " GiB"


def _diffusers_decode(decode, frames: int, chunk: int, shape: tuple) -> None:
    """diffusers' ``decode_latents``: ``chunk`` frames a VAE call, the decoded chunks concatenated on the device
    and made float32."""
    parts = [decode(torch.empty(min(chunk, frames - i), *shape, dtype=torch.float16, device=DEVICE))
             for i in range(0, frames, chunk)]
    torch.cat(parts).float()


def svd(sc, frames: int, width: int, height: int, args) -> Workload:
    from kinema.models.clip_vision import heads_for_width
    from kinema.models.svd import SVDUNet, SVDUNetConfig
    from kinema.models.svd_model import SVDModel
    from kinema.models.vae import TemporalAutoencoder, TemporalVAEConfig
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hidden = sc.vision_hidden
    unet = _meta(lambda: SVDUNet(SVDUNetConfig(model_channels=sc.svd_channels, channel_mult=sc.svd_mult,
                                               context_dim=sc.image_context)))
    vae = _meta(lambda: TemporalAutoencoder(TemporalVAEConfig(ch=sc.svd_vae_ch, ch_mult=sc.vae_mult)))
    vision = _meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=sc.vision_layers,
        num_attention_heads=heads_for_width(hidden), image_size=224, patch_size=14,
        projection_dim=sc.image_context)))
    lat_h, lat_w = height // 8, width // 8
    w = Workload(f"SVD-XT: VideoUNet, CLIP ViT-H/14, temporal VAE, {frames} frames {width}x{height}, fp16",
                 {"UNet": nbytes(unet), "VAE": nbytes(vae), "CLIP image": nbytes(vision)})
    everything = sum(w.weights.values())
    pixels = torch.empty(1, 3, 224, 224, dtype=torch.float16, device=DEVICE)
    image = torch.empty(1, 3, height, width, dtype=torch.float16, device=DEVICE)
    clip_peak = measure(lambda live: vision(pixel_values=pixels), w.weights["CLIP image"])
    encode_peak = measure(lambda live: vae.encode(image), w.weights["VAE"])

    def make_model(offload):
        return SVDModel(unet=unet, variant="svd_xt") if offload is None else SVDModel(
            unet=unet, variant="svd_xt", offload=offload)

    def call(model, videos, chunk):
        n = videos * frames
        x = torch.empty(n, 8, lat_h, lat_w, dtype=torch.float16, device=DEVICE)
        context = torch.empty(n, 1, sc.image_context, dtype=torch.float16, device=DEVICE)
        model(x, torch.empty(n, device=DEVICE), context, torch.empty(n, 768, device=DEVICE), frames,
              attn_chunk=chunk)

    for p in POLICIES:
        none = p.mode == "none"
        w.phases[p.name] = {
            "encode": max(clip_peak + (everything - w.weights["CLIP image"] if none else 0),
                          encode_peak + (everything - w.weights["VAE"] if none else 0)),
            "sample": _sample_peak(p, make_model, call, w.weights["UNet"], everything, args),
            "decode": _decode(vae, (min(frames, SVD_DECODE_CHUNK), 4, lat_h, lat_w), p, args)
                      + (everything - w.weights["VAE"] if none else 0),
        }
    if args.diffusers:
        _diffusers_svd(w, sc, frames, lat_h, lat_w, unet, vae, clip_peak, encode_peak)
    return w


def _diffusers_svd(w: Workload, sc, frames: int, lat_h: int, lat_w: int, unet, vae, clip_peak: int,
                   encode_peak: int) -> None:
    """diffusers' ``StableVideoDiffusionPipeline`` on the same structure: ``UNetSpatioTemporalConditionModel`` and
    ``AutoencoderKLTemporalDecoder`` (configs as ``tests/fixtures_svd_pipeline.py`` builds them), the same CLIP
    image tower. As the pipeline runs: cond and uncond in one UNet batch, ``decode_chunk_size`` frames a decoder
    call (all the frames by default), the decoded chunks gathered on the GPU."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from fixtures_svd_unet import diffusers_svd_config

    diffusers_logging.set_verbosity_error()
    widths = tuple(vae.cfg.ch * m for m in vae.cfg.ch_mult)
    with torch.device(DEVICE):
        # (.to: diffusers makes its blend factors with torch.Tensor([...]), on the CPU whatever the device context)
        d_unet = diffusers.UNetSpatioTemporalConditionModel(**diffusers_svd_config(unet.cfg)).to(DEVICE, torch.float16)
        d_vae = diffusers.AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
            block_out_channels=widths, layers_per_block=vae.cfg.num_res_blocks,
            latent_channels=vae.cfg.z_channels).to(DEVICE, torch.float16)
    sizes = {"UNet": nbytes(d_unet), "VAE": nbytes(d_vae), "CLIP image": w.weights["CLIP image"]}
    everything = sum(sizes.values())
    x = torch.empty(2, frames, 8, lat_h, lat_w, dtype=torch.float16, device=DEVICE)
    context = torch.empty(2, 1, sc.image_context, dtype=torch.float16, device=DEVICE)
    ids = torch.empty(2, 3, dtype=torch.float16, device=DEVICE)
    t = torch.full((), 1.0, device=DEVICE)
    for cfg in DIFFUSERS:
        for m in d_unet.modules():
            if hasattr(m, "set_chunk_feed_forward"):
                m.set_chunk_feed_forward(chunk_size=1 if cfg.chunking else None, dim=0)
        sample = measure(lambda live: d_unet(x, t, context, ids), everything if cfg.resident else sizes["UNet"])
        chunk = cfg.decode_chunk or frames  # StableVideoDiffusionPipeline's decode_chunk_size: all the frames
        decode = measure(lambda live, chunk=chunk: _diffusers_decode(
                             lambda z: d_vae.decode(z, num_frames=z.shape[0]).sample, frames, chunk, (4, lat_h, lat_w)),
                         everything if cfg.resident else sizes["VAE"])
        rest = everything - sizes["CLIP image"] - sizes["VAE"] if cfg.resident else 0
        encode = max(clip_peak + (sizes["VAE"] if cfg.resident else 0),
                     encode_peak + (sizes["CLIP image"] if cfg.resident else 0)) + rest
        w.diffusers[cfg.name] = {"encode": encode, "sample": sample, "decode": decode}
    w.diffusers_note = "diffusers weights: " + ", ".join(f"{k} {_g(v)}" for k, v in sizes.items()) + " GiB"


def _decode(vae, shape: tuple, p: Policy, args) -> int:
    """Peak of one decode chunk, the VAE's weights included, as ``vae.decode_frames`` runs it on a GPU: each
    (tile's) output is clamped in fp32 and copied to the CPU, where the tiles are blended."""
    from kinema.models.tiling import TileOptions, run_tiled

    tiles = TileOptions(args.tile // 8, args.tile_overlap // 8) if p.tiles else TileOptions()
    z = torch.empty(shape, dtype=torch.float16, device=DEVICE)

    def call(part):
        out = vae.decode(part).float().clamp(-1, 1)
        return torch.empty(out.shape)  # .cpu(): the device copy is dropped here

    return measure(lambda live: run_tiled(call, z, tiles, 8), nbytes(vae))


# -- report -------------------------------------------------------------------------------------------------------

def _g(n: int) -> str:
    return f"{n / GIB:.2f}"


def report(workloads: list[Workload], argv: list[str], seconds: float) -> list[str]:
    intro = (f"`{command_line('bench/estimate_vram.py', argv)}` ({seconds:.0f} s); torch {torch.__version__}. "
             "GiB; fp16 weights and activations; flash attention; cuDNN's NHWC copies around half-precision "
             "convolutions; other workspaces, allocator rounding and fragmentation not counted (an H200 measured "
             "Kinema's peaks within 5% of these estimates).")
    lines = ["# Estimated peak GPU memory (no GPU: the meta device, see bench/estimate_vram.py)", "", intro, ""]
    for w in workloads:
        lines += [f"## {w.title}", "",
                  "Weights: " + ", ".join(f"{k} {_g(v)}" for k, v in w.weights.items()) + " GiB.", "",
                  "| policy | ComfyUI | encode | sample | decode | peak |", "|---|---|---:|---:|---:|---:|"]
        for p in POLICIES:
            ph = w.phases[p.name]
            lines.append(f"| Kinema {p.name} | {p.comfy} | {_g(ph['encode'])} | {_g(ph['sample'])} | "
                         f"{_g(ph['decode'])} | {_g(max(ph.values()))} |")
        for name, ph in w.diffusers.items():
            lines.append(f"| diffusers {name} | | {_g(ph['encode'])} | {_g(ph['sample'])} | {_g(ph['decode'])} | "
                         f"{_g(max(ph.values()))} |")
        if w.diffusers_note:
            lines += ["", w.diffusers_note + "."]
        lines.append("")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("animatediff", "svd", "both"), default="both")
    p.add_argument("--frames", type=int, help="default: 16 (AnimateDiff), 25 (SVD-XT)")
    p.add_argument("--width", type=int, help="default: 512 (AnimateDiff), 1024 (SVD-XT)")
    p.add_argument("--height", type=int, help="default: 512 (AnimateDiff), 576 (SVD-XT)")
    p.add_argument("--tile", type=int, default=SCALES["real"].tile, help="block-tiles: VAE tile, pixels")
    p.add_argument("--tile-overlap", type=int, default=SCALES["real"].overlap, help="block-tiles: overlap, pixels")
    p.add_argument("--attn-chunk", type=int, default=SCALES["real"].attn_chunk, help="block-tiles: attention chunk")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="leave out diffusers' pipelines on the same structure")
    p.add_argument("--out", help="also write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    register_pack()
    sc = SCALES["real"]
    t0 = time.perf_counter()
    workloads = []
    for name, make, video in (("animatediff", animatediff, sc.ad_video), ("svd", svd, sc.svd_video)):
        if args.model in (name, "both"):
            frames, width, height = args.frames or video[0], args.width or video[1], args.height or video[2]
            workloads.append(make(sc, frames, width, height, args))
    text = "\n".join(report(workloads, argv, time.perf_counter() - t0))
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
