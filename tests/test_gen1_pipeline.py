"""ControlNet and IP-Adapter add-ons in the AnimateDiff sampler: per-window hints, start/end, strength, the
unconditional side of the IP-Adapter, stacking, and the nodes that attach them."""
import pytest
import torch
from conftest import load_pack
from fixtures import motion_model
from fixtures_controlnet import controlnet
from fixtures_ip_adapter import ip_adapter
from kinema.models import addons, demo, pipelines
from kinema.models.clip_vision import load_image_encoder
from kinema.models.context import ContextOptions
from kinema.models.errors import KinemaError
from kinema.models.guidance import CFGDenoiser, EpsVideoDenoiser
from kinema.models.sampling import DiscreteSchedule

HW = 8  # latent size: 64x64 pixels


class SpyControlNet(torch.nn.Module):
    """The demo ControlNet, recording the hints of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.hints = net, []

    def check_unet(self, cfg):
        return self.net.check_unet(cfg)

    def forward(self, x, hint, t, ctx, opts):
        self.hints.append(hint.clone())
        return self.net(x, hint, t, ctx, opts)


def _conds():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)


def _sample(model, frames=4, steps=2, cfg=5.0, context=None, batch_cond=True, negative=True, hw=(HW, HW)):
    pos, neg = _conds()
    opts = pipelines.SampleOptions(seed=7, steps=steps, cfg=cfg, context=context, batch_cond=batch_cond)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg if negative else None, torch.zeros(frames, 4, *hw), opts)


def _hints(n, size=64, width=None):
    return torch.rand(n, size, width or size, 3, generator=torch.Generator().manual_seed(n))


def test_hints_reach_each_context_window_sliced_to_its_frames():
    spy = SpyControlNet(controlnet())
    frames = 8
    hints = _hints(frames)
    model = motion_model("v2").with_options(controls=(addons.control_hint(spy, hints),))
    ctx = ContextOptions(context_length=4, overlap=2)
    _sample(model, frames=frames, steps=1, context=ctx)
    windows = pipelines.context_windows(frames, ctx, 0, 1)
    px = hints.permute(0, 3, 1, 2)
    assert len(spy.hints) == len(windows)
    for window, seen in zip(windows, spy.hints):
        assert torch.equal(seen, px[list(window.sub_idxs)])  # one per frame, shared by the uncond and cond videos


def test_fewer_hints_than_frames_are_spread_and_resized():
    spy = SpyControlNet(controlnet())
    hints = _hints(2, size=32)  # half the video's size: resized
    model = motion_model("v2").with_options(controls=(addons.control_hint(spy, hints),))
    _sample(model, frames=4, steps=1, cfg=1.0)
    (seen,) = spy.hints
    assert seen.shape == (4, 3, 64, 64)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[1], seen[2])


def test_hints_of_a_wide_video_keep_its_height_and_width():
    spy = SpyControlNet(controlnet())
    model = motion_model("v2").with_options(controls=(addons.control_hint(spy, _hints(2, 16, 32)),))
    _sample(model, frames=2, steps=1, cfg=1.0, hw=(4, 8))  # 64 pixels wide, 32 high: the hints are resized 2x
    (seen,) = spy.hints
    assert seen.shape == (2, 3, 32, 64)


def test_strength_zero_and_an_empty_range_are_the_plain_sampler():
    plain = _sample(motion_model("v2"))
    off = addons.control_hint(controlnet(), _hints(4), strength=0.0)
    assert torch.equal(_sample(motion_model("v2").with_options(controls=(off,))), plain)
    on = _sample(motion_model("v2").with_options(controls=(addons.control_hint(controlnet(), _hints(4)),)))
    assert not torch.allclose(on, plain)


def test_start_and_end_percent_limit_the_steps_a_controlnet_works_in():
    spy = SpyControlNet(controlnet())
    model = motion_model("v2").with_options(controls=(addons.control_hint(spy, _hints(4), end=0.5),))
    _sample(model, steps=4, cfg=1.0)
    assert 1 <= len(spy.hints) < 4
    late = SpyControlNet(controlnet())
    model = motion_model("v2").with_options(controls=(addons.control_hint(late, _hints(4), start=0.5),))
    _sample(model, steps=4, cfg=1.0)
    assert len(spy.hints) + len(late.hints) == 4  # the two halves of the schedule together are every step


@pytest.mark.parametrize("cfg, batch_cond, negative, calls", [
    (5.0, True, True, 1), (5.0, False, True, 2), (1.0, True, True, 1), (5.0, True, False, 1)])
def test_temporal_guidance_reuses_the_controlnet_residuals_of_the_video_evaluation(monkeypatch, cfg, batch_cond,
                                                                                   negative, calls):
    """The image evaluation of temporal guidance gets the ControlNet the same inputs as the video evaluation of its
    side: its residuals are reused (ControlNet evaluations a step: batched 1, unbatched 2, at cfg 1 1, without a
    negative 1; they were 2, 3, 2 and 2), and the video is the one computed without the reuse."""
    spy = SpyControlNet(controlnet())
    model = motion_model("v2").with_options(controls=(addons.control_hint(spy, _hints(4)),), temporal_scale=1.5)
    reused = _sample(model, steps=2, cfg=cfg, batch_cond=batch_cond, negative=negative)
    assert len(spy.hints) == 2 * calls
    monkeypatch.setattr(addons.ControlReuse, "residuals_for", lambda self, compute, flags, frames: compute())
    spy.hints.clear()
    fresh = _sample(model, steps=2, cfg=cfg, batch_cond=batch_cond, negative=negative)
    assert len(spy.hints) == 2 * (calls + 1)
    assert float((reused - fresh).abs().max()) <= 1e-5 * float(fresh.abs().max())


def test_stacked_controlnets_add_up():
    a = addons.control_hint(controlnet(), _hints(4), strength=0.5)
    b = addons.control_hint(controlnet(), _hints(2), strength=0.7)
    one = _sample(motion_model("v2").with_options(controls=(a,)))
    both = _sample(motion_model("v2").with_options(controls=(a, b)))
    assert not torch.allclose(one, both)


def test_a_hint_of_another_aspect_ratio_is_refused_before_sampling():
    model = motion_model("v2").with_options(controls=(addons.control_hint(controlnet(), _hints(2)[:, :, :32]),))
    with pytest.raises(KinemaError, match="aspect ratio"):
        _sample(model)


# -- IP-Adapter ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_encoder():
    return load_image_encoder(demo.clip_vision_state_dict(0, torch.float32), None, torch.float32, "demo clip vision")


def _content(image_encoder, weight=1.0, **kw):
    return addons.image_content(ip_adapter(), image_encoder, _hints(1, 80)[:, :64], weight=weight, **kw)


def test_ip_adapter_uncond_side_sees_the_zero_image_tokens(image_encoder):
    content = _content(image_encoder)
    model = motion_model("v2").with_options(contents=(content,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, HW, HW, generator=g)
    pos, neg = (c.expand(4, -1, -1) for c in _conds())
    sigma = torch.tensor(2.0)
    den = EpsVideoDenoiser(model, DiscreteSchedule("linear"))
    with torch.no_grad():
        x0_u, x0_c = den(x, sigma, [neg, pos], uncond=[True, False])
        zero_image = motion_model("v2").with_options(contents=(
            addons.ImageContent(content.adapter, content.uncond_tokens, content.uncond_tokens),))
        want_u = EpsVideoDenoiser(zero_image, DiscreteSchedule("linear"))(x, sigma, [neg])[0]
        want_c = den(x, sigma, [pos])[0]
    assert torch.allclose(x0_u, want_u, atol=1e-4, rtol=1e-5) and torch.allclose(x0_c, want_c, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(x0_u, den(x, sigma, [neg])[0], atol=1e-3)  # the cond tokens would differ


def test_ip_adapter_batched_and_unbatched_guidance_agree(image_encoder):
    """At 16x16 latents: at 8x8 the demo UNet's deepest level is 1x1, where a GroupNorm of 2 values a group
    (eps 1e-6) magnifies fp32 rounding about 1e4 times, and batching changes that rounding."""
    model = motion_model("v2").with_options(contents=(_content(image_encoder),))
    batched, single = _sample(model, hw=(16, 16)), _sample(model, batch_cond=False, hw=(16, 16))
    assert float((batched - single).abs().max()) <= 1e-5 * float(single.abs().max())


def test_ip_adapter_weight_zero_is_the_plain_sampler_and_weight_changes_the_video(image_encoder):
    plain = _sample(motion_model("v2"))
    assert torch.equal(_sample(motion_model("v2").with_options(contents=(_content(image_encoder, 0.0),))), plain)
    assert not torch.allclose(_sample(motion_model("v2").with_options(contents=(_content(image_encoder),))), plain)


def test_start_and_end_percent_limit_the_steps_an_ip_adapter_works_in(image_encoder, monkeypatch):
    def counted(content):
        calls, real = [], content.adapter.cross_extra
        monkeypatch.setattr(content.adapter, "cross_extra", lambda *a: (calls.append(1), real(*a))[1])
        return calls

    early = _content(image_encoder, end=0.5)
    early_calls = counted(early)
    _sample(motion_model("v2").with_options(contents=(early,)), steps=4, cfg=1.0)
    early_steps = len(early_calls)
    assert 1 <= early_steps < 4
    late = _content(image_encoder, start=0.5)
    late_calls = counted(late)
    _sample(motion_model("v2").with_options(contents=(late,)), steps=4, cfg=1.0)
    assert early_steps + len(late_calls) == 4  # the two halves of the schedule together are every step
    # an adapter that works in no step is the plain sampler
    never = _content(image_encoder, start=1.0, end=1.0)
    assert torch.equal(_sample(motion_model("v2").with_options(contents=(never,))), _sample(motion_model("v2")))


def test_apply_ip_adapter_node_passes_weight_range_and_every_image(image_encoder):
    from kinema.models.ip_adapter import clip_image_embeds, content_tokens

    adapter = ip_adapter()
    images = torch.cat([_hints(1, 80)[:, :64], 1 - _hints(1, 80)[:, :64]])
    node = load_pack().NODE_CLASS_MAPPINGS["KinemaApplyIPAdapter"]()
    (model,) = node.apply(motion_model("v2"), adapter, image_encoder, images, 0.3, 0.1, 0.7)
    (content,) = model.contents
    assert (content.weight, content.steps.start, content.steps.end) == (0.3, 0.1, 0.7)
    want, _ = content_tokens(adapter, clip_image_embeds(image_encoder, images), "mean")  # both images, averaged
    first, _ = content_tokens(adapter, clip_image_embeds(image_encoder, images[:1]), "mean")
    assert torch.allclose(content.tokens, want.float(), atol=1e-6) and not torch.allclose(content.tokens, first)


def test_ip_adapter_checks_the_clip_vision_width(image_encoder):
    from kinema.models.demo import DemoSizes

    wide = load_image_encoder(demo.clip_vision_state_dict(0, torch.float32, DemoSizes(clip_hidden=32)), None,
                              torch.float32, "another clip vision")
    with pytest.raises(KinemaError, match="CLIP"):
        addons.image_content(ip_adapter(), wide, _hints(1))


def test_cfg_denoiser_marks_the_uncond_entries():
    seen = []

    class Den:
        def __call__(self, x, sigma, conds, window=None, uncond=None, temporal=True, reuse=None):
            seen.append(uncond)
            return [x for _ in conds]

    CFGDenoiser(Den(), torch.zeros(2, 1, 1), torch.ones(2, 1, 1), 2.0)(torch.zeros(2, 4, 2, 2), torch.tensor(1.0))
    assert seen == [[True, False]]


# -- nodes -----------------------------------------------------------------------------------------------------

def _nodes():
    return load_pack().nodes


def test_apply_nodes_attach_without_changing_the_input_model(image_encoder):
    nodes = _nodes()
    base = motion_model("v2")
    (with_cn,) = nodes.structure.KinemaApplyControlNet().apply(base, controlnet(), _hints(4), 0.8, 0.0, 0.9)
    (stacked,) = nodes.structure.KinemaApplyControlNet().apply(with_cn, controlnet(), _hints(1), 0.5)
    (with_ip,) = nodes.content.KinemaApplyIPAdapter().apply(stacked, ip_adapter(), image_encoder, _hints(1))
    assert base.controls == () and base.contents == () and len(with_cn.controls) == 1
    assert len(stacked.controls) == 2 and len(with_ip.contents) == 1 and with_ip.controls == stacked.controls
    assert with_cn.controls[0].strength == 0.8 and with_cn.controls[0].steps == addons.StepRange(0.0, 0.9)
    assert torch.isfinite(_sample(with_ip)).all()
    named = ip_adapter()
    named.source = "ip-adapter_sd15.safetensors"  # what the loader sets: errors and the content name it
    (with_named,) = nodes.content.KinemaApplyIPAdapter().apply(stacked, named, image_encoder, _hints(1))
    assert with_named.contents[0].name == "ip-adapter_sd15.safetensors"
    (chained,) = nodes.content.KinemaApplyIPAdapter().apply(with_ip, named, image_encoder, _hints(2)[1:], 0.4)
    assert chained.contents[0] is with_ip.contents[0] and len(chained.contents) == 2  # chained: contents mix
    assert chained.contents[1].weight == 0.4
    with pytest.raises(KinemaError, match="IP-Adapter 'ip-adapter_sd15.safetensors': start_percent"):
        nodes.content.KinemaApplyIPAdapter().apply(stacked, named, image_encoder, _hints(1), 0.8, 0.9, 0.1)


def test_apply_nodes_refuse_bad_inputs(image_encoder):
    nodes = _nodes()
    with pytest.raises(KinemaError, match="0 images"):
        nodes.structure.KinemaApplyControlNet().apply(motion_model("v2"), controlnet(), torch.zeros(0, 64, 64, 3))
    with pytest.raises(KinemaError, match="start_percent"):
        nodes.structure.KinemaApplyControlNet().apply(motion_model("v2"), controlnet(), _hints(1), 1.0, 0.7, 0.2)
    with pytest.raises(KinemaError, match="input 'model' takes a KINEMA_MODEL, got object"):
        nodes.structure.KinemaApplyControlNet().apply(object(), controlnet(), _hints(1))
    with pytest.raises(KinemaError, match="input 'model' takes a KINEMA_MODEL, got object"):
        nodes.content.KinemaApplyIPAdapter().apply(object(), ip_adapter(), image_encoder, _hints(1))


def test_apply_ip_adapter_node_refuses_an_ip_adapter_for_another_unet(image_encoder):
    """Refused where it is attached, naming the file, not as a shape error in the middle of sampling."""
    from dataclasses import replace

    from kinema.models.ip_adapter import IPAdapter

    with torch.device("meta"):
        sd21 = IPAdapter(replace(ip_adapter().cfg, cross_dim=1024), "ip-adapter_sd21.bin")
    model = motion_model("v2")
    with pytest.raises(KinemaError, match=r"'ip-adapter_sd21.bin' was made for a UNet with 1024-wide text context"):
        _nodes().content.KinemaApplyIPAdapter().apply(model, sd21, image_encoder, _hints(1))
    assert model.contents == ()
