"""Long AnimateDiff videos with context windows: time and memory as the frame count grows.

    python bench/bench_context.py [--frames 16 64 128] [--steps 3] [--size 256] [--threads N] [--scale tiny]

Each frame count samples one text-to-video latent in its own subprocess on the
pack's demo weights (v2 motion module, fp32, CPU; tiny, or ``--scale medium``) with the same context
options (length 16, overlap 4, uniform_standard, pyramid fuse, FreeNoise),
Euler, cfg 7.5 with cond and uncond batched. Reported per frame count: the
windows run (all steps), the sampling time, the time per window, and the peak
RSS while sampling (``VmHWM`` after resetting it just before sampling) and of
the whole process; then each as a ratio to the first (smallest) frame count.
The targets: peak RSS flat (the largest count within 1.2x of the smallest),
and time growing with the number of windows, not faster (time per window flat).

``collect(args)`` and ``report(args, argv, results)`` are what ``bench_all.py`` calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (
    check_at_least,
    command_line,
    cpu_name,
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

CONTEXT = {"context_length": 16, "overlap": 4, "schedule": "uniform_standard", "fuse": "pyramid", "freenoise": True}


def run_child_process(args) -> None:

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures
    from kinema.models.context import ContextOptions
    from kinema.models.pipelines import SampleOptions, sample_video

    if args.scale == "medium":
        fixtures.use_sizes(fixtures.MEDIUM)
    g = torch.Generator().manual_seed(1234)
    dim = fixtures.SIZES.clip_hidden
    positive, negative = torch.randn(1, 77, dim, generator=g), torch.randn(1, 77, dim, generator=g)
    model = fixtures.motion_model("v2", beta_schedule="linear")
    for name in ("sd15_state_dict", "motion_state_dict"):
        getattr(fixtures, name).cache_clear()
    release_heap()
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
            "peak_rss_kib": process_peak_rss_kib(),
            "rss_before_sampling_kib": rss_before,
            "threads": torch.get_num_threads(),
        }, f)


def collect(args) -> dict:
    """One child per frame count; returns ``{"runs": [run per frame count], "flat": bool, "threads": n}``
    (``flat``: the largest count's peak within 1.2x of the smallest's). Raises ``BenchError`` when a child fails."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        for frames in args.frames:
            result = os.path.join(tmp, f"{frames}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child-frames", str(frames), "--result", result,
                   "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads),
                   "--scale", args.scale]
            run_child(cmd, args.threads, f"context windows, {frames} frames")
            with open(result) as f:
                runs.append(json.load(f))
    base, last = runs[0], runs[-1]
    peak = last["sampling_peak_rss_kib"] or last["peak_rss_kib"]
    base_peak = base["sampling_peak_rss_kib"] or base["peak_rss_kib"]
    per_window = (last["total"] / last["windows"]) / (base["total"] / base["windows"])
    # the whole process's peak is mostly libraries and weights: sampling's own growth is judged too (with 8 MiB
    # of slack, the noise of a growth of a few tens of MiB)
    grew, base_grew = growth_kib(last), growth_kib(base)
    flat = peak <= 1.2 * base_peak and (grew is None or base_grew is None or grew <= 1.2 * base_grew + 8 * 1024)
    return {"runs": runs, "flat": flat, "peak_ratio": peak / base_peak, "growth_kib": (base_grew, grew),
            "per_window_ratio": per_window, "threads": base["threads"]}


def growth_kib(run: dict) -> int | None:
    """What sampling added to the process's RSS at its peak (KiB): the peak while sampling less the RSS before."""
    peak, before = run.get("sampling_peak_rss_kib"), run.get("rss_before_sampling_kib")
    return None if peak is None or before is None else max(0, peak - before)


def _growth(res: dict) -> str:
    base, last = res.get("growth_kib", (None, None))
    if base is None or last is None:
        return ""
    return (f"; sampling itself grew the RSS by {mib(last)} MiB against {mib(base)} MiB (target <= 1.2x, with 8 MiB "
            "of slack)")


def report(args, argv: list[str], res: dict) -> list[str]:
    """The markdown report of ``collect``'s results."""
    import torch

    runs = res["runs"]
    base, last = runs[0], runs[-1]
    lat = args.size // 8
    c = CONTEXT
    lines = [
        "```",
        command_line("bench/bench_context.py", argv),
        "```",
        "",
        (f"AnimateDiff v2 on the Kinema demo weights ({args.scale}, random), {args.size}x{args.size} (latent "
         f"{lat}x{lat}), {args.steps} Euler steps, cfg 7.5 (cond and uncond batched), context length "
         f"{c['context_length']}, overlap {c['overlap']}, {c['schedule']}, {c['fuse']} fuse, FreeNoise; fp32 on CPU, "
         f"{res['threads']} threads ({cpu_name()}, {os.cpu_count()} cores); torch {torch.__version__}. One process "
         "per frame count."),
        "",
        ("| frames | windows (all steps) | sampling (s) | s / window | peak RSS while sampling (MiB) "
         "| peak RSS (MiB) | time / first | windows / first | peak RSS while sampling / first |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['frames']} | {r['windows']} | {r['total']:.1f} | {r['total'] / r['windows']:.2f} | "
            f"{mib(r['sampling_peak_rss_kib'])} | {mib(r['peak_rss_kib'])} | {ratio(r['total'], base['total'])} | "
            f"{ratio(r['windows'], base['windows'])} | "
            f"{ratio(r['sampling_peak_rss_kib'], base['sampling_peak_rss_kib'])} |"
        )
    lines += [
        "",
        (f"Memory {'flat' if res['flat'] else 'NOT flat'}: {last['frames']} frames peak at {res['peak_ratio']:.2f}x "
         f"the {base['frames']}-frame peak (target <= 1.2x){_growth(res)}. Time per window at {last['frames']} "
         "frames is "
         f"{res['per_window_ratio']:.2f}x that at {base['frames']} (target: about 1, time grows with the windows)."),
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128], help="frame counts (run smallest first; the ratios are to the smallest)")
    p.add_argument("--steps", type=int, default=3, help="Euler steps")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels (latent is size/8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--scale", choices=("tiny", "medium"), default="tiny",
                   help="demo network width: tiny (32 channels) or medium (the real block structure at 160 "
                        "channels, as bench_animatediff.py --scale medium)")
    p.add_argument("--child-frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % 8 or args.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    check_at_least(p, args, 1, "steps", "threads", "frames")
    args.frames = sorted(set(args.frames))  # the first is the base of the ratios, the last the largest
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_bench(args, argv, bool(args.child_frames), run_child_process, collect, report,
                     status=lambda res: 0 if res["flat"] else 2)  # 2: memory grew with the frame count


if __name__ == "__main__":
    sys.exit(main())
