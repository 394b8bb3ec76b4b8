"""Stable Video Diffusion image-to-video: Kinema vs the diffusers SVD pipeline on the same weights, CPU, fp32,
with and without the low-memory settings.

    python bench/bench_svd.py [--frames 14] [--steps 10] [--width 256] [--height 256] [--threads N] [--repeat N]
                              [--scale tiny|medium] [--configs kinema diffusers ...]

The demo SVD checkpoint (``kinema.models.demo``: the published SVD layout, random weights; ``--scale tiny``, or
``medium``: the real SVD block structure at 128 model channels, see ``tests/fixtures_svd_pipeline.py``) is
written once by a preparing subprocess; then each configuration makes one video in its own subprocess from that
file and the demo init image: the image conditioning (CLIP embedding, VAE encoding), ``--steps`` Euler steps on
the karras EDM schedule with the linear per-frame guidance 1.0 -> 2.5, the same starting noise, and the
temporal VAE decode. Configurations (``--configs``, default all four):

- ``kinema``: cond and uncond in one batch, whole-frame attention, decoding ``--decode-chunk`` frames
  at a time (default: all frames);
- ``kinema low-mem``: cond and uncond one after the other (``batch_cond=False``), attention queries in
  chunks of ``--attn-chunk``, decoding ``--low-decode-chunk`` frames at a time;
- ``diffusers``: ``StableVideoDiffusionPipeline`` (cond and uncond always batched), ``decode_chunk_size``
  ``--decode-chunk``;
- ``diffusers low-mem``: the same with ``unet.enable_forward_chunking()`` (its feed-forward chunking) and
  ``decode_chunk_size`` ``--low-decode-chunk``.

Reported: the median step time after the warm-up step, the conditioning + sampling time, the decode time, the
total (the time per video), peak RSS while making the video (``VmHWM`` after resetting it, where the kernel
allows) and of the whole process, each as a ratio to ``diffusers``; and how far each video's latents are from
diffusers' (the same computation; the decode chunk changes the decoded frames, not the latents).

``collect(args)`` and ``report(args, argv, results)`` are what ``bench_all.py`` calls.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (
    EDM_LEAP_NOTE,
    check_at_least,
    command_line,
    cpu_name,
    edm_leap,
    median_after_warmup,
    mib,
    process_peak_rss_kib,
    ratio,
    register_pack,
    release_heap,
    reset_peak_rss,
    rss_kib,
    run_bench,
    run_child,
)

CONFIGS = ("kinema", "kinema low-mem", "diffusers", "diffusers low-mem")
#: the configurations compared with each other (bench_all.py's summary rows)
PAIRS = (("kinema", "diffusers"), ("kinema low-mem", "diffusers low-mem"))
MIN_CFG, MAX_CFG, FPS, MOTION_BUCKET = 1.0, 2.5, 7, 127
SCALES = {"tiny": "32 model channels, context 64", "medium": "the real block structure at 128 model channels "
          "(SVD: 320), context 512"}


def prepare_checkpoint(args) -> None:
    """Child: write the demo SVD checkpoint at ``--scale`` to ``--prepare`` (once for every configuration)."""
    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures_svd_pipeline

    if args.scale == "medium":
        fixtures_svd_pipeline.use_sizes(fixtures_svd_pipeline.MEDIUM)
    fixtures_svd_pipeline.write_svd(args.prepare)


def run_child_process(args) -> None:
    """Child: one configuration makes one video from ``--checkpoint``; results to ``--result``."""

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    from kinema.models import checkpoint, pipelines, svd_model
    from kinema.models.demo_media import demo_image
    from kinema.models.sampling import initial_noise
    from kinema.models.vae import decode_frames

    w, h, frames = args.width, args.height, args.frames
    bundle = checkpoint.load_svd(args.checkpoint)
    big = torch.from_numpy(demo_image()).float().div(255)[None]
    image_u8 = (svd_model.fit_image(big, w, h)[0] * 255).round().to(torch.uint8)
    image = image_u8.float().div(255)[None]
    noise = initial_noise(args.seed, (frames, 4, h // 8, w // 8))
    low = args.child.endswith("low-mem")
    decode_chunk = args.low_decode_chunk if low else (args.decode_chunk or frames)
    stamps: list[float] = []
    phases: dict[str, float] = {}

    if args.child.startswith("kinema"):
        model = bundle.model.with_options(cfg_mode="linear", min_cfg=MIN_CFG)
        opts = pipelines.SampleOptions(seed=args.seed, steps=args.steps, cfg=MAX_CFG, sampler="euler",
                                       scheduler="karras", batch_cond=not low,
                                       attn_chunk=args.attn_chunk if low else 0)

        def make(t0: float):
            cond, uncond = svd_model.image_conditioning(
                bundle.image_encoder, bundle.vae, image,
                svd_model.ImageConditioningOptions(width=w, height=h, frames=frames, fps=FPS,
                                                   motion_bucket_id=MOTION_BUCKET, augmentation_level=0.0))
            stamps.append(time.perf_counter())  # the steps are timed from the start of the sampling call
            latent = pipelines.sample_img2vid(model, cond, uncond, pipelines.empty_video_latent(frames, w, h), opts,
                                              callback=lambda i, n, x0: stamps.append(time.perf_counter()))
            phases["sampling"] = time.perf_counter() - t0
            decode_frames(bundle.vae, latent, chunk=decode_chunk)
            return latent * svd_model.SVD_LATENT_SCALE
    else:
        from diffusers.utils import logging as diffusers_logging
        from fixtures_svd_pipeline import diffusers_svd_pipeline
        from PIL import Image

        diffusers_logging.set_verbosity_error()
        pipe = diffusers_svd_pipeline(bundle, checkpoint.load_state_dict(args.checkpoint))
        if low:
            pipe.unet.enable_forward_chunking()
        pil = Image.fromarray(image_u8.numpy())
        del bundle

        def step_end(pipeline, i, t, kwargs):
            stamps.append(time.perf_counter())
            return {}

        def make(t0: float):
            stamps.append(t0)  # the pipeline call holds the conditioning: its first step includes it
            with torch.no_grad():
                latent = pipe(pil, height=h, width=w, num_frames=frames, num_inference_steps=args.steps,
                              min_guidance_scale=MIN_CFG, max_guidance_scale=MAX_CFG, fps=FPS,
                              motion_bucket_id=MOTION_BUCKET, noise_aug_strength=0.0,
                              decode_chunk_size=decode_chunk, latents=noise[None], output_type="latent",
                              callback_on_step_end=step_end).frames[0]
                phases["sampling"] = time.perf_counter() - t0
                pipe.decode_latents(latent[None], frames, decode_chunk_size=decode_chunk)
            return latent

    release_heap()
    rss_before = rss_kib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    latent = make(t0)
    total = time.perf_counter() - t0
    sampling_peak = rss_kib("VmHWM") if reset else None
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    torch.save(latent.float().contiguous(), args.latent_out)
    with open(args.result, "w") as f:
        json.dump({"total": total, "sampling": phases["sampling"], "decode": total - phases["sampling"],
                   "steps": steps, "median": median_after_warmup(steps),
                   "peak_rss_kib": process_peak_rss_kib(),
                   "video_peak_rss_kib": sampling_peak, "rss_before_kib": rss_before,
                   "threads": torch.get_num_threads(), "decode_chunk": decode_chunk}, f)


def _child_options(args) -> list[str]:
    return ["--frames", str(args.frames), "--steps", str(args.steps), "--width", str(args.width),
            "--height", str(args.height), "--seed", str(args.seed), "--threads", str(args.threads),
            "--decode-chunk", str(args.decode_chunk), "--low-decode-chunk", str(args.low_decode_chunk),
            "--attn-chunk", str(args.attn_chunk), "--scale", args.scale]


def collect(args) -> dict:
    """Write the checkpoint once, run each configuration of ``--configs`` in its own child (``--repeat`` rounds,
    the configurations alternating within each); returns ``{"results": {config: run}, "latent_diff": {config:
    relative difference to diffusers' latents, or None}, "threads": n}``, each configuration's run with the fastest
    median step. Raises ``BenchError`` when a child fails."""
    import torch

    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        ckpt = os.path.join(tmp, "kinema_demo_svd.safetensors")
        run_child([sys.executable, script, "--prepare", ckpt, "--threads", str(args.threads), "--scale", args.scale],
                  args.threads, f"SVD {args.scale}: writing the demo checkpoint")
        for rep, name in [(r, n) for r in range(args.repeat) for n in args.configs]:
            slug = f"{name.replace(' ', '_')}{rep}"
            result, latent = os.path.join(tmp, f"{slug}.json"), os.path.join(tmp, f"{slug}.pt")
            cmd = [sys.executable, script, "--child", name, "--checkpoint", ckpt, "--result", result,
                   "--latent-out", latent, *_child_options(args)]
            run_child(cmd, args.threads, f"SVD {args.scale} {name} ({rep + 1}/{args.repeat})")
            with open(result) as f:
                run = json.load(f)
            run["latent"] = torch.load(latent)
            runs[name].append(run)
    # with --repeat, each configuration's fastest run (the least disturbed by other load on the machine)
    results = {name: min(rs, key=lambda r: r["median"] if r["median"] is not None else r["total"])
               for name, rs in runs.items()}
    latents = {name: r.pop("latent") for name, r in results.items()}
    ref = latents.get("diffusers")
    diffs = {}
    for name in args.configs:
        diffs[name] = None if ref is None else float((latents[name] - ref).abs().max()) / float(ref.abs().max())
    # each Kinema configuration against the diffusers one it is compared with (the summary's rows)
    pairs = {ours: float((latents[ours] - latents[theirs]).abs().max()) / float(latents[theirs].abs().max())
             for ours, theirs in PAIRS if ours in latents and theirs in latents}
    threads = next(iter(results.values()))["threads"]
    return {"results": results, "latent_diff": diffs, "latent_diff_pair": pairs, "threads": threads}


def _repeat_text(args) -> str:
    if args.repeat < 2:
        return ""
    return (f", {args.repeat} rounds with the configurations alternating, each configuration's run with the fastest "
            "median step shown")


def _f(value, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def report(args, argv: list[str], res: dict) -> list[str]:
    """The markdown report of ``collect``'s results."""
    import diffusers
    import torch

    results, diffs = res["results"], res["latent_diff"]
    ref = results.get("diffusers")
    lines = [
        "```", command_line("bench/bench_svd.py", argv), "```", "",
        (f"Stable Video Diffusion on the Kinema demo weights ({args.scale}: {SCALES[args.scale]}; random, the "
         f"published layout), {args.frames} frames at {args.width}x{args.height} (latent {args.width // 8}x"
         f"{args.height // 8}), {args.steps} Euler steps (karras, EDM), per-frame guidance {MIN_CFG} -> {MAX_CFG}, "
         f"image conditioning and temporal decode included; fp32 on CPU, {res['threads']} threads ({cpu_name()}, "
         f"{os.cpu_count()} cores); torch {torch.__version__}, diffusers {diffusers.__version__}. One process per "
         f"configuration{_repeat_text(args)}. low-mem: Kinema cond/uncond one at a time + attention chunks of {args.attn_chunk} "
         f"queries; diffusers unet.enable_forward_chunking(); both decode {args.low_decode_chunk} frames at a "
         "time."),
        "",
        ("| | decode chunk | step, median after warm-up (s) | conditioning + sampling (s) | decode (s) | total (s) "
         "| peak RSS making the video (MiB) | peak RSS (MiB) | step / diffusers | total / diffusers "
         "| video peak RSS / diffusers | latents vs diffusers |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.configs:
        r = results[name]
        lines.append(
            f"| {name} | {r['decode_chunk']} | {_f(r['median'], '.3f')} | {r['sampling']:.2f} | {r['decode']:.2f} "
            f"| {r['total']:.2f} | {mib(r['video_peak_rss_kib'])} | {mib(r['peak_rss_kib'])} "
            f"| {ratio(r['median'], ref and ref['median'])} | {ratio(r['total'], ref and ref['total'])} "
            f"| {ratio(r['video_peak_rss_kib'], ref and ref['video_peak_rss_kib'])} | {_f(diffs[name], '.1e')} |")
    lines += ["", ("latents vs diffusers: max |latents - diffusers'| / max |diffusers'| (the same video: ~1e-5 in "
                   "fp32; n/a without the diffusers configuration). The first step of diffusers also holds its "
                   "image conditioning; the median leaves it out.")]
    if (leap := edm_leap(args.steps)) is not None:
        lines[-1] += f" Latents vs diffusers: {EDM_LEAP_NOTE.format(to=leap)}."
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, default=14, help="video frames (svd: 14)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps")
    p.add_argument("--width", type=int, default=256, help="video width in pixels (a multiple of 8)")
    p.add_argument("--height", type=int, default=256, help="video height in pixels (a multiple of 8)")
    p.add_argument("--scale", choices=tuple(SCALES), default="tiny",
                   help="demo network width: " + "; ".join(f"{k}: {v}" for k, v in SCALES.items()))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), metavar="CONFIG",
                   help=f"configurations to run, in this order (of: {', '.join(repr(c) for c in CONFIGS)})")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every configuration, alternating (each configuration's fastest run is reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--decode-chunk", type=int, default=0, help="frames decoded at once (0: all)")
    p.add_argument("--low-decode-chunk", type=int, default=2, help="low-mem: frames decoded at once")
    p.add_argument("--attn-chunk", type=int, default=256, help="low-mem (Kinema): attention queries at once")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--latent-out", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.width % 8 or args.height % 8 or min(args.width, args.height) < 64:
        p.error("--width and --height must be multiples of 8, at least 64")
    check_at_least(p, args, 2, "steps")  # the first is the warm-up step, left out of the median
    check_at_least(p, args, 1, "frames", "threads", "low_decode_chunk", "attn_chunk", "repeat")
    check_at_least(p, args, 0, "decode_chunk")
    args.configs = list(dict.fromkeys(args.configs))  # each once, in the order given
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.prepare:
        prepare_checkpoint(args)
        return 0
    return run_bench(args, argv, bool(args.child), run_child_process, collect, report)


if __name__ == "__main__":
    sys.exit(main())
