"""Where one UNet call spends its CPU time, Kinema beside diffusers on the same weights: the time of a call, its
FLOPs (``torch.utils.flop_counter``), the FLOP rate reached, and the operators' self CPU time under
``torch.profiler``; then Kinema's call with the weights and input in channels_last.

    python bench/profile_step.py [--model animatediff|svd] [--scale tiny|medium|real] [--frames 16] [--size 128]
                                 [--threads 2] [--repeat 4] [--timing-only] [--low-mem [--attn-chunk 256]]
    python bench/profile_step.py --no-diffusers        # Kinema alone
    python bench/profile_step.py --model svd --scale real --frames 2 --size 1024x576 --repeat 6 --timing-only

AnimateDiff: one call on cond + uncond (2 x frames) of the demo v3 model at ``--scale`` (tiny or medium, as
bench_animatediff; real: SD1.5's published widths), the prompt's embedding repeated per frame (as
AnimateDiffPipeline gives it to diffusers' UNetMotionModel). SVD: one call of the demo SVD UNet (tiny or medium,
as bench_svd; real: SVD's widths) on two videos (cond + uncond) of ``--frames`` frames, with a one-token image
context and micro-conditioning per video, as StableVideoDiffusionPipeline gives them to diffusers'
UNetSpatioTemporalConditionModel. The calls are timed
alternately, ``--repeat`` times each after a warm-up; the fastest of each is reported, with the median of each and the
median of the rounds' Kinema / diffusers ratios (each round's two calls run back to back, so a slow spell of a shared
machine weighs on both sides of a ratio alike). ``--timing-only`` stops there (no FLOP count, profiler or
channels_last rounds: at the published widths each call takes a minute or more on two cores). ``--low-mem``: each
side's low-memory setting (Kinema cond and uncond in two calls with attention queries in chunks of
``--attn-chunk``, diffusers one call with ``enable_forward_chunking()``), no channels_last rounds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import check_at_least, cpu_name, register_pack

#: operators counted as matrix products in the FLOP-rate column (the flop counter counts these and convolutions)
#: the kernels of what the FLOP count counts (convolutions, matrix products): oneDNN's convolutions, PyTorch's
#: reference 3D convolution (diffusers' SVD temporal convolutions at small sizes), BLAS
GEMM_OPS = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::addmm", "aten::mm", "aten::bmm")


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


def timings(calls: dict, repeat: int) -> dict[str, list[float]]:
    """Each call's seconds in ``repeat`` alternating rounds (after one warm-up call each), round by round."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def fastest(calls: dict, repeat: int) -> dict[str, float]:
    """Each call's fastest time over ``repeat`` alternating rounds (after one warm-up call each)."""
    return {name: min(t) for name, t in timings(calls, repeat).items()}


def parse_size(text: str) -> tuple[int, int]:
    """``--size``: ``N`` (N x N pixels) or ``WxH``, each a positive multiple of 8."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        width = height = 0
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"'{text}': give N or WxH pixels, multiples of 8 (e.g. 512 or 1024x576)")
    return width, height


def animatediff_calls(args):
    """(title, {name: call}, Kinema's call in a memory format) for one AnimateDiff v3 UNet call on cond + uncond."""
    import fixtures
    import torch
    from einops import rearrange

    if args.scale != "tiny":
        fixtures.use_sizes(getattr(fixtures, args.scale.upper()))
    f, (width, height) = args.frames, args.size
    model = fixtures.motion_model("v3", beta_schedule="linear")
    x = torch.randn(2 * f, 4, height // 8, width // 8)
    context = torch.randn(2, 77, fixtures.SIZES.clip_hidden).repeat_interleave(f, dim=0)
    t = torch.full((2 * f,), 500.0)
    calls = {"Kinema": lambda: model(x, t, context, f)}
    if args.low_mem:
        calls["Kinema"] = lambda: one_then_other(
            lambda s: model(x[s], t[s], context[s], f, attn_chunk=args.attn_chunk), f)
    if not args.no_diffusers:
        unet = fixtures.diffusers_motion_unet("v3")
        if args.low_mem:
            unet.enable_forward_chunking()
        x_d = rearrange(x, "(b f) c h w -> b c f h w", f=f)
        calls["diffusers"] = lambda: unet(x_d, t[0], encoder_hidden_states=context).sample

    def in_layout(fmt):
        last = copy.deepcopy(model)
        last.unet.to(memory_format=fmt)
        last.motion.to(memory_format=fmt)
        x_last = x.contiguous(memory_format=fmt)
        return lambda: last(x_last, t, context, f)

    return f"AnimateDiff v3 UNet, {args.scale}, {f} frames x 2 (cond, uncond)", calls, in_layout


def svd_calls(args):
    """(title, {name: call}, Kinema's call in a memory format) for one SVD UNet call on cond + uncond."""
    import tempfile

    import fixtures_svd_pipeline
    import torch
    from einops import rearrange, repeat
    from kinema.models import checkpoint
    from kinema.models.layers import RunOptions
    from kinema.models.svd import micro_conditioning

    if args.scale != "tiny":
        fixtures_svd_pipeline.use_sizes(getattr(fixtures_svd_pipeline, args.scale.upper()))
    with tempfile.TemporaryDirectory() as tmp:
        path = fixtures_svd_pipeline.write_svd(os.path.join(tmp, "svd.safetensors"))
        bundle = checkpoint.load_svd(path)
        sd = None if args.no_diffusers else checkpoint.load_state_dict(path)
    unet = bundle.model.unet
    cfg, f, (width, height) = unet.cfg, args.frames, args.size
    ids = torch.tensor([[6.0, 127.0, 0.0]] * 2)  # fps id, motion bucket, augmentation: per video
    y = torch.cat([micro_conditioning(*row.tolist(), frames=1, dim_each=cfg.adm_in_channels // 3) for row in ids])
    x = torch.randn(2, f, cfg.in_channels, height // 8, width // 8)
    context = torch.randn(2, 1, cfg.context_dim)
    t = torch.full((2,), 0.25)  # c_noise of sigma e

    t_f, y_f = repeat(t, "b -> (b f)", f=f), repeat(y, "b e -> (b f) e", f=f)
    context_f = repeat(context, "b n d -> (b f) n d", f=f)

    def per_frame(x_flat, model=unet, rows=slice(None), chunk=0):
        """The UNet on the frames ``rows`` of the folded batch (all: cond and uncond at once)."""
        opts = RunOptions(num_frames=f, attn_chunk=chunk)
        return model(x_flat[rows], t_f[rows], context_f[rows], y_f[rows], f, opts)

    x_flat = rearrange(x, "b f c h w -> (b f) c h w")
    calls = {"Kinema": lambda: per_frame(x_flat)}
    if args.low_mem:
        calls["Kinema"] = lambda: one_then_other(lambda s: per_frame(x_flat, rows=s, chunk=args.attn_chunk), f)
    if not args.no_diffusers:
        from fixtures_svd_pipeline import diffusers_svd_pipeline

        d_unet = diffusers_svd_pipeline(bundle, sd).unet.eval()
        if args.low_mem:
            d_unet.enable_forward_chunking()
        calls["diffusers"] = lambda: d_unet(x, t, context, added_time_ids=ids).sample

    def in_layout(fmt):
        last = copy.deepcopy(unet)
        for module in last.modules():  # the 2D convolutions (the temporal ones' 5D weights have no such format)
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=fmt)
        x_last = x_flat.contiguous(memory_format=fmt)
        return lambda: per_frame(x_last, last)

    return f"SVD UNet, {args.scale}, 2 videos (cond, uncond) of {f} frames", calls, in_layout


def one_then_other(call, frames: int):
    """A low-memory sampler's cond and uncond one after the other: ``call(rows)`` on the first video's rows of the
    folded batch, then on the second's, the outputs in one batch."""
    import torch

    return torch.cat([call(slice(0, frames)), call(slice(frames, 2 * frames))])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("animatediff", "svd"), default="animatediff")
    p.add_argument("--scale", choices=("tiny", "medium", "real"), default="medium",
                   help="network widths: the demo's, the real block structure at reduced width, the published ones")
    p.add_argument("--frames", type=int, default=None, help="frames a video (default: 16, SVD 14)")
    p.add_argument("--size", type=parse_size, default=(128, 128), metavar="N|WxH",
                   help="pixels, N (square) or WxH (latent is a size/8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=4, help="timed rounds (the fastest and the median reported)")
    p.add_argument("--no-diffusers", action="store_true", help="profile Kinema alone")
    p.add_argument("--top", type=int, default=10, help="operators listed")
    p.add_argument("--low-mem", action="store_true",
                   help="each side's low-memory setting: Kinema cond and uncond in two calls with attention queries "
                        "in chunks of --attn-chunk, diffusers one call with its feed-forward chunking")
    p.add_argument("--attn-chunk", type=int, default=256, help="--low-mem (Kinema): attention queries at once")
    p.add_argument("--timing-only", action="store_true",
                   help="time the calls only (no FLOP count, profiler or channels_last rounds)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    check_at_least(p, args, 1, "frames", "threads", "repeat", "top", "attn_chunk")
    args.frames = args.frames or (14 if args.model == "svd" else 16)

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    if not args.no_diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    title, calls, in_layout = (svd_calls if args.model == "svd" else animatediff_calls)(args)

    with torch.no_grad():
        rounds = timings(calls, args.repeat)
        if not args.timing_only:
            counts = {name: flops(fn) for name, fn in calls.items()}
            ops = profile(calls, args.repeat)
            if not args.low_mem:  # channels_last: the plain call's layouts
                layouts = fastest({"default": calls["Kinema"], "last": in_layout(torch.channels_last)}, args.repeat)

    names, (width, height) = list(calls), args.size
    low = (f". Low-memory settings: Kinema cond and uncond in two calls, attention queries in chunks of "
           f"{args.attn_chunk}; diffusers one call with its feed-forward chunking" if args.low_mem else "")
    print(f"{title} at {width}x{height}, fp32, {args.threads} threads ({cpu_name()}); torch "
          f"{torch.__version__}; {args.repeat} alternating rounds, the fastest and the median of each{low}\n")
    print("| | " + " | ".join(names) + (" | Kinema / diffusers |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * (len(names) + (len(names) > 1)))

    def row(label, values, fmt):
        cells = [format(v, fmt) for v in values]
        if len(values) > 1:
            cells.append(f"{values[0] / values[1]:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("one call (s)", [min(rounds[n]) for n in names], ".3f")
    row("one call, median (s)", [statistics.median(rounds[n]) for n in names], ".3f")
    if not args.timing_only:
        row("GFLOP a call (convolutions, matrix products)", [counts[n] / 1e9 for n in names], ".1f")
        gemm = {n: sum(ops[n].get(k, 0.0) for k in GEMM_OPS) for n in names}
        row("their self CPU time (s)", [gemm[n] for n in names], ".3f")
        row("their GFLOP/s", [counts[n] / 1e9 / gemm[n] for n in names], ".0f")
        row("everything else (s)", [sum(ops[n].values()) - gemm[n] for n in names], ".3f")
    print()
    for n in names:
        print(f"{n}, seconds a call, round by round: " + ", ".join(f"{t:.3f}" for t in rounds[n]))
    if len(names) > 1:
        pairs = [k / d for k, d in zip(rounds["Kinema"], rounds["diffusers"])]
        print("Kinema / diffusers, round by round: " + ", ".join(f"{r:.2f}" for r in pairs)
              + f"; median {statistics.median(pairs):.2f}")
    if args.timing_only:
        return
    for n in names:
        total = sum(ops[n].values())
        top = sorted(ops[n].items(), key=lambda kv: -kv[1])[: args.top]
        print(f"\n{n}, self CPU time by operator (one call, {total:.3f} s under the profiler):\n")
        print("| operator | s | share |\n|---|---:|---:|")
        for key, s in top:
            print(f"| {key} | {s:.3f} | {100 * s / total:.1f} % |")
    if args.low_mem:
        return
    print(f"\nKinema in channels_last: {layouts['last']:.3f} s a call, in the default layout {layouts['default']:.3f} s "
          f"({layouts['last'] / layouts['default']:.2f}x; alternating, fastest of {args.repeat})")


if __name__ == "__main__":
    main()
