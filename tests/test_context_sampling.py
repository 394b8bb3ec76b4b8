"""Context windows in the sampler: windows reach the model and the conditioning, memory follows the window."""
import pytest
import torch

from conftest import load_pack
from fixtures import motion_model
from kinema.models.context import ContextOptions, context_windows
from kinema.models.errors import KinemaError
from kinema.models.motion import parse_scale, scale_for_frames
from kinema.models.pipelines import SampleOptions, sample_video

HW = 8


class Spy:
    """A video model that records what each call saw: frames, per-frame contexts, window."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, ctx, num_frames, window=None, **kw):
        self.calls.append({"frames": num_frames, "batch": x.shape[0] // num_frames, "ctx": ctx.clone(),
                           "window": window})
        return self.model(x, t, ctx, num_frames, window=window, **kw)


def _conds(frames, tokens=77):
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, tokens, 64, generator=g), torch.randn(1, tokens, 64, generator=g)


def _sample(model, frames, context=None, steps=2, positive=None, **kw):
    pos, neg = _conds(frames)
    opts = SampleOptions(seed=7, steps=steps, cfg=5.0, sampler="euler", scheduler="normal", context=context)
    with torch.no_grad():
        return sample_video(model, pos if positive is None else positive, neg, torch.zeros(frames, 4, HW, HW), opts,
                            **kw)


def test_a_video_that_fits_one_window_is_sampled_as_without_windows():
    model = motion_model("v2")
    plain = _sample(model, 12)
    for schedule in ("uniform_standard", "uniform_looped", "static"):
        windowed = _sample(model, 12, ContextOptions(context_length=16, overlap=4, schedule=schedule,
                                                     freenoise=True))
        assert torch.equal(windowed, plain), schedule


@pytest.mark.parametrize("schedule", ["uniform_standard", "uniform_looped", "static"])
def test_long_video_runs_window_by_window_with_per_frame_conditioning(schedule):
    frames, opts = 20, ContextOptions(context_length=8, overlap=2, schedule=schedule, stride=2)
    spy = Spy(motion_model("v2"))
    positive = torch.randn(frames, 77, 64, generator=torch.Generator().manual_seed(5))  # a prompt per frame
    windows_seen = []
    out = _sample(spy, frames, opts, positive=positive, on_window=lambda: windows_seen.append(1))
    assert out.shape == (frames, 4, HW, HW) and torch.isfinite(out).all()
    expected = [w for step in range(2) for w in context_windows(frames, opts, step, 2)]
    assert len(spy.calls) == len(expected) == len(windows_seen)
    for call, want in zip(spy.calls, expected):
        window = call["window"]
        assert window.sub_idxs == want.sub_idxs and window.full_length == frames and window.context_length == 8
        assert call["frames"] == len(window.sub_idxs) <= 8  # the model never sees more than a window
        assert call["batch"] == 2  # cond and uncond batched
        cond = call["ctx"][call["frames"]:]  # (uncond, cond) batches: the second half is the positive
        assert torch.equal(cond, positive[list(window.sub_idxs)])


def test_windows_change_the_result_and_fuse_every_frame():
    model = motion_model("v2")
    a = _sample(model, 20, ContextOptions(context_length=8, overlap=3, schedule="static", fuse="flat"))
    b = _sample(model, 20, ContextOptions(context_length=8, overlap=3, schedule="static", fuse="pyramid"))
    assert not torch.equal(a, b)  # overlapping frames are blended by the fuse weights
    c = _sample(model, 20, ContextOptions(context_length=8, overlap=3, schedule="static", fuse="pyramid"))
    assert torch.equal(b, c)  # deterministic


def test_freenoise_changes_only_the_noise_of_frames_past_the_first_window():
    model = motion_model("v2")
    opts = ContextOptions(context_length=8, overlap=2, schedule="static")
    plain = _sample(model, 20, opts, steps=1)
    free = _sample(model, 20, ContextOptions(context_length=8, overlap=2, schedule="static", freenoise=True), steps=1)
    assert not torch.equal(plain[8:], free[8:])


def test_context_length_and_frame_limits_are_clear_errors():
    model = motion_model("v1")  # sees at most 24 frames
    with pytest.raises(KinemaError, match="Context Options"):
        _sample(model, 30)
    with pytest.raises(KinemaError, match="context length is 30"):
        _sample(model, 40, ContextOptions(context_length=30, overlap=4))
    with pytest.raises(KinemaError):
        _sample(model, 40, ContextOptions(context_length=8, overlap=8))
    _sample(model, 30, ContextOptions(context_length=16, overlap=4), steps=1)
    # a context length past the module's limit is fine where the video is shorter: its one window is the video
    assert torch.equal(_sample(model, 8, ContextOptions(context_length=30, overlap=4), steps=1),
                       _sample(model, 8, steps=1))


def test_non_finite_cfg_or_latent_is_refused_before_sampling():
    model = motion_model("v2")
    pos, neg = _conds(4)
    for cfg in (float("nan"), float("inf"), "7"):
        with pytest.raises(KinemaError, match="cfg must be a finite number"):
            sample_video(model, pos, neg, torch.zeros(4, 4, HW, HW), SampleOptions(seed=7, steps=1, cfg=cfg))
    latent = torch.zeros(4, 4, HW, HW)
    latent[2, 1, 0, 0] = float("nan")
    with pytest.raises(KinemaError, match="the latent holds NaN or infinite values"):
        sample_video(model, pos, neg, latent, SampleOptions(seed=7, steps=1, cfg=5.0))


def test_per_frame_motion_scale_follows_the_window_frames():
    assert parse_scale("1, 0.5 0.25") == (1.0, 0.5, 0.25) and parse_scale("") == ()
    with pytest.raises(KinemaError, match="'x' is not a number"):
        parse_scale("1.0, x")
    assert scale_for_frames(0.7, range(4)) == 0.7
    assert scale_for_frames((1.0, 0.5), [0, 1, 5]).tolist() == [1.0, 0.5, 0.5]  # the last value holds
    assert scale_for_frames((1.0, 0.5), [0, 1, 2, 4]).tolist() == [1.0, 0.5, 0.5, 0.5]  # held, not cycled
    assert scale_for_frames((0.5, 0.5), range(4)) == 0.5

    model = motion_model("v2")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 4, HW, HW, generator=g), torch.randn(4, 77, 64, generator=g)
    t = torch.full((4,), 300.0)
    scales = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    with torch.no_grad():
        constant = model.with_options(scale=(0.6,) * 8)(x, t, ctx, 4)
        assert torch.allclose(constant, model.with_options(scale=0.6)(x, t, ctx, 4), atol=1e-6)
        window = ContextWindowLike(range(4, 8))
        windowed = model.with_options(scale=scales)(x, t, ctx, 4, window=window)
        sliced = model.with_options(scale=scales[4:])(x, t, ctx, 4)
        assert torch.equal(windowed, sliced)
        assert not torch.allclose(windowed, model.with_options(scale=scales[:4])(x, t, ctx, 4))


class ContextWindowLike:
    def __init__(self, idxs):
        self.sub_idxs = tuple(idxs)


def test_context_options_node_and_sampler_progress(host_dirs):
    nodes = load_pack().NODE_CLASS_MAPPINGS
    (opts,) = nodes["KinemaContextOptions"]().build(8, 2, "static", 1, "pyramid", True)
    assert opts == ContextOptions(context_length=8, overlap=2, stride=1, schedule="static", fuse="pyramid",
                                  freenoise=True)
    with pytest.raises(KinemaError, match="overlap"):
        nodes["KinemaContextOptions"]().build(8, 8, "static", 1, "pyramid", True)

    updates = []
    real = host_dirs.ProgressBar.update_absolute

    def spy(self, value, total=None, preview=None):
        updates.append((value, total))
        return real(self, value, total, preview)

    host_dirs.ProgressBar.update_absolute = spy
    try:
        pos, neg = _conds(20)
        (latent,) = nodes["KinemaVideoSampler"]().sample(
            motion_model("v2"), [[pos, {}]], [[neg, {}]], {"samples": torch.zeros(20, 4, HW, HW)}, 1, 2, 5.0,
            "euler", "normal", 1.0, context_options=opts)
    finally:
        host_dirs.ProgressBar.update_absolute = real
    windows = len(context_windows(20, opts))
    assert latent["samples"].shape == (20, 4, HW, HW)
    assert updates[-1] == (2 * windows, 2 * windows) and len(updates) >= 2 * windows  # moves per window


def test_the_progress_bar_of_windowed_sampling_never_moves_back(host_dirs, monkeypatch):
    """The uniform schedules run one window more at some steps than at the first: the bar counts the most."""
    from kinema.models.pipelines import windows_per_step

    opts = ContextOptions(context_length=8, overlap=2)
    counts = [len(context_windows(20, opts, i, 2)) for i in range(2)]
    assert counts[1] > counts[0] and windows_per_step(20, opts, 2) == counts[1]
    values = []
    monkeypatch.setattr(host_dirs.ProgressBar, "update_absolute",
                        lambda self, value, total=None, preview=None: values.append((value, total)))
    pos, neg = _conds(20)
    load_pack().NODE_CLASS_MAPPINGS["KinemaVideoSampler"]().sample(
        motion_model("v2"), [[pos, {}]], [[neg, {}]], {"samples": torch.zeros(20, 4, HW, HW)}, 1, 2, 5.0, "euler",
        "normal", 1.0, context_options=opts)
    done = [v for v, _ in values]
    assert done == sorted(done) and values[-1] == (2 * counts[1], 2 * counts[1])
    # ddim_uniform at 7 steps samples 8 (ComfyUI's schedule): the bar's total is those 8 steps' windows throughout
    values.clear()
    load_pack().NODE_CLASS_MAPPINGS["KinemaVideoSampler"]().sample(
        motion_model("v2"), [[pos, {}]], [[neg, {}]], {"samples": torch.zeros(20, 4, HW, HW)}, 1, 7, 5.0, "ddim",
        "ddim_uniform", 1.0, context_options=ContextOptions(context_length=8, overlap=2, schedule="static"))
    done, totals = [v for v, _ in values], {t for _, t in values}
    assert done == sorted(done) and totals == {8 * 3} and values[-1] == (24, 24)


def test_each_sampling_step_runs_the_windows_of_its_own_step():
    """The uniform schedules move their windows from step to step: the windowed denoiser finds the step of the sigma
    it is called at in the schedule (step i at sigmas[i], and the nearest one between two) and runs that step's
    windows, in order, each on its own frames."""
    from kinema.models.guidance import WindowedDenoiser

    seen = []

    def denoiser(x, sigma, window=None):
        seen.append(window.sub_idxs)
        assert torch.equal(x[:, 0, 0, 0], torch.tensor(window.sub_idxs, dtype=x.dtype))
        return x

    frames, opts = 20, ContextOptions(context_length=8, overlap=2, schedule="uniform_standard")
    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])
    den = WindowedDenoiser(denoiser, opts, sigmas)
    x = torch.arange(frames, dtype=torch.float32)[:, None, None, None].expand(frames, 4, 2, 2)
    for step, sigma in [(0, 14.6), (1, 7.0), (2, 3.1), (3, 1.2), (4, 0.4), (2, 3.0), (1, 6.0)]:
        seen.clear()
        assert torch.equal(den(x, torch.tensor(sigma)), x)
        assert seen == [w.sub_idxs for w in context_windows(frames, opts, step)], (step, sigma)
    assert context_windows(frames, opts, 0) != context_windows(frames, opts, 1)  # the steps differ
