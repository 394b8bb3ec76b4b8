"""The benchmark scripts (bench/): their plans parse, and the GPU bench's CPU smoke mode runs."""
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_all
import bench_gpu


@pytest.mark.parametrize("plan", sorted(bench_all.PLANS))
def test_bench_all_plans_are_valid_options_of_each_bench(plan):
    assert set(bench_all.PLANS[plan]) == set(bench_all.SECTIONS)
    for section, argv in bench_all.PLANS[plan].items():
        args = bench_all.MODULES[bench_all._module(section)].parse_args([*argv, "--threads", "1"])
        if section.startswith(("animatediff", "svd")):
            assert args.scale == section.split("-")[1]


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


def test_bench_gpu_cpu_smoke_svd(capsys):
    argv = ["--device", "cpu", "--scale", "tiny", "--models", "svd", "--policies", "none", "block-chunk",
            "--diffusers", "plain", "--frames", "2", "--steps", "2"]  # no --threads: it would change the session's
    assert bench_gpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "| Kinema | none |" in out and "| Kinema | block-chunk |" in out and "| diffusers | plain |" in out
    assert "failed" not in out


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_everything(capsys):
    assert bench_gpu.main(["--device", "cpu", "--scale", "tiny", "--steps", "2", "--frames", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("| Kinema | model |", "| Kinema | block |", "| diffusers | chunked |", "skipped: needs a CUDA"):
        assert row in out
