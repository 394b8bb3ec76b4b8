"""Where one AnimateDiff UNet call spends its CPU time, Kinema beside diffusers on the same weights: the time of a
call, its FLOPs (``torch.utils.flop_counter``), the FLOP rate reached, and the operators' self CPU time under
``torch.profiler``; then Kinema's call with the weights and input in channels_last.

    python bench/profile_step.py [--scale medium] [--frames 16] [--size 128] [--threads 2] [--repeat 4]
    python bench/profile_step.py --no-diffusers        # Kinema alone

One call on cond + uncond (2 x frames) of the demo v3 model at ``--scale`` (tiny or medium, as bench_animatediff),
the prompt's embedding repeated per frame (as AnimateDiffPipeline gives it to diffusers' UNetMotionModel). The two
calls are timed alternately, ``--repeat`` times each after a warm-up; the fastest of each is reported.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cpu_name, register_pack

#: operators counted as matrix products in the FLOP-rate column (the flop counter counts these and convolutions)
GEMM_OPS = ("aten::mkldnn_convolution", "aten::addmm", "aten::mm", "aten::bmm")


def profile(calls: dict, repeat: int) -> dict[str, dict[str, float]]:
    """Self CPU seconds per operator of one call of each of ``calls``: profiled ``repeat`` times alternately, the
    profile of each call's fastest round (a single profiled call on a shared machine can be far off)."""
    import torch

    best: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for name, fn in calls.items():
            with torch.profiler.profile() as prof:
                fn()
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
            if name not in best or sum(ops.values()) < sum(best[name].values()):
                best[name] = ops
    return best


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def fastest(calls: dict, repeat: int) -> dict[str, float]:
    """Each call's fastest time over ``repeat`` alternating rounds (after one warm-up call each)."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("tiny", "medium"), default="medium")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="pixels (latent is size/8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=4, help="timed rounds (fastest reported)")
    p.add_argument("--no-diffusers", action="store_true", help="profile Kinema alone")
    p.add_argument("--top", type=int, default=10, help="operators listed")
    args = p.parse_args()

    import torch
    from einops import rearrange

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures

    if args.scale == "medium":
        fixtures.use_sizes(fixtures.MEDIUM)
    f, lat = args.frames, args.size // 8
    model = fixtures.motion_model("v3", beta_schedule="linear")
    x = torch.randn(2 * f, 4, lat, lat)
    context = torch.randn(2, 77, fixtures.SIZES.clip_hidden).repeat_interleave(f, dim=0)
    t = torch.full((2 * f,), 500.0)
    calls = {"Kinema": lambda: model(x, t, context, f)}
    if not args.no_diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        unet = fixtures.diffusers_motion_unet("v3")
        x_d = rearrange(x, "(b f) c h w -> b c f h w", f=f)
        calls["diffusers"] = lambda: unet(x_d, t[0], encoder_hidden_states=context).sample

    with torch.no_grad():
        seconds = fastest(calls, args.repeat)
        counts = {name: flops(fn) for name, fn in calls.items()}
        ops = profile(calls, args.repeat)
        last_model = copy.deepcopy(model)
        last_model.unet.to(memory_format=torch.channels_last)
        last_model.motion.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        layouts = fastest({"default": calls["Kinema"], "last": lambda: last_model(x_last, t, context, f)},
                          args.repeat)

    names = list(calls)
    print(f"AnimateDiff v3 UNet, {args.scale}, {f} frames x 2 (cond, uncond) at {args.size}x{args.size}, fp32, "
          f"{args.threads} threads ({cpu_name()}); torch {torch.__version__}; fastest of {args.repeat} "
          "alternating calls\n")
    print("| | " + " | ".join(names) + (" | Kinema / diffusers |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * (len(names) + (len(names) > 1)))

    def row(label, values, fmt):
        cells = [format(v, fmt) for v in values]
        if len(values) > 1:
            cells.append(f"{values[0] / values[1]:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("one call (s)", [seconds[n] for n in names], ".3f")
    row("GFLOP a call (convolutions, matrix products)", [counts[n] / 1e9 for n in names], ".1f")
    gemm = {n: sum(ops[n].get(k, 0.0) for k in GEMM_OPS) for n in names}
    row("their self CPU time (s)", [gemm[n] for n in names], ".3f")
    row("their GFLOP/s", [counts[n] / 1e9 / gemm[n] for n in names], ".0f")
    row("everything else (s)", [sum(ops[n].values()) - gemm[n] for n in names], ".3f")
    for n in names:
        total = sum(ops[n].values())
        top = sorted(ops[n].items(), key=lambda kv: -kv[1])[: args.top]
        print(f"\n{n}, self CPU time by operator (one call, {total:.3f} s under the profiler):\n")
        print("| operator | s | share |\n|---|---:|---:|")
        for key, s in top:
            print(f"| {key} | {s:.3f} | {100 * s / total:.1f} % |")
    print(f"\nKinema in channels_last: {layouts['last']:.3f} s a call, in the default layout {layouts['default']:.3f} s "
          f"({layouts['last'] / layouts['default']:.2f}x; alternating, fastest of {args.repeat})")


if __name__ == "__main__":
    main()
