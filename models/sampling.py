"""k-diffusion style sampling: schedules return sigma tensors, samplers are pure functions.

A denoiser is ``denoiser(x, sigma) -> x0`` on the sampler's scaled latent.
Schedulers and samplers follow ComfyUI's definitions (which follow k-diffusion),
so the same seed, steps and settings give the same sigmas and noise as
ComfyUI's KSampler.
"""
from __future__ import annotations

import math
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


# -- schedulers: (schedule, steps) -> sigmas, ending in 0 -----------------------------------------------------------

def normal_scheduler(s: SigmaTable, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = float(s.timestep(s.sigma_max)), float(s.timestep(s.sigma_min))
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        ts = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(t)) for t in ts]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def karras_scheduler(s: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    return karras_sigmas(steps, float(s.sigma_min), float(s.sigma_max), rho)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, ending in 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def exponential_scheduler(s: DiscreteSchedule, steps: int) -> torch.Tensor:
    sigmas = torch.linspace(math.log(float(s.sigma_max)), math.log(float(s.sigma_min)), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])]).float()


def simple_scheduler(s: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = len(s.sigmas) / steps
    sigs = [float(s.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform_scheduler(s: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = max(len(s.sigmas) // steps, 1)
    sigs = [float(s.sigmas[i]) for i in range(1, len(s.sigmas), stride)][::-1]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


SCHEDULERS = {
    "normal": normal_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "sgm_uniform": lambda s, n: normal_scheduler(s, n, sgm=True),
    "simple": simple_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
}


#: the longest schedule ``calculate_sigmas`` builds for a partial denoise (ten sigmas for each of the 1000 levels
#: of the DDPM table: a longer one only repeats them)
MAX_SCHEDULE_STEPS = 10_000


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
    if denoise < 1.0:
        total = int(steps / denoise)
        if total > MAX_SCHEDULE_STEPS:
            raise KinemaError(f"denoise {denoise:g} with {steps} steps takes the last steps of a {total}-step "
                              f"schedule, past the {MAX_SCHEDULE_STEPS} this computes: raise denoise to at least "
                              f"{steps / MAX_SCHEDULE_STEPS:g} (or lower the steps)")
        return SCHEDULERS[scheduler](s, total)[-(steps + 1):]
    return SCHEDULERS[scheduler](s, steps)


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


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) for an ancestral step."""
    if not eta or not sigma_to:
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
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_to."""
    noise = ancestral_noise_sampler(seed)
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        down, up = ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        d = (x - x0) / sigmas[i]
        x = x + d * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x) * up
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


def initial_noise(seed: int, shape: tuple) -> torch.Tensor:
    """ComfyUI KSampler's noise: ``torch.manual_seed(seed)`` then ``randn`` on the CPU in the latent's shape."""
    gen = torch.manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")


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
