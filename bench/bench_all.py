"""Every CPU benchmark in one command: Kinema vs diffusers, AnimateDiff and SVD at tiny and medium width, and the
frame-count scaling under context windows; one combined markdown report.

    python bench/bench_all.py --threads 2            # about 9-15 minutes on 2 threads
    python bench/bench_all.py --quick --threads 2    # a smoke run of a few minutes: small sizes, few steps

Runs, in one invocation, the benchmarks of ``bench_animatediff.py`` (tiny, medium, each plain and with both sides'
low-memory settings), ``bench_svd.py`` (tiny, medium) and ``bench_context.py`` by calling their ``collect``
functions: each implementation (and each SVD configuration, each frame count) still samples in its own subprocess,
so every peak RSS is that process's own.
The report starts with the command line and the machine, then one summary table (per-step time, time per
video, peak RSS while making the video, each for Kinema and diffusers, with the ratios Kinema / diffusers and
how far apart the final latents are), the context-window table, and then each benchmark's own report with the
command that repeats it alone.

Time per video: the whole sampling call for AnimateDiff (no VAE decode: the bench compares samplers); image
conditioning + sampling + temporal VAE decode for SVD. Per-step time: the median step after the first
(warm-up) step.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_animatediff
import bench_context
import bench_svd
from _measure import BenchError, check_at_least, command_line, cpu_name, mib, ratio

#: the settings of each section (the sub-benchmarks' own command-line options), full and --quick
PLANS = {
    "full": {
        "animatediff-tiny": ["--scale", "tiny", "--frames", "16", "--size", "256", "--steps", "10"],
        "animatediff-medium": ["--scale", "medium", "--frames", "16", "--size", "128", "--steps", "10"],
        "animatediff-tiny-low-mem": ["--scale", "tiny", "--frames", "16", "--size", "256", "--steps", "10",
                                     "--low-mem"],
        "animatediff-medium-low-mem": ["--scale", "medium", "--frames", "16", "--size", "128", "--steps", "10",
                                       "--low-mem"],
        "svd-tiny": ["--scale", "tiny", "--frames", "14", "--width", "256", "--height", "256", "--steps", "10"],
        "svd-medium": ["--scale", "medium", "--frames", "14", "--width", "128", "--height", "128", "--steps", "10"],
        "context": ["--frames", "16", "32", "64", "--size", "128", "--steps", "3"],
    },
    "quick": {
        "animatediff-tiny": ["--scale", "tiny", "--frames", "8", "--size", "128", "--steps", "4"],
        "animatediff-medium": ["--scale", "medium", "--frames", "4", "--size", "64", "--steps", "2"],
        "animatediff-tiny-low-mem": ["--scale", "tiny", "--frames", "8", "--size", "128", "--steps", "4",
                                     "--low-mem"],
        "animatediff-medium-low-mem": ["--scale", "medium", "--frames", "4", "--size", "64", "--steps", "2",
                                       "--low-mem"],
        "svd-tiny": ["--scale", "tiny", "--frames", "4", "--width", "64", "--height", "64", "--steps", "3",
                     "--configs", "kinema", "diffusers"],
        "svd-medium": ["--scale", "medium", "--frames", "4", "--width", "64", "--height", "64", "--steps", "3",
                       "--configs", "kinema", "diffusers"],
        "context": ["--frames", "16", "32", "--size", "64", "--steps", "1"],
    },
}
SECTIONS = tuple(PLANS["full"])
MODULES = {"animatediff": bench_animatediff, "svd": bench_svd, "context": bench_context}
SCRIPTS = {"animatediff": "bench/bench_animatediff.py", "svd": "bench/bench_svd.py", "context": "bench/bench_context.py"}


def _module(section: str) -> str:
    return section.split("-")[0]


def run_section(section: str, argv: list[str]) -> tuple[argparse.Namespace, dict | None, str | None]:
    """(the section's parsed options, its ``collect`` results or None, the error or None)."""
    module = MODULES[_module(section)]
    args = module.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = module.collect(args)
    except BenchError as e:
        print(f"{section} failed:\n{e}", file=sys.stderr)
        return args, None, str(e).splitlines()[0]
    print(f"{section} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return args, res, None


def _s(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _video_peaks(k: dict, d: dict, key: str) -> tuple[int | None, int | None]:
    """Both runs' peak while making the video (``key``), or, where either run lacks it, both whole-process peaks:
    one quantity on both sides of the ratio."""
    if k.get(key) is None or d.get(key) is None:
        key = "peak_rss_kib"
    return k.get(key), d.get(key)


def _row(name: str, scale: str, setting: str, k: dict, d: dict, peak_key: str, diff: float | None) -> str:
    kp, dp = _video_peaks(k, d, peak_key)
    return (f"| {name} | {scale} | {setting} | {_s(k['median'])} | {_s(d['median'])} "
            f"| {ratio(k['median'], d['median'])} | {k['total']:.2f} | {d['total']:.2f} "
            f"| {ratio(k['total'], d['total'])} | {mib(kp)} | {mib(dp)} | {ratio(kp, dp)} | {_s(diff, '.1e')} |")


def summary_rows(section: str, args, res: dict) -> list[str]:
    """The summary table's rows for one Kinema vs diffusers section."""
    if _module(section) == "animatediff":
        setting = f"{args.motion}, {args.frames} frames {args.size}x{args.size}, {args.steps} steps"
        label = "AnimateDiff low-mem" if args.low_mem else "AnimateDiff"
        return [_row(label, args.scale, setting, res["kinema"], res["diffusers"], "sampling_peak_rss_kib",
                     res["rel"])]
    rows = []
    results, diffs = res["results"], res["latent_diff"]
    setting = f"{args.frames} frames {args.width}x{args.height}, {args.steps} steps"
    pairs = res.get("latent_diff_pair", {})
    for (ours, theirs), label in zip(bench_svd.PAIRS, ("SVD", "SVD low-mem")):
        if ours in results and theirs in results:
            rows.append(_row(label, args.scale, setting, results[ours], results[theirs], "video_peak_rss_kib",
                             pairs.get(ours, diffs[ours])))
    return rows


def build_report(argv: list[str], plan: dict, outcomes: dict, seconds: float) -> tuple[list[str], int]:
    """The combined markdown report and the exit status (0 ok, 1 a section failed, 2 context memory not flat)."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = "not installed"
    threads = next((res["threads"] for _, res, _ in outcomes.values() if res), None)
    lines = [
        "# Kinema benchmarks: Kinema vs diffusers on CPU",
        "",
        "```",
        command_line("bench/bench_all.py", argv),
        "```",
        "",
        (f"fp32 on CPU, {threads} torch threads a process ({cpu_name()}, {os.cpu_count()} cores); Python "
         f"{platform.python_version()}, torch {torch.__version__}, diffusers {diffusers_version}. The demo weights "
         "(random, the published layouts): tiny = 32 model channels; medium = the real block structure at reduced "
         "width (AnimateDiff: SD1.5 UNet at 160 channels, context 384; SVD: 128 channels, context 512). Every "
         f"implementation, configuration and frame count ran in its own process. Whole run: {seconds / 60:.1f} min."),
        "",
        "## Kinema vs diffusers",
        "",
        ("| benchmark | scale | setting | Kinema step (s) | diffusers step (s) | step K/D | Kinema video (s) "
         "| diffusers video (s) | video K/D | Kinema peak RSS (MiB) | diffusers peak RSS (MiB) | peak RSS K/D "
         "| latents vs diffusers |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    status = 0
    for section, (args, res, error) in outcomes.items():
        if _module(section) == "context":
            continue
        if res is None:
            lines.append(f"| {section} | | failed: {error} | | | | | | | | | | |")
            status = 1
            continue
        lines += summary_rows(section, args, res)
    lines += [
        "",
        ("step: median after the warm-up step. video: AnimateDiff the whole sampling call (no VAE decode); SVD "
         "image conditioning + sampling + temporal VAE decode. peak RSS: the process's peak while making the video "
         "(VmHWM reset just before; weights and libraries included). K/D: Kinema / diffusers (below 1: Kinema "
         "faster or smaller). latents vs diffusers: max |Kinema - diffusers| / max |diffusers| of the final "
         "latents (the same video: ~1e-5 or less in fp32). low-mem: Kinema cond/uncond one at a time and "
         "chunked attention vs diffusers' forward chunking (SVD: both decode 2 frames at a time)."),
    ]
    if "context" in outcomes:
        args, res, error = outcomes["context"]
        lines += ["", "## Frame count under context windows (Kinema)", ""]
        if res is None:
            lines.append(f"failed: {error}")
            status = 1
        else:
            body = bench_context.report(args, plan["context"], res)
            lines += body[body.index("") + 1:]  # the setup sentence, the table, the verdict (no command line)
            if not res["flat"] and status == 0:
                status = 2
    lines += ["", "## Each benchmark", ""]
    for section, (args, res, error) in outcomes.items():
        if res is None or _module(section) == "context":
            continue
        lines += [f"### {section}", ""]
        lines += MODULES[_module(section)].report(args, plan[section], res)
        lines.append("")
    return lines, status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few steps, fewer SVD configurations")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads in each child")
    p.add_argument("--repeat", type=int, default=1,
                   help="AnimateDiff and SVD: run each implementation / configuration this many times, alternating, "
                   "and report its fastest run")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"what to run (of: {', '.join(SECTIONS)})")
    p.add_argument("--output", help="also write the report to this file")
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "threads", "repeat")
    if any(_module(s) != "context" for s in args.sections) and importlib.util.find_spec("diffusers") is None:
        print("bench_all.py compares with diffusers, which is not installed: pip install -r requirements-test.txt "
              "(or run only --sections context)", file=sys.stderr)
        return 1
    plan = {}
    for section in args.sections:
        extra = ["--threads", str(args.threads)]
        if _module(section) in ("animatediff", "svd") and args.repeat > 1:
            extra += ["--repeat", str(args.repeat)]
        plan[section] = PLANS["quick" if args.quick else "full"][section] + extra
    t0 = time.perf_counter()
    outcomes = {section: run_section(section, plan[section]) for section in args.sections}
    lines, status = build_report(argv, plan, outcomes, time.perf_counter() - t0)
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
