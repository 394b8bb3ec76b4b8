"""Where one AnimateDiff UNet call spends its CPU time: the top operators of torch.profiler, and the same call with
the weights and input in channels_last.

    python bench/profile_step.py [--scale medium] [--frames 8] [--size 128] [--threads 2]

One call on cond + uncond (2 x frames) of the demo v3 model at ``--scale`` (tiny or medium, as bench_animatediff).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import register_pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("tiny", "medium"), default="medium")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="pixels (latent is size/8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures

    if args.scale == "medium":
        fixtures.use_sizes(fixtures.MEDIUM)
    model = fixtures.motion_model("v3", beta_schedule="linear")
    f, lat = args.frames, args.size // 8
    x = torch.randn(2 * f, 4, lat, lat)
    ctx = torch.randn(2 * f, 77, fixtures.SIZES.clip_hidden)
    t = torch.full((2 * f,), 500.0)

    def best(inp, n=3):
        with torch.no_grad():
            model(inp, t, ctx, f)
            times = []
            for _ in range(n):
                start = time.perf_counter()
                model(inp, t, ctx, f)
                times.append(time.perf_counter() - start)
        return min(times)

    plain = best(x)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x, t, ctx, f)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.scale}, {f} frames (x2 cond/uncond) at {args.size}x{args.size}, {args.threads} threads")
    print("| operator | share of self CPU time |\n|---|---:|")
    for e in events[:8]:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f} % |")
    model.unet.to(memory_format=torch.channels_last)
    model.motion.to(memory_format=torch.channels_last)
    last = best(x.contiguous(memory_format=torch.channels_last))
    print(f"\none call: {plain:.3f} s; channels_last: {last:.3f} s ({last / plain:.2f}x)")


if __name__ == "__main__":
    main()
