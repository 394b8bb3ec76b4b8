"""The benchmark scripts (bench/): their plans parse, and the GPU bench's CPU smoke mode runs."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_all
import bench_gpu
import probe_vae_memory


@pytest.mark.parametrize("plan", sorted(bench_all.PLANS))
def test_bench_all_plans_are_valid_options_of_each_bench(plan):
    assert set(bench_all.PLANS[plan]) == set(bench_all.SECTIONS)
    for section, argv in bench_all.PLANS[plan].items():
        args = bench_all.MODULES[bench_all._module(section)].parse_args([*argv, "--threads", "1"])
        if section.startswith(("animatediff", "svd")):
            assert args.scale == section.split("-")[1]
        if section.startswith("animatediff"):
            assert args.low_mem == section.endswith("-low-mem")


def test_bench_animatediff_keeps_width_as_an_alias_of_scale():
    import bench_animatediff

    assert bench_animatediff.parse_args(["--width", "medium"]).scale == "medium"
    assert bench_animatediff.parse_args(["--scale", "medium"]).scale == "medium"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the bench would run at real size")
def test_bench_gpu_without_cuda_says_so_and_exits_0(capsys):
    assert bench_gpu.main([]) == 0
    assert "--device cpu --scale tiny" in capsys.readouterr().out


def test_bench_gpu_skips_a_policy_the_engine_does_not_know(monkeypatch):
    from kinema.models import offload

    args = bench_gpu.build_parser().parse_args(["--device", "cpu"])
    args.attn_chunk = 16
    monkeypatch.setattr(offload, "OFFLOAD_MODES", ("none", "block"))
    run = bench_gpu._attempt(lambda: bench_gpu.policy_options("model", args, torch.device("cpu")), "Kinema", "model")
    assert run.note.startswith("skipped: unknown offload mode 'model'")


def test_bench_gpu_cpu_smoke_svd(capsys, tmp_path):
    report = tmp_path / "gpu_report.md"
    argv = ["--device", "cpu", "--scale", "tiny", "--models", "svd", "--policies", "none", "block-chunk",
            "--diffusers", "plain", "--frames", "2", "--steps", "2", "--output", str(report), "--time-budget", "3600",
            "--profile", "4"]
    assert bench_gpu.main(argv) == 0  # no --threads above: it would change the session's
    out = capsys.readouterr().out
    assert report.read_text(encoding="utf-8") == out
    assert "| Kinema | none |" in out and "| Kinema | block-chunk |" in out and "| diffusers | plain |" in out
    assert "failed" not in out and bench_gpu.CPU_RSS_NOTE in out and "In progress" not in out
    for impl in ("Kinema", "diffusers"):  # --profile: the first 4 operators of one UNet call, by time
        section = out.split(f"{impl}, one UNet call of the warm-up step under torch.profiler")[1]
        rows = [line for line in section.split("\n\n")[1].splitlines() if line.startswith("| aten::")]
        assert len(rows) == 4 and "aten::mkldnn_convolution" in section.split("\n\n")[1]


def _budgeted_bench(monkeypatch, argv, compile_s=0.0, deadline=45.0, runs=False):
    """bench_workload with fake runs of 10 s each (a compiled policy's ``compile_s`` of them its compile) and a
    deadline at 45 s: (the runs made, the runs skipped for the budget with their notes, the report's writes, or
    with ``runs`` every run)."""
    from types import SimpleNamespace

    clock = [0.0]

    def video(impl):
        def run(w, config, *args, steps=None, **kwargs):
            clock[0] += 10.0
            r = bench_gpu.Run(impl, config if steps is None else "warm-up")
            if steps is None and impl == "Kinema" and config in bench_gpu.COMPILED:
                r.compile = compile_s
            return r
        return run

    monkeypatch.setattr(bench_gpu.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bench_gpu, "kinema_video", video("Kinema"))
    monkeypatch.setattr(bench_gpu, "diffusers_video", lambda w, pipe, config, *a, **k: video("diffusers")(w, config,
                                                                                                          **k))
    if not runs:
        monkeypatch.setattr(bench_gpu, "_diffusers_pipeline", lambda *a: object())
    args = bench_gpu.build_parser().parse_args(["--device", "cpu", "--policies", *bench_gpu.POLICIES, *argv])
    written = []
    out = bench_gpu.bench_workload(SimpleNamespace(title="t"), args, torch.device("cpu"),
                                   SimpleNamespace(clear=lambda: None), None, None, deadline=deadline,
                                   on_run=lambda res: written.append(len(res["runs"])))
    ran = [(r.impl, r.config) for r in out["runs"] if not r.note]
    skipped = {(r.impl, r.config): r.note for r in out["runs"] if "time budget" in r.note}
    return ran, skipped, out["runs"] if runs else written


def test_bench_gpu_runs_the_speed_pair_first_and_skips_what_the_time_budget_cannot_hold(monkeypatch):
    """On the device the whole run has one time limit: the pair that gives the speed ratio runs first, the report is
    rewritten after every run, and a run that would end after ``--time-budget`` is skipped with a note."""
    ran, skipped, written = _budgeted_bench(monkeypatch, ["--compile-allowance", "5"], compile_s=4.0)
    assert ran == [("Kinema", "none"), ("diffusers", "plain"), ("Kinema", "compiled")]  # 10 s each after a warm-up
    assert list(skipped) == [("Kinema", "model"), ("Kinema", "block"), ("Kinema", "block-chunk"),
                             ("Kinema", "block-compiled"), ("diffusers", "chunked"), ("diffusers", "model-offload"),
                             ("diffusers", "sequential-offload")]
    assert "with a compile of about 4 s" in skipped[("Kinema", "block-compiled")]  # the measured one, not 5
    assert "compile" not in skipped[("Kinema", "model")]
    assert written == list(range(1, 11))


def test_bench_gpu_budgets_a_compile_for_the_compiled_policies(monkeypatch):
    """A compiled run is judged with a compile's length (``--compile-allowance`` until one is measured): at 30 s of
    45 a compiled run of 10 + 150 s is skipped, a plain policy's 10 s still runs."""
    ran, skipped, _ = _budgeted_bench(monkeypatch, [])
    assert ran == [("Kinema", "none"), ("diffusers", "plain"), ("Kinema", "model")]
    assert "with a compile of about 150 s" in skipped[("Kinema", "compiled")]


def test_bench_gpu_default_policies_leave_compiling_to_cuda():
    assert bench_gpu.default_policies(torch.device("cpu")) == ["none", "model", "block", "block-chunk"]
    assert set(bench_gpu.COMPILED) < set(bench_gpu.POLICIES)
    assert bench_gpu.default_policies(torch.device("cuda", 0)) == list(bench_gpu.POLICIES)


def test_bench_gpu_compiled_policies_give_the_model_compile_options(capsys, monkeypatch):
    """The compiled rows: the model carries the pack's CompileOptions (``--compile-backend``/``--compile-mode``;
    what compiling does is tests/test_compiling.py's), for a one-step video first and the timed one, reported apart;
    ``block-compiled`` under block offload, its UNet compiled block by block; both decode through the compiled
    decoder (Compile VAE), the one-step video's decode too."""
    from kinema.models import compiling

    seen, blocks, decodes = [], [], []

    def spy(opts):  # records the options and runs the UNet plain: dynamo's capture is test_compiling's
        seen.append(opts)
        return compiling._call

    def block_spy(opts):
        blocks.append(opts)
        return compiling._call_block

    def decode_spy(opts):
        decodes.append(opts)
        return compiling._call_decode

    monkeypatch.setattr(compiling, "compiled_call", spy)
    monkeypatch.setattr(compiling, "compiled_block_call", block_spy)
    monkeypatch.setattr(compiling, "compiled_decode_call", decode_spy)
    argv = ["--device", "cpu", "--scale", "tiny", "--models", "animatediff", "--policies", "none", "compiled",
            "block", "block-compiled", "--compile-backend", "eager", "--diffusers", "plain", "--frames", "2",
            "--steps", "2"]
    assert bench_gpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "failed" not in out
    rows = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in out.splitlines()
            if line.startswith("| Kinema |")}
    assert rows["compiled"] == rows["none"]  # latents vs diffusers plain: the same difference
    assert rows["block-compiled"] == rows["block"]
    assert "Compiling (the one-step video and its decode, run first): Kinema compiled" in out
    assert "Kinema block-compiled" in out.split("Compiling (")[1]
    eager = compiling.CompileOptions(backend="eager", mode="default")
    assert set(seen) == {eager} and set(blocks) == {eager}
    assert len(seen) == 1 + 2  # a UNet call a step (cond and uncond in one batch): the one-step video, then 2 steps
    assert len(blocks) == len(seen)  # the UNet's call_block, once per UNet call
    assert decodes == [eager] * 4  # 2 frames in one decode call: the one-step video's and the timed one's, twice
    assert "and the VAE's decoder (Compile VAE)" in out  # the policies' notes say so


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_everything(capsys):
    assert bench_gpu.main(["--device", "cpu", "--scale", "tiny", "--steps", "2", "--frames", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("| Kinema | model |", "| Kinema | block |", "| diffusers | chunked |", "skipped: needs a CUDA"):
        assert row in out


# -- estimate_vram.py: peak GPU memory on the meta device ----------------------------------------------------------

def test_live_bytes_counts_what_ops_make_until_it_is_freed():
    import estimate_vram as ev

    weight = torch.empty(256, 256, device="meta")  # made before the count: never counted, nor its views
    with ev.LiveBytes(base=1000) as live:
        a = torch.ones(1024, device="meta")  # 4 KiB
        t = weight.t()
        b = a.view(32, 32)  # a view: no new memory
        assert live.now == 1000 + 4096
        c = a[:512] * 2  # 2 KiB more, while a lives
        assert live.now == 1000 + 4096 + 2048
        del a, t
        assert live.now == 1000 + 4096 + 2048  # b still holds a's storage
        del b
        assert live.now == 1000 + 2048
        del c
    assert live.now == 1000 and live.peak == 1000 + 4096 + 2048


def test_flash_attention_stand_in_allocates_output_and_logsumexp_only():
    import estimate_vram as ev

    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16, device="meta")
    peak = ev.measure(lambda live: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert peak == q.numel() * 2 + 2 * 8 * 4096 * 4  # the math path would hold 2 x 8 x 4096² scores


def test_half_precision_convolution_stand_in_counts_cudnns_nhwc_copies():
    import estimate_vram as ev

    conv = torch.nn.Conv2d(8, 16, 3, padding=1, device="meta", dtype=torch.float16)
    x = torch.empty(2, 8, 32, 32, dtype=torch.float16, device="meta")  # made before the count, like a weight
    size_in, size_out = x.numel() * 2, 2 * 16 * 32 * 32 * 2
    assert ev.measure(lambda live: conv(x)) == size_in + 2 * size_out  # the input's and the output's NHWC copies
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert ev.measure(lambda live: conv(nhwc)) == size_out  # already NHWC: no copies
    strided = torch.empty(2, 3, 8, 32, 32, dtype=torch.float16, device="meta").transpose(1, 2)  # frames as a video
    peak = ev.measure(lambda live: torch.nn.functional.group_norm(strided, 4))
    assert 2 * strided.numel() * 2 <= peak < 2 * strided.numel() * 2 + 1024  # the contiguous copy and the output


def _estimate(make, policies):
    import argparse

    import estimate_vram as ev

    args = argparse.Namespace(attn_chunk=1024, tile=256, tile_overlap=64, diffusers=False)
    keep = ev.POLICIES
    ev.POLICIES = tuple(p for p in keep if p.name in policies)
    try:
        return make(ev, ev.SCALES["real"], args)
    finally:
        ev.POLICIES = keep


def test_real_size_animatediff_fits_4_gb_by_default():
    """SD1.5 + v2 motion module, 16 frames 512x512, fp16, the default policy (model offload): the weights plus
    the activations of one cond + uncond UNet call, and the VAE decode, under 4 GB (3.46 GiB). Before the
    feed-forward and temporal slices and the in-place adds, the UNet call alone took 4.40 GiB (without cuDNN's
    layout copies); before the default decode chunk of 4 frames at 512x512, the 8-frame decode took 4.41 GiB
    (an H200 measured 4.45, and 3.54 for the sampling this estimates at 3.46)."""
    w = _estimate(lambda ev, sc, args: ev.animatediff(sc, 16, 512, 512, args), ("model",))
    phases = w.phases["model"]
    activations = phases["sample"] - w.weights["UNet"] - w.weights["motion module"]
    assert max(phases.values()) < 4e9 and activations < 1.25 * 2**30, phases
    # and no part left out (the estimate's figures: 3.46, 1.02 and 2.28 GiB)
    assert phases["sample"] > 3.3 * 2**30 and activations > 0.9 * 2**30 and phases["decode"] > 2.2 * 2**30, phases


def test_real_size_svd_xt_fits_16_gb_by_default_and_6_gb_with_block_offload_and_tiles():
    """SVD-XT, 25 frames 1024x576, fp16: default (model offload, the 14-frame temporal decode) under 16 GB,
    block offload with VAE tiles under 6 GB. The decode took 17.9 GiB before the float32 GroupNorm in slices of
    groups (estimated then without cuDNN's layout copies); 16.92 with them before the decoder's per-frame layers ran
    on slices of frames (an H200 measured 16.96); 6.93 now. The UNet call with block offload 3.62 (measured 3.69)."""
    w = _estimate(lambda ev, sc, args: ev.svd(sc, 25, 1024, 576, args), ("model", "block-tiles"))
    assert max(w.phases["model"].values()) < 16e9 and w.phases["model"]["decode"] < 8 * 2**30, w.phases["model"]
    assert max(w.phases["block-tiles"].values()) < 6e9, w.phases["block-tiles"]


@pytest.mark.parametrize("model", ["animatediff", "svd"])
def test_profile_step_runs_kinema_beside_diffusers(model, capsys):
    pytest.importorskip("diffusers", exc_type=ImportError)
    import profile_step

    threads = torch.get_num_threads()
    try:
        profile_step.main(["--model", model, "--scale", "tiny", "--frames", "2", "--size", "32", "--repeat", "1",
                           "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| one call (s) |" in out and "Kinema / diffusers" in out
    assert "Kinema, self CPU time by operator" in out and "diffusers, self CPU time by operator" in out
    assert "Kinema in channels_last" in out


@pytest.mark.parametrize("model, fixture_module, unet_params", [
    ("animatediff", "fixtures", 859.52e6),  # SD1.5's UNet (v1-5-pruned-emaonly: 859,520,964 parameters)
    ("svd", "fixtures_svd_pipeline", 1524.62e6),  # SVD's VideoUNet (svd_xt: 1,524,623,082)
])
def test_profile_step_real_scale_builds_the_published_widths(monkeypatch, model, fixture_module, unet_params):
    """``--scale real`` switches the fixtures to their REAL sizes, whose UNet has the published parameter count
    (counted on the meta device)."""
    import importlib

    import profile_step
    from kinema.models import demo
    from kinema.models.svd import SVDUNet
    from kinema.models.unet import UNetModel

    fixtures_module = importlib.import_module(fixture_module)
    seen = []

    class Stop(Exception):
        pass

    def use_sizes(sizes):
        seen.append(sizes)
        raise Stop  # before anything is built at that size

    monkeypatch.setattr(fixtures_module, "use_sizes", use_sizes)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            profile_step.main(["--model", model, "--scale", "real", "--no-diffusers", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert seen == [fixtures_module.REAL]
    make = {"animatediff": lambda: UNetModel(demo.demo_unet_config(seen[0])),
            "svd": lambda: SVDUNet(demo.demo_svd_unet_config(seen[0]))}[model]
    with torch.device("meta"):
        unet = make()
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(unet_params, abs=0.01e6)


def test_probe_vae_memory_replays_the_trace_to_its_peak():
    root = probe_vae_memory.ROOT
    ours = [{"filename": os.path.join(root, "models", "vae.py"), "line": 7, "name": "decode"},
            {"filename": "/torch/nn/functional.py", "line": 1, "name": "conv2d"}]
    ours = [ours[1], ours[0]]  # innermost first, as torch records them
    other = [{"filename": "/torch/x.py", "line": 3, "name": "f"}]
    events = [{"action": "alloc", "addr": 1, "size": 100, "frames": ours},
              {"action": "alloc", "addr": 2, "size": 50, "frames": other},
              {"action": "free_completed", "addr": 2, "size": 50},
              {"action": "alloc", "addr": 3, "size": 80, "frames": ours},   # the peak: 1 and 3 alive, 180
              {"action": "free_completed", "addr": 1, "size": 100},
              {"action": "alloc", "addr": 4, "size": 60, "frames": other}]  # 140, not a peak
    peak, alive = probe_vae_memory.peak_allocations(events)
    assert peak == 180 and sorted(alive) == [1, 3]
    # the group's bytes, its blocks and its largest block
    assert probe_vae_memory.by_source(alive) == [(os.path.join("models", "vae.py") + ":7 (decode)", 180, 2, 100)]


def test_probe_vae_memory_cpu_check(monkeypatch, capsys, tmp_path):
    """Both forms of the temporal convolution decode, in turn, the same frames, and the device set is restored
    after: here with the CPU left out of it, as CUDA is by default, then with the CPU's own set."""
    from kinema.models import layers

    forms, real = [], layers.FrameConv._conv
    monkeypatch.setattr(layers.FrameConv, "_conv", lambda self, x: forms.append(
        "2d" if x.device.type in layers.FRAME_CONV_2D_DEVICES else "conv3d") or real(self, x))
    own = layers.FRAME_CONV_2D_DEVICES
    monkeypatch.setattr(layers, "FRAME_CONV_2D_DEVICES", frozenset())
    assert probe_vae_memory.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "the decode ran" in out
    assert layers.FRAME_CONV_2D_DEVICES == frozenset()
    half = len(forms) // 2
    assert half and forms == ["conv3d"] * half + ["2d"] * half
    assert "as conv3d (the pack's default here)\n" in out and "### Temporal convolutions as 2d\n" in out
    gap = float(out.split("Largest difference between the two decodes (frames in [0, 1]): ")[1].split()[0][:-1])
    assert gap < 1e-4
    monkeypatch.setattr(layers, "FRAME_CONV_2D_DEVICES", own)
    forms.clear()
    report = tmp_path / "probe.md"
    assert probe_vae_memory.main(["--device", "cpu", "--frame-conv", "conv3d", "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert report.read_text().strip() == out.strip()
    assert set(forms) == {"conv3d"} and "Largest difference" not in out
    assert "### Temporal convolutions as conv3d\n" in out  # not the CPU's default
    assert layers.FRAME_CONV_2D_DEVICES == own  # the CPU's 2D form again after the Conv3d decode


def test_bench_gpu_names_dtypes_as_its_options_do():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    assert [bench_gpu._dtype_name(d) for d in dtypes] == ["fp32", "fp16", "bf16"]


def test_the_summary_compares_each_row_with_its_own_diffusers_run():
    """SVD low-mem's latents are compared with diffusers low-mem's, the configuration its other columns compare."""
    import argparse

    run = {"median": 1.0, "total": 10.0, "video_peak_rss_kib": 1024}
    res = {"results": dict.fromkeys(("kinema", "kinema low-mem", "diffusers", "diffusers low-mem"), run),
           "latent_diff": {"kinema": 1e-6, "kinema low-mem": 7e-5},
           "latent_diff_pair": {"kinema": 1e-6, "kinema low-mem": 3e-6}}
    args = argparse.Namespace(frames=14, width=64, height=64, steps=2, scale="tiny")
    plain, low = bench_all.summary_rows("svd-tiny", args, res)
    assert plain.startswith("| SVD |") and plain.endswith("| 1.0e-06 |")
    assert low.startswith("| SVD low-mem |") and low.endswith("| 3.0e-06 |")


def test_summary_ratios_are_kinema_over_diffusers():
    """Each K/D cell divides Kinema's figure by diffusers' (a row with both sides equal could not tell)."""
    import argparse

    kinema = {"median": 1.0, "total": 30.0, "video_peak_rss_kib": 1024 * 300}
    diffusers = {"median": 4.0, "total": 40.0, "video_peak_rss_kib": 1024 * 600}
    res = {"results": {"kinema": kinema, "kinema low-mem": diffusers, "diffusers": diffusers,
                       "diffusers low-mem": kinema},
           "latent_diff": {"kinema": 1e-6, "kinema low-mem": 7e-5},
           "latent_diff_pair": {"kinema": 1e-6, "kinema low-mem": 3e-6}}
    args = argparse.Namespace(frames=14, width=64, height=64, steps=2, scale="tiny")
    plain, low = bench_all.summary_rows("svd-tiny", args, res)
    cells = [c.strip() for c in plain.strip("|").split("|")]
    assert cells[3:] == ["1.000", "4.000", "0.25", "30.00", "40.00", "0.75", "300", "600", "0.50", "1.0e-06"]
    cells = [c.strip() for c in low.strip("|").split("|")]
    assert cells[5] == "4.00" and cells[8] == "1.33" and cells[11] == "2.00"


def test_the_whole_process_peak_survives_the_reset_of_the_peak_mark():
    """Resetting VmHWM (/proc/self/clear_refs) resets ru_maxrss as well: the process's peak is kept aside."""
    import resource

    from _measure import process_peak_rss_kib, reset_peak_rss, rss_kib

    block = bytearray(256 * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: resident
        block[i] = 1
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not reset_peak_rss():
        pytest.skip("the kernel does not let this process reset its peak RSS")
    assert rss_kib("VmHWM") < before  # the mark is reset
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= before:
        pytest.skip("ru_maxrss is not reset with VmHWM on this kernel")
    assert process_peak_rss_kib() >= before >= 256 * 1024


@pytest.mark.parametrize("script, argv, message", [
    ("bench_context", ["--frames", "0", "16"], "--frames must be at least 1"),
    ("bench_svd", ["--steps", "1"], "--steps must be at least 2"),
    ("bench_svd", ["--decode-chunk", "-1"], "--decode-chunk must be at least 0"),
    ("bench_animatediff", ["--repeat", "0"], "--repeat must be at least 1"),
])
def test_bad_options_are_refused_before_any_work(script, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_gpu_refuses_bad_options_before_looking_for_a_gpu(capsys):
    for argv, message in ((["--peak-tflops", "0"], "--peak-tflops must be above 0"),
                          (["--frames", "0"], "--frames must be at least 1"),
                          (["--tile", "0"], "--tile must be at least 1"),
                          (["--steps", "1"], "--steps must be at least 2")):
        with pytest.raises(SystemExit):
            bench_gpu.main(argv)
        assert message in capsys.readouterr().err


def test_bench_context_runs_frame_counts_smallest_first():
    """The ratios are to the first run and the memory verdict reads the last as the largest: any order given."""
    import bench_context

    assert bench_context.parse_args(["--frames", "64", "16", "32", "16"]).frames == [16, 32, 64]


def test_the_step_median_leaves_out_the_warm_up_step_alone():
    """Per-step time: the median of the steps after the first (the mean, all steps or two left out all differ)."""
    from _measure import median_after_warmup

    steps = [9.0, 1.0, 2.0, 6.0]  # median after the first 2; mean 3; median of all 4; after two left out 4
    assert median_after_warmup(steps) == 2.0 and median_after_warmup([5.0]) == 5.0 and median_after_warmup([]) is None
    assert bench_gpu.Run("Kinema", "none", steps=steps).median == 2.0
    assert bench_gpu.Run("Kinema", "none", steps=[5.0]).median == 5.0


def test_a_bench_command_runs_its_child_or_reports_what_the_children_gave(capsys):
    """The child/parent benches' shared command (``run_bench``): a child runs and only runs; the parent prints the
    report of what ``collect`` gave and exits with the status of the results; a failed child is a message and 1."""
    from _measure import BenchError, run_bench

    ran = []
    assert run_bench("args", ["--child"], True, ran.append, None, None) == 0 and ran == ["args"]
    assert capsys.readouterr().out == ""

    def failing(args):
        raise BenchError("the diffusers child failed: see its log")

    assert run_bench("args", [], False, None, failing, None) == 1
    assert "the diffusers child failed" in capsys.readouterr().err

    def report(args, argv, res):
        return [f"{args} {argv}", f"flat {res['flat']}"]

    def flat(res):
        return 0 if res["flat"] else 2

    assert run_bench("args", ["-v"], False, None, lambda a: {"flat": False}, report, status=flat) == 2
    assert capsys.readouterr().out == "args ['-v']\nflat False\n"
    assert run_bench("args", [], False, None, lambda a: {"flat": True}, report, status=flat) == 0
    assert run_bench("args", [], False, None, lambda a: {"flat": False}, report) == 0  # no status: 0


def test_bench_gpu_run_peak_is_its_larger_phase_and_steps_are_the_gaps_between_callbacks(monkeypatch):
    assert bench_gpu.Run("Kinema", "none", peak_sampling=3, peak_decode=5).peak == 5
    assert bench_gpu.Run("Kinema", "none", peak_sampling=3).peak == 3
    stamps = iter([10.0, 11.0, 13.0, 16.0])
    monkeypatch.setattr(bench_gpu.time, "perf_counter", lambda: next(stamps))
    clock = bench_gpu.StepClock(bench_gpu.Meter(torch.device("cpu")))
    clock.start()
    for _ in range(3):
        clock.tick()
    assert clock.steps() == [1.0, 2.0, 3.0]


def test_bench_gpu_cpu_meter_resets_the_peak_mark_and_reports_bytes(monkeypatch):
    resets = []
    monkeypatch.setattr(bench_gpu, "reset_peak_rss", lambda: resets.append(True) or True)
    monkeypatch.setattr(bench_gpu, "rss_kib", {"VmRSS": 3, "VmHWM": 5}.get)
    meter = bench_gpu.Meter(torch.device("cpu"))
    meter.reset()
    assert resets == [True] and meter.now() == 3 * 1024 and meter.peak() == 5 * 1024


def test_rss_kib_reads_kib():
    from _measure import rss_kib

    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: resident
        block[i] = 1
    kib = rss_kib("VmRSS")
    if kib is None:
        pytest.skip("no /proc/self/status")
    assert kib >= len(block) // 1024


@pytest.mark.parametrize("kind, steps, schedules_differ, leap", [
    ("animatediff", 20, True, False), ("animatediff", 10, False, False), ("animatediff", 2, False, False),
    ("svd", 25, False, False), ("svd", 2, False, True)])
def test_bench_gpu_report_rows_give_the_figures_of_each_run(kind, steps, schedules_differ, leap):
    """TFLOP/s from Kinema's count and the run's median step, its fraction of --peak-tflops, GiB of 2**30, the
    latents relative to diffusers plain's (not to another diffusers run, nor to the run's own); for AnimateDiff at a
    step count whose schedules differ (bench/README.md), a line that says so, and for SVD at one whose first step
    leaps from sigma 700 to 0.002 (float32 rounding), a line that says that."""
    args = bench_gpu.build_parser().parse_args(["--device", "cpu", "--peak-tflops", "100"])
    plain = torch.tensor([[1.0, -2.0]])
    runs = [bench_gpu.Run("diffusers", "chunked", steps=[9.0, 2.0], latent=torch.tensor([[1.0, -2.5]])),
            bench_gpu.Run("Kinema", "none", steps=[9.0, 2.0, 4.0, 3.0], sampling=6.0, decode=1.0, total=7.5,
                          peak_sampling=2**30, peak_decode=3 * 2**29, start_memory=2**29,
                          latent=torch.tensor([[1.0, -2.2]])),
            bench_gpu.Run("diffusers", "plain", steps=[9.0, 4.0], latent=plain)]
    res = {"workload": SimpleNamespace(title="t", weights_note="w", kind=kind, steps=steps), "runs": runs,
           "flops": {"Kinema": 6e14, "diffusers": 5e10}}
    lines = bench_gpu.workload_report(res, args, bench_gpu.Meter(torch.device("cpu")))
    assert "Kinema 600.00 TFLOP, diffusers 50.000 GFLOP" in "\n".join(lines)
    assert "| Kinema | none | 3.000 | 6.00 | 1.00 | 7.50 | 1.00 | 1.50 | 1.50 | 0.50 | 200 | 2 | 1.0e-01 |" in lines
    assert "| diffusers | plain | 4.000 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 150 | 1.5 | 0.0e+00 |" in lines
    assert any("the schedules differ slightly" in line for line in lines) == schedules_differ
    assert any("from sigma 700 to 0.002 at once" in line for line in lines) == leap


def test_edm_leap_is_where_svd_s_first_step_lands_when_it_drops_from_sigma_700_at_once():
    """1 step: to 0; 2 steps: to sigma_min 0.002; 3 steps or more come down gradually (15.6 first at 3): None."""
    from _measure import edm_leap

    assert edm_leap(1) == 0.0
    assert edm_leap(2) == pytest.approx(0.002, rel=1e-5)  # float32
    assert edm_leap(3) is None and edm_leap(25) is None


@pytest.mark.parametrize("steps, leap", [(2, True), (3, False)])
def test_bench_svd_report_says_when_the_first_step_leaps_to_the_last_sigma(steps, leap):
    import bench_svd

    args = bench_svd.parse_args(["--steps", str(steps), "--configs", "kinema", "diffusers"])
    row = {"decode_chunk": 14, "median": 1.0, "sampling": 2.0, "decode": 1.0, "total": 3.0,
           "video_peak_rss_kib": 1024, "peak_rss_kib": 2048}
    res = {"results": {"kinema": row, "diffusers": row}, "latent_diff": {"kinema": 8e-4, "diffusers": 0.0},
           "threads": 1}
    lines = bench_svd.report(args, [], res)
    assert "| kinema | 14 | 1.000 |" in "\n".join(lines)
    assert ("goes from sigma 700 to 0.002 at once" in lines[-1]) == leap


def test_the_animatediff_summary_row_compares_the_sampling_peaks_and_gives_the_latent_difference():
    import argparse

    kinema = {"median": 1.0, "total": 30.0, "sampling_peak_rss_kib": 1024 * 300, "peak_rss_kib": 1024 * 900}
    diffusers = {"median": 4.0, "total": 40.0, "sampling_peak_rss_kib": 1024 * 600, "peak_rss_kib": 1024 * 1000}
    args = argparse.Namespace(motion="v2", frames=16, size=128, steps=10, scale="tiny", low_mem=False)
    (row,) = bench_all.summary_rows("animatediff-tiny", args, {"kinema": kinema, "diffusers": diffusers, "rel": 2e-6})
    assert row.startswith("| AnimateDiff | tiny | v2, 16 frames 128x128, 10 steps |")
    assert row.endswith("| 300 | 600 | 0.50 | 2.0e-06 |")
    del kinema["sampling_peak_rss_kib"]  # one run without the sampling peak: both sides' whole-process peaks
    (row,) = bench_all.summary_rows("animatediff-tiny", args, {"kinema": kinema, "diffusers": diffusers, "rel": 2e-6})
    assert row.endswith("| 900 | 1000 | 0.90 | 2.0e-06 |")
    args.low_mem = True
    (row,) = bench_all.summary_rows("animatediff-tiny-low-mem", args,
                                    {"kinema": kinema, "diffusers": diffusers, "rel": 2e-6})
    assert row.startswith("| AnimateDiff low-mem | tiny | v2, 16 frames 128x128, 10 steps |")


def test_bench_all_report_exits_1_when_a_section_failed_whatever_the_context_verdict(monkeypatch):
    import bench_context

    monkeypatch.setattr(bench_context, "report", lambda args, plan, res: ["command", "", "table"])
    outcomes = {"svd-tiny": (None, None, "svd-tiny failed (exit 1):"),
                "context": (None, {"flat": False, "threads": 2}, None)}
    lines, status = bench_all.build_report([], bench_all.PLANS["quick"], outcomes, 60.0)
    assert status == 1 and "| svd-tiny | | failed: svd-tiny failed (exit 1): | | | | | | | | | | |" in lines
    _, status = bench_all.build_report([], bench_all.PLANS["quick"], {"context": outcomes["context"]}, 60.0)
    assert status == 2  # memory not flat under context windows


def test_bench_all_gives_each_section_its_plan_threads_and_repeat(monkeypatch, capsys):
    pytest.importorskip("diffusers", exc_type=ImportError)
    seen = {}

    def run_section(section, argv):
        seen[section] = argv
        return None, None, "not run"

    monkeypatch.setattr(bench_all, "run_section", run_section)
    monkeypatch.setattr(bench_all, "build_report", lambda argv, plan, outcomes, seconds: (["report"], 1))
    assert bench_all.main(["--quick", "--threads", "3", "--repeat", "2", "--sections", "svd-tiny", "context"]) == 1
    assert seen == {"svd-tiny": [*bench_all.PLANS["quick"]["svd-tiny"], "--threads", "3", "--repeat", "2"],
                    "context": [*bench_all.PLANS["quick"]["context"], "--threads", "3"]}
    bench_all.main(["--threads", "1", "--sections", "animatediff-tiny"])
    assert seen["animatediff-tiny"] == [*bench_all.PLANS["full"]["animatediff-tiny"], "--threads", "1"]


def test_estimate_vram_report_gives_gib_and_the_largest_phase():
    import estimate_vram as ev

    phases = {p.name: {"encode": 2**30, "sample": 3 * 2**30, "decode": 7 * 2**29} for p in ev.POLICIES}
    lines = ev.report([ev.Workload("t", {"UNet": 2**31}, phases)], [], 1.0)
    assert "Weights: UNet 2.00 GiB." in lines
    assert "| Kinema model | default | 1.00 | 3.00 | 3.50 | 3.50 |" in lines


# -- the model-running halves: both sides given the same video, the options reaching the engine --------------------

def _in_process_children(monkeypatch, module):
    """``module.run_child`` replaced by the child's ``main`` in this process (torch's thread count restored): the
    command lines the parent built, in order."""
    cmds = []

    def run_child(cmd, threads, what):
        cmds.append(cmd)
        before = torch.get_num_threads()
        try:
            assert module.main(cmd[2:]) == 0, what
        finally:
            torch.set_num_threads(before)

    monkeypatch.setattr(module, "run_child", run_child)
    return cmds


def _child_args(module, cmd):
    return vars(module.parse_args(cmd[2:]))


@pytest.mark.parametrize("low_mem", [False, True])
def test_bench_animatediff_children_sample_the_same_video_with_the_options_given(monkeypatch, low_mem):
    """Kinema and diffusers on the same noise, prompts, cfg, seed and schedule: the final latents agree in fp32 (4
    steps: identical schedules), each child got the parent's options, and every step was timed; with --low-mem,
    each side's low-memory setting reaches its engine (Kinema cond/uncond apart with attention chunks, diffusers'
    feed-forward chunking)."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    import bench_animatediff
    from _measure import reset_peak_rss
    from diffusers import UNetMotionModel
    from kinema.models import pipelines

    cmds = _in_process_children(monkeypatch, bench_animatediff)
    seen = []
    sample, d_chunking = pipelines.sample_video, UNetMotionModel.enable_forward_chunking

    def spy_sample(model, positive, negative, latent, opts, **kw):
        seen.append(("sample", opts.batch_cond, opts.attn_chunk))
        return sample(model, positive, negative, latent, opts, **kw)

    def spy_chunking(self, *a, **kw):
        seen.append(("forward chunking",))
        return d_chunking(self, *a, **kw)

    monkeypatch.setattr(pipelines, "sample_video", spy_sample)
    monkeypatch.setattr(UNetMotionModel, "enable_forward_chunking", spy_chunking)
    args = bench_animatediff.parse_args(["--frames", "2", "--steps", "4", "--size", "64", "--threads", "1",
                                         "--cfg", "5.0", "--seed", "3", "--motion", "v3", "--attn-chunk", "16",
                                         *(["--low-mem"] if low_mem else [])])
    res = bench_animatediff.collect(args)
    assert [_child_args(bench_animatediff, c)["child"] for c in cmds] == ["kinema", "diffusers"]
    keys = ("frames", "steps", "size", "cfg", "seed", "motion", "scale", "threads", "low_mem", "attn_chunk")
    for cmd in cmds:
        child = _child_args(bench_animatediff, cmd)
        assert {k: child[k] for k in keys} == {k: vars(args)[k] for k in keys}
    assert seen == ([("sample", False, 16), ("forward chunking",)] if low_mem else [("sample", True, 0)])
    assert ("low-memory settings" in "\n".join(bench_animatediff.report(args, [], res))) == low_mem
    k, d = res["kinema"], res["diffusers"]
    assert k["latent"].shape == d["latent"].shape == (2, 4, 8, 8)
    assert res["rel"] < 1e-4, res["rel"]
    assert res["rel"] == pytest.approx(float((k["latent"] - d["latent"]).abs().max() / d["latent"].abs().max()))
    assert float(k["latent"].abs().max()) > 0.01  # in the sampler's scaled space, as diffusers' latents
    for run in (k, d):
        assert len(run["steps"]) == args.steps and run["steps"][0] > 0
        assert (run["sampling_peak_rss_kib"] is not None) == reset_peak_rss()


def test_bench_svd_configurations_make_the_same_video_with_their_own_memory_settings(monkeypatch):
    """The four configurations sample the same latents as diffusers' (fp32: ~1e-5), each child gets the parent's
    options, and each low-mem setting reaches its engine: Kinema cond/uncond apart with attention chunks, diffusers'
    feed-forward chunking, each side decoding its own chunk of frames."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    import bench_svd
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from kinema.models import pipelines, vae

    cmds = _in_process_children(monkeypatch, bench_svd)
    seen = []
    sample, decode = pipelines.sample_img2vid, vae.decode_frames

    def spy_sample(model, cond, uncond, latent, opts, **kw):
        seen.append(("sample", model.cfg_mode, model.min_cfg, opts.cfg, opts.batch_cond, opts.attn_chunk,
                     opts.scheduler, opts.seed, opts.steps))
        return sample(model, cond, uncond, latent, opts, **kw)

    def spy_decode(model, latent, chunk=None, **kw):
        seen.append(("kinema decode", chunk))
        return decode(model, latent, chunk=chunk, **kw)

    d_decode = StableVideoDiffusionPipeline.decode_latents
    d_chunking = UNetSpatioTemporalConditionModel.enable_forward_chunking

    def spy_d_decode(self, latents, num_frames, decode_chunk_size=14):
        seen.append(("diffusers decode", decode_chunk_size))
        return d_decode(self, latents, num_frames, decode_chunk_size=decode_chunk_size)

    def spy_chunking(self, *a, **kw):
        seen.append(("forward chunking",))
        return d_chunking(self, *a, **kw)

    monkeypatch.setattr(pipelines, "sample_img2vid", spy_sample)
    monkeypatch.setattr(vae, "decode_frames", spy_decode)
    monkeypatch.setattr(StableVideoDiffusionPipeline, "decode_latents", spy_d_decode)
    monkeypatch.setattr(UNetSpatioTemporalConditionModel, "enable_forward_chunking", spy_chunking)
    args = bench_svd.parse_args(["--frames", "2", "--steps", "2", "--width", "64", "--height", "64", "--threads", "1",
                                 "--seed", "5", "--low-decode-chunk", "1", "--attn-chunk", "16"])
    res = bench_svd.collect(args)
    names = ["kinema", "kinema low-mem", "diffusers", "diffusers low-mem"]
    assert [_child_args(bench_svd, c)["child"] for c in cmds[1:]] == names
    keys = ("frames", "steps", "width", "height", "seed", "threads", "decode_chunk", "low_decode_chunk", "attn_chunk",
            "scale")
    for cmd in cmds[1:]:
        assert {k: _child_args(bench_svd, cmd)[k] for k in keys} == {k: vars(args)[k] for k in keys}
    common = ("linear", bench_svd.MIN_CFG, bench_svd.MAX_CFG)
    assert seen == [("sample", *common, True, 0, "karras", 5, 2), ("kinema decode", 2),
                    ("sample", *common, False, 16, "karras", 5, 2), ("kinema decode", 1),
                    ("diffusers decode", 2), ("forward chunking",), ("diffusers decode", 1)]
    assert {n: r["decode_chunk"] for n, r in res["results"].items()} == dict(zip(names, [2, 1, 2, 1]))
    for name in names:
        assert res["latent_diff"][name] < 1e-4, res["latent_diff"]
        assert len(res["results"][name]["steps"]) == args.steps
    assert set(res["latent_diff_pair"]) == {"kinema", "kinema low-mem"}
    assert max(res["latent_diff_pair"].values()) < 1e-4 and res["latent_diff"]["diffusers"] == 0.0


def test_bench_svd_latent_differences_are_relative_to_each_pairs_diffusers_run(monkeypatch):
    """latent_diff: max |x - diffusers| / max |diffusers|; the pair's: against the diffusers run it is paired with."""
    import bench_svd

    latents = {"kinema": torch.tensor([1.0, -4.0]), "kinema low-mem": torch.tensor([2.0, -4.0]),
               "diffusers": torch.tensor([1.0, -2.0]), "diffusers low-mem": torch.tensor([2.0, -5.0])}

    def run_child(cmd, threads, what):
        if "--child" not in cmd:
            return
        name = cmd[cmd.index("--child") + 1]
        torch.save(latents[name], cmd[cmd.index("--latent-out") + 1])
        with open(cmd[cmd.index("--result") + 1], "w") as f:
            f.write('{"median": 1.0, "total": 2.0, "threads": 1}')

    monkeypatch.setattr(bench_svd, "run_child", run_child)
    res = bench_svd.collect(bench_svd.parse_args(["--threads", "1"]))
    assert res["latent_diff"] == {"kinema": 1.0, "kinema low-mem": 1.0, "diffusers": 0.0, "diffusers low-mem": 1.5}
    assert res["latent_diff_pair"] == {"kinema": 1.0, "kinema low-mem": 0.2}


def test_bench_context_child_samples_the_frames_asked_with_the_context_options(monkeypatch, tmp_path):
    """The child samples ``--child-frames`` frames with CONTEXT's windows and counts the windows run; the parent
    reads the last run against the first: time per window and the sampling peak (the whole-process one only
    without it)."""
    import json

    import bench_context
    from kinema.models import pipelines
    from kinema.models.context import ContextOptions

    seen = []

    def fake_sample(model, positive, negative, latent, opts, on_window=None, **kw):
        seen.append((tuple(latent.shape), opts.context, opts.steps, opts.cfg))
        for _ in range(3):
            on_window()
        return latent

    monkeypatch.setattr(pipelines, "sample_video", fake_sample)
    result = tmp_path / "r.json"
    before = torch.get_num_threads()
    try:
        bench_context.main(["--child-frames", "20", "--result", str(result), "--steps", "2", "--size", "64",
                            "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert seen == [((20, 4, 8, 8), ContextOptions(**bench_context.CONTEXT), 2, 7.5)]
    assert json.loads(result.read_text())["windows"] == 3 and json.loads(result.read_text())["frames"] == 20

    fake = {16: {"frames": 16, "windows": 4, "total": 8.0, "sampling_peak_rss_kib": 100, "peak_rss_kib": 1000,
                 "threads": 1},
            64: {"frames": 64, "windows": 16, "total": 64.0, "sampling_peak_rss_kib": 150, "peak_rss_kib": 1100,
                 "threads": 1}}
    cmds = []

    def run_child(cmd, threads, what):
        cmds.append(cmd)
        frames = int(cmd[cmd.index("--child-frames") + 1])
        with open(cmd[cmd.index("--result") + 1], "w") as f:
            json.dump(fake[frames], f)

    monkeypatch.setattr(bench_context, "run_child", run_child)
    args = bench_context.parse_args(["--frames", "64", "16", "--steps", "2", "--size", "64", "--threads", "1"])
    res = bench_context.collect(args)
    assert [bench_context.parse_args(c[2:]).steps for c in cmds] == [2, 2]
    assert res["per_window_ratio"] == 2.0 and res["peak_ratio"] == 1.5 and res["flat"] is False
    fake[64]["sampling_peak_rss_kib"] = 120
    assert bench_context.collect(args)["flat"] is True  # 1.2x: within the target
    argv = ["--frames", "16", "64", "--steps", "2", "--size", "64", "--threads", "1"]
    assert bench_context.main(argv) == 0  # the command's status: 0 flat, 2 memory growing with the frame count
    fake[64]["sampling_peak_rss_kib"] = 121
    assert bench_context.main(argv) == 2


def test_bench_gen1_gives_each_configuration_its_guidance_and_times_steps_after_the_warm_up(monkeypatch, capsys):
    """Each Kinema configuration samples with its temporal guidance, ControlNet and IP-Adapter (and the cfg asked),
    diffusers' ControlNet row with the ControlNet pipeline and the hints; the table's median leaves out each run's
    warm-up step and the ratio is Kinema / diffusers."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    import bench_gen1
    from diffusers import AnimateDiffControlNetPipeline, AnimateDiffPipeline
    from kinema.models import pipelines

    seen = {}

    def fake_sample(model, positive, negative, latent, opts, callback=None, **kw):
        seen.setdefault("kinema", []).append((model.temporal_scale, len(model.controls), len(model.contents),
                                              opts.cfg, opts.seed, opts.steps))

    def fake_pipe(name):
        def call(self, **kw):
            seen.setdefault(name, []).append((kw["guidance_scale"], kw["num_inference_steps"],
                                              len(kw.get("conditioning_frames") or ())))
        return call

    monkeypatch.setattr(pipelines, "sample_video", fake_sample)
    monkeypatch.setattr(AnimateDiffPipeline, "__call__", fake_pipe("plain"))
    monkeypatch.setattr(AnimateDiffControlNetPipeline, "__call__", fake_pipe("controlnet"))
    args = SimpleNamespace(frames=2, size=32, steps=3, cfg=5.0, seed=4)
    runs = bench_gen1.build(args)
    for run in runs.values():
        run(lambda: None)
    assert dict(zip([name for impl, name in runs if impl == "Kinema"], seen["kinema"])) == {
        "plain": (1.0, 0, 0, 5.0, 4, 3), "temporal guidance (w_t 1.5)": (1.5, 0, 0, 5.0, 4, 3),
        "ControlNet": (1.0, 1, 0, 5.0, 4, 3), "ControlNet + temporal guidance": (1.5, 1, 0, 5.0, 4, 3),
        "IP-Adapter": (1.0, 0, 1, 5.0, 4, 3), "ControlNet + IP-Adapter + temporal guidance": (1.5, 1, 1, 5.0, 4, 3)}
    assert seen["plain"] == [(5.0, 3, 0)] and seen["controlnet"] == [(5.0, 3, 2)]

    clock = [0.0]
    step_times = {"Kinema": [9.0, 1.0, 2.0], "diffusers": [9.0, 4.0, 4.0]}  # medians after the warm-up: 1.5, 4

    def fake_build(args):
        def run(impl):
            def go(on_step):
                for dt in step_times[impl]:
                    clock[0] += dt
                    on_step()
            return go
        return {(impl, name): run(impl) for impl, name in [("Kinema", "plain"), ("Kinema", "ControlNet"),
                                                             ("diffusers", "plain"), ("diffusers", "ControlNet")]}

    monkeypatch.setattr(bench_gen1, "build", fake_build)
    monkeypatch.setattr(bench_gen1.time, "perf_counter", lambda: clock[0])
    before = torch.get_num_threads()
    try:
        assert bench_gen1.main(["--repeat", "1", "--threads", str(before)]) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| Kinema | plain | 1.500 | 1.00 |" in out and "| diffusers | ControlNet | 4.000 | 1.00 |" in out
    assert "Kinema / diffusers, step time: plain 0.38, ControlNet 0.38." in out


@pytest.mark.parametrize("low_mem", [False, True])
@pytest.mark.parametrize("model", ["animatediff", "svd"])
def test_profile_step_times_kinema_and_diffusers_on_the_same_call(monkeypatch, model, low_mem):
    """The two profiled calls compute the same thing (same weights, inputs, timestep, context): Kinema's noise
    prediction equals diffusers' in fp32; with --low-mem too, Kinema's attention then in chunks (its two calls,
    cond and uncond) and diffusers' feed-forward chunking on."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    import profile_step
    from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel
    from kinema.models import layers, motion

    chunks, chunking = [], []

    def spy_attention(q, k, v, heads, chunk=0):
        chunks.append(chunk)
        return attention(q, k, v, heads, chunk)

    attention = layers.attention
    monkeypatch.setattr(layers, "attention", spy_attention)
    monkeypatch.setattr(motion, "attention", spy_attention)
    def spy_chunking(enable):
        def spy(self, *a, **kw):
            chunking.append(type(self).__name__)
            return enable(self, *a, **kw)
        return spy

    for cls in (UNetMotionModel, UNetSpatioTemporalConditionModel):
        monkeypatch.setattr(cls, "enable_forward_chunking", spy_chunking(cls.enable_forward_chunking))
    args = SimpleNamespace(scale="tiny", frames=2, size=(48, 32), no_diffusers=False, low_mem=low_mem, attn_chunk=8)
    # one fixed draw of the inputs: on about one draw in 40 this random tiny network amplifies fp32 rounding to
    # ~2e-4 in both settings (a throwaway count), and the draw would otherwise depend on the tests run before
    torch.manual_seed(3)
    _, calls, _ = (profile_step.svd_calls if model == "svd" else profile_step.animatediff_calls)(args)
    with torch.no_grad():
        ours, theirs = calls["Kinema"](), calls["diffusers"]()
    theirs = theirs.flatten(0, 1) if model == "svd" else theirs.transpose(1, 2).flatten(0, 1)
    assert ours.shape == theirs.shape and ours.shape[-2:] == (4, 6)  # --size W x H: latent H/8 x W/8
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the spatial attention gets the query chunk (the temporal one is split by positions, its 2 frames unchunked)
    assert chunks and set(chunks) == ({0, 8} if low_mem else {0})
    diffusers_unet = "UNetSpatioTemporalConditionModel" if model == "svd" else "UNetMotionModel"
    assert chunking == ([diffusers_unet] if low_mem else [])


def test_profile_step_ratio_column_is_kinema_over_diffusers(monkeypatch, capsys):
    pytest.importorskip("diffusers", exc_type=ImportError)
    import profile_step

    rounds = {"Kinema": [3.0, 2.0, 6.0], "diffusers": [4.0, 8.0, 5.0]}
    monkeypatch.setattr(profile_step, "timings", lambda calls, repeat: {n: rounds[n] for n in calls})
    before = torch.get_num_threads()
    try:
        profile_step.main(["--model", "animatediff", "--scale", "tiny", "--frames", "2", "--size", "32", "--repeat",
                           "3", "--threads", "1", "--timing-only"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "| one call (s) | 2.000 | 4.000 | 0.50 |" in out  # the fastest of each
    assert "| one call, median (s) | 3.000 | 5.000 | 0.60 |" in out
    assert "Kinema, seconds a call, round by round: 3.000, 2.000, 6.000" in out
    # each round's pair: 0.75, 0.25, 1.20 -> median 0.75 (not the ratio of the medians, 0.60)
    assert "Kinema / diffusers, round by round: 0.75, 0.25, 1.20; median 0.75" in out
    assert "GFLOP" not in out and "self CPU time" not in out and "channels_last" not in out  # --timing-only


@pytest.mark.parametrize("text, size", [("128", (128, 128)), ("1024x576", (1024, 576)), ("64X32", (64, 32))])
def test_profile_step_size_is_square_or_width_by_height(text, size):
    import profile_step

    assert profile_step.build_parser().parse_args(["--size", text]).size == size


@pytest.mark.parametrize("text", ["100", "0", "1024x", "x576", "64x32x8", "big", "-8"])
def test_profile_step_rejects_sizes_that_are_not_multiples_of_8(text, capsys):
    import profile_step

    with pytest.raises(SystemExit):
        profile_step.build_parser().parse_args(["--size", text])
    assert "multiples of 8" in capsys.readouterr().err


def test_bench_gpu_policies_give_the_engine_their_offload_options():
    args = bench_gpu.build_parser().parse_args(["--device", "cpu", "--resident", "3", "--attn-chunk", "16"])
    opts = {p: bench_gpu.policy_options(p, args, torch.device("cpu")) for p in bench_gpu.POLICIES}
    assert {p: o.mode for p, o in opts.items()} == {"none": "none", "compiled": "none", "model": "model",
                                                    "block": "block", "block-chunk": "block",
                                                    "block-compiled": "block"}
    assert {p: o.attn_chunk for p, o in opts.items()} == {p: 16 if p == "block-chunk" else 0 for p in opts}
    assert {(o.device, o.storage, o.resident) for o in opts.values()} == {("cpu", "cpu", 3)}


@pytest.mark.parametrize("model", ["animatediff", "svd"])
def test_bench_gpu_kinema_and_diffusers_make_the_same_latents_in_fp32(model, capsys, monkeypatch):
    """On the CPU in fp32 every row's latents match diffusers plain's (the same video: seeds, noise, cfg,
    schedule and conditioning alike on both sides); block-chunk decodes in Kinema's tiles, diffusers chunked with
    its feed-forward chunking and (AnimateDiff) the same tiles, LOW_DECODE_CHUNK frames a call."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers import AnimateDiffPipeline, StableVideoDiffusionPipeline
    from kinema.models import vae

    decodes = []
    decode = vae.decode_frames

    def spy_decode(model_, latent, chunk=None, tiles=None, **kw):
        decodes.append(("Kinema", tiles))
        return decode(model_, latent, chunk=chunk, tiles=tiles, **kw)

    pipe_cls = AnimateDiffPipeline if model == "animatediff" else StableVideoDiffusionPipeline
    d_decode = pipe_cls.decode_latents

    def spy_d_decode(self, latents, *a, **kw):
        chunking = {getattr(m, "_chunk_size", None) for m in self.unet.modules() if hasattr(m, "_chunk_size")}
        tiling = (getattr(self.vae, "use_tiling", None), getattr(self.vae, "tile_sample_min_size", None),
                  getattr(self.vae, "tile_overlap_factor", None))
        decodes.append(("diffusers", chunking, tiling, a, kw))
        return d_decode(self, latents, *a, **kw)

    monkeypatch.setattr(vae, "decode_frames", spy_decode)
    monkeypatch.setattr(pipe_cls, "decode_latents", spy_d_decode)
    argv = ["--device", "cpu", "--scale", "tiny", "--models", model, "--policies", "none", "block-chunk",
            "--diffusers", "plain", "chunked", "--frames", "2", "--steps", "4", "--dtype", "fp32", "--tile", "32",
            "--tile-overlap", "8"]
    assert bench_gpu.main(argv) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[-2].strip() for line in out.splitlines()
            if line.startswith(("| Kinema |", "| diffusers |"))}
    assert set(rows) == {("Kinema", "none"), ("Kinema", "block-chunk"), ("diffusers", "plain"),
                         ("diffusers", "chunked")}
    # 4 steps: AnimateDiff's schedules are the same only where steps - 1 divides 999 (bench/README.md); with 2, SVD's
    # Euler step from sigma 700 to 0.002 cancels two float32 terms of ~700 (ulp 6e-5), and the two implementations'
    # roundings of it leave their latents 2.5e-4 apart (the image conditioning agrees to 3e-7)
    assert all(float(v) < 1e-4 for v in rows.values()), rows
    from kinema.models.tiling import TileOptions

    kinema = [d[1] for d in decodes if d[0] == "Kinema"]
    assert kinema[-2:] == [TileOptions(), TileOptions(4, 1)]  # the none row's decode, then block-chunk's in tiles
    plain, chunked = [d for d in decodes if d[0] == "diffusers"][-2:]
    assert plain[1] <= {None} and chunked[1] == {1}  # feed-forward chunks of 1 (enable_forward_chunking's default)
    if model == "animatediff":
        assert plain[2][0] is False and chunked[2] == (True, 32, 0.25)
        assert chunked[3] == (bench_gpu.LOW_DECODE_CHUNK,)
    else:
        assert chunked[4] == {"decode_chunk_size": bench_gpu.LOW_DECODE_CHUNK}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_release_heap_hands_freed_heap_back_before_a_peak_is_measured():
    """Memory a phase freed (small blocks, below glibc's mmap threshold) stays in RSS behind a block still alive
    until ``release_heap`` trims the heap: a peak measured without it counts the freed memory."""
    from _measure import release_heap, rss_kib

    blocks = [torch.ones(16384) for _ in range(1024)]  # 64 MiB in 64 KiB blocks on the C heap
    kept = blocks[-1]
    del blocks
    release_heap()  # the first call may also trim what earlier tests left
    blocks = [torch.ones(16384) for _ in range(1024)]
    kept = blocks[-1]
    del blocks
    before = rss_kib("VmRSS")
    release_heap()
    assert before - rss_kib("VmRSS") > 32 * 1024 and float(kept.sum()) == 16384


def test_bench_gpu_budget_counts_from_the_device_commands_start(monkeypatch):
    """gpu_run.sh exports its start: the wheels and the tests before the bench use up the budget too."""
    import time

    monkeypatch.delenv("KINEMA_BENCH_STARTED", raising=False)
    assert bench_gpu.budget_deadline(None, 50.0) is None and bench_gpu.budget_deadline(480, 50.0) == 530.0
    monkeypatch.setenv("KINEMA_BENCH_STARTED", str(time.time() - 100))
    assert bench_gpu.budget_deadline(480, 50.0) == pytest.approx(430.0, abs=2)
    monkeypatch.setenv("KINEMA_BENCH_STARTED", "soon")
    with pytest.raises(ValueError, match="date \\+%s"):
        bench_gpu.budget_deadline(480, 50.0)


def test_bench_gpu_judges_the_first_run_by_the_warm_up_and_keeps_kinema_when_diffusers_fails(monkeypatch):
    """A workload's first run is judged by its one-step warm-up (10 s here), not as free: after the warm-up, at 10 s
    of 15, neither diffusers' pipeline (twice the warm-up) nor a run is started. A diffusers pipeline that fails to
    build is a failed row; Kinema's runs are still made."""
    ran, skipped, _ = _budgeted_bench(monkeypatch, ["--policies", "none", "model"], deadline=15.0)
    assert ran == [] and list(skipped) == [("diffusers", "-"), ("Kinema", "none"), ("Kinema", "model")]

    def broken(*a):
        raise RuntimeError("no such converter")

    monkeypatch.setattr(bench_gpu, "_diffusers_pipeline", broken)
    ran, skipped, out = _budgeted_bench(monkeypatch, ["--policies", "none"], deadline=35.0, runs=True)
    assert [(r.impl, r.config, r.note) for r in out if r.note.startswith("failed")] == \
        [("diffusers", "-", "failed: building its pipeline: RuntimeError: no such converter")]
    assert [(r.impl, r.config) for r in out if not r.note] == [("Kinema", "none")]


def test_bench_gpu_a_failing_workload_keeps_the_others_and_sequential_offload_runs_last(monkeypatch, tmp_path):
    """A workload that fails outside its runs (building its weights) is reported as not run, failed; the next one
    still runs and the report is written; diffusers' sequential offload is moved last whatever the order given."""
    seen = {}

    def build_svd(*a):
        raise RuntimeError("boom")

    def bench_workload(w, args, *a, **k):
        seen["diffusers"] = list(args.diffusers)
        return {"workload": w, "runs": [], "flops": {}, "profile": {}, "setup_s": 1.0}

    monkeypatch.setattr(bench_gpu, "build_svd", build_svd)
    monkeypatch.setattr(bench_gpu, "build_animatediff", lambda *a: SimpleNamespace(state_dicts={}))
    monkeypatch.setattr(bench_gpu, "bench_workload", bench_workload)
    monkeypatch.setattr(bench_gpu, "workload_report", lambda res, args, meter: ["the animatediff section"])
    report = tmp_path / "report.md"
    rc = bench_gpu.main(["--device", "cpu", "--scale", "tiny", "--models", "svd", "animatediff", "--policies", "none",
                         "--diffusers", "sequential-offload", "plain", "--output", str(report)])
    text = report.read_text()
    assert rc == 1 and "the animatediff section" in text and "Not run: svd (failed: RuntimeError: boom)." in text
    assert seen["diffusers"] == ["plain", "sequential-offload"] and "In progress" not in text


@pytest.mark.parametrize("grown_mib,flat", [(30, True), (40, True), (120, False)])
def test_bench_context_judges_what_sampling_itself_grew(monkeypatch, grown_mib, flat):
    """The whole process's peak (libraries and weights) hides a sampling part that grows: a 64-frame run whose
    sampling grew 120 MiB against 30 MiB at 16 frames is not flat, though its whole peak is only 1.2x."""
    import json

    import bench_context

    def child(cmd, threads, what):
        frames = int(cmd[cmd.index("--child-frames") + 1])
        grown = 30 if frames == 16 else grown_mib
        with open(cmd[cmd.index("--result") + 1], "w") as f:
            json.dump({"frames": frames, "windows": frames // 4, "total": frames / 8.0, "peak_rss_kib": 600 << 10,
                       "rss_before_sampling_kib": 450 << 10, "sampling_peak_rss_kib": (450 + grown) << 10,
                       "threads": 1}, f)

    monkeypatch.setattr(bench_context, "run_child", child)
    res = bench_context.collect(bench_context.parse_args(["--frames", "16", "64"]))
    assert res["flat"] is flat and res["peak_ratio"] == pytest.approx((450 + grown_mib) / 480)
    assert f"sampling itself grew the RSS by {grown_mib} MiB against 30 MiB" in "\n".join(
        bench_context.report(bench_context.parse_args(["--frames", "16", "64"]), [], res))
