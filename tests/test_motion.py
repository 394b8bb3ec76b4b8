"""Motion-module injection: composition without mutation, scale, frame coupling, limits."""
import pytest
import torch

from kinema.models import checkpoint, demo
from kinema.models.errors import KinemaError
from kinema.models.motion import MotionModel, MotionModule, MotionModuleSet, infer_motion_config
from kinema.models.unet import UNetModel, infer_unet_config

F, HW = 4, 8


@pytest.fixture(scope="module")
def unet():
    sd = checkpoint.sub_state_dict(demo.sd15_state_dict(), "model.diffusion_model.")
    return checkpoint.build_on_meta(lambda: UNetModel(infer_unet_config(sd)), sd, None, "UNet", "demo")


def _motion(version):
    sd = demo.motion_state_dict(version)
    return checkpoint.build_on_meta(lambda: MotionModuleSet(infer_motion_config(sd)), sd, None, "mm", version)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(F, 4, HW, HW, generator=g)
    ctx = torch.randn(F, 77, 64, generator=g)
    t = torch.full((F,), 400.0)
    return x, t, ctx


def _run(model, x, t, ctx, **kw):
    with torch.no_grad():
        return model(x, t, ctx, x.shape[0], **kw)


def test_applying_a_motion_module_does_not_change_the_base_model(unet, inputs):
    base = MotionModel(unet)
    before = _run(base, *inputs)
    params = {k: v.clone() for k, v in unet.state_dict().items()}
    video = base.with_options(motion=_motion("v2"), scale=1.0, beta_schedule="linear")
    moved = _run(video, *inputs)
    assert not torch.allclose(moved, before)
    assert torch.equal(_run(base, *inputs), before)
    assert all(torch.equal(v, params[k]) for k, v in unet.state_dict().items())
    assert base.motion is None and video.motion is not None


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_scale_zero_and_temporal_off_are_the_image_model(unet, inputs, version):
    base = _run(MotionModel(unet), *inputs)
    video = MotionModel(unet, _motion(version))
    assert torch.allclose(_run(video.with_options(scale=0.0), *inputs), base, atol=1e-6)
    assert torch.equal(_run(video, *inputs, temporal=False), base)


def test_per_frame_motion_scale_applies_frame_by_frame_to_each_video_of_a_batch(unet, inputs):
    """Sampling runs cond and uncond as one batch of two videos: frame i of each gets the scale of frame i."""
    x, t, ctx = inputs
    video = MotionModel(unet, _motion("v2")).with_options(scale=(1.0, 0.8, 0.3, 0.0))
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        both = video(torch.cat([x, other]), torch.cat([t, t]), torch.cat([ctx, ctx]), F)  # 2 videos of F frames
    # a batch of two runs other fp32 kernels than one video (on an AVX-512 machine up to 1.3e-4 apart at values ~2)
    torch.testing.assert_close(both[:F], _run(video, x, t, ctx), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(both[F:], _run(video, other, t, ctx), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(both[:F], _run(video.with_options(scale=1.0), x, t, ctx), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_motion_module_computes_in_its_own_precision_inside_a_unet_in_another(unet, inputs, dtype):
    """The UNet cast to half precision alone (Memory Policy before Apply Motion Module, or loaders set apart): the
    fp32 motion module computes its update from the half-precision activations in fp32, added in the UNet's."""
    from kinema.models.memory import cast_weights

    mm = _motion("v2")
    module = next(m for m in mm.modules() if type(m).__name__ == "MotionModule")
    x = torch.randn(F, module.temporal_transformer.proj_in.in_features, HW, HW,
                    generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got = module(x, F)
        update = module.temporal_transformer(x.float(), F)
    assert got.dtype == dtype and torch.equal(got, x + update.to(dtype))
    x, t, ctx = inputs
    half = MotionModel(cast_weights(unet, dtype), mm)  # runs (the weights of both precisions meet)
    out = _run(half, x.to(dtype), t, ctx.to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_motion_scale_multiplies_the_temporal_update():
    """Scale s adds s times the update of scale 1 (scales below, near and above 1)."""
    g = torch.Generator().manual_seed(0)
    module = MotionModule(32, 8, 24).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = torch.randn(F, 32, 4, 4, generator=g)
        update = module(x, F) - x
        assert float(update.abs().max()) > 0.1
        for s in (0.5, 0.8, 1.5):
            torch.testing.assert_close(module(x, F, s) - x, s * update, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v3"])  # v1: its cross-frame UNet norms are off with the motion
def test_temporal_off_keeps_frames_independent_and_on_couples_them(unet, inputs, version):
    x, t, ctx = inputs
    video = MotionModel(unet, _motion(version))
    x2 = x.clone()
    x2[3] += 1.0
    off_a, off_b = _run(video, x, t, ctx, temporal=False), _run(video, x2, t, ctx, temporal=False)
    assert torch.equal(off_a[:3], off_b[:3]) and not torch.equal(off_a[3], off_b[3])
    on_a, on_b = _run(video, x, t, ctx), _run(video, x2, t, ctx)
    assert (on_a[0] - on_b[0]).abs().max() > 1e-4


def test_v1_uses_cross_frame_groupnorm(unet, inputs):
    x, t, ctx = inputs
    v1 = MotionModel(unet, _motion("v1"))
    # at scale 0 the motion modules add nothing, yet v1 frames stay coupled through the UNet's norms
    a = _run(v1.with_options(scale=0.0), x, t, ctx)
    x2 = x.clone()
    x2[3] += 1.0
    b = _run(v1.with_options(scale=0.0), x2, t, ctx)
    assert (a[0] - b[0]).abs().max() > 1e-5
    # per-frame norms can be forced, and a single frame is the same either way
    per_frame = _run(v1.with_options(scale=0.0, cross_frame_norm=False), x, t, ctx)
    assert torch.allclose(per_frame, _run(MotionModel(unet), x, t, ctx), atol=1e-6)
    one = (x[:1], t[:1], ctx[:1])
    assert torch.allclose(_run(v1, *one), _run(v1.with_options(cross_frame_norm=False), *one), atol=1e-5)


@pytest.mark.parametrize("version,limit", [("v1", 24), ("v2", 32), ("v3", 32)])
def test_positional_limit_is_enforced_with_a_clear_message(unet, version, limit):
    video = MotionModel(unet, _motion(version), name=f"mm_{version}")
    video.check_frames(limit)
    with pytest.raises(KinemaError, match=f"at most {limit} frames.*Context Options"):
        video.check_frames(limit + 1)
    video.check_frames(4 * limit, context_length=limit)  # windows of the module's length: any frame count
    with pytest.raises(KinemaError, match=f"context length is {limit + 1}.*{limit} or less"):
        video.check_frames(4 * limit, context_length=limit + 1)
    with pytest.raises(KinemaError, match="at least 1 frame"):
        video.check_frames(0)


def test_motion_module_for_another_unet_is_refused(unet):
    sd = demo.motion_state_dict("v2", sizes=demo.DemoSizes(model_channels=64))
    other = checkpoint.build_on_meta(lambda: MotionModuleSet(infer_motion_config(sd)), sd, None, "mm", "big")
    with pytest.raises(KinemaError, match="made for a UNet with channels"):
        other.check_unet(unet.cfg)


def test_versions_are_told_apart():
    assert [_motion(v).version for v in ("v1", "v2", "v3")] == ["v1", "v2", "v3"]


@pytest.mark.parametrize("text", ["1, nan", "inf", "1.0 -inf", "1e30", "-50", "1, 2.5"])
def test_per_frame_motion_scale_outside_the_motion_scale_range_is_refused(text):
    from kinema.models.motion import parse_scale

    with pytest.raises(KinemaError, match=r"motion_scale_per_frame: .* is outside 0\.\.2"):
        parse_scale(text)
    assert parse_scale("0, 2, 1.5") == (0.0, 2.0, 1.5)


# -- diffusers' layout ---------------------------------------------------------------------------------------------

def _state(module):
    return module.state_dict()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_a_diffusers_motion_adapter_file_loads_as_the_published_file(tmp_path, version):
    """A MotionAdapter's ``diffusion_pytorch_model.safetensors`` as diffusers writes it (``save_pretrained`` of the
    demo weights, converted by diffusers' own converter) gives the module the published file gives."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures import motion_adapter, motion_state_dict
    from safetensors.torch import save_file

    motion_adapter(version).save_pretrained(str(tmp_path / "adapter"))
    ours = checkpoint.load_motion_module(str(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"))
    save_file(dict(motion_state_dict(version)), str(tmp_path / "mm.safetensors"))
    ref = checkpoint.load_motion_module(str(tmp_path / "mm.safetensors"))
    assert ours.version == version and ours.cfg == ref.cfg
    got, want = _state(ours), _state(ref)
    assert got.keys() == want.keys()
    for key, value in want.items():
        # diffusers recomputes the positional tables (same formula, its own float rounding); the rest is copied
        tol = 1e-6 if key.endswith("pos_encoder.pe") else 0.0
        torch.testing.assert_close(got[key], value, rtol=0, atol=tol, msg=key)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_a_motion_module_that_stores_no_positional_tables_gets_the_computed_ones(tmp_path, version, caplog):
    """AnimateDiff's training code since July 2024 saves no tables (non-persistent buffers) and its loader always
    recomputes them: such a file loads with the sinusoidal tables, which equal the published files' stored ones,
    so it makes the same noise prediction."""
    import logging

    from safetensors.torch import save_file

    sd = demo.motion_state_dict(version)
    full_path, bare_path = tmp_path / "full.safetensors", tmp_path / "no_pe.safetensors"
    save_file(sd, str(full_path))
    save_file({k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}, str(bare_path))
    with caplog.at_level(logging.INFO, logger="kinema"):
        bare = checkpoint.load_motion_module(str(bare_path))
    assert "'no_pe.safetensors' stores no positional tables" in caplog.text
    full = checkpoint.load_motion_module(str(full_path))
    assert bare.version == full.version == version and bare.cfg == full.cfg
    for (k, a), (_, b) in zip(full.state_dict().items(), bare.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    # a file with some tables but not all is still damaged, and named so
    save_file({k: v for k, v in sd.items() if k != next(k for k in sd if k.endswith("pos_encoder.pe"))},
              str(tmp_path / "one_gone.safetensors"))
    with pytest.raises(KinemaError, match="pos_encoder.pe"):
        checkpoint.load_motion_module(str(tmp_path / "one_gone.safetensors"))


def test_published_layout_renames_diffusers_keys_and_keeps_the_published_ones():
    from kinema.models.motion import published_layout

    sd = demo.motion_state_dict("v2")
    assert published_layout(sd) == sd
    head = "unet.up_blocks.1.motion_modules.2."
    diffusers = {f"{head}proj_in.weight": 1, f"{head}transformer_blocks.0.pos_embed.pe": 2,
                 f"{head}transformer_blocks.0.attn2.processor.to_out_lora.up.weight": 3,
                 f"{head}transformer_blocks.0.norm3.bias": 4, f"{head}transformer_blocks.0.ff.net.2.weight": 5,
                 "other.weight": 6}
    tt = "up_blocks.1.motion_modules.2.temporal_transformer."
    assert published_layout(diffusers) == {
        f"{tt}proj_in.weight": 1, f"{tt}transformer_blocks.0.attention_blocks.0.pos_encoder.pe": 2,
        f"{tt}transformer_blocks.0.attention_blocks.1.pos_encoder.pe": 2,
        f"{tt}transformer_blocks.0.attention_blocks.1.processor.to_out_lora.up.weight": 3,
        f"{tt}transformer_blocks.0.ff_norm.bias": 4, f"{tt}transformer_blocks.0.ff.net.2.weight": 5,
        "other.weight": 6}


def test_the_motion_modules_of_a_whole_diffusers_unet_motion_model_file_are_loaded(tmp_path, caplog):
    pytest.importorskip("diffusers", exc_type=ImportError)
    import logging

    from fixtures import diffusers_motion_unet, motion_modules
    from safetensors.torch import save_file

    unet3d = diffusers_motion_unet("v3", per_frame_motion_norm=False)
    save_file({k: v.contiguous() for k, v in unet3d.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    with caplog.at_level(logging.INFO, logger="kinema"):
        ours = checkpoint.load_motion_module(str(tmp_path / "unet.safetensors"))
    assert "'unet.safetensors' is a whole diffusers UNetMotionModel: its motion modules are loaded" in caplog.text
    want = _state(motion_modules("v3"))
    got = _state(ours)
    assert got.keys() == want.keys() and ours.version == "v3"
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6 if key.endswith(".pe") else 0.0, msg=key)


# -- audit: structure checks the other tests leave open ------------------------------------------------------------

def test_a_motion_module_with_another_module_count_a_block_is_refused_for_the_unet(unet):
    """``check_unet`` compares a down block's module count with the UNet's res blocks a level, not only the channels:
    a module set with the UNet's channels but one module a block more is refused; the matching one is accepted."""
    from kinema.models.motion import MotionConfig

    nrb = unet.cfg.num_res_blocks
    chans = tuple(unet.cfg.model_channels * m for m in unet.cfg.channel_mult)
    with torch.device("meta"):
        extra = MotionModuleSet(MotionConfig(down_channels=chans, modules_per_down=nrb + 1, modules_per_up=nrb + 2,
                                             has_mid=False, max_len=32))
        fits = MotionModuleSet(MotionConfig(down_channels=chans, modules_per_down=nrb, modules_per_up=nrb + 1,
                                            has_mid=False, max_len=32))
    wanted = f"has {nrb + 1} temporal modules a down block, the checkpoint.s UNet has {nrb} ResBlocks"
    with pytest.raises(KinemaError, match=wanted):
        extra.check_unet(unet.cfg)
    fits.check_unet(unet.cfg)


@pytest.mark.parametrize("depth,num_attn", [(2, 2), (1, 3)])
def test_the_transformer_depth_and_attention_count_are_read_off_the_keys(depth, num_attn):
    """``infer_motion_config`` reads the transformer blocks a module (depth) and the attentions a block off the key
    indices: a file with two blocks a module is built with two, never as a one-block network."""
    from kinema.models.motion import MotionConfig

    cfg = MotionConfig(down_channels=(32, 64), modules_per_down=2, modules_per_up=3, has_mid=False, max_len=32,
                       depth=depth, num_attn=num_attn)
    with torch.device("meta"):
        sd = MotionModuleSet(cfg).state_dict()
    assert infer_motion_config(sd) == cfg


def test_a_down_level_without_norm_or_projection_weights_is_named_as_damaged():
    """A down level whose modules all lack their norm/proj_in/proj_out weights (the keys its channels are read from)
    is a KinemaError naming that level, not a KeyError."""
    sd = demo.motion_state_dict("v3")
    gone = ("norm.", "proj_in.", "proj_out.")
    sd = {k: v for k, v in sd.items()
          if not (k.startswith("down_blocks.1.") and k.split(".temporal_transformer.")[1].startswith(gone))}
    with pytest.raises(KinemaError, match="no norm/proj_in/proj_out weights for 'down_blocks.1.motion_modules'"):
        infer_motion_config(sd)


def test_a_hotshotxl_file_is_named_and_refused_for_sdxl(tmp_path):
    """HotshotXL's temporal layers (``down_blocks.i.temporal_attentions.j...pos_encoder.positional_encoding``) are
    an SDXL motion model: the motion-module loader says so, not "an unrecognised model"."""
    from safetensors.torch import save_file

    sd = {}
    for key, value in demo.motion_state_dict("v2").items():
        key = key.replace(".motion_modules.", ".temporal_attentions.").replace(".temporal_transformer.", ".")
        sd[key.replace("pos_encoder.pe", "pos_encoder.positional_encoding")] = value.clone()
    path = tmp_path / "hsxl_temporal_layers.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=r"'hsxl_temporal_layers.safetensors' is a HotshotXL .*SDXL.* use an "
                                          r"AnimateDiff SD1\.5 motion module"):
        checkpoint.load_motion_module(str(path))
