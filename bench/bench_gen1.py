"""Cost per sampling step of Gen-1 style guidance (temporal guidance, ControlNet, IP-Adapter), CPU, fp32.

    python bench/bench_gen1.py [--frames 16] [--size 128] [--steps 4] [--threads N] [--repeat 3]

One process, the pack's tiny demo weights (real SD1.5 / AnimateDiff v2 / ControlNet / IP-Adapter layouts, random
weights). Kinema samples the same video (euler, cfg 7.5, cond and uncond batched) as:
plain; with temporal guidance (w_t = 1.5, one extra temporal-free evaluation a step); with a depth ControlNet
(one hint per frame); both; with an IP-Adapter content image; all three. diffusers samples the same video with
``AnimateDiffPipeline`` and with ``AnimateDiffControlNetPipeline`` on the same UNet, motion module and ControlNet
weights (diffusers has no temporal guidance; its IP-Adapter path needs a CLIP image encoder pipeline: not timed).

Configurations run round-robin ``--repeat`` times; reported per configuration: the median step time after each
run's warm-up step over all runs, and its ratio to the plain sampler of the same implementation.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import check_at_least, cpu_name, register_pack


def build(args):
    import torch
    from einops import rearrange

    register_pack()
    import fixtures
    from fixtures_controlnet import controlnet, diffusers_controlnet
    from fixtures_ip_adapter import ip_adapter
    from kinema.models import addons, demo
    from kinema.models.clip_vision import load_image_encoder
    from kinema.models.pipelines import SampleOptions, sample_video
    from kinema.models.sampling import initial_noise

    frames, lat = args.frames, args.size // 8
    g = torch.Generator().manual_seed(1234)
    positive, negative = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    hints = torch.rand(frames, args.size, args.size, 3, generator=g)
    content_image = torch.rand(1, args.size, args.size, 3, generator=g)

    base = fixtures.motion_model("v2", beta_schedule="linear")
    control = addons.control_hint(controlnet(), hints)
    encoder = load_image_encoder(demo.clip_vision_state_dict(0, torch.float32), None, torch.float32, "demo")
    content = addons.image_content(ip_adapter(), encoder, content_image, weight=0.8)
    kinema = {
        "plain": base,
        "temporal guidance (w_t 1.5)": base.with_options(temporal_scale=1.5),
        "ControlNet": base.with_options(controls=(control,)),
        "ControlNet + temporal guidance": base.with_options(controls=(control,), temporal_scale=1.5),
        "IP-Adapter": base.with_options(contents=(content,)),
        "ControlNet + IP-Adapter + temporal guidance": base.with_options(controls=(control,), contents=(content,),
                                                                        temporal_scale=1.5),
    }

    def kinema_run(model):
        def run(on_step):
            opts = SampleOptions(seed=args.seed, steps=args.steps, cfg=args.cfg, sampler="euler", scheduler="normal")
            with torch.no_grad():
                sample_video(model, positive, negative, torch.zeros(frames, 4, lat, lat), opts,
                             callback=lambda i, n, x0: on_step())
        return run

    runs = {("Kinema", name): kinema_run(model) for name, model in kinema.items()}

    from diffusers import (
        AnimateDiffControlNetPipeline,
        AnimateDiffPipeline,
        EulerDiscreteScheduler,
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    unet = fixtures.diffusers_motion_unet("v2")
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="linear", timestep_spacing="linspace", steps_offset=0)
    plain_pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None,
                                     scheduler=scheduler)
    cn_pipe = AnimateDiffControlNetPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                            motion_adapter=None, controlnet=diffusers_controlnet(),
                                            scheduler=scheduler)
    scheduler.set_timesteps(args.steps)
    start = rearrange(initial_noise(args.seed, (frames, 4, lat, lat)), "f c h w -> 1 c f h w")
    start = start * (math.sqrt(1 + float(scheduler.sigmas.max()) ** 2) / float(scheduler.init_noise_sigma))
    cond_frames = [rearrange(h, "h w c -> 1 c h w") for h in hints]

    def diffusers_run(pipe, **extra):
        pipe.set_progress_bar_config(disable=True)

        def run(on_step):
            def step_end(pipeline, i, t, kwargs):
                on_step()
                return {}

            with torch.no_grad():
                pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_frames=frames, height=args.size,
                     width=args.size, num_inference_steps=args.steps, guidance_scale=args.cfg, latents=start.clone(),
                     output_type="latent", callback_on_step_end=step_end, **extra)
        return run

    runs[("diffusers", "plain")] = diffusers_run(plain_pipe)
    runs[("diffusers", "ControlNet")] = diffusers_run(cn_pipe, conditioning_frames=cond_frames)
    return runs


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    check_at_least(p, args, 2, "steps")  # the first is the warm-up step, left out of the median
    check_at_least(p, args, 1, "frames", "threads", "repeat")
    if args.size % 8 or args.size < 8:
        p.error("--size must be a multiple of 8 pixels")

    import torch

    torch.set_num_threads(args.threads)
    runs = build(args)
    steps: dict = {key: [] for key in runs}
    for rep in range(args.repeat):
        for key, run in runs.items():
            print(f"{key[0]}: {key[1]} ({rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            stamps = []
            t0 = time.perf_counter()
            run(lambda stamps=stamps: stamps.append(time.perf_counter()))
            times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
            steps[key].extend(times[1:] if len(times) > 1 else times)
    median = {key: statistics.median(v) for key, v in steps.items()}

    import diffusers

    lines = [
        "```",
        "python " + " ".join(shlex.quote(a) for a in ["bench/bench_gen1.py"] + argv),
        "```",
        "",
        (f"AnimateDiff v2 on the Kinema demo weights (tiny, random), {args.frames} frames at {args.size}x{args.size}, "
         f"{args.steps} Euler steps, cfg {args.cfg} (cond and uncond batched), fp32 on CPU, "
         f"{torch.get_num_threads()} threads ({cpu_name()}, {os.cpu_count()} cores); torch {torch.__version__}, "
         f"diffusers {diffusers.__version__}. Median step time after the warm-up step over {args.repeat} "
         "round-robin runs."),
        "",
        "| implementation | configuration | step (s) | × its plain sampler |",
        "|---|---|---:|---:|",
    ]
    for (impl, name), t in median.items():
        lines.append(f"| {impl} | {name} | {t:.3f} | {t / median[(impl, 'plain')]:.2f} |")
    lines += ["", ("Kinema / diffusers, step time: plain "
                   f"{median[('Kinema', 'plain')] / median[('diffusers', 'plain')]:.2f}, ControlNet "
                   f"{median[('Kinema', 'ControlNet')] / median[('diffusers', 'ControlNet')]:.2f}.")]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
