"""VAE decode with and without spatial tiles: time, peak RSS and the difference, CPU, fp32.

    python bench/bench_vae_tiling.py [--frames 2] [--size 1024] [--tile 512] [--overlap 64] [--threads N]

Decodes the same random latent with the pack's demo SD1.5 VAE (real layout, tiny width, random weights) and the
demo SVD temporal decoder, untiled and in tiles of ``--tile`` pixels overlapping ``--overlap``, each run in its own
subprocess so its peak RSS (VmHWM after the weights are built) is its own. Prints a table with the ratios tiled /
untiled and the mean and max absolute difference of the tiled frames from the untiled ones ([0, 1] images).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import (
    ROOT,
    check_at_least,
    cpu_name,
    mib,
    register_pack,
    release_heap,
    reset_peak_rss,
    rss_kib,
    thread_env,
)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    register_pack()
    from kinema.models import checkpoint, demo
    from kinema.models.tiling import TileOptions
    from kinema.models.vae import (
        SVD_VAE_PREFIX,
        AutoencoderKL,
        TemporalAutoencoder,
        decode_frames,
        infer_temporal_vae_config,
        infer_vae_config,
    )

    if args.vae == "sd15":
        sd = checkpoint.sub_state_dict(demo.sd15_state_dict(0, torch.float32), "first_stage_model.")
        cfg = infer_vae_config(sd)
        vae = checkpoint.build_on_meta(lambda: AutoencoderKL(cfg), sd, torch.float32, "VAE", "demo")
    else:
        sd = checkpoint.sub_state_dict(demo.svd_state_dict(0, torch.float32), SVD_VAE_PREFIX)
        cfg = infer_temporal_vae_config(sd)
        vae = checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, torch.float32, "VAE", "demo")
    del sd
    lat = args.size // 8
    latent = torch.randn(args.frames, 4, lat, lat, generator=torch.Generator().manual_seed(0))
    tiles = TileOptions(args.tile // 8, args.overlap // 8) if args.tile else TileOptions()
    release_heap()
    reset_peak_rss()
    before = rss_kib("VmRSS")
    t0 = time.perf_counter()
    images = decode_frames(vae, latent, chunk=args.frames, tiles=tiles)
    seconds = time.perf_counter() - t0
    torch.save(images, args.out + ".pt")
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "peak_kib": rss_kib("VmHWM"), "before_kib": before}, f)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child-vae", dest="vae", default=None, help=argparse.SUPPRESS)  # a child process: which VAE
    p.add_argument("--child-result", dest="out", default=None, help=argparse.SUPPRESS)  # and where its result goes
    args = p.parse_args(argv)
    if args.out:
        child(args)
        return 0
    check_at_least(p, args, 1, "frames", "threads")
    if args.size % 8 or args.tile % 8 or args.overlap % 8 or args.tile < 64 or not 0 <= 2 * args.overlap < args.tile:
        p.error("--size, --tile and --overlap must be multiples of 8 pixels, the tile at least 64 and the overlap "
                "less than half the tile")

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="kinema_tiles_") as tmp:
        for vae in ("sd15", "svd"):
            got = {}
            for tile in (0, args.tile):
                out = os.path.join(tmp, f"{vae}{tile}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--child-vae", vae, "--child-result", out, "--frames",
                       str(args.frames), "--size", str(args.size), "--tile", str(tile), "--overlap",
                       str(args.overlap), "--threads", str(args.threads)]
                print(f"decoding with the {vae} VAE, tile {tile or 'off'} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, check=False, env=thread_env(args.threads), cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stdout + proc.stderr, file=sys.stderr)
                    return 1
                with open(out) as f:
                    got[tile] = json.load(f)
                got[tile]["images"] = torch.load(out + ".pt")
            plain, tiled = got[0], got[args.tile]
            diff = (tiled["images"] - plain["images"]).abs()
            rows.append((vae, plain, tiled, float(diff.mean()), float(diff.max())))
    lines = ["```", "python " + " ".join(shlex.quote(a) for a in ["bench/bench_vae_tiling.py"] + argv), "```", "",
             (f"{args.frames} frames at {args.size}x{args.size} decoded at once, tiles of {args.tile} px overlapping "
              f"{args.overlap}, demo VAE weights (tiny, random), fp32, {args.threads} threads ({cpu_name()}); "
              f"torch {torch.__version__}. Peak RSS while decoding (VmHWM, weights included)."), "",
             ("| VAE | untiled s | tiled s | untiled peak MiB | tiled peak MiB | time tiled/untiled "
              "| peak tiled/untiled | mean abs diff | max abs diff |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vae, plain, tiled, mean, mx in rows:
        lines.append(f"| {vae} | {plain['seconds']:.2f} | {tiled['seconds']:.2f} | {mib(plain['peak_kib'])} | "
                     f"{mib(tiled['peak_kib'])} | {tiled['seconds'] / plain['seconds']:.2f} | "
                     f"{tiled['peak_kib'] / plain['peak_kib']:.2f} | {mean:.4f} | {mx:.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
