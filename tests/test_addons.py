"""Add-ons of a video model (addons.py): hints spread over frames, start/end ranges, hint sizes and counts."""
import math

import pytest
import torch
from kinema.models import addons
from kinema.models.errors import KinemaError
from kinema.models.sampling import ContinuousEDMSchedule, DiscreteSchedule


@pytest.mark.parametrize("count,frames,want", [
    (1, 4, [0, 0, 0, 0]),
    (2, 4, [0, 0, 1, 1]),
    (3, 8, [0, 0, 0, 1, 1, 1, 2, 2]),
    (4, 4, [0, 1, 2, 3]),
    (6, 4, [0, 1, 2, 3]),
])
def test_hints_are_spread_evenly_over_the_frames(count, frames, want):
    assert addons.spread_indices(count, frames) == want


def test_every_hint_is_used_and_in_order_when_there_are_fewer_hints_than_frames():
    for count in range(1, 17):
        idx = addons.spread_indices(count, 16)
        assert sorted(set(idx)) == list(range(count)) and idx == sorted(idx)


def test_percent_to_sigma_follows_the_schedule():
    s = DiscreteSchedule("linear")
    assert s.percent_to_sigma(0.0) == math.inf and s.percent_to_sigma(1.0) == 0.0
    assert s.percent_to_sigma(0.5) == pytest.approx(float(s.sigma(torch.tensor(499.5))), rel=1e-5)
    assert s.percent_to_sigma(0.001) == pytest.approx(float(s.sigma(torch.tensor(998.001))), rel=1e-5)
    edm = ContinuousEDMSchedule(0.002, 700.0)
    mid = math.exp((math.log(0.002) + math.log(700.0)) / 2)
    assert edm.percent_to_sigma(0.5) == pytest.approx(mid, rel=1e-4)


@pytest.mark.parametrize("beta", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps,percent,inside", [(25, 0.5, 13), (3, 0.5, 2), (5, 0.25, 2), (11, 0.6, 7)])
def test_a_step_on_the_boundary_is_inside_as_in_comfyui(beta, steps, percent, inside):
    """ComfyUI's cut-off is its float32 sigma at (1 - percent) * 999, the arithmetic a step's own sigma comes
    from, so a step on the boundary (25 steps, end 0.5: the 13th step at timestep 499.5) is inside; the float64
    interpolation before put it one rounding step outside (12 steps)."""
    from kinema.models.sampling import normal_scheduler

    s = DiscreteSchedule(beta)
    cut = s.percent_to_sigma(percent)
    assert cut == float(s.sigma(torch.tensor((1 - percent) * 999)))
    sigmas = [float(x) for x in normal_scheduler(s, steps)[:-1]]
    assert sum(addons.StepRange(0.0, percent).active(x, s) for x in sigmas) == inside
    assert sum(addons.StepRange(percent, 1.0).active(x, s) for x in sigmas) == steps - inside + 1  # the shared one


def test_step_range_is_active_between_start_and_end():
    s = DiscreteSchedule("linear")
    r = addons.StepRange(0.25, 0.75)
    hi, lo = s.percent_to_sigma(0.25), s.percent_to_sigma(0.75)
    assert r.active(hi, s) and r.active(lo, s) and r.active((hi + lo) / 2, s)
    assert not r.active(hi * 1.01, s) and not r.active(lo * 0.99, s)
    assert addons.StepRange().active(1e9, s) and addons.StepRange().active(None, s)
    with pytest.raises(KinemaError, match="start_percent"):
        addons.StepRange(0.8, 0.2).validate("ControlNet")


def test_hints_are_resized_only_when_the_aspect_ratio_matches():
    hints = torch.rand(2, 3, 32, 48)
    assert addons.fit_hints(hints, 32, 48) is hints
    assert addons.fit_hints(hints, 64, 96).shape == (2, 3, 64, 96)
    with pytest.raises(KinemaError, match="aspect ratio"):
        addons.fit_hints(hints, 64, 64)
    # frames cropped to multiples of 8 (854x480 -> 848x480) for a 512x288 video: 0.7% off, resized
    assert addons.fit_hints(torch.rand(1, 3, 480, 848), 288, 512).shape == (1, 3, 288, 512)
    with pytest.raises(KinemaError, match="aspect ratio"):  # 4:3 against 16:9
        addons.fit_hints(torch.rand(1, 3, 480, 640), 288, 512)


def test_a_hint_12_percent_off_the_aspect_ratio_is_refused():
    with pytest.raises(KinemaError, match="aspect ratio"):  # 25x25 hints for a 28x25 video: 12% wider
        addons.fit_hints(torch.rand(1, 3, 25, 25), 25, 28)


def test_hints_are_resized_bilinear_antialiased():
    hints = torch.rand(2, 3, 32, 48)
    want = torch.nn.functional.interpolate(hints, size=(16, 24), mode="bilinear", antialias=True,
                                           align_corners=False)
    assert torch.equal(addons.fit_hints(hints, 16, 24), want)


@pytest.mark.parametrize("images,match", [
    (torch.zeros(0, 64, 64, 3), "0 images"),
    (torch.zeros(64, 64, 3), "IMAGE"),
    (torch.zeros(2, 4, 4, 3), "too small"),
])
def test_bad_hint_images_are_refused(images, match):
    with pytest.raises(KinemaError, match=match):
        addons.control_hint(torch.nn.Identity(), images)


def test_non_finite_strength_is_refused():
    with pytest.raises(KinemaError, match="ControlNet 'd': strength must be a finite number, got nan"):
        addons.control_hint(torch.nn.Identity(), torch.rand(1, 16, 16, 3), strength=float("nan"), name="d")


def test_a_looped_window_takes_its_hints_in_window_order():
    """A uniform_looped window wraps from the last frame to the first: its hints follow the window's frames."""
    fitted = addons.control_hint(torch.nn.Identity(), torch.rand(4, 16, 16, 3)).prepared(4, 16, 16)
    assert torch.equal(fitted.hints_for((3, 0)), fitted.hints[[3, 0]])


class _FakeAdapter:
    """An IP-Adapter stand-in whose cross-attention extras name it, the slot, the layer and the weight."""

    def __init__(self, name):
        self.name = name

    def cross_extra(self, unet_cfg, tokens, weight):
        return lambda slot, j: [(self.name, slot, j, weight, tuple(tokens.shape))]


def test_two_ip_adapters_both_add_their_keys_and_values():
    tokens = torch.zeros(1, 4, 8)
    contents = [addons.ImageContent(_FakeAdapter(n), tokens, tokens, weight=w) for n, w in (("a", 0.5), ("b", 1.0))]
    extra = addons.content_cross_extra(contents, None, 3, [False, True], None, DiscreteSchedule())
    assert extra("down", 1) == [("a", "down", 1, 0.5, (6, 4, 8)), ("b", "down", 1, 1.0, (6, 4, 8))]


def test_a_hint_is_not_used_before_it_is_fitted():
    hint = addons.control_hint(torch.nn.Identity(), torch.rand(2, 16, 16, 3))
    with pytest.raises(KinemaError, match="fitted"):
        hint.hints_for([0])
    fitted = hint.prepared(4, 32, 32)
    assert fitted.hints_for([0, 3]).shape == (2, 3, 32, 32)
    assert torch.equal(fitted.hints_for([1]), fitted.hints[[0]]) and torch.equal(fitted.hints_for([2]),
                                                                                 fitted.hints[[1]])


def test_rgba_hint_images_are_taken_with_their_alpha_channel_dropped():
    """An IMAGE with an alpha channel (a PNG loaded with it, [n, h, w, 4]) is a valid hint: it is accepted and the
    ControlNet gets its RGB channels only, in [n, 3, h, w]."""
    rgba = torch.rand(2, 16, 16, 4, generator=torch.Generator().manual_seed(5))
    hint = addons.control_hint(torch.nn.Identity(), rgba)
    assert torch.equal(hint.hints, rgba[..., :3].permute(0, 3, 1, 2))


def test_a_step_range_outside_0_to_1_is_refused():
    """start_percent below 0 or end_percent above 1 is refused, not only start > end."""
    for start, end in ((-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(KinemaError, match="0 <= start <= end <= 1"):
            addons.StepRange(start, end).validate("ControlNet")


def test_a_control_hint_built_directly_is_checked_when_fitted_to_the_video():
    """``ControlHint.prepared`` (what the sampler calls) validates the range and refuses an empty hint list,
    also for a ControlHint not made by ``control_hint``."""
    bad = addons.ControlHint(torch.nn.Identity(), torch.rand(1, 3, 16, 16), steps=addons.StepRange(0.8, 0.2),
                             name="d")
    with pytest.raises(KinemaError, match="ControlNet 'd': start_percent"):
        bad.prepared(4, 16, 16)
    with pytest.raises(KinemaError, match="no hint images"):
        addons.ControlHint(torch.nn.Identity(), torch.rand(0, 3, 16, 16)).prepared(4, 16, 16)


class _FixedEncoder:
    """A CLIP vision stand-in: each image's embedding is a distinct constant vector."""

    def __init__(self, dim):
        self.embed_dim = dim

    def encode(self, images, style="svd"):
        return torch.arange(1, images.shape[0] + 1, dtype=torch.float32)[:, None].expand(-1, self.embed_dim) / 10


def test_non_finite_ip_adapter_weight_is_refused():
    """An IP-Adapter weight of NaN or infinity is refused where it enters, naming the adapter."""
    from fixtures_ip_adapter import ip_adapter

    adapter = ip_adapter()
    with pytest.raises(KinemaError, match="IP-Adapter 'c': weight must be a finite number, got inf"):
        addons.image_content(adapter, _FixedEncoder(adapter.cfg.clip_dim), torch.rand(1, 16, 16, 3),
                             weight=float("inf"), name="c")


def test_image_content_concat_puts_the_images_tokens_side_by_side():
    """``image_content(combine="concat")`` gives each image's tokens side by side (and n zero-image token sets on
    the uncond side); "mean" gives one image's worth of tokens."""
    from fixtures_ip_adapter import ip_adapter
    from kinema.models.ip_adapter import content_tokens

    adapter = ip_adapter()
    enc = _FixedEncoder(adapter.cfg.clip_dim)
    images = torch.rand(2, 16, 16, 3)
    cat = addons.image_content(adapter, enc, images, combine="concat")
    mean = addons.image_content(adapter, enc, images)
    t, d = adapter.cfg.tokens, adapter.cfg.cross_dim
    assert cat.tokens.shape == (1, 2 * t, d) and cat.uncond_tokens.shape == (1, 2 * t, d)
    assert mean.tokens.shape == (1, t, d)
    want, _ = content_tokens(adapter, enc.encode(images), "concat")
    assert torch.allclose(cat.tokens, want.float())


def test_control_reuse_keeps_its_sides_residuals_from_the_first_batch_that_has_it():
    """``ControlReuse(side)`` keeps, from the first batch holding its side, that side's slice of the residuals
    (wherever the side sits in the batch), and hands exactly those to a later batch of that side alone."""
    frames = 2
    reuse = addons.ControlReuse(side=True)
    first = [torch.arange(8.0).reshape(4, 2), torch.arange(8.0, 16.0).reshape(4, 1, 2)]  # (cond, uncond) x 2 frames
    assert reuse.residuals_for(lambda: first, (False, True), frames) is first
    later = [torch.full((4, 2), -1.0), torch.full((4, 1, 2), -1.0)]
    assert reuse.residuals_for(lambda: later, (True, False), frames) is later  # computed, not kept
    calls = []
    kept = reuse.residuals_for(lambda: calls.append(1), (True,), frames)
    assert calls == [] and len(kept) == 2
    assert torch.equal(kept[0], first[0][2:4]) and torch.equal(kept[1], first[1][2:4])
