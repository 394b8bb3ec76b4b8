"""Schedules, samplers and noise: definitions checked against independent computations."""
import math

import pytest
import torch

from kinema.models import sampling
from kinema.models.errors import KinemaError


def test_linear_beta_schedule_is_animatediffs():
    s = sampling.DiscreteSchedule("linear")
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-6)
    sd = sampling.DiscreteSchedule("scaled_linear")
    # AnimateDiff's linear betas end far noisier than SD's scaled-linear ones
    assert math.isclose(float(sd.sigma_max), 14.6146, rel_tol=1e-4)
    assert math.isclose(float(s.sigma_max), 25.1461, rel_tol=1e-4)


def test_sqrt_linear_is_refused_with_the_mapping_of_names():
    # LDM / ComfyUI's "sqrt_linear" is AnimateDiff's linear betas: a guess either way would be wrong for someone
    with pytest.raises(KinemaError, match="'linear'.*'scaled_linear'"):
        sampling.DiscreteSchedule("sqrt_linear")


@pytest.mark.parametrize("schedule, steps, step, expected", [
    ("scaled_linear", 25, 4, 833),  # sigma 5.948899, halfway between two levels in float32
    ("linear", 19, 5, 722),  # sigma 5.766581
])
def test_timestep_between_two_levels_is_comfyuis(schedule, steps, step, expected):
    """The UNet timestep of a sigma that falls halfway between two table levels is ComfyUI's (its log sigma table
    is the float64 log cast to float32; a float32 log picks the other neighbour). Expected values from
    ComfyUI's ModelSamplingDiscrete (0.3.64) with the same betas."""
    s = sampling.DiscreteSchedule(schedule)
    sigma = sampling.normal_scheduler(s, steps)[step]
    assert int(s.timestep(sigma)) == expected


def test_timestep_and_sigma_are_inverse_on_the_grid():
    s = sampling.DiscreteSchedule("linear")
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    assert torch.equal(s.timestep(s.sigma(t)), t)
    # fractional timesteps interpolate log sigma
    mid = s.sigma(torch.tensor(10.5))
    assert math.isclose(float(mid.log()), float((s.log_sigmas[10] + s.log_sigmas[11]) / 2), rel_tol=1e-6)


def test_normal_scheduler_integer_timesteps():
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.normal_scheduler(s, 10)
    assert len(sig) == 11 and sig[-1] == 0
    expected = [float(s.sigmas[t]) for t in range(999, -1, -111)]
    assert torch.allclose(sig[:-1], torch.tensor(expected), rtol=1e-6)


def test_karras_matches_formula():
    sig = sampling.karras_sigmas(5, 0.03, 14.6, rho=7)
    ramp = [i / 4 for i in range(5)]
    want = [(14.6 ** (1 / 7) + r * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for r in ramp] + [0.0]
    assert torch.allclose(sig, torch.tensor(want), rtol=1e-5)


def test_sgm_uniform_exponential_and_ddim_uniform_are_comfyuis():
    """Each schedule as ComfyUI computes it (comfy/samplers.py, k-diffusion's get_sigmas_exponential), written
    out here from their definitions."""
    s = sampling.DiscreteSchedule("linear")
    start, end = float(s.timestep(s.sigma_max)), float(s.timestep(s.sigma_min))
    # sgm_uniform: steps + 1 evenly spaced timesteps from sigma_max's to sigma_min's, the last left out
    ts = [start + (end - start) * i / 4 for i in range(4)]
    want = [float(s.sigma(torch.tensor(t))) for t in ts] + [0.0]
    got = sampling.calculate_sigmas(s, "sgm_uniform", 4)
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5) and float(got[0]) == pytest.approx(float(s.sigma_max))
    # exponential: evenly spaced in log sigma from sigma_max to sigma_min, both included
    lo, hi = math.log(float(s.sigma_min)), math.log(float(s.sigma_max))
    want = [math.exp(hi + (lo - hi) * i / 4) for i in range(5)] + [0.0]
    assert torch.allclose(sampling.calculate_sigmas(s, "exponential", 5), torch.tensor(want), rtol=1e-5)
    # ddim_uniform: the table's sigmas from index 1 on, every 1000 // steps, highest first
    got = sampling.calculate_sigmas(s, "ddim_uniform", 8)
    want = [float(s.sigmas[i]) for i in range(1, 1000, 125)][::-1] + [0.0]
    assert torch.equal(got, torch.tensor(want, dtype=torch.float32)) and float(got[0]) == float(s.sigmas[876])


def test_a_partial_denoise_takes_the_tail_of_int_steps_over_denoise():
    """ComfyUI builds int(steps / denoise) steps and keeps the last steps + 1 sigmas: 10 at 0.6 -> 16, not 17."""
    s = sampling.DiscreteSchedule("linear")
    assert torch.equal(sampling.calculate_sigmas(s, "normal", 10, denoise=0.6),
                       sampling.normal_scheduler(s, 16)[-11:])
    assert not torch.equal(sampling.normal_scheduler(s, 16)[-11:], sampling.normal_scheduler(s, 17)[-11:])


@pytest.mark.parametrize("name", list(sampling.SCHEDULERS))
def test_every_scheduler_decreases_to_zero(name):
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, name, 12)
    # ddim_uniform keeps ComfyUI's quirk: a stride of 1000 // steps can give one step more
    assert len(sig) == (14 if name == "ddim_uniform" else 13) and sig[-1] == 0
    assert torch.all(sig[:-1] > 0) and torch.all(sig[1:] <= sig[:-1])


@pytest.mark.parametrize("name", list(sampling.SCHEDULERS))
@pytest.mark.parametrize("schedule", [sampling.DiscreteSchedule("linear"), sampling.ContinuousEDMSchedule()],
                         ids=["ddpm", "edm"])
def test_denoise_keeps_the_tail_of_a_longer_schedule(name, schedule):
    """Bit for bit the last sigmas of the whole longer schedule, though only those are computed."""
    for steps, denoise, total in [(10, 0.5, 20), (7, 0.3, 23), (3, 0.01, 300), (200, 0.1, 2000), (1000, 0.5, 2000)]:
        full = sampling.SCHEDULERS[name](schedule, total)
        part = sampling.calculate_sigmas(schedule, name, steps, denoise=denoise)
        assert torch.equal(part, full[-(steps + 1):]), (steps, denoise)
    assert len(sampling.calculate_sigmas(schedule, name, 10, denoise=0.0)) == 1


def test_a_short_denoise_of_a_very_long_schedule():
    """steps 200 at denoise 0.01 (a 20000-step schedule, as ComfyUI builds it) samples 200 distinct sigmas at
    the schedules whose tails differ, quickly; a denoise above 0.9999 is the whole schedule, as ComfyUI's."""
    s = sampling.DiscreteSchedule("linear")
    for name in ("karras", "exponential", "normal", "sgm_uniform"):
        sig = sampling.calculate_sigmas(s, name, 200, denoise=0.01)
        assert len(sig) == 201 and len(torch.unique(sig)) == 201
    karras = sampling.calculate_sigmas(s, "karras", 200, denoise=0.01)
    assert torch.equal(karras, sampling.karras_scheduler(s, 20000)[-201:])
    assert torch.equal(sampling.calculate_sigmas(s, "ddim_uniform", 7, denoise=0.99995),
                       sampling.calculate_sigmas(s, "ddim_uniform", 7))


@pytest.mark.parametrize("denoise", [1e-7, 5e-324, 1e-300])
def test_a_denoise_past_the_longest_schedule_is_refused(denoise):
    with pytest.raises(KinemaError, match="raise denoise to at least 5e-06") as e:
        sampling.calculate_sigmas(sampling.DiscreteSchedule(), "normal", 5, denoise=denoise)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("bad", [{"scheduler": "nope"}, {"steps": 0}, {"denoise": 1.5}, {"denoise": 1e-7},
                                 {"denoise": float("nan")}])
def test_bad_schedule_arguments(bad):
    args = dict(scheduler="normal", steps=5, denoise=1.0) | bad
    with pytest.raises(KinemaError):
        sampling.calculate_sigmas(sampling.DiscreteSchedule(), **args)
    with pytest.raises(KinemaError):
        sampling.get_sampler("heun++")


def test_initial_noise_is_comfyui_ksampler_noise():
    torch.manual_seed(1234)
    want = torch.randn((16, 4, 8, 8), dtype=torch.float32, device="cpu")
    assert torch.equal(sampling.initial_noise(1234, (16, 4, 8, 8)), want)


@pytest.mark.parametrize("index", [[0, 1, 2], [4, 2, 2], [7], [3, 4, 5, 6]])
def test_initial_noise_of_a_batch_index_is_comfyuis(index):
    """``comfy.sample.prepare_noise`` with a latent's batch_index: one frame's noise drawn at a time (a frame of 36
    numbers: not the same numbers as one draw of the whole), each frame given its index's."""
    gen = torch.manual_seed(99)
    frames = [torch.randn((1, 4, 3, 3), generator=gen) for _ in range(max(index) + 1)]
    want = torch.cat([frames[i] for i in index])
    assert torch.equal(sampling.initial_noise(99, (len(index), 4, 3, 3), index), want)
    assert not torch.equal(sampling.initial_noise(99, (3, 4, 3, 3), [0, 1, 2]), sampling.initial_noise(99, (3, 4, 3, 3)))


def _gaussian_denoiser(mu: float, var: float):
    """Exact x0 for data ~ N(mu, var): the samplers must land on the data distribution."""

    def denoise(x, sigma):
        s2 = float(sigma) ** 2
        return mu + (x - mu) * var / (var + s2)

    return denoise


def _gaussian_consistency(mu, var):
    """The consistency function of N(mu, var) data: the end of the probability-flow ODE from x at sigma, which
    maps N(mu, var + sigma^2) onto N(mu, var)."""
    def denoise(x, sigma):
        return mu + (x - mu) * (var / (var + float(sigma) ** 2)) ** 0.5

    return denoise


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_samplers_solve_a_gaussian(name):
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, "karras", 30)
    noise = sampling.initial_noise(0, (20000,))
    x = noise * float(sig[0])
    # lcm is for consistency models: they predict where the probability-flow ODE ends, not the posterior mean
    denoiser = _gaussian_consistency(2.0, 0.25) if name == "lcm" else _gaussian_denoiser(2.0, 0.25)
    out = sampling.get_sampler(name)(denoiser, x, sig, seed=3)
    # deterministic samplers map N(0, sigma^2 + var) onto N(mu, var); ancestral ones (and lcm) sample it
    assert abs(float(out.mean()) - 2.0) < 0.05
    assert abs(float(out.std()) - 0.5) < 0.05 + (0.03 if name in ("euler_ancestral", "lcm") else 0.0) + 0.5 / float(sig[0])


def test_ddim_equals_euler_in_sigma_space():
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, "ddim_uniform", 8)
    x = sampling.initial_noise(5, (64,)) * float(sig[0])
    den = _gaussian_denoiser(0.3, 0.5)
    assert torch.allclose(sampling.sample_ddim(den, x, sig), sampling.sample_euler(den, x, sig), atol=1e-5)


def _dpmpp_2m_as_in_the_paper(denoiser, x, sigmas):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 ("DPM-Solver++"), written out for x = data + sigma * noise
    (alpha = 1, lambda = -log sigma), with the first step (no earlier prediction) and the step to sigma 0 (where
    lambda is infinite) first order, as k-diffusion and ComfyUI run it."""
    lam = [-math.log(float(s)) if float(s) > 0 else math.inf for s in sigmas]
    previous = None
    for i in range(1, len(sigmas)):
        x0 = denoiser(x, sigmas[i - 1])
        if float(sigmas[i]) == 0:
            x = x0
        else:
            h = lam[i] - lam[i - 1]
            d = x0
            if previous is not None:
                r = (lam[i - 1] - lam[i - 2]) / h  # the last step's length over this one's
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
            x = float(sigmas[i] / sigmas[i - 1]) * x - math.expm1(-h) * d
        previous = x0
    return x


@pytest.mark.parametrize("scheduler", ["karras", "exponential", "normal"])
def test_dpmpp_2m_is_the_papers_multistep_update(scheduler):
    """Unequal steps (karras) make the step ratio matter: the Gaussian test's mean and spread cannot see it."""
    sig = sampling.calculate_sigmas(sampling.DiscreteSchedule("linear"), scheduler, 10)
    x = sampling.initial_noise(0, (64,)) * float(sig[0])
    den = _gaussian_denoiser(0.3, 0.5)
    ours, ref = sampling.sample_dpmpp_2m(den, x, sig), _dpmpp_2m_as_in_the_paper(den, x, sig)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, sampling.sample_euler(den, x, sig), atol=1e-3)  # second order, not Euler's


def test_dpmpp_2m_over_repeated_sigmas_stays_finite():
    """A short denoise of a long ``simple`` schedule gives every sigma twice (as ComfyUI's arithmetic does): the
    2M update's step ratio would be 0 or infinite there, and the video NaN. Zero-length steps change nothing and
    the step after one is first order: with every sigma repeated, each step is first order (Euler's update in
    sigma space), so the result is Euler's on the distinct sigmas."""
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, "simple", 20, denoise=0.01)
    assert len(sig) == 21 and bool((sig[1:-1] == sig[:-2]).any())
    x = sampling.initial_noise(3, (64,)) * float(sig[0])
    out = sampling.sample_dpmpp_2m(_gaussian_denoiser(0.3, 0.5), x, sig)
    assert bool(torch.isfinite(out).all())
    distinct = torch.unique_consecutive(sig)
    first_order = sampling.sample_euler(_gaussian_denoiser(0.3, 0.5), x, distinct)
    assert torch.allclose(out, first_order, atol=1e-5)


@pytest.mark.parametrize("name", ["euler_ancestral", "lcm"])
def test_the_pipeline_gives_its_seed_to_samplers_that_add_noise(name, monkeypatch):
    """Ancestral samplers draw fresh noise each step from the seed (ComfyUI's default noise sampler): the video's
    seed, not a fixed one, so two seeds give two videos past the first step."""
    from fixtures import motion_model

    from kinema.models import pipelines

    seen, real = [], sampling.get_sampler(name)
    def spy(*args, **kwargs):
        seen.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines, "get_sampler", lambda n: spy)
    pos, neg = torch.randn(1, 77, 64), torch.randn(1, 77, 64)
    pipelines.sample_video(motion_model("v2"), pos, neg, torch.zeros(2, 4, 8, 8),
                           pipelines.SampleOptions(seed=1234, steps=2, cfg=1.0, sampler=name))
    assert seen == [1234]


def test_callback_sees_every_step():
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, "normal", 4)
    seen = []
    sampling.sample_dpmpp_2m(_gaussian_denoiser(0, 1), torch.zeros(3), sig, callback=lambda i, n, x0: seen.append((i, n)))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_noise_latent_scaling():
    s = sampling.DiscreteSchedule("linear")
    full = sampling.calculate_sigmas(s, "normal", 5)
    noise = torch.ones(2)
    assert torch.allclose(sampling.noise_latent(torch.zeros(2), noise, full, s),
                          torch.full((2,), math.sqrt(1 + float(full[0]) ** 2)))
    part = sampling.calculate_sigmas(s, "normal", 5, denoise=0.5)
    lat = torch.full((2,), 3.0)
    assert torch.allclose(sampling.noise_latent(lat, noise, part, s), 3.0 + part[0])


def test_noise_latent_scales_pure_noise_only_from_the_schedules_maximum():
    """Just below sigma_max (a denoise near 1) is latent + sigma * noise; at or above it (pure noise) the noise is
    scaled by sqrt(1 + sigma^2) and the latent kept, as ComfyUI's eps models."""
    s = sampling.DiscreteSchedule("linear")
    top = float(s.sigma_max)
    lat, noise = torch.full((2,), 3.0), torch.ones(2)
    below = torch.tensor([0.995 * top, 0.0])
    assert torch.allclose(sampling.noise_latent(lat, noise, below, s), 3.0 + below[0])
    above = torch.tensor([1.5 * top, 0.0])
    assert torch.allclose(sampling.noise_latent(lat, noise, above, s),
                          torch.full((2,), 3.0 + math.sqrt(1 + float(above[0]) ** 2)))


def test_edm_table_is_comfyuis_1000_log_spaced_levels():
    """ModelSamplingContinuousEDM's table: 1000 levels log-linear from sigma_min to sigma_max, which the
    table-indexing schedulers (simple) read, and percent_to_sigma log-linear between the ends."""
    edm = sampling.ContinuousEDMSchedule(0.002, 700.0)
    assert len(edm.sigmas) == 1000
    span = math.log(700.0 / 0.002)

    def level(k):
        return math.exp(math.log(0.002) + k / 999 * span)

    # simple, 4 steps: levels -1, -(1 + 250), -(1 + 500), -(1 + 750) of the table
    want = [level(999), level(749), level(499), level(249), 0.0]
    assert sampling.simple_scheduler(edm, 4).tolist() == pytest.approx(want, rel=2e-5)
    assert edm.percent_to_sigma(0.25) == pytest.approx(math.exp(math.log(0.002) + 0.75 * span), rel=1e-5)
    assert edm.percent_to_sigma(1e-17) == pytest.approx(700.0, rel=1e-5)  # the table's top level, not past it
    assert edm.percent_to_sigma(0.0) == math.inf and edm.percent_to_sigma(1.0) == 0.0  # ComfyUI: above all, 0


def test_an_ancestral_steps_noise_is_capped_at_the_next_sigma():
    """k-diffusion's get_ancestral_step: sigma_up = min(sigma_to, eta * ...); an eta above 1 lands on the noise."""
    down, up = sampling.ancestral_step(torch.tensor(10.0), torch.tensor(1.0), eta=5.0)
    assert float(up) == 1.0 and float(down) == 0.0
    down, up = sampling.ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=1.0)
    assert float(up) == pytest.approx(math.sqrt(0.75)) and float(down) == pytest.approx(0.5)


def test_edm_time_input_is_a_quarter_of_log_sigma():
    """SVD's c_noise = 0.25 ln(sigma) (EDM), and ``sigma`` its inverse."""
    edm = sampling.ContinuousEDMSchedule()
    assert float(edm.timestep(torch.tensor(math.exp(4.0)))) == pytest.approx(1.0, rel=1e-6)
    assert float(edm.timestep(torch.tensor(700.0))) == pytest.approx(0.25 * math.log(700.0), rel=1e-6)
    assert float(edm.sigma(torch.tensor(-0.5))) == pytest.approx(math.exp(-2.0), rel=1e-6)


def test_discrete_percent_to_sigma_is_comfyuis_timestep_percent_of_999():
    """ComfyUI's ModelSamplingDiscrete: ``sigma((1 - percent) * 999)``, log-linear between the two levels."""
    s = sampling.DiscreteSchedule("scaled_linear")
    logs = s.sigmas.double().log()
    assert s.percent_to_sigma(0.5) == pytest.approx(math.exp(float(logs[499] + logs[500]) / 2), rel=1e-5)
    assert s.percent_to_sigma(0.25) == pytest.approx(math.exp(float(0.75 * logs[749] + 0.25 * logs[750])), rel=1e-5)
    assert s.percent_to_sigma(0.0) == math.inf and s.percent_to_sigma(1.0) == 0.0


def test_ancestral_noise_is_comfyuis_default_noise_sampler():
    """k-diffusion's default_noise_sampler (ComfyUI's KSampler): one generator on the latent's device, seeded
    with the sampling seed, drawn in the latent's dtype step after step."""
    x = torch.zeros(2, 4, 8, 8)
    draw = sampling.ancestral_noise_sampler(1234)
    gen = torch.Generator(device=x.device).manual_seed(1234)
    for _ in range(3):
        assert torch.equal(draw(x), torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device))


def test_lcm_noises_each_prediction_to_the_next_sigma_with_comfyuis_ancestral_noise():
    """k-diffusion's ``sample_lcm`` (ComfyUI's ``lcm``): the model sees its last prediction plus fresh noise at the
    next sigma, the noise drawn as ancestral steps draw it; the last step returns the prediction itself."""
    s = sampling.DiscreteSchedule("linear")
    sig = sampling.calculate_sigmas(s, "sgm_uniform", 4)
    seen, preds = [], []

    def denoiser(x, sigma):
        seen.append(x.clone())
        preds.append(torch.tanh(x) * 0.5 + float(sigma) * 1e-3)
        return preds[-1]

    x = sampling.initial_noise(7, (2, 4, 3, 3)) * float(sig[0])
    out = sampling.sample_lcm(denoiser, x, sig, seed=11)
    gen = torch.Generator().manual_seed(11)
    assert len(seen) == 4 and torch.equal(seen[0], x)
    for i in range(1, 4):
        torch.testing.assert_close(seen[i], preds[i - 1] + torch.randn(x.shape, generator=gen) * sig[i])
    assert torch.equal(out, preds[-1])


def test_euler_ancestral_steps_as_comfyuis():
    """k-diffusion's ancestral step in float32 (ComfyUI's ``euler_ancestral``): an Euler step to sigma_down plus
    fresh noise times sigma_up; a step whose sigma_down is 0 lands on the prediction and draws nothing: the last
    one, and SVD's 700 -> 0.1 (sigma_to / sigma_from 1.4e-4 rounds sigma_down to 0 in float32)."""
    def denoiser(x, sigma):
        return torch.tanh(x / (1 + float(sigma))) * 0.7 + 0.05

    x = sampling.initial_noise(3, (2, 4, 3, 3)) * 14.6
    sig = torch.tensor([14.6, 2.0, 0.3, 0.0])
    out = sampling.sample_euler_ancestral(denoiser, x, sig, seed=9)
    gen, want = torch.Generator().manual_seed(9), x
    for i in range(2):
        s, t = sig[i], sig[i + 1]
        up = torch.sqrt(t**2 * (s**2 - t**2) / s**2)
        down = torch.sqrt(t**2 - up**2)
        want = want + (want - denoiser(want, s)) / s * (down - s) + torch.randn(x.shape, generator=gen) * up
    assert torch.equal(out, denoiser(want, sig[2]))  # the last step: the prediction itself

    far = torch.tensor([700.0, 0.1, 0.0])
    x = sampling.initial_noise(3, (2, 4, 3, 3)) * 700.0
    out = sampling.sample_euler_ancestral(denoiser, x, far, seed=9)
    assert torch.equal(out, denoiser(denoiser(x, far[0]), far[1]))


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_callback_is_given_each_steps_prediction(name):
    """The progress callback (the preview) gets step i of n and that step's prediction x0, not the latent."""
    sig = sampling.calculate_sigmas(sampling.DiscreteSchedule("linear"), "karras", 4)
    preds, seen = [], []

    def denoiser(x, sigma):
        preds.append(torch.tanh(x) * 0.5 + float(sigma) * 1e-3)
        return preds[-1]

    x = sampling.initial_noise(2, (2, 3)) * float(sig[0])
    sampling.get_sampler(name)(denoiser, x, sig, callback=lambda i, n, x0: seen.append((i, n, x0)), seed=1)
    assert [(i, n) for i, n, _ in seen] == [(i, 4) for i in range(4)]
    assert all(torch.equal(x0, pred) for (_, _, x0), pred in zip(seen, preds))


def test_karras_scheduler_is_rho_7_between_the_tables_ends():
    """ComfyUI's karras: rho 7 from the model's sigma_max down to its sigma_min."""
    s = sampling.DiscreteSchedule("linear")
    lo, hi = float(s.sigma_min) ** (1 / 7), float(s.sigma_max) ** (1 / 7)
    want = [(hi + i / 5 * (lo - hi)) ** 7 for i in range(6)] + [0.0]
    assert torch.allclose(sampling.calculate_sigmas(s, "karras", 6), torch.tensor(want), rtol=1e-5)


def test_simple_scheduler_of_steps_that_do_not_divide_the_table_is_comfyuis():
    """ComfyUI's simple: a float stride len / steps, each index truncated (12 steps: 1000 / 12 = 83.33 levels)."""
    s = sampling.DiscreteSchedule("linear")
    want = [float(s.sigmas[-(1 + int(i * 1000 / 12))]) for i in range(12)] + [0.0]
    assert sampling.calculate_sigmas(s, "simple", 12).tolist() == want
    assert float(sampling.calculate_sigmas(s, "simple", 12)[3]) == float(s.sigmas[-251])


def test_sigma_at_a_fractional_timestep_is_log_linear_between_the_two_levels():
    """normal and sgm_uniform read sigmas between the table's levels: log-linear, nearer the nearer level."""
    s = sampling.DiscreteSchedule("linear")
    want = math.exp(0.75 * float(s.log_sigmas[10]) + 0.25 * float(s.log_sigmas[11]))
    assert float(s.sigma(torch.tensor(10.25))) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("bad", [[0, 1.5], [0, True], [0, math.inf], [0, -1], [0, sampling.MAX_BATCH_INDEX + 1],
                                 [0], (0, 1, 2), "01"], ids=["fraction", "bool", "inf", "negative", "too large",
                                                            "too few", "too many", "a string"])
def test_a_batch_index_other_than_whole_numbers_one_a_frame_is_refused(bad):
    with pytest.raises(KinemaError, match="batch_index must list 2 whole numbers"):
        sampling.check_batch_index(bad, 2)
    assert sampling.check_batch_index([0, 2.0], 2) == [0, 2]
