"""SVD's temporal convolutions (kernel (3, 1, 1)) as the pack runs them (``layers.FrameConv``: a 2D convolution over
``b c f (h w)``) against PyTorch's Conv3d, on the CPU, one process, the two alternating, fp32.

    python bench/bench_frame_conv.py [--scale tiny|medium] [--frames 14] [--size 256] [--repeat 3] [--threads N]

The demo SVD checkpoint at ``--scale`` (as bench_svd.py; random weights, the published layout): one UNet call on
cond + uncond (2 x ``--frames``) and the temporal VAE decode of ``--frames`` frames in chunks of 14 and of 2 (the
low-memory setting), each timed ``--repeat`` times with every ``FrameConv`` running its own way and as
``nn.Conv3d.forward``, alternating; the fastest of each is kept. Prints the times, the ratio and the largest
difference of the outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import check_at_least, command_line, cpu_name, register_pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("tiny", "medium"), default="tiny")
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--size", type=int, default=256, help="pixels (a multiple of 8)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    check_at_least(p, args, 1, "frames", "repeat", "threads")
    if args.size % 8 or args.size < 8:
        p.error("--size must be a multiple of 8 pixels")

    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    import fixtures_svd_pipeline
    from kinema.models import checkpoint
    from kinema.models.layers import FrameConv
    from kinema.models.vae import decode_frames

    if args.scale == "medium":
        fixtures_svd_pipeline.use_sizes(fixtures_svd_pipeline.MEDIUM)
    with tempfile.TemporaryDirectory(prefix="kinema_bench_") as tmp:
        bundle = checkpoint.load_svd(fixtures_svd_pipeline.write_svd(os.path.join(tmp, "svd.safetensors")))
    f, lat = args.frames, args.size // 8
    g = torch.Generator().manual_seed(0)
    unet = bundle.model.unet
    x = torch.randn(2 * f, unet.cfg.in_channels, lat, lat, generator=g)
    t = torch.full((2 * f,), 0.5)
    context = torch.randn(2 * f, 1, unet.cfg.context_dim, generator=g)
    y = torch.randn(2 * f, unet.cfg.adm_in_channels, generator=g)
    latent = torch.randn(f, 4, lat, lat, generator=g)
    calls = {
        f"UNet call, 2 x {f} frames": lambda: unet(x, t, context, y, f),
        f"temporal decode, {f} frames, chunks of 14": lambda: decode_frames(bundle.vae, latent, chunk=14),
        f"temporal decode, {f} frames, chunks of 2": lambda: decode_frames(bundle.vae, latent, chunk=2),
    }
    own = FrameConv.forward

    def timed(fn, conv3d: bool) -> tuple[float, torch.Tensor]:
        FrameConv.forward = torch.nn.Conv3d.forward if conv3d else own
        try:
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out
        finally:
            FrameConv.forward = own

    print("```\n" + command_line("bench/bench_frame_conv.py", sys.argv[1:]) + "\n```\n")
    print(f"SVD demo weights ({args.scale}), {args.size}x{args.size}, fp32 on CPU, {torch.get_num_threads()} threads "
          f"({cpu_name()}); torch {torch.__version__}; fastest of {args.repeat}, alternating\n")
    print("| call | FrameConv (s) | Conv3d (s) | FrameConv / Conv3d | max difference |\n|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for name, fn in calls.items():
            fn()
            best = {False: float("inf"), True: float("inf")}
            outs = {}
            for _ in range(args.repeat):
                for conv3d in (False, True):
                    seconds, outs[conv3d] = timed(fn, conv3d)
                    best[conv3d] = min(best[conv3d], seconds)
            diff = float((outs[False] - outs[True]).abs().max())
            print(f"| {name} | {best[False]:.3f} | {best[True]:.3f} | {best[False] / best[True]:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
