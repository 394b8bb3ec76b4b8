"""AnimateDiff text-to-video sampling: Kinema vs diffusers on the same weights, CPU, fp32.

    python bench/bench_animatediff.py [--frames 16] [--steps 10] [--size 256] [--threads N] [--motion v3]
                                      [--scale tiny|medium] [--low-mem [--attn-chunk 256]]

Both implementations sample one video from the pack's demo weights
(``kinema.models.demo``: real SD1.5 / AnimateDiff layouts, random weights; tiny, or
with ``--scale medium`` the real block structure at half SD1.5's width) with
the same initial noise, prompt embeddings, cfg and schedule (Euler; ComfyUI's
``normal`` schedule vs diffusers' ``EulerDiscreteScheduler`` with linear betas
and ``linspace`` spacing). Kinema runs ``sample_video``; diffusers runs
``AnimateDiffPipeline`` on ``UNetMotionModel.from_unet2d`` with its motion
GroupNorm patched to per frame (as the original AnimateDiff and Kinema; see
``tests/fixtures.py``). Each runs in its own subprocess, so its peak RSS is its own.
With ``--low-mem`` each uses its low-memory setting: Kinema cond and uncond one
after the other (``batch_cond=False``) and attention queries in chunks of
``--attn-chunk``; diffusers ``unet.enable_forward_chunking()``.

Reported per implementation: the median step time after one warm-up step, the
total sampling time (the whole sampling call), the peak RSS of the child
process (``ru_maxrss`` at its end: imports, weights and sampling) and the peak
RSS while sampling (``VmHWM`` after resetting it before sampling, where the
kernel allows), plus the ratios Kinema / diffusers and how far apart the two
final latents are (a check that both computed the same video).

``collect(args)`` and ``report(args, argv, results)`` are what ``bench_all.py`` calls.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (
    SCHEDULE_NOTE,
    check_at_least,
    command_line,
    cpu_name,
    integer_schedule,
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

LATENT_SCALE = 0.18215  # the SD1.5 latent scale: both final latents are compared in the sampler's (scaled) space


# -- child: one implementation -------------------------------------------------------------------------------------

def run_child_process(args) -> None:
    import torch
    from einops import rearrange

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures

    if args.scale == "medium":
        fixtures.use_sizes(fixtures.MEDIUM)

    from kinema.models.pipelines import SampleOptions, sample_video
    from kinema.models.sampling import initial_noise

    frames, lat = args.frames, args.size // 8
    g = torch.Generator().manual_seed(1234)
    dim = fixtures.SIZES.clip_hidden
    positive, negative = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)

    if args.child == "kinema":
        model = fixtures.motion_model(args.motion, beta_schedule="linear")

        def sample(on_step):
            opts = SampleOptions(seed=args.seed, steps=args.steps, cfg=args.cfg, sampler="euler", scheduler="normal",
                                 batch_cond=not args.low_mem, attn_chunk=args.attn_chunk if args.low_mem else 0)
            out = sample_video(model, positive, negative, torch.zeros(frames, 4, lat, lat), opts,
                               callback=lambda i, n, x0: on_step())
            return out * LATENT_SCALE
    else:
        from diffusers import AnimateDiffPipeline, EulerDiscreteScheduler
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        unet = fixtures.diffusers_motion_unet(args.motion)
        if args.motion == "v1":
            fixtures.cross_frame_resnet_norms(unet, frames)
        scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="linear", timestep_spacing="linspace", steps_offset=0)
        pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None,
                                   scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if args.low_mem:
            unet.enable_forward_chunking()
        # ComfyUI's start sqrt(1 + sigma_max^2) * noise; diffusers multiplies by its init_noise_sigma
        scheduler.set_timesteps(args.steps)
        sigma_max = float(scheduler.sigmas.max())
        start = rearrange(initial_noise(args.seed, (frames, 4, lat, lat)), "f c h w -> 1 c f h w")
        start = start * (math.sqrt(1 + sigma_max**2) / float(scheduler.init_noise_sigma))

        def sample(on_step):
            def step_end(pipeline, i, t, kwargs):
                on_step()
                return {}

            with torch.no_grad():
                out = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_frames=frames,
                           height=args.size, width=args.size, num_inference_steps=args.steps,
                           guidance_scale=args.cfg, latents=start, output_type="latent",
                           callback_on_step_end=step_end).frames
            return rearrange(out, "1 c f h w -> f c h w")

    # drop the caches of the state dicts and conversion sources: keep only what sampling uses
    for name in ("sd15_state_dict", "motion_state_dict", "diffusers_unet2d", "diffusers_vae"):
        getattr(fixtures, name).cache_clear()
    release_heap()
    rss_before = rss_kib("VmRSS")
    reset = reset_peak_rss()

    stamps = []
    t0 = time.perf_counter()
    latent = sample(lambda: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0

    sampling_peak = rss_kib("VmHWM") if reset else None
    steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    torch.save(latent.float().contiguous(), args.latent_out)
    with open(args.result, "w") as f:
        json.dump({
            "steps": steps,
            "total": total,
            "peak_rss_kib": process_peak_rss_kib(),
            "rss_before_sampling_kib": rss_before,
            "sampling_peak_rss_kib": sampling_peak,
            "threads": torch.get_num_threads(),
        }, f)


# -- parent: run both, report ----------------------------------------------------------------------------------------

def collect(args) -> dict:
    """Run the children (``--repeat`` times each, alternating) and return ``{"kinema": run, "diffusers": run,
    "rel": relative latent difference, "threads": n}``: each implementation's fastest run (its step times, the
    median step, the total and the peaks). Raises ``BenchError`` when a child fails."""
    import torch

    runs = {"kinema": [], "diffusers": []}
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        for rep, impl in [(r, i) for r in range(args.repeat) for i in runs]:  # alternating, one child each
            result, latent = os.path.join(tmp, f"{impl}{rep}.json"), os.path.join(tmp, f"{impl}{rep}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--result", result,
                   "--latent-out", latent, "--frames", str(args.frames), "--steps", str(args.steps),
                   "--size", str(args.size), "--threads", str(args.threads), "--cfg", str(args.cfg),
                   "--seed", str(args.seed), "--motion", args.motion, "--scale", args.scale,
                   "--attn-chunk", str(args.attn_chunk), *(["--low-mem"] if args.low_mem else [])]
            run_child(cmd, args.threads, f"AnimateDiff {args.scale} {impl} ({rep + 1}/{args.repeat})")
            with open(result) as f:
                run = json.load(f)
            run["latent"] = torch.load(latent)
            run["median"] = median_after_warmup(run["steps"])
            runs[impl].append(run)
    # with --repeat, each implementation's fastest run (least disturbed by other load) is reported
    k, d = (min(runs[impl], key=lambda r: r["median"]) for impl in ("kinema", "diffusers"))
    rel = float((k["latent"] - d["latent"]).abs().max() / d["latent"].abs().max())
    return {"kinema": k, "diffusers": d, "rel": rel, "threads": k["threads"]}


def _setting(args) -> str:
    """How each implementation ran its UNet calls: the plain batch or its low-memory setting (``--low-mem``)."""
    if args.low_mem:
        return (f"low-memory settings: Kinema cond and uncond one after the other, {args.frames} UNet images a call, "
                f"attention queries in chunks of {args.attn_chunk}; diffusers cond and uncond in one batch with its "
                "feed-forward chunking")
    return f"cond and uncond in one batch: {2 * args.frames} UNet images a step"


def report(args, argv: list[str], res: dict) -> list[str]:
    """The markdown report of ``collect``'s results."""
    import diffusers
    import torch

    k, d, rel = res["kinema"], res["diffusers"], res["rel"]
    lat = args.size // 8
    lines = [
        "```",
        command_line("bench/bench_animatediff.py", argv),
        "```",
        "",
        (f"AnimateDiff {args.motion} on the Kinema demo weights ({args.scale}, random), {args.frames} frames at "
         f"{args.size}x{args.size} (latent {lat}x{lat}), {args.steps} Euler steps, cfg {args.cfg} ({_setting(args)}), "
         f"fp32 on CPU, {k['threads']} threads "
         f"({cpu_name()}, {os.cpu_count()} cores); torch {torch.__version__}, diffusers {diffusers.__version__}."
         + (f" Each implementation ran {args.repeat} times, alternating; its run with the fastest median step is "
            "shown." if args.repeat > 1 else "")),
        "",
        ("| | step, median after warm-up (s) | total sampling (s) | peak RSS (MiB) | peak RSS while sampling (MiB) "
         "| RSS before sampling (MiB) |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("Kinema", k), ("diffusers", d)):
        lines.append(f"| {name} | {r['median']:.3f} | {r['total']:.2f} | "
                     f"{mib(r['peak_rss_kib'])} | {mib(r['sampling_peak_rss_kib'])} | "
                     f"{mib(r['rss_before_sampling_kib'])} |")
    lines.append(
        f"| Kinema / diffusers | {ratio(k['median'], d['median'])} | "
        f"{ratio(k['total'], d['total'])} | {ratio(k['peak_rss_kib'], d['peak_rss_kib'])} | "
        f"{ratio(k['sampling_peak_rss_kib'], d['sampling_peak_rss_kib'])} | "
        f"{ratio(k['rss_before_sampling_kib'], d['rss_before_sampling_kib'])} |"
    )
    lines += [
        "",
        ("Step times (s): Kinema " + ", ".join(f"{s:.3f}" for s in k["steps"])
         + "; diffusers " + ", ".join(f"{s:.3f}" for s in d["steps"]) + "."),
        (f"Final latents: max |Kinema - diffusers| / max |diffusers| = {rel:.2e}"
         + ("." if integer_schedule(args.steps) else f" ({SCHEDULE_NOTE}).")),
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, default=16, help="frames of the video")
    p.add_argument("--steps", type=int, default=10, help="Euler steps (the first is the warm-up step)")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels (latent is size/8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="noise seed (ComfyUI convention)")
    p.add_argument("--motion", choices=("v1", "v2", "v3"), default="v3", help="demo motion module version")
    p.add_argument("--scale", "--width", dest="scale", choices=("tiny", "medium"), default="tiny",
                   help="demo network width: tiny (32 channels) or medium (the real block structure at 160 "
                        "channels, half SD1.5's 320, context 384); --width is the older name")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each implementation this many times (alternating) and report its fastest run")
    p.add_argument("--low-mem", action="store_true",
                   help="each implementation's low-memory setting: Kinema cond and uncond one after the other and "
                        "attention queries in chunks of --attn-chunk; diffusers its feed-forward chunking "
                        "(unet.enable_forward_chunking())")
    p.add_argument("--attn-chunk", type=int, default=256, help="--low-mem (Kinema): attention queries at once")
    p.add_argument("--child", choices=("kinema", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--latent-out", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % 8 or args.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    check_at_least(p, args, 2, "steps")  # the first is the warm-up step, left out of the median
    check_at_least(p, args, 1, "frames", "threads", "repeat", "attn_chunk")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_bench(args, argv, bool(args.child), run_child_process, collect, report)


if __name__ == "__main__":
    sys.exit(main())
