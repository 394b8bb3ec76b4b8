"""What the benchmarks share: loading the pack from the checkout, and reading memory and machine facts."""
from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def register_pack() -> None:
    """Load the repository root as the package ``kinema`` (as tests/conftest.py does) and reach tests/fixtures.py."""
    if "kinema" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "kinema", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
        )
        sys.modules["kinema"] = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "tests"))


def rss_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in KiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_peak_before_reset_kib = 0


def release_heap() -> None:
    """Collect garbage and hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``), so that the
    RSS measured next is what is alive and not what an earlier phase freed and the heap kept: building a model with
    random initialisation several times over (the diffusers fixtures do) left up to 2.5 GiB of freed heap in RSS.
    Elsewhere than glibc, garbage collection only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_peak_rss_kib() -> int:
    """The process's peak RSS so far in KiB (imports, weights, everything), resets of the peak mark included:
    ``reset_peak_rss`` also resets ``ru_maxrss``, so the peak before each reset is kept here."""
    import resource

    return max(_peak_before_reset_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so VmHWM then measures what follows alone. The mark is
    ``ru_maxrss``'s too: ``process_peak_rss_kib`` gives the whole process's peak."""
    global _peak_before_reset_kib
    _peak_before_reset_kib = process_peak_rss_kib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(kib) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def thread_env(threads: int) -> dict:
    """The environment of a child that should use ``threads`` CPU threads."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


class BenchError(RuntimeError):
    """A benchmark's child process failed; the message holds its output."""


def run_child(cmd: list[str], threads: int, what: str) -> None:
    """Run one measuring child (``threads`` CPU threads) in the repository root; raise BenchError if it fails."""
    print(f"running {what} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False, env=thread_env(threads), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def check_at_least(parser, args, minimum, *names: str) -> None:
    """``parser.error`` naming the first option of ``names`` (attribute names) set below ``minimum``; options left
    unset (None: the script's default) pass."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v < minimum:
                parser.error(f"--{name.replace('_', '-')} must be at least {minimum:g}, not {v:g}")


def run_bench(args, argv: list[str], is_child: bool, run_child, collect, report, status=None) -> int:
    """The command of a bench whose implementations run in child processes: in a child (``is_child``), run it
    (``run_child(args)``, which writes its result file); in the parent, ``collect(args)`` the children's results and
    print ``report(args, argv, results)``. Exit status: 1 after a ``BenchError`` (printed), else
    ``status(results)`` (0 by default)."""
    if is_child:
        run_child(args)
        return 0
    try:
        res = collect(args)
    except BenchError as e:
        print(e, file=sys.stderr)
        return 1
    print("\n".join(report(args, argv, res)))
    return status(res) if status else 0


def median_after_warmup(steps: list[float]) -> float | None:
    """The median of the step times after the first (warm-up) one; None without steps."""
    if not steps:
        return None
    return statistics.median(steps[1:] if len(steps) > 1 else steps)


def command_line(script: str, argv: list[str]) -> str:
    """How the benchmark was run, as a shell command from the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in [script, *argv])


#: why Kinema's and diffusers' AnimateDiff latents differ slightly at a step count where ``integer_schedule`` is False
SCHEDULE_NOTE = ("with this step count the schedules differ slightly: ComfyUI's normal schedule rounds the timestep "
                 "given to the UNet and interpolates log sigma, diffusers' linspace spacing gives fractional "
                 "timesteps and interpolates sigma; steps with (steps - 1) dividing 999, e.g. 4 or 10, give identical "
                 "schedules")


def integer_schedule(steps: int) -> bool:
    """ComfyUI's normal schedule and diffusers' linspace spacing give the same timesteps (``steps - 1`` divides
    999)."""
    return steps == 1 or 999 % (steps - 1) == 0


#: why Kinema's and diffusers' SVD latents differ by more than usual when ``edm_leap`` gives a sigma
EDM_LEAP_NOTE = ("with this step count the first Euler step goes from sigma 700 to {to:g} at once: x + dt (x - "
                 "denoised) / sigma, with x a few times 700, leaves float32 rounding of about 1e-4 (absolute) in "
                 "either result, and the difference between them is that rounding, not a different computation "
                 "(8.7e-4 at the real SVD-XT sizes with 2 steps, 1.7e-5 with 3; README, Performance)")


def edm_leap(steps: int) -> float | None:
    """The sigma on which the first step of SVD's karras schedule (EDM, sigma 700 to 0.002) lands when it comes
    down to under 1/1000 of sigma_max at once (1 or 2 steps), else None."""
    register_pack()
    from kinema.models.sampling import ContinuousEDMSchedule, calculate_sigmas

    sigmas = calculate_sigmas(ContinuousEDMSchedule(), "karras", steps)
    return float(sigmas[1]) if sigmas[1] < 1e-3 * sigmas[0] else None
