"""Stable Video Diffusion image-to-video: Kinema vs the diffusers SVD pipeline on the same weights, CPU, fp32,
with and without the low-memory settings.

    python bench/bench_svd.py [--frames 14] [--steps 10] [--width 256] [--height 256] [--threads N]

Each configuration makes one video in its own subprocess from the pack's tiny demo SVD weights
(``kinema.models.demo``: the published SVD layout, random weights) and the demo init image: the image
conditioning (CLIP embedding, VAE encoding), ``--steps`` Euler steps on the karras EDM schedule with the
linear per-frame guidance 1.0 -> 2.5, the same starting noise, and the temporal VAE decode. Configurations:

- ``kinema``: cond and uncond in one batch, whole-frame attention, decoding ``--decode-chunk`` frames
  at a time (default: all frames);
- ``kinema low-mem``: cond and uncond one after the other (``batch_cond=False``), attention queries in
  chunks of ``--attn-chunk``, decoding ``--low-decode-chunk`` frames at a time;
- ``diffusers``: ``StableVideoDiffusionPipeline`` (cond and uncond always batched), ``decode_chunk_size``
  ``--decode-chunk``;
- ``diffusers low-mem``: the same with ``unet.enable_forward_chunking()`` (its feed-forward chunking) and
  ``decode_chunk_size`` ``--low-decode-chunk``.

Reported: total time (conditioning + sampling + decode), peak RSS while making the video
(``VmHWM`` after resetting it, where the kernel allows) and of the whole process, each as a ratio to
``diffusers``; and how far each video's latents are from diffusers' (the same computation; the decode chunk
changes the decoded frames, not the latents).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from _measure import ROOT, cpu_name, mib, ratio, register_pack, reset_peak_rss, rss_kib, thread_env

CONFIGS = ("kinema", "kinema low-mem", "diffusers", "diffusers low-mem")
MIN_CFG, MAX_CFG, FPS, MOTION_BUCKET = 1.0, 2.5, 7, 127


def run_child(args) -> None:
    import gc
    import resource

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    from fixtures_svd_pipeline import write_svd

    from kinema.models import checkpoint, pipelines, svd_model
    from kinema.models.demo_media import demo_image
    from kinema.models.sampling import initial_noise
    from kinema.models.vae import decode_frames

    w, h, frames = args.width, args.height, args.frames
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        bundle = checkpoint.load_svd(write_svd(os.path.join(tmp, "svd.safetensors")))
    big = torch.from_numpy(demo_image()).float().div(255)[None]
    image_u8 = (svd_model.fit_image(big, w, h)[0] * 255).round().to(torch.uint8)
    image = image_u8.float().div(255)[None]
    noise = initial_noise(args.seed, (frames, 4, h // 8, w // 8))
    low = args.child.endswith("low-mem")
    decode_chunk = args.low_decode_chunk if low else (args.decode_chunk or frames)

    if args.child.startswith("kinema"):
        model = bundle.model.with_options(cfg_mode="linear", min_cfg=MIN_CFG)
        opts = pipelines.SampleOptions(seed=args.seed, steps=args.steps, cfg=MAX_CFG, sampler="euler",
                                       scheduler="karras", batch_cond=not low,
                                       attn_chunk=args.attn_chunk if low else 0)

        def make():
            cond, uncond = svd_model.image_conditioning(
                bundle.image_encoder, bundle.vae, image,
                svd_model.ImageConditioningOptions(width=w, height=h, frames=frames, fps=FPS,
                                                   motion_bucket_id=MOTION_BUCKET, augmentation_level=0.0))
            latent = pipelines.sample_img2vid(model, cond, uncond, pipelines.empty_video_latent(frames, w, h), opts)
            decode_frames(bundle.vae, latent, chunk=decode_chunk)
            return latent * svd_model.SVD_LATENT_SCALE
    else:
        from diffusers.utils import logging as diffusers_logging
        from fixtures_svd_pipeline import diffusers_svd_pipeline
        from PIL import Image

        diffusers_logging.set_verbosity_error()
        pipe = diffusers_svd_pipeline(bundle)
        if low:
            pipe.unet.enable_forward_chunking()
        pil = Image.fromarray(image_u8.numpy())
        del bundle

        def make():
            with torch.no_grad():
                latent = pipe(pil, height=h, width=w, num_frames=frames, num_inference_steps=args.steps,
                              min_guidance_scale=MIN_CFG, max_guidance_scale=MAX_CFG, fps=FPS,
                              motion_bucket_id=MOTION_BUCKET, noise_aug_strength=0.0,
                              decode_chunk_size=decode_chunk, latents=noise[None], output_type="latent").frames[0]
                pipe.decode_latents(latent[None], frames, decode_chunk_size=decode_chunk)
            return latent

    gc.collect()
    rss_before = rss_kib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    latent = make()
    total = time.perf_counter() - t0
    sampling_peak = rss_kib("VmHWM") if reset else None
    torch.save(latent.float().contiguous(), args.latent_out)
    with open(args.result, "w") as f:
        json.dump({"total": total,
                   "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "video_peak_rss_kib": sampling_peak, "rss_before_kib": rss_before,
                   "threads": torch.get_num_threads(), "decode_chunk": decode_chunk}, f)


def run_parent(args, argv: list[str]) -> int:
    import torch

    results, latents = {}, {}
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        for name in CONFIGS:
            slug = name.replace(" ", "_")
            result, latent = os.path.join(tmp, f"{slug}.json"), os.path.join(tmp, f"{slug}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", result,
                   "--latent-out", latent] + argv
            print(f"running {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=thread_env(args.threads), cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                print(f"{name} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            with open(result) as f:
                results[name] = json.load(f)
            latents[name] = torch.load(latent)
    import diffusers

    ref = results["diffusers"]
    lines = [
        "```", "python " + " ".join(shlex.quote(a) for a in ["bench/bench_svd.py"] + argv), "```", "",
        f"Stable Video Diffusion on the Kinema demo weights (tiny, random; the published layout), {args.frames} "
        f"frames at {args.width}x{args.height} (latent {args.width // 8}x{args.height // 8}), {args.steps} Euler "
        f"steps (karras, EDM), per-frame guidance {MIN_CFG} -> {MAX_CFG}, image conditioning and temporal decode "
        f"included; fp32 on CPU, {ref['threads']} threads ({cpu_name()}, {os.cpu_count()} cores); torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}. One process per configuration. low-mem: Kinema "
        f"cond/uncond one at a time + attention chunks of {args.attn_chunk} queries; diffusers "
        f"unet.enable_forward_chunking(); both decode {args.low_decode_chunk} frames at a time.",
        "",
        "| | decode chunk | total (s) | peak RSS making the video (MiB) | peak RSS (MiB) "
        "| total / diffusers | video peak RSS / diffusers | latents vs diffusers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    scale = float(latents["diffusers"].abs().max())
    for name in CONFIGS:
        r = results[name]
        diff = float((latents[name] - latents["diffusers"]).abs().max()) / scale
        lines.append(
            f"| {name} | {r['decode_chunk']} | {r['total']:.2f} | {mib(r['video_peak_rss_kib'])} "
            f"| {mib(r['peak_rss_kib'])} | {ratio(r['total'], ref['total'])} "
            f"| {ratio(r['video_peak_rss_kib'], ref['video_peak_rss_kib'])} | {diff:.1e} |")
    lines += ["", "latents vs diffusers: max |latents - diffusers'| / max |diffusers'| (the same video: ~1e-5 in "
              "fp32)."]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=14, help="video frames (svd: 14)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps")
    p.add_argument("--width", type=int, default=256, help="width in pixels (a multiple of 8)")
    p.add_argument("--height", type=int, default=256, help="height in pixels (a multiple of 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--decode-chunk", type=int, default=0, help="frames decoded at once (0: all)")
    p.add_argument("--low-decode-chunk", type=int, default=2, help="low-mem: frames decoded at once")
    p.add_argument("--attn-chunk", type=int, default=256, help="low-mem (Kinema): attention queries at once")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--latent-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        p.error("--width and --height must be multiples of 8, at least 64")
    if min(args.steps, args.frames, args.threads, args.low_decode_chunk, args.attn_chunk) < 1:
        p.error("--steps, --frames, --threads, --low-decode-chunk and --attn-chunk must be at least 1")
    if args.child:
        run_child(args)
        return 0
    return run_parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())
