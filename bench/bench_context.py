"""Long AnimateDiff videos with context windows: time and memory as the frame count grows.

    python bench/bench_context.py [--frames 16 64 128] [--steps 3] [--size 256] [--threads N]

Each frame count samples one text-to-video latent in its own subprocess on the
pack's tiny demo weights (v2 motion module, fp32, CPU) with the same context
options (length 16, overlap 4, uniform_standard, pyramid fuse, FreeNoise),
Euler, cfg 7.5 with cond and uncond batched. Reported per frame count: the
windows run (all steps), the sampling time, the time per window, and the peak
RSS while sampling (``VmHWM`` after resetting it just before sampling) and of
the whole process; then each as a ratio to the first (smallest) frame count.
The targets: peak RSS flat (the largest count within 1.2x of the smallest),
and time growing with the number of windows, not faster (time per window flat).
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

CONTEXT = {"context_length": 16, "overlap": 4, "schedule": "uniform_standard", "fuse": "pyramid", "freenoise": True}


def run_child(args) -> None:
    import gc
    import resource

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures

    from kinema.models.context import ContextOptions
    from kinema.models.pipelines import SampleOptions, sample_video

    g = torch.Generator().manual_seed(1234)
    positive, negative = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    model = fixtures.motion_model("v2", beta_schedule="linear")
    for name in ("sd15_state_dict", "motion_state_dict"):
        getattr(fixtures, name).cache_clear()
    gc.collect()
    lat = args.size // 8
    opts = SampleOptions(seed=0, steps=args.steps, cfg=7.5, sampler="euler", scheduler="normal",
                         context=ContextOptions(**CONTEXT))
    windows = [0]

    def on_window():
        windows[0] += 1

    rss_before = rss_kib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = sample_video(model, positive, negative, torch.zeros(args.child_frames, 4, lat, lat), opts,
                           on_window=on_window)
    total = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    with open(args.result, "w") as f:
        json.dump({
            "frames": args.child_frames,
            "windows": windows[0],
            "total": total,
            "sampling_peak_rss_kib": rss_kib("VmHWM") if reset else None,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rss_before_sampling_kib": rss_before,
            "threads": torch.get_num_threads(),
        }, f)


def run_parent(args, argv: list[str]) -> int:
    import torch

    runs = []
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        for frames in args.frames:
            result = os.path.join(tmp, f"{frames}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child-frames", str(frames), "--result", result,
                   "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads)]
            print(f"running {frames} frames ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=thread_env(args.threads), cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                print(f"{frames} frames failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            with open(result) as f:
                runs.append(json.load(f))
    base = runs[0]
    lat = args.size // 8
    c = CONTEXT
    lines = [
        "```",
        "python " + " ".join(shlex.quote(a) for a in ["bench/bench_context.py"] + argv),
        "```",
        "",
        f"AnimateDiff v2 on the Kinema demo weights (tiny, random), {args.size}x{args.size} (latent {lat}x{lat}), "
        f"{args.steps} Euler steps, cfg 7.5 (cond and uncond batched), context length {c['context_length']}, "
        f"overlap {c['overlap']}, {c['schedule']}, {c['fuse']} fuse, FreeNoise; fp32 on CPU, {base['threads']} "
        f"threads ({cpu_name()}, {os.cpu_count()} cores); torch {torch.__version__}. One process per frame count.",
        "",
        "| frames | windows (all steps) | sampling (s) | s / window | peak RSS while sampling (MiB) "
        "| peak RSS (MiB) | time / first | windows / first | peak RSS while sampling / first |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['frames']} | {r['windows']} | {r['total']:.1f} | {r['total'] / r['windows']:.2f} | "
            f"{mib(r['sampling_peak_rss_kib'])} | {mib(r['peak_rss_kib'])} | {ratio(r['total'], base['total'])} | "
            f"{ratio(r['windows'], base['windows'])} | "
            f"{ratio(r['sampling_peak_rss_kib'], base['sampling_peak_rss_kib'])} |"
        )
    last = runs[-1]
    peak = last["sampling_peak_rss_kib"] or last["peak_rss_kib"]
    base_peak = base["sampling_peak_rss_kib"] or base["peak_rss_kib"]
    flat = peak <= 1.2 * base_peak
    per_window = (last["total"] / last["windows"]) / (base["total"] / base["windows"])
    lines += [
        "",
        f"Memory {'flat' if flat else 'NOT flat'}: {last['frames']} frames peak at {peak / base_peak:.2f}x the "
        f"{base['frames']}-frame peak (target <= 1.2x). Time per window at {last['frames']} frames is "
        f"{per_window:.2f}x that at {base['frames']} (target: about 1, time grows with the windows).",
    ]
    print("\n".join(lines))
    return 0 if flat else 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128], help="frame counts, smallest first")
    p.add_argument("--steps", type=int, default=3, help="Euler steps")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels (latent is size/8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--child-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size % 8 or args.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    if min(args.steps, args.threads, *args.frames) < 1:
        p.error("--steps, --threads and --frames must be at least 1")
    if args.child_frames:
        run_child(args)
        return 0
    return run_parent(args, argv)


if __name__ == "__main__":
    sys.exit(main())
