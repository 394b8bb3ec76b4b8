"""Gen-1 temporal guidance: the composition with CFG, w_t = 1 is the plain sampler, temporal-off frames are
independent (AnimateDiff and SVD), and it works under context windows and from its node."""
import pytest
import torch
from conftest import load_pack
from fixtures import motion_model
from fixtures_svd_pipeline import write_svd
from kinema.models import checkpoint, pipelines, svd_model
from kinema.models.context import ContextOptions
from kinema.models.errors import KinemaError
from kinema.models.guidance import CFGDenoiser
from kinema.models.svd import AlphaBlender

HW = 8


class Recorder:
    """A denoiser giving a distinct constant per (uncond?, temporal?) and recording the calls."""

    VALUES = {(True, True): 1.0, (False, True): 2.0, (True, False): 5.0, (False, False): 11.0}

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, conds, window=None, uncond=None, temporal=True, reuse=None):
        flags = uncond or [False] * len(conds)
        self.calls.append((tuple(flags), temporal))
        return [torch.full_like(x, self.VALUES[(u, temporal)]) for u in flags]


@pytest.mark.parametrize("w_t", [0.0, 0.5, 1.7])
@pytest.mark.parametrize("cfg", [3.0, torch.tensor([1.5, 2.0, 2.5])])
def test_temporal_guidance_composes_with_cfg_as_gen1(w_t, cfg):
    rec = Recorder()
    x = torch.zeros(3, 4, 2, 2)
    out = CFGDenoiser(rec, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), cfg, temporal_scale=w_t)(x, torch.tensor(1.0))
    vid_u, vid_c, img_u = 1.0, 2.0, 5.0
    w = cfg if isinstance(cfg, float) else cfg.reshape(3, 1, 1, 1)
    want = img_u + w_t * (vid_u - img_u) + w * (vid_c - vid_u)
    assert torch.allclose(out, torch.as_tensor(want).expand_as(out).float())
    assert rec.calls == [((True, False), True), ((True,), False)]


def test_without_uncond_temporal_guidance_mixes_the_conditional_predictions():
    rec = Recorder()
    x = torch.zeros(2, 4, 2, 2)
    out = CFGDenoiser(rec, torch.zeros(2, 1, 1), None, 7.0, temporal_scale=0.25)(x, torch.tensor(1.0))
    assert torch.allclose(out, torch.full_like(x, 11.0 + 0.25 * (2.0 - 11.0)))
    assert rec.calls == [((False,), True), ((False,), False)]


def test_temporal_guidance_moves_smoothly_with_cfg_through_one():
    """With a negative, cfg 1 keeps the uncond for the temporal term (the first formula at w = 1), so cfg 1 and
    cfg just above give about the same prediction; at w_t 1 the uncond is still skipped at cfg 1."""
    x = torch.zeros(2, 4, 2, 2)
    at, above = (CFGDenoiser(Recorder(), torch.zeros(2, 1, 1), torch.ones(2, 1, 1), cfg, temporal_scale=2.0)(
        x, torch.tensor(1.0)) for cfg in (1.0, 1.0 + 1e-6))
    assert torch.allclose(at, torch.full_like(x, 5.0 + 2.0 * (1.0 - 5.0) + (2.0 - 1.0)))
    assert torch.allclose(at, above, atol=1e-5)
    rec = Recorder()
    CFGDenoiser(rec, torch.zeros(2, 1, 1), torch.ones(2, 1, 1), 1.0, temporal_scale=1.0)(x, torch.tensor(1.0))
    assert rec.calls == [((False,), True)]


def test_w_t_one_never_runs_the_image_model():
    rec = Recorder()
    x = torch.zeros(2, 4, 2, 2)
    CFGDenoiser(rec, torch.zeros(2, 1, 1), torch.ones(2, 1, 1), 3.0, temporal_scale=1.0)(x, torch.tensor(1.0))
    assert all(temporal for _, temporal in rec.calls)


class CountTemporalOff:
    def __init__(self, model):
        self.model, self.off = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, temporal=True, **kw):
        self.off += not temporal
        return self.model(*args, temporal=temporal, **kw)


def _sample(model, frames=4, cfg=5.0, context=None):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    opts = pipelines.SampleOptions(seed=7, steps=3, cfg=cfg, context=context)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg if cfg != 1.0 else None, torch.zeros(frames, 4, HW, HW), opts)


def test_w_t_one_equals_the_plain_sampler_exactly():
    model = motion_model("v2")
    plain = _sample(model)
    counted = CountTemporalOff(model.with_options(temporal_scale=1.0))
    assert torch.equal(_sample(counted), plain) and counted.off == 0
    near = CountTemporalOff(model.with_options(temporal_scale=1.05))
    guided = _sample(near)
    assert near.off == 3  # one image-model evaluation per step
    change = float((guided - plain).abs().max()) / float(plain.abs().max())
    assert 0 < change < 0.1  # a small step away from the plain model gives a small change


def test_w_t_zero_without_cfg_is_the_image_model_exactly():
    model = motion_model("v3")
    image_model = model.with_options(motion=None)
    assert torch.equal(_sample(model.with_options(temporal_scale=0.0), cfg=1.0), _sample(image_model, cfg=1.0))


def test_temporal_guidance_under_context_windows():
    model = motion_model("v2")
    ctx = ContextOptions(context_length=4, overlap=2)
    plain = _sample(model, frames=8, context=ctx)
    guided = _sample(model.with_options(temporal_scale=1.5), frames=8, context=ctx)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.equal(guided, plain)


# -- Stable Video Diffusion ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def svd(tmp_path_factory):
    return checkpoint.load_svd(write_svd(str(tmp_path_factory.mktemp("svd") / "svd_tiny.safetensors")))


def _svd_inputs(svd, frames=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(frames, 8, HW, HW, generator=g)
    d = svd.model.unet.cfg.context_dim
    ctx = torch.randn(1, 1, d, generator=g).expand(frames, -1, -1)
    y = torch.randn(1, svd.model.unet.cfg.adm_in_channels, generator=g).expand(frames, -1)
    return x, torch.full((frames,), 0.3), ctx, y


def test_svd_temporal_off_keeps_frames_independent(svd):
    x, t, ctx, y = _svd_inputs(svd)
    with torch.no_grad():
        off = svd.model(x, t, ctx, y, 3, temporal=False)
        x2 = x.clone()
        x2[2] += 1.0
        off2 = svd.model(x2, t, ctx, y, 3, temporal=False)
        on, on2 = svd.model(x, t, ctx, y, 3), svd.model(x2, t, ctx, y, 3)
    assert torch.equal(off[:2], off2[:2]) and not torch.equal(off[2], off2[2])
    assert not torch.allclose(on[:2], on2[:2])  # with the temporal layers, frame 2 reaches the others


def test_svd_skipping_the_blended_out_temporal_path_changes_nothing(svd, monkeypatch):
    x, t, ctx, y = _svd_inputs(svd)
    with torch.no_grad():
        skipped = svd.model(x, t, ctx, y, 3, temporal=False)
        monkeypatch.setattr(AlphaBlender, "spatial_only", lambda self, ind: False)  # compute and blend, as sgm
        blended = svd.model(x, t, ctx, y, 3, temporal=False)
    assert torch.equal(skipped, blended)


def test_svd_sampler_with_temporal_guidance(svd):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    opts = svd_model.ImageConditioningOptions(width=64, height=64, frames=3)
    cond, uncond = svd_model.image_conditioning(svd.image_encoder, svd.vae, image, opts)
    latent = pipelines.empty_video_latent(3, 64, 64)
    sopts = pipelines.SampleOptions(seed=1, steps=2, cfg=2.5, scheduler="karras")
    plain = pipelines.sample_img2vid(svd.model, cond, uncond, latent, sopts)
    same = pipelines.sample_img2vid(svd.model.with_options(temporal_scale=1.0), cond, uncond, latent, sopts)
    guided = pipelines.sample_img2vid(svd.model.with_options(temporal_scale=0.5), cond, uncond, latent, sopts)
    assert torch.equal(plain, same) and not torch.allclose(plain, guided)


def test_svd_content_image_replaces_the_clip_embedding_only(svd):
    g = torch.Generator().manual_seed(2)
    image, content = torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
    opts = svd_model.ImageConditioningOptions(width=64, height=64, frames=3)
    plain, _ = svd_model.image_conditioning(svd.image_encoder, svd.vae, image, opts)
    mixed, _ = svd_model.image_conditioning(svd.image_encoder, svd.vae, image, opts, content_image=content)
    from_content, _ = svd_model.image_conditioning(svd.image_encoder, svd.vae, content, opts)
    assert torch.equal(mixed["concat"], plain["concat"])
    assert torch.equal(mixed["context"], from_content["context"]) and not torch.equal(mixed["context"],
                                                                                        plain["context"])


# -- the node ------------------------------------------------------------------------------------------------------

def test_temporal_guidance_node():
    node = load_pack().nodes.guidance.KinemaTemporalGuidance()
    (model,) = node.apply(motion_model("v2"), 1.5)
    assert model.temporal_scale == 1.5 and motion_model("v2").temporal_scale == 1.0
    with pytest.raises(KinemaError, match="no motion module"):
        node.apply(motion_model("v2").with_options(motion=None), 1.5)
    with pytest.raises(KinemaError, match="input 'model' takes a KINEMA_MODEL, got object"):
        node.apply(object(), 1.5)


def test_temporal_guidance_node_takes_an_svd_model_and_changes_no_input(svd):
    node = load_pack().nodes.guidance.KinemaTemporalGuidance()
    base = motion_model("v2")
    (model,) = node.apply(base, 1.5)
    assert model is not base and base.temporal_scale == 1.0  # a new model: the input keeps its scale
    (guided,) = node.apply(svd.model, 0.5)  # an SVD model has no motion module: its temporal layers are its own
    assert guided.temporal_scale == 0.5 and svd.model.temporal_scale == 1.0
