"""VAE decode and encode on the CPU in channels_last (what the pack does) against the default layout, one process,
the two alternating, fp32.

    python bench/bench_vae_layout.py [--frames 14] [--size 256] [--repeat 3] [--threads N]

The pack's demo SD1.5 VAE (decode and encode) and the demo SVD temporal decoder (real layouts, tiny width, random
weights) on the same random latent / image; each call is timed ``--repeat`` times in each layout, alternating,
and the fastest is kept. Prints the times, the ratio channels_last / default and the largest difference of the
outputs (decoded images in [0, 1]; latents).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import check_at_least, command_line, cpu_name, register_pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    from kinema.models import checkpoint, demo, vae
    from kinema.models.vae import SVD_VAE_PREFIX, AutoencoderKL, TemporalAutoencoder

    def build(cls, sd, infer):
        return checkpoint.build_on_meta(lambda: cls(infer(sd)), sd, torch.float32, "VAE", "demo")

    sd15 = build(AutoencoderKL, checkpoint.sub_state_dict(demo.sd15_state_dict(0, torch.float32),
                                                          "first_stage_model."), vae.infer_vae_config)
    svd = build(TemporalAutoencoder, checkpoint.sub_state_dict(demo.svd_state_dict(0, torch.float32),
                                                               SVD_VAE_PREFIX), vae.infer_temporal_vae_config)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(args.frames, 4, args.size // 8, args.size // 8, generator=gen)
    images = torch.rand(args.frames, args.size, args.size, 3, generator=gen)
    calls = {
        "SD1.5 decode": lambda: vae.decode_frames(sd15, latent, chunk=args.frames),
        "SD1.5 encode": lambda: vae.encode_frames(sd15, images, chunk=args.frames),
        "SVD temporal decode": lambda: vae.decode_frames(svd, latent, chunk=args.frames),
    }
    packs_layout = vae._layout
    layouts = {"channels_last": packs_layout, "default": lambda x: x}

    print(f"```\n{command_line('bench/bench_vae_layout.py', sys.argv[1:])}\n```\n")
    print(f"{args.frames} frames at {args.size}x{args.size}, demo VAEs (tiny, random), fp32, {args.threads} threads "
          f"({cpu_name()}), torch {torch.__version__}; fastest of {args.repeat} alternating runs.\n")
    print("| call | channels_last (s) | default (s) | channels_last / default | max difference |")
    print("|---|---:|---:|---:|---:|")
    try:
        for name, call in calls.items():
            best, out = {}, {}
            for layout, fn in layouts.items():  # warm-up
                vae._layout = fn
                call()
            for _ in range(args.repeat):
                for layout, fn in layouts.items():
                    vae._layout = fn
                    start = time.perf_counter()
                    out[layout] = call()
                    best[layout] = min(best.get(layout, float("inf")), time.perf_counter() - start)
            diff = float((out["channels_last"] - out["default"]).abs().max())
            print(f"| {name} | {best['channels_last']:.2f} | {best['default']:.2f} | "
                  f"{best['channels_last'] / best['default']:.2f} | {diff:.1e} |")
    finally:
        vae._layout = packs_layout


if __name__ == "__main__":
    main()
