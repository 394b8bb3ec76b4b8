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
