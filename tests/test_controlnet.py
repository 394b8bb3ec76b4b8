"""SD1.5 ControlNet (models/controlnet.py): parity with diffusers, the controlled UNet, files, bad inputs.

The demo ControlNet (``tests/fixtures_controlnet.py``) is loaded into the engine in the original layout and into
diffusers' ``ControlNetModel`` through a key mapping written in the fixture; both are run on the same inputs
(fp32, within ``1e-5 * max(1, max |reference|)``).
"""
from dataclasses import replace

import pytest
import torch
from conftest import assert_net_close
from fixtures import diffusers_unet2d, unet
from fixtures_controlnet import (
    bare,
    controlnet,
    controlnet_state_dict,
    diffusers_controlnet,
    diffusers_controlnet_config,
    original_to_diffusers,
)
from kinema.models import addons, demo
from kinema.models.controlnet import (
    PREFIX,
    ControlNet,
    ControlNetConfig,
    diffusers_to_original,
    infer_controlnet_config,
    load_controlnet,
)
from kinema.models.errors import KinemaError
from kinema.models.layers import RunOptions
from kinema.models.sampling import DiscreteSchedule

pytest.importorskip("diffusers", exc_type=ImportError)


def _inputs(frames: int = 3, h: int = 16, w: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, 4, h, w, generator=g)
    hint = torch.rand(frames, 3, 8 * h, 8 * w, generator=g)
    t = torch.linspace(999.0, 1.0, frames)
    ctx = torch.randn(frames, 77, 64, generator=g)
    return x, hint, t, ctx


def _diffusers_residuals(x, hint, t, ctx):
    with torch.no_grad():
        down, mid = diffusers_controlnet()(x, t, ctx, hint, return_dict=False)
    return [*down, mid]


def _shapes_of(cfg: ControlNetConfig) -> dict[str, torch.Tensor]:
    """A ControlNet state dict of ``cfg`` on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return ControlNet(cfg).state_dict()


def _save(sd: dict, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _zeros_file(cfg: ControlNetConfig, path, extra: dict | None = None) -> str:
    """A ControlNet file of ``cfg`` (zero weights, ``control_model.`` keys) for the tests of other bases."""
    sd = {PREFIX + k: torch.zeros(v.shape) for k, v in _shapes_of(cfg).items()}
    return _save({**sd, **(extra or {})}, path)


# -- config ---------------------------------------------------------------------------------------------------------

def test_config_is_read_off_the_shapes():
    cfg = infer_controlnet_config(bare(controlnet_state_dict()))
    assert cfg == ControlNetConfig.for_unet(unet().cfg, demo.DEMO_CONTROLNET_HINT)
    assert cfg.hint_channels == (8, 16, 16, 32) and cfg.hint_scale == 8 and cfg.context_dim == 64
    controlnet().check_unet(unet().cfg)
    assert diffusers_controlnet_config(controlnet_state_dict())["conditioning_embedding_out_channels"] == (8, 16, 16, 32)


def test_the_published_sd15_layout_at_full_size():
    """At the real size (on the meta device): the config comes back from the shapes, and the keys and shapes are
    those of diffusers' SD1.5 ControlNetModel (340 tensors, as the published files)."""
    from diffusers import ControlNetModel

    real = ControlNetConfig()
    sd = _shapes_of(real)
    assert infer_controlnet_config(sd) == real and real.hint_channels == (16, 32, 96, 256)
    assert [tuple(sd[f"input_hint_block.{i}.weight"].shape[:2]) for i in range(0, 16, 2)] == [
        (16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (320, 256)]
    with torch.device("meta"):
        ref = ControlNetModel(cross_attention_dim=768).state_dict()
    ours = {k: tuple(v.shape) for k, v in original_to_diffusers(sd).items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.items()} and len(ours) == 340
    back = diffusers_to_original(ref)  # the engine's conversion of diffusers' own names
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_fixture_mapping_agrees_with_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    sd = controlnet_state_dict()
    theirs = convert_controlnet_checkpoint(dict(sd), diffusers_controlnet().config)
    ours = original_to_diffusers(sd)
    assert set(theirs) == set(ours) and all(theirs[k] is ours[k] for k in ours)


# -- parity -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])  # 12x20: odd sizes at the deepest level
def test_residuals_match_diffusers(h, w):
    x, hint, t, ctx = _inputs(h=h, w=w)
    with torch.no_grad():
        ours = controlnet()(x, hint, t, ctx)
    ref = _diffusers_residuals(x, hint, t, ctx)
    assert len(ours) == len(unet().input_blocks) + 1 == len(ref) == 13
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_net_close(a, b, f"residual {i}")
    # every residual depends on the hint (the hint enters after the first input block)
    with torch.no_grad():
        other = controlnet()(x, torch.rand_like(hint), t, ctx)
    assert all(float((a - b).abs().max()) > 1e-4 for a, b in zip(ours, other))


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_controlled_unet_matches_diffusers(h, w):
    x, hint, t, ctx = _inputs(h=h, w=w, seed=2)
    with torch.no_grad():
        ours = unet()(x, t, ctx, control=controlnet()(x, hint, t, ctx))
        plain = unet()(x, t, ctx)
        *down, mid = _diffusers_residuals(x, hint, t, ctx)
        ref = diffusers_unet2d()(x, t, ctx, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
    assert_net_close(ours, ref, "controlled UNet eps")
    assert float((ours - plain).abs().max()) > 1e-2  # the ControlNet steers the UNet


@pytest.mark.parametrize("filename,pooled", [("control_v11e_sd15_shuffle.safetensors", True),
                                              ("control_v11e_sd15_shuffle_fp16.safetensors", True),
                                              ("control_v11f1p_sd15_depth.safetensors", False),
                                              ("shuffle_depth.safetensors", False)])
def test_a_shuffle_controlnet_averages_its_residuals_over_the_image(filename, pooled, tmp_path):
    """lllyasviel's shuffle ControlNet runs with global average pooling (its config; ComfyUI tells it by the file
    name as here): every residual is its spatial mean, the other files' are as computed."""
    path = _save(bare(controlnet_state_dict()), tmp_path / filename)
    net = load_controlnet(path, dtype=torch.float32)
    assert net.global_average_pooling is pooled
    x, hint, t, ctx = _inputs()
    with torch.no_grad():
        got = net(x, hint, t, ctx)
        plain = controlnet()(x, hint, t, ctx)
    for a, b in zip(got, plain):
        want = b.mean(dim=(2, 3), keepdim=True).expand_as(b) if pooled else b
        torch.testing.assert_close(a, want, rtol=0, atol=1e-6)


def test_frames_are_independent_so_a_context_window_takes_its_own_hints():
    x, hint, t, ctx = _inputs(frames=4)
    net = controlnet()
    with torch.no_grad():
        full = net(x, hint, t, ctx, RunOptions(num_frames=4))
        part = net(x[1:3], hint[1:3], t[1:3], ctx[1:3], RunOptions(num_frames=2, attn_chunk=7))
    for a, b in zip(full, part):
        assert_net_close(b, a[1:3], "window residual")


def test_strength_and_stacked_controlnets_through_the_addons():
    x, hint, t, ctx = _inputs(frames=4)
    images = hint.permute(0, 2, 3, 1)  # IMAGE [f, h, w, 3]
    first = addons.control_hint(controlnet(), images, strength=0.5).prepared(4, 128, 128)
    second = addons.control_hint(controlnet(), images.flip(0), strength=2.0).prepared(4, 128, 128)
    window = [2, 3]
    with torch.no_grad():
        got = addons.control_residuals((first, second), x[:2], t[:2], ctx[:2], window, None,
                                       DiscreteSchedule("linear"), RunOptions(num_frames=2))
        a = controlnet()(x[:2], hint[2:4], t[:2], ctx[:2])
        b = controlnet()(x[:2], hint.flip(0)[2:4], t[:2], ctx[:2])
    for r, ra, rb in zip(got, a, b):
        assert_net_close(r, 0.5 * ra + 2.0 * rb, "stacked residual")


def test_a_v1_video_model_runs_its_controlnet_frame_by_frame():
    """AnimateDiff v1's UNet norms pool the frames of a video; its ControlNet, an image model, keeps every frame on
    its own (module doc): the residuals the video model adds are those of per-frame norms."""
    from fixtures import motion_model

    x, hint, t, ctx = _inputs(frames=4)
    net = controlnet()
    control = addons.control_hint(net, hint.permute(0, 2, 3, 1)).prepared(4, 128, 128)
    model = motion_model("v1").with_options(controls=(control,))
    seen = []
    handle = net.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x, t, ctx, 4)
    finally:
        handle.remove()
    hints = control.hints_for(range(4))
    with torch.no_grad():
        per_frame = net(x, hints, t, ctx, RunOptions(num_frames=4))
        pooled = net(x, hints, t, ctx, RunOptions(num_frames=4, cross_frame_norm=True))
    assert len(seen) == 1
    for got, want in zip(seen[0], per_frame):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert any(float((a - b).abs().max()) > 1e-4 for a, b in zip(per_frame, pooled))  # pooling would show


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_controlnet_computes_in_its_own_precision_for_a_unet_in_another(dtype):
    """A UNet in half precision (Memory Policy's precision, or loaders set apart) with a ControlNet in fp32: the
    ControlNet takes the UNet's activations in its own precision and gives its residuals back in the UNet's."""
    x, hint, t, ctx = _inputs()
    net = controlnet()
    with torch.no_grad():
        got = net(x.to(dtype), hint, t, ctx.to(dtype))
        want = net(x.to(dtype).float(), hint, t, ctx.to(dtype).float())
    for r, w in zip(got, want):
        assert r.dtype == dtype
        assert torch.equal(r, w.to(dtype))


# -- files ------------------------------------------------------------------------------------------------------------

def _as_pth(sd, path) -> str:
    torch.save(dict(sd), str(path))
    return str(path)


@pytest.mark.parametrize("layout", ["pth_prefixed", "v10_full_pth", "bare_fp16", "diffusers"])
def test_published_layouts_load(layout, tmp_path):
    sd = controlnet_state_dict()
    if layout == "pth_prefixed":  # lllyasviel/ControlNet-v1-1 .pth
        path = _as_pth(sd, tmp_path / "control_v11f1p_sd15_depth.pth")
    elif layout == "v10_full_pth":  # ControlNet 1.0: the whole SD1.5 model and the ControlNet in one file
        from fixtures import sd15_state_dict

        path = _as_pth({**sd15_state_dict(), **sd}, tmp_path / "control_sd15_depth.pth")
    elif layout == "bare_fp16":  # the fp16 safetensors repacks
        path = _save({k: v.half() for k, v in bare(sd).items()}, tmp_path / "control_v11f1p_sd15_depth_fp16.safetensors")
    else:  # diffusion_pytorch_model.safetensors
        path = _save(original_to_diffusers(sd), tmp_path / "diffusion_pytorch_model.safetensors")
    net = load_controlnet(path, dtype=torch.float32)
    assert net.name == path.rsplit("/", 1)[-1] and net.dtype == torch.float32
    got = net.state_dict()
    assert set(got) == set(bare(sd))
    for k, v in bare(sd).items():
        want = v.half().float() if layout == "bare_fp16" else v
        assert torch.equal(got[k], want), k
    if layout == "bare_fp16":
        assert load_controlnet(path).dtype == torch.float16  # no dtype: as stored


def test_demo_file_is_written_and_substituted(demo_models_dir):
    path = demo.write_demo_models(demo_models_dir)["controlnet"]
    assert path.endswith("controlnet/" + demo.DEMO_CONTROLNET)
    assert demo.substitute("controlnet", "control_v11f1p_sd15_depth.pth") == demo.DEMO_CONTROLNET
    net = load_controlnet(path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in bare(controlnet_state_dict()).items())
    zero_convs = [v for k, v in net.state_dict().items() if k.startswith(("zero_convs.", "middle_block_out."))]
    assert all(float(v.abs().max()) > 0 for v in zero_convs)  # not the untrained zeros: the demo has an effect


# -- bad inputs -----------------------------------------------------------------------------------------------------

def test_an_sd15_checkpoint_is_not_a_controlnet(tmp_path):
    from fixtures import sd15_state_dict

    path = _save(sd15_state_dict(), tmp_path / "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(KinemaError, match=r"'v1-5-pruned-emaonly.safetensors' is an SD1.5 checkpoint.*checkpoints"):
        load_controlnet(path)


@pytest.mark.parametrize("what,match", [
    ("motion_module", "AnimateDiff motion module.*animatediff_models"),
    ("t2i_adapter", "T2I-Adapter"),
    ("sparsectrl", "SparseCtrl"),
    ("label_emb", "SDXL ControlNet"),
    ("diffusers_sdxl", "SDXL ControlNet"),
    ("bad_hint_block", "input_hint_block"),
])
def test_other_models_are_named(what, match, tmp_path):
    sd = controlnet_state_dict()
    if what == "motion_module":
        from fixtures import motion_state_dict

        bad = motion_state_dict("v2")
    elif what == "t2i_adapter":
        bad = {"conv_in.weight": torch.zeros(8, 192, 3, 3), "body.0.block1.weight": torch.zeros(8, 8, 3, 3)}
    elif what == "sparsectrl":
        bad = {**original_to_diffusers(sd), "down_blocks.0.motion_modules.0.proj_in.weight": torch.zeros(4, 4)}
    elif what == "label_emb":
        bad = {**sd, PREFIX + "label_emb.0.0.weight": torch.zeros(1280, 2816)}
    elif what == "diffusers_sdxl":
        bad = {**original_to_diffusers(sd), "add_embedding.linear_1.weight": torch.zeros(1280, 2816)}
    else:
        bad = {k: v for k, v in sd.items() if not k.startswith(PREFIX + "input_hint_block.4.")}
    path = _save(bad, tmp_path / f"{what}.safetensors")
    with pytest.raises(KinemaError, match=match) as err:
        load_controlnet(path)
    assert f"{what}.safetensors" in str(err.value)


@pytest.mark.parametrize("context_dim,linear,base", [(2048, False, "SDXL"), (1024, True, "SD2.x"), (64, True, "SD2.x")])
def test_a_controlnet_for_another_base_is_refused_by_check_unet(context_dim, linear, base, tmp_path):
    cfg = replace(infer_controlnet_config(bare(controlnet_state_dict())), context_dim=context_dim, linear_proj=linear)
    net = load_controlnet(_zeros_file(cfg, tmp_path / "control_other.safetensors"))
    assert net.cfg.context_dim == context_dim and net.cfg.linear_proj == linear
    with pytest.raises(KinemaError, match=rf"'control_other.safetensors' is an {base} ControlNet.*SD1.5 ControlNet"):
        net.check_unet(unet().cfg)


def test_the_apply_controlnet_node_refuses_a_controlnet_for_another_base(tmp_path):
    """Refused where it is attached, naming the file, not as a shape error in the middle of sampling."""
    from fixtures import motion_model
    from kinema.nodes.structure import KinemaApplyControlNet

    cfg = replace(infer_controlnet_config(bare(controlnet_state_dict())), context_dim=1024, linear_proj=True)
    net = load_controlnet(_zeros_file(cfg, tmp_path / "control_sd21.safetensors"))
    model = motion_model("v2")
    with pytest.raises(KinemaError, match=r"'control_sd21.safetensors' is an SD2.x ControlNet"):
        KinemaApplyControlNet().apply(model, net, torch.zeros(8, 64, 64, 3))
    assert model.controls == ()


def test_a_controlnet_for_another_unet_layout_is_refused(tmp_path):
    cfg = ControlNetConfig.for_unet(replace(unet().cfg, model_channels=64), (8, 8))
    net = load_controlnet(_zeros_file(cfg, tmp_path / "wide.safetensors"))
    assert net.cfg.hint_scale == 2
    with pytest.raises(KinemaError, match=r"another UNet: its model_channels 64 \(the model's: 32\)"):
        net.check_unet(unet().cfg)


def test_a_controlnet_with_attention_at_other_levels_is_refused(tmp_path):
    """The same residual shapes, but attention at other levels: another layout, not silently run."""
    cfg = ControlNetConfig.for_unet(replace(unet().cfg, attention_levels=(0, 1)), (8, 8))
    net = load_controlnet(_zeros_file(cfg, tmp_path / "levels.safetensors"))
    with pytest.raises(KinemaError, match=r"another UNet: its attention_levels \(0, 1\) \(the model's: \(0, 1, 2\)\)"):
        net.check_unet(unet().cfg)


def test_a_unet_refuses_residuals_of_another_layout():
    x, hint, t, ctx = _inputs(frames=2)
    with torch.no_grad():
        residuals = controlnet()(x, hint, t, ctx)
        with pytest.raises(KinemaError, match="the ControlNet gives 12 residuals, the UNet takes 13"):
            unet()(x, t, ctx, control=residuals[1:])
        with pytest.raises(KinemaError, match="the ControlNet gives 14 residuals, the UNet takes 13"):
            unet()(x, t, ctx, control=(*residuals, residuals[-1]))


def test_a_hint_of_the_wrong_size_names_the_expected_size():
    x, hint, t, ctx = _inputs(frames=2, h=8, w=12)
    with pytest.raises(KinemaError, match=r"expected \(2, 3, 64, 96\).*96x64 pixels"):
        controlnet()(x, hint[..., :80], t, ctx)
    with pytest.raises(KinemaError, match="expected"):
        controlnet()(x, hint[:1], t, ctx, RunOptions(num_frames=2))  # one hint for two frames
    two = torch.cat([x, x])  # two videos of 2 frames: one hint per frame is shared, one for both is not
    with pytest.raises(KinemaError, match="expected"):
        controlnet()(two, hint[:1], t.repeat(2), ctx.repeat(2, 1, 1), RunOptions(num_frames=2))


def test_a_hint_per_frame_is_shared_by_the_videos_of_the_batch():
    x, hint, t, ctx = _inputs(frames=2)
    two = torch.cat([x, x.flip(0)])
    with torch.no_grad():
        shared = controlnet()(two, hint, t.repeat(2), ctx.repeat(2, 1, 1), RunOptions(num_frames=2))
        full = controlnet()(two, hint.repeat(2, 1, 1, 1), t.repeat(2), ctx.repeat(2, 1, 1), RunOptions(num_frames=2))
    for a, b in zip(shared, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix,match", [(".safetensors", "truncated"), (".pth", "truncated|damaged")])
def test_a_truncated_file_is_named(suffix, match, tmp_path):
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        _as_pth(controlnet_state_dict(), full)
    else:
        _save(controlnet_state_dict(), full)
    cut = tmp_path / f"control_cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(KinemaError, match=match) as err:
        load_controlnet(str(cut))
    assert f"control_cut{suffix}" in str(err.value)


@pytest.mark.parametrize("field,value", [("in_channels", 9), ("transformer_depth", 2)])
def test_a_controlnet_for_another_unet_input_or_depth_is_refused(field, value, tmp_path):
    """``check_unet`` compares the latent channels (an inpainting-style 9-channel ControlNet) and the transformer
    depth too, naming the field, not only widths and attention levels."""
    cfg = ControlNetConfig.for_unet(replace(unet().cfg, **{field: value}), (8, 8))
    net = load_controlnet(_zeros_file(cfg, tmp_path / "other.safetensors"))
    with pytest.raises(KinemaError, match=rf"another UNet: its {field} {value} \(the model's: "):
        net.check_unet(unet().cfg)


# -- mutation audit: gaps -------------------------------------------------------------------------------------------

def test_a_diffusers_layout_controlnet_with_keys_kinema_does_not_know_is_refused(tmp_path):
    """``diffusers_to_original`` refuses a diffusers-layout file holding modules it has no original name for (e.g.
    ControlNet-Union's ``task_embedding``/``spatial_ch_projs``), naming the first: such a file is not run as a plain
    SD1.5 ControlNet with those weights silently dropped."""
    sd = {**original_to_diffusers(controlnet_state_dict()), "spatial_ch_projs.weight": torch.zeros(32, 32)}
    path = _save(sd, tmp_path / "union.safetensors")
    with pytest.raises(KinemaError, match=r"'union.safetensors' is a diffusers-layout ControlNet with keys Kinema "
                                          r"does not know \(first: 'spatial_ch_projs.weight'\)"):
        load_controlnet(path)


def test_the_hint_channel_count_is_read_off_the_file(tmp_path):
    """``hint_in_channels`` comes from the file's first hint convolution, not assumed to be 3: a ControlNet made
    for 1-channel hints loads and checks its hints against 1 channel."""
    cfg = replace(ControlNetConfig.for_unet(unet().cfg, (8, 8)), hint_in_channels=1)
    net = load_controlnet(_zeros_file(cfg, tmp_path / "gray.safetensors"))
    assert net.cfg.hint_in_channels == 1
    x, _, t, ctx = _inputs(frames=2, h=8, w=8)
    with torch.no_grad():
        assert len(net(x, torch.rand(2, 1, 16, 16), t, ctx)) == 13
    with pytest.raises(KinemaError, match=r"expected \(2, 1, 16, 16\)"):
        net(x, torch.rand(2, 3, 16, 16), t, ctx)


def test_a_batch_of_no_whole_number_of_videos_does_not_share_the_hints():
    """A hint of ``num_frames`` images is shared only by a batch of whole videos: 3 latents for videos of 2 frames
    are refused as a KinemaError naming the expected hint, not a shape error inside the network."""
    x, hint, t, ctx = _inputs(frames=3)
    with pytest.raises(KinemaError, match=r"expected \(3, 3, 128, 128\)"):
        controlnet()(x, hint[:2], t, ctx, RunOptions(num_frames=2))


@pytest.mark.parametrize("what,match", [
    ("adapter_body", "T2I-Adapter"),
    ("control_lora", "Control-LoRA"),
    ("control_lora_whole_hint_block", "Control-LoRA"),
    ("class_embedding", "SDXL ControlNet"),
])
def test_more_files_that_are_not_sd15_controlnets_are_named(what, match, tmp_path):
    """The other layouts ``_original_layout`` tells apart: T2I-Adapters saved with an ``adapter.`` prefix,
    Control-LoRAs (``lora_controlnet``; Stability's files also hold the hint block, the zero convs and
    ``label_emb`` whole, so the marker is looked at first) and diffusers ControlNets with a ``class_embedding``
    are named as what they are, not as unknown files, SDXL ControlNets or unknown diffusers keys."""
    if what == "adapter_body":
        bad = {"adapter.conv_in.weight": torch.zeros(8, 192, 3, 3),
               "adapter.body.0.block1.weight": torch.zeros(8, 8, 3, 3)}
    elif what == "control_lora":
        bad = {"lora_controlnet": torch.zeros(1), "input_blocks.1.0.in_layers.2.up": torch.zeros(8, 4)}
    elif what == "control_lora_whole_hint_block":
        bad = {**controlnet_state_dict(), "label_emb.0.0.weight": torch.zeros(8, 8), "lora_controlnet": torch.zeros(1),
               "input_blocks.1.0.in_layers.2.up": torch.zeros(8, 4)}
    else:
        bad = {**original_to_diffusers(controlnet_state_dict()), "class_embedding.linear_1.weight": torch.zeros(8, 8)}
    path = _save(bad, tmp_path / f"{what}.safetensors")
    with pytest.raises(KinemaError, match=match) as err:
        load_controlnet(path)
    assert f"{what}.safetensors" in str(err.value)


def test_a_half_precision_controlnet_runs_on_float32_inputs():
    """A ControlNet loaded in bf16 (an fp16 repack loaded as stored, or a dtype asked for) takes fp32 latents,
    hints (images) and timestep embeddings in its own precision and gives fp32 residuals close to the fp32 net's."""
    from kinema.models.controlnet import controlnet_from_state_dict

    net = controlnet_from_state_dict(controlnet_state_dict(), "demo_controlnet", torch.bfloat16)
    x, hint, t, ctx = _inputs(frames=2)
    with torch.no_grad():
        got = net(x, hint, t, ctx)
        want = controlnet()(x, hint, t, ctx)
    for r, w in zip(got, want):
        assert r.dtype == torch.float32
        assert float((r - w).abs().max()) <= 0.1 * max(1.0, float(w.abs().max()))


def test_a_controlnet_with_a_malformed_tensor_is_named_as_damaged(tmp_path):
    """A tensor of the wrong rank where the config is read (a 1-D hint convolution) is a KinemaError naming the file
    as damaged (``damaged_file``), not a raw IndexError."""
    sd = {**bare(controlnet_state_dict()), "input_hint_block.0.weight": torch.zeros(8)}
    path = _save(sd, tmp_path / "control_bad.safetensors")
    with pytest.raises(KinemaError, match=r"'control_bad.safetensors' is damaged or not an SD1.5 ControlNet"):
        load_controlnet(path)
