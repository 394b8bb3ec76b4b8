"""Where SVD's temporal decode spends its peak GPU memory: the allocations alive at the peak, by Kinema source line.

The H200 measured 11.79 GiB for SVD-XT's default 14-frame decode at 1024x576 where ``estimate_vram.py`` says 6.93
(README, Performance); this probe says which allocations make the difference. It builds the temporal VAE at the
published size (random weights in the published layout, as ``bench_gpu.py``), decodes one chunk of latents on CUDA
under ``torch.cuda.memory._record_memory_history``, replays the allocator's trace to its peak, and lists what was
alive there, grouped by the innermost frame in the pack's code (file:line, function), largest first, with each
group's largest block (a cuDNN workspace, which the estimate leaves out, is one block). Then the same decode again
without the trace: its time and ``max_memory_allocated``.

The decoder's one 3D operation, the temporal convolution across frames (``layers.FrameConv``), runs as Conv3d on
CUDA; the probe decodes with it as Conv3d and as the CPU's 2D form (``--frame-conv``), the same sums, and reports
both peaks and the largest difference between the two decodes: which form the pack should take on CUDA.

    python bench/probe_vae_memory.py --output /tmp/out/vae_memory.md   # on a GPU, about a minute

On a machine without CUDA it says so and exits 0 (``--device cpu`` decodes a tiny VAE without the trace: a check of
the script).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

from _measure import ROOT, register_pack


def peak_allocations(events: list[dict]) -> tuple[int, dict[int, tuple[int, list]]]:
    """Replay an allocator trace (``_snapshot()["device_traces"][i]``: ``alloc`` / ``free_completed`` events with
    ``addr``, ``size`` and ``frames``) -> (peak bytes above the start, the blocks alive at the peak: {addr: (size,
    frames)}). Blocks allocated before the trace began are not in it (the weights)."""
    live, now, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            now += e["size"]
            if now > peak:
                peak, peak_at = now, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])
    alive: dict[int, tuple[int, list]] = {}
    for e in events[:peak_at + 1]:
        if e["action"] == "alloc":
            alive[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] == "free_completed":
            alive.pop(e["addr"], None)
    return peak, alive


def by_source(alive: dict[int, tuple[int, list]], root: str = ROOT) -> list[tuple[str, int, int, int]]:
    """The blocks grouped by their innermost frame in ``root``'s code (else their innermost frame):
    [(where, bytes, count, largest block)], largest first (a workspace shows as one large block)."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for size, frames in alive.values():
        ours = [f for f in frames if f.get("filename", "").startswith(root)]
        f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
        where = f"{os.path.relpath(f['filename'], root) if ours else f['filename']}:{f['line']} ({f['name']})"
        group = groups[where]
        group[0] += size
        group[1] += 1
        group[2] = max(group[2], size)
    return sorted(((w, *g) for w, g in groups.items()), key=lambda t: -t[1])


#: ``--frame-conv``: the temporal convolutions (``layers.FrameConv``, kernel (3, 1, 1)) as Conv3d or as the 2D form
#: (a 2D convolution over ``b c f (h w)``), each run as a ``FRAME_CONV_2D_DEVICES`` that leaves the device out or
#: names it.
FRAME_CONV_FORMS = ("conv3d", "2d")


@contextmanager
def frame_conv_form(form: str, device_type: str):
    """``FrameConv`` on ``device_type`` as ``form`` (``FRAME_CONV_FORMS``) while the block runs."""
    from kinema.models import layers

    saved = layers.FRAME_CONV_2D_DEVICES
    layers.FRAME_CONV_2D_DEVICES = saved | {device_type} if form == "2d" else saved - {device_type}
    try:
        yield
    finally:
        layers.FRAME_CONV_2D_DEVICES = saved


def probe(vae, latent, device, top: int) -> tuple[object, list[str]]:
    """One decode of ``latent`` under the allocator trace (on CUDA), then one timed: (the frames, report lines)."""
    import torch
    from kinema.models.vae import decode_frames

    cuda = device.type == "cuda"
    gib = 1 << 30
    sync = torch.cuda.synchronize if cuda else (lambda _device: None)
    lines = []
    with torch.no_grad():
        decode_frames(vae, latent[:1], chunk=None)  # warm-up: cuDNN's handles and plans, outside the trace
        if cuda:
            sync(device)
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            decode_frames(vae, latent, chunk=None)
            sync(device)
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            index = device.index if device.index is not None else torch.cuda.current_device()
            peak, alive = peak_allocations(snap["device_traces"][index])
            lines += [(f"At the start (the weights): {start / gib:.2f} GiB; max_memory_allocated "
                       f"{torch.cuda.max_memory_allocated(device) / gib:.2f} GiB; the trace's peak above the start "
                       f"{peak / gib:.2f} GiB, alive then, by the pack's source line:"), "",
                      "| where | GiB | blocks | largest block (GiB) |", "|---|---:|---:|---:|"]
            lines += [f"| {w} | {b / gib:.3f} | {n} | {big / gib:.3f} |" for w, b, n, big in by_source(alive)[:top]]
            lines.append("")
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        frames = decode_frames(vae, latent, chunk=None)
        sync(device)
        seconds = time.perf_counter() - t0
    untraced = f"; max_memory_allocated {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB" if cuda else ""
    lines.append(f"Decoded again without the trace: {seconds:.2f} s{untraced}.")
    return frames, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda (default, when there is one) or cpu (a tiny check, no trace)")
    p.add_argument("--frames", type=int, default=14, help="frames in the chunk (SVD's default decode: 14)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--top", type=int, default=25, help="source lines listed")
    p.add_argument("--frame-conv", choices=(*FRAME_CONV_FORMS, "both"), default="both",
                   help="the temporal convolutions as Conv3d, as the 2D form, or each in turn (default)")
    p.add_argument("--output", help="also write the report (markdown) here")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print(f"probe_vae_memory.py: no CUDA device (torch {torch.__version__}); nothing measured")
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    register_pack()
    from bench_gpu import random_state_dict, shapes_of
    from kinema.models import checkpoint, layers
    from kinema.models.vae import TemporalAutoencoder, TemporalVAEConfig

    cuda = device.type == "cuda"
    ch = 128 if cuda else 32
    if not cuda:
        args.frames, args.width, args.height = min(args.frames, 3), 64, 64
    dtype = torch.float16 if cuda else torch.float32
    cfg = TemporalVAEConfig(ch=ch, ch_mult=(1, 2, 4, 4), quant_conv=True)
    sd = random_state_dict(shapes_of(lambda: TemporalAutoencoder(cfg)), 1, device, dtype)
    vae = checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, dtype, "VAE", "random temporal VAE")
    vae = vae.to(device)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(args.frames, 4, args.height // 8, args.width // 8, generator=g).to(device)
    own = "2d" if device.type in layers.FRAME_CONV_2D_DEVICES else "conv3d"
    lines = [(f"Temporal VAE decode, {args.frames} frames {args.width}x{args.height}, {ch} channels, "
             f"{str(dtype).removeprefix('torch.')}, on {torch.cuda.get_device_name(device) if cuda else 'the CPU'}; "
             f"torch {torch.__version__}."), ""]
    if not cuda:
        lines += ["No allocator trace off CUDA: the decode ran (a check of the script).", ""]
    decoded, printed = {}, 0

    def report(more: list[str]) -> None:
        """Print the new lines; the output file gets the whole report so far (a run cut short keeps its forms)."""
        nonlocal printed
        lines.extend(more)
        print("\n".join(lines[printed:]), flush=True)
        printed = len(lines)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write("\n".join(lines).rstrip() + "\n")

    report([])
    for form in FRAME_CONV_FORMS if args.frame_conv == "both" else (args.frame_conv,):
        with frame_conv_form(form, device.type):
            decoded[form], section = probe(vae, latent, device, args.top)
        report([f"### Temporal convolutions as {form}" + (" (the pack's default here)" if form == own else ""), "",
                *section, ""])
    if len(decoded) == 2:
        a, b = decoded.values()
        gap = (a - b).abs().max().item()
        report([f"Largest difference between the two decodes (frames in [0, 1]): {gap:.2e}."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
