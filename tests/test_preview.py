"""Step previews: the contact sheet of a video latent, the guard that keeps a failing previewer from stopping a
run, and the sampler node handing one preview a step to the progress bar (AnimateDiff here; SVD in
test_svd_pipeline.py)."""
import logging

import pytest
import torch
from conftest import load_pack
from kinema.models.preview import contact_sheet


def _video(frames, c=4, h=3, w=5):
    return torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1).expand(frames, c, h, w) + 1


@pytest.mark.parametrize("frames, picks, grid", [
    (1, [0], (1, 1)), (2, [0, 1], (1, 2)), (3, [0, 1, 2], (2, 2)), (16, [0, 5, 10, 15], (2, 2)),
    (7, [0, 2, 4, 6], (2, 2)),
    (6, [0, 2, 3, 5], (2, 2)),  # linspace(0, 5, 4) = 0, 1.67, 3.33, 5: rounded, not truncated
])
def test_contact_sheet_shows_first_last_and_evenly_spaced_frames(frames, picks, grid):
    x0 = _video(frames)
    sheet = contact_sheet(x0)
    rows, cols = grid
    assert sheet.shape == (1, 4, rows * 3, cols * 5)
    cells = [sheet[0, :, r * 3:(r + 1) * 3, q * 5:(q + 1) * 5] for r in range(rows) for q in range(cols)]
    for cell, i in zip(cells, picks):
        assert torch.equal(cell, x0[i])
    for cell in cells[len(picks):]:
        assert torch.equal(cell, torch.zeros_like(cell))  # the latent's mean, grey


def test_contact_sheet_refuses_what_is_not_a_video_latent():
    with pytest.raises(ValueError, match=r"\[f, c, h, w\]"):
        contact_sheet(torch.zeros(1, 4, 2, 3, 3))


def test_contact_sheet_shows_one_frame_at_least():
    x0 = _video(5)
    assert torch.equal(contact_sheet(x0, frames=0), x0[:1])


def test_a_failing_previewer_is_logged_once_and_sampling_goes_on(caplog):
    from kinema.nodes import host

    calls = []

    def fails(latent):
        calls.append(latent)
        raise RuntimeError("no taesd")

    preview = host._guarded_preview(fails)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert preview(torch.zeros(1)) is None and preview(torch.zeros(1)) is None
    assert len(calls) == 1 and caplog.text.count("step previews are off for this run") == 1


def test_no_previews_outside_comfyui():
    from kinema.nodes import host

    assert host.latent_previewer() is None


def test_a_previewer_that_cannot_be_set_up_turns_previews_off(monkeypatch, caplog):
    """ComfyUI's get_previewer fails on a damaged TAESD file (as its own KSampler does): previews off, logged,
    sampling goes on."""
    import sys
    import types

    from kinema.nodes import host

    def broken(device, latent_format):
        raise RuntimeError("header too large")

    monkeypatch.setattr(host, "_comfy_utils", object())
    monkeypatch.setitem(sys.modules, "latent_preview", types.SimpleNamespace(get_previewer=broken))
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(latent_formats=types.SimpleNamespace(SD15=object)))
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", sys.modules["comfy"].latent_formats)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert host.latent_previewer() is None
    assert "previewer could not be set up: header too large" in caplog.text


def test_the_video_sampler_previews_every_step(host_dirs, previews):
    nodes = load_pack().NODE_CLASS_MAPPINGS
    recorder, shown = previews
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v3.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "a fox")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(6, 64, 48)
    nodes["KinemaVideoSampler"]().sample(video, pos, pos, latent, 7, 3, 7.5, "euler", "normal", 1.0)
    assert shown == [("JPEG", i, 512) for i in (1, 2, 3)]
    # frames 0, 2, 3, 5 of the 6 (the scaled prediction), 2 x 2 frames of 6 x 8 latent pixels
    assert [tuple(x.shape) for x in recorder.latents] == [(1, 4, 12, 16)] * 3
    assert all(torch.isfinite(x).all() and x.abs().max() > 0 for x in recorder.latents)
