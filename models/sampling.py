"""k-diffusion style sampling: schedules return sigma tensors, samplers are pure functions.

A denoiser is ``denoiser(x, sigma) -> x0`` on the sampler's scaled latent.
Schedulers and samplers follow ComfyUI's definitions (which follow k-diffusion),
so the same seed, steps and settings give the same sigmas and noise as
ComfyUI's KSampler.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from .errors import KinemaError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, x0)


# -- the discrete DDPM noise levels of an eps-prediction model ---------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear")


class SigmaTable:
    """A model's noise levels as an increasing table ``sigmas`` (and ``log_sigmas``)."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def percent_to_sigma(self, percent: float) -> float:
        """The noise level at ``percent`` of the way through sampling (0: pure noise, 1: clean), as ComfyUI's
        start/end percents: log-linear in the table, above every level at 0 and 0 at 1."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        pos = (1.0 - float(percent)) * (len(self.log_sigmas) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(self.log_sigmas) - 1)
        w = pos - lo
        return math.exp((1 - w) * float(self.log_sigmas[lo]) + w * float(self.log_sigmas[hi]))


class DiscreteSchedule(SigmaTable):
    """The 1000 noise levels of a DDPM-trained model, as sigmas.

    ``linear`` is AnimateDiff's (betas linear from 0.00085 to 0.012, diffusers' name);
    ``scaled_linear`` is SD1.5's (square roots linear, diffusers' name). The original LDM code and ComfyUI name
    them the other way round: their ``linear`` is SD1.5's and their ``sqrt_linear`` is AnimateDiff's, so
    ``sqrt_linear`` is refused here with that mapping rather than guessed.
    """

    def __init__(self, beta_schedule: str = "linear", linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000):
        if beta_schedule == "linear":
            betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "sqrt_linear":
            raise KinemaError("beta schedule 'sqrt_linear' is ComfyUI's (LDM's) name for AnimateDiff's linear betas, "
                              "which Kinema calls 'linear'; SD1.5's own schedule is 'scaled_linear' here")
        else:
            raise KinemaError(f"unknown beta schedule '{beta_schedule}': use one of {', '.join(BETA_SCHEDULES)}")
        self.beta_schedule = beta_schedule
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        # both from float64 (as ComfyUI's table): a float32 log moves a sigma halfway between two levels to the
        # other neighbour, and the UNet gets another timestep than ComfyUI gives it
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()

    def percent_to_sigma(self, percent: float) -> float:
        """As ComfyUI's discrete models: ``sigma`` (float32, as a step's own sigma) at the timestep ``percent`` of
        the way down the table, so that a step whose sigma falls on the boundary counts as inside (the float64 of
        the table's interpolation put it one rounding step outside at e.g. 25 steps, end 0.5)."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - float(percent)) * (len(self.sigmas) - 1))))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The nearest discrete timestep of each sigma (what the UNet is given)."""
        dists = sigma.float().log().to(self.log_sigmas.device).reshape(-1)[None] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).float()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Log-linear interpolation of sigma at a (fractional) timestep."""
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()


class ContinuousEDMSchedule(SigmaTable):
    """The continuous noise levels of an EDM-trained model (Stable Video Diffusion).

    Sigmas run from ``sigma_min`` to ``sigma_max`` (SVD: 0.002 to 700); the
    network's time input is ``c_noise = 0.25 ln(sigma)``. ``sigmas`` is a table of
    1000 log-spaced levels, as ComfyUI builds for its continuous EDM models, so
    every scheduler (including the table-indexing ``simple``/``ddim_uniform``)
    works on it as on a discrete schedule.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 700.0, table_size: int = 1000):
        if not 0 < sigma_min < sigma_max:
            raise KinemaError(f"an EDM schedule needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), table_size).exp().float()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise: 0.25 ln(sigma)."""
        return 0.25 * torch.as_tensor(sigma, dtype=torch.float32).log()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(t, dtype=torch.float32) / 0.25).exp()


# -- schedulers: (schedule, steps, keep) -> sigmas, ending in 0 -----------------------------------------------------
#
# ``keep``: only the last ``keep`` sigmas of the ``steps``-step schedule (and the 0), what a partial denoise samples
# (None: all). Each kept sigma is computed exactly as in the whole schedule (the same vectorised or one-at-a-time
# arithmetic as ComfyUI's, so the same float32 values), and the one-at-a-time ones only for the kept sigmas: a short
# denoise of a long schedule costs its length in a linspace, not in table lookups.

def _tail(values, keep: int | None):
    """The last ``keep`` of ``values`` (all of them when there are fewer: ddim_uniform's schedule holds at most 999
    sigmas however many steps are asked for)."""
    return values if keep is None else values[max(0, len(values) - keep):]


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def normal_scheduler(s: SigmaTable, steps: int, sgm: bool = False, keep: int | None = None) -> torch.Tensor:
    start, end = float(s.timestep(s.sigma_max)), float(s.timestep(s.sigma_min))
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        ts = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(t)) for t in _tail(ts, keep)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def karras_scheduler(s: DiscreteSchedule, steps: int, keep: int | None = None, rho: float = 7.0) -> torch.Tensor:
    return _with_zero(_tail(karras_sigmas(steps, float(s.sigma_min), float(s.sigma_max), rho)[:-1], keep))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, ending in 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_scheduler(s: DiscreteSchedule, steps: int, keep: int | None = None) -> torch.Tensor:
    sigmas = torch.linspace(math.log(float(s.sigma_max)), math.log(float(s.sigma_min)), steps).exp()
    return _with_zero(_tail(sigmas, keep))


def simple_scheduler(s: DiscreteSchedule, steps: int, keep: int | None = None) -> torch.Tensor:
    stride = len(s.sigmas) / steps
    sigs = [float(s.sigmas[-(1 + int(i * stride))]) for i in _tail(range(steps), keep)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform_scheduler(s: DiscreteSchedule, steps: int, keep: int | None = None) -> torch.Tensor:
    stride = max(len(s.sigmas) // steps, 1)
    sigs = [float(s.sigmas[i]) for i in range(1, len(s.sigmas), stride)][::-1]
    return torch.tensor(_tail(sigs, keep) + [0.0], dtype=torch.float32)


SCHEDULERS = {
    "normal": normal_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "sgm_uniform": lambda s, n, keep=None: normal_scheduler(s, n, sgm=True, keep=keep),
    "simple": simple_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
}


#: the longest schedule ``calculate_sigmas`` takes a partial denoise's last steps from (the node's 1000 steps at
#: its smallest denoise, 0.01, need 100000; a schedule this long costs a 4 MB linspace)
MAX_SCHEDULE_STEPS = 1_000_000
#: a denoise above this samples the whole schedule, as ComfyUI's KSampler (it reads 0.99995 as 1)
FULL_DENOISE = 0.9999


def calculate_sigmas(s: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for ``steps`` steps; ``denoise`` < 1 keeps the last steps of a longer schedule (as ComfyUI)."""
    if scheduler not in SCHEDULERS:
        raise KinemaError(f"unknown scheduler '{scheduler}': use one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise KinemaError("steps must be at least 1")
    if not 0.0 <= denoise <= 1.0:
        raise KinemaError(f"denoise must be between 0 and 1, got {denoise}")
    if denoise <= 0.0:
        return torch.zeros(1)
    if denoise > FULL_DENOISE:
        return SCHEDULERS[scheduler](s, steps)
    total = steps / denoise
    if not total <= MAX_SCHEDULE_STEPS:  # also an infinite one (a denoise of 5e-324)
        raise KinemaError(f"denoise {denoise:g} with {steps} steps takes the last steps of a {total:.3g}-step "
                          f"schedule, past the {MAX_SCHEDULE_STEPS} this computes: raise denoise to at least "
                          f"{steps / MAX_SCHEDULE_STEPS:g} (or lower the steps)")
    total = int(total)
    return SCHEDULERS[scheduler](s, total, keep=min(steps, total))


# -- samplers ---------------------------------------------------------------------------------------------------

def _notify(callback, i, n, x0):
    if callback is not None:
        callback(i, n, x0)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None,
                 **_) -> torch.Tensor:
    """Euler (Karras et al. 2022, Algorithm 2 without churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        d = (x - x0) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        _notify(callback, i, n, x0)
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) for an ancestral step, in the sigmas' precision (float32 tensors, as ComfyUI and
    k-diffusion compute them: a step far down, sigma_to / sigma_from below about 3e-4, rounds sigma_down to 0)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    down = (sigma_to**2 - up**2) ** 0.5
    return down, up


def ancestral_noise_sampler(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fresh noise for ancestral steps, as ComfyUI's KSampler draws it (k-diffusion's ``default_noise_sampler``):
    a generator on the latent's device seeded with the sampling seed, so the same seed gives ComfyUI's video on
    the same device (a CUDA generator's numbers differ from a CPU one's; the initial noise is always drawn on
    the CPU, by both)."""
    gen: torch.Generator | None = None

    def sample(like: torch.Tensor) -> torch.Tensor:
        nonlocal gen
        if gen is None:
            gen = torch.Generator(device=like.device)
            gen.manual_seed(seed)
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)

    return sample


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           callback: StepCallback | None = None, eta: float = 1.0, seed: int = 0, **_) -> torch.Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_to. As ComfyUI's: a step
    whose sigma_down is 0 (the last, to sigma 0, and one so far down that float32 rounds sigma_down to 0) lands
    on the prediction itself and draws no noise."""
    noise = ancestral_noise_sampler(seed)
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x0
        else:
            d = (x - x0) / sigmas[i]
            x = x + d * (down - sigmas[i]) + noise(x) * up
        _notify(callback, i, n, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: StepCallback | None = None, **_) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep."""
    n = len(sigmas) - 1
    old_x0 = None
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        h_last = None if old_x0 is None else t - (-sigmas[i - 1].log())
        # first order at the first and last step, and where a step has no length (a sigma given twice: a short
        # denoise of a long ``simple`` schedule repeats every sigma), whose ratio r would be 0 or infinite
        if old_x0 is None or sigmas[i + 1] == 0 or h == 0 or h_last == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * x0
        else:
            r = h_last / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * x0_d
        old_x0 = x0
        _notify(callback, i, n, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None,
                **_) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): ``x_next = x0 + sigma_next * eps``.

    In the sigma-scaled latent this update is the same arithmetic as an Euler
    step; it is written here in DDIM's form.
    """
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        eps = (x - x0) / sigmas[i]
        x = x0 + sigmas[i + 1] * eps
        _notify(callback, i, n, x0)
    return x


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None,
               seed: int = 0, **_) -> torch.Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023), as ComfyUI's ``lcm``: each step's prediction, noised
    afresh to the next sigma (the noise drawn as an ancestral step's). For consistency-distilled models
    (AnimateLCM, an LCM-LoRA): a handful of steps, cfg about 1 to 2, scheduler ``sgm_uniform``."""
    noise = ancestral_noise_sampler(seed)
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        x = x0 + noise(x0) * sigmas[i + 1] if sigmas[i + 1] > 0 else x0
        _notify(callback, i, n, x0)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "lcm": sample_lcm,
}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise KinemaError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def initial_noise(seed: int, shape: tuple, batch_index: list[int] | None = None) -> torch.Tensor:
    """ComfyUI KSampler's noise (``comfy.sample.prepare_noise``): ``torch.manual_seed(seed)`` then ``randn`` on the
    CPU in the latent's shape. ``batch_index`` (a latent's, as Latent From Batch sets it: each frame's place in the
    batch it was taken from) draws one frame's noise at a time up to the largest index and gives each frame the
    noise of its index, so a part of a video gets the noise it had in the whole."""
    gen = torch.manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")
    index = check_batch_index(batch_index, shape[0])
    wanted = set(index)
    drawn = {}
    for i in range(max(index) + 1):
        noise = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32, device="cpu")
        if i in wanted:
            drawn[i] = noise
    return torch.cat([drawn[i] for i in index])


#: the largest batch index ``initial_noise`` draws up to (a frame's noise each: more is a damaged latent)
MAX_BATCH_INDEX = 100_000


def check_batch_index(batch_index, frames: int) -> list[int]:
    """A latent's ``batch_index`` as a list of ``frames`` whole numbers from 0 up, or KinemaError."""
    listed = isinstance(batch_index, (list, tuple)) and len(batch_index) == frames
    if not listed or not all(isinstance(i, numbers.Real) and not isinstance(i, bool) and math.isfinite(i)
                             and i == int(i) and 0 <= i <= MAX_BATCH_INDEX for i in batch_index):
        raise KinemaError(f"the latent's batch_index must list {frames} whole numbers from 0 to {MAX_BATCH_INDEX}, "
                          f"one a frame (it is {str(batch_index)[:80]}): remove it or make the latent again with "
                          "Latent From Batch")
    return [int(i) for i in batch_index]


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, s: DiscreteSchedule) -> torch.Tensor:
    """The sampler's starting point, scaled like ComfyUI's eps models do.

    From pure noise (first sigma at the schedule's maximum) the noise is scaled
    by sqrt(1 + sigma^2); otherwise ``latent + sigma * noise``.
    """
    sigma = float(sigmas[0])
    sigma_max = float(s.sigma_max)
    if math.isclose(sigma, sigma_max, rel_tol=1e-5) or sigma > sigma_max:
        return noise * math.sqrt(1.0 + sigma**2) + latent
    return noise * sigma + latent
