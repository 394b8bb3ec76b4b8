"""LoRAs: merge math, copy-on-write, MotionLoRA (parity with diffusers), SD1.5 LoRAs (kohya, LDM names, the v3
adapter layout; parity with diffusers), bad files, and the two nodes called without ComfyUI.

Parity tolerance as in test_parity.py: ``1e-5 * max(1, max |reference|)`` on the networks' outputs, fp32.
"""
import copy
import logging
import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from conftest import assert_net_close, load_pack
from fixtures import motion_model, motion_modules, sd15_state_dict, unet

from kinema.models import checkpoint, demo, lora
from kinema.models.patching import is_deferred, materialize
from kinema.models.encoders import TextEncoder
from kinema.models.errors import KinemaError

FRAMES, HW = 8, 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)




def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the original's '{k}' changed"


def text_encoder():
    """A fresh TextEncoder on the demo weights (its tensors are those of the cached state dict: read-only)."""
    return TextEncoder.from_state_dict(sd15_state_dict())


def _video_inputs():
    g = _gen(2)
    x = torch.randn(2 * FRAMES, 4, HW, HW, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g).repeat_interleave(FRAMES, dim=0)
    return x, torch.tensor(500.0), ctx


def _kinema_eps(model, x, t, ctx):
    with torch.no_grad():
        return model(x, t.expand(x.shape[0]), ctx, FRAMES)


def _diffusers_eps(model, x, t, ctx):
    with torch.no_grad():
        out = model(rearrange(x, "(b f) c h w -> b c f h w", f=FRAMES), t, ctx).sample
    return rearrange(out, "b c f h w -> (b f) c h w")


def _image_inputs():
    g = _gen(3)
    return torch.randn(2, 4, HW, HW, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 64, generator=g)


# -- merge math --------------------------------------------------------------------------------------------------

def test_pair_delta_linear_conv_and_locon():
    g = _gen(0)
    down, up = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    pair = lora.LoRAPair(down, up, alpha=1.5)
    assert pair.scale == 0.5
    torch.testing.assert_close(pair.delta((7, 5)), 0.5 * up @ down)
    # 1x1 conv
    pair = lora.LoRAPair(down.reshape(3, 5, 1, 1), up.reshape(7, 3, 1, 1))
    torch.testing.assert_close(pair.delta((7, 5, 1, 1)), (up @ down).reshape(7, 5, 1, 1))
    # 3x3 LoCon: conv with the delta == conv with down, then 1x1 conv with up
    down3 = torch.randn(3, 5, 3, 3, generator=g)
    pair = lora.LoRAPair(down3, up.reshape(7, 3, 1, 1), alpha=3.0)
    x = torch.randn(2, 5, 6, 6, generator=g)
    direct = F.conv2d(F.conv2d(x, down3, padding=1), up.reshape(7, 3, 1, 1))
    torch.testing.assert_close(F.conv2d(x, pair.delta((7, 5, 3, 3)), padding=1), direct, rtol=1e-5, atol=1e-5)
    assert pair.fits((7, 5, 3, 3)) and not pair.fits((7, 5, 1, 1)) and not pair.fits((8, 5, 3, 3))


def test_merge_is_copy_on_write_and_merges_in_fp32():
    g = _gen(1)
    base = nn.Sequential(nn.Linear(5, 7), nn.Sequential(nn.Linear(7, 7), nn.Linear(7, 3))).half()
    before = snapshot(base)
    pair = lora.LoRAPair(torch.randn(2, 7, generator=g), torch.randn(7, 2, generator=g) * 1e-3, alpha=4.0)
    merged = lora.merge(base, [({"1.0.weight": pair}, 0.5)])
    assert is_deferred(merged) and merged[1][0].weight is base[1][0].weight  # computed when first used
    assert materialize(merged) is merged and not is_deferred(merged)
    assert_unchanged(base, before)
    want = (before["1.0.weight"].float() + 0.5 * 2.0 * (pair.up @ pair.down)).half()
    assert merged[1][0].weight.dtype == torch.float16 and torch.equal(merged[1][0].weight, want)
    assert merged is not base and merged[1] is not base[1] and merged[1][0] is not base[1][0]
    assert merged[0] is base[0] and merged[1][1] is base[1][1]  # untouched branches are the same modules
    assert merged[1][0].bias is base[1][0].bias
    assert lora.merge(base, [({"1.0.weight": pair}, 0.0)]) is base  # strength 0: the same object
    # a patch naming no weight (the v3 adapter's LoRA for the text encoder): the same object, left as it was
    assert lora.merge(base, [({}, 1.0)]) is base and not [k for k in vars(base) if k.startswith("_kinema")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chained_merges_round_once_in_any_order(dtype):
    """LoRAs stacked by chained nodes merge onto the unpatched weights together (ComfyUI's patching: one fp32 sum,
    one rounding): the same weights in either order and as one call; a LoRA then its negative gives the
    weights back exactly; a recast copy (Memory Policy) is merged onto as it is."""
    from kinema.models.memory import cast_weights

    g = _gen(2)
    base = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(dtype)
    before = snapshot(base)
    a = {"0.weight": lora.LoRAPair(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g) * 0.05, 4.0),
         "1.weight": lora.LoRAPair(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g) * 0.05, 4.0)}
    b = {"0.weight": lora.LoRAPair(torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g) * 0.05, 8.0)}
    one_call = lora.merge(base, [(a, 0.7), (b, -1.3)])
    a_then_b = lora.merge(lora.merge(base, [(a, 0.7)]), [(b, -1.3)])
    b_then_a = lora.merge(lora.merge(base, [(b, -1.3)]), [(a, 0.7)])
    shape = base[0].weight.shape  # the fp32 sum of the two updates, added to the weight, rounded once
    want = (before["0.weight"].float() + (0.7 * a["0.weight"].delta(shape) - 1.3 * b["0.weight"].delta(shape)))
    want = want.to(dtype)
    for merged in (one_call, a_then_b, b_then_a):
        materialize(merged)
        assert torch.equal(merged[0].weight, want) and torch.equal(merged[1].weight, one_call[1].weight)
    back = materialize(lora.merge(lora.merge(base, [(a, 1.0)]), [(a, -1.0)]))
    assert torch.equal(back[0].weight, base[0].weight) and torch.equal(back[1].weight, base[1].weight)
    assert_unchanged(base, before)
    recast = cast_weights(lora.merge(base, [(a, 0.7)]), torch.float32)  # its own weights: merged onto as they are
    assert torch.equal(materialize(lora.merge(recast, [(b, 1.0)]))[1].weight, recast[1].weight)


# -- MotionLoRA ----------------------------------------------------------------------------------------------------

def motion_lora_sd(seed=0):
    return demo.motion_lora_state_dict(seed)


def test_motion_lora_copy_on_write_shares_unpatched_tensors():
    mm = motion_modules("v2")
    before = snapshot(mm)
    new = materialize(lora.apply_motion_loras(mm, [(motion_lora_sd(), 1.0, "demo")]))
    assert_unchanged(mm, before)
    old_p, new_p = dict(mm.named_parameters()), dict(new.named_parameters())
    patched = {k for k in new_p if new_p[k].data_ptr() != old_p[k].data_ptr()}
    lora_targets = {k for k in old_p if ".attention_blocks." in k and k.endswith(("to_q.weight", "to_k.weight",
                                                                                  "to_v.weight", "to_out.0.weight"))}
    assert patched == lora_targets  # new tensors for the patched weights only
    assert all(new_p[k] is old_p[k] for k in old_p if k not in patched)
    new_b, old_b = dict(new.named_buffers()), dict(mm.named_buffers())
    assert all(new_b[k] is old_b[k] for k in old_b)  # positional tables shared
    assert new.version == "v2" and new.cfg == mm.cfg and new.loras == (("demo", 1.0),)
    new.check_unet(unet().cfg)


def _deltas(new, base):
    materialize(new)
    old = dict(base.named_parameters())
    return {k: v.detach() - old[k].detach() for k, v in new.named_parameters()}


def test_motion_lora_strengths_and_stacking():
    mm = motion_modules("v2")
    a, b = motion_lora_sd(0), motion_lora_sd(1)
    assert lora.apply_motion_loras(mm, [(a, 0.0, "a")]) is mm
    pos = _deltas(lora.apply_motion_loras(mm, [(a, 0.8, "a")]), mm)
    neg = _deltas(lora.apply_motion_loras(mm, [(a, -0.8, "a")]), mm)
    for k in pos:
        torch.testing.assert_close(neg[k], -pos[k], rtol=0, atol=1e-6)
    # the update is exactly strength * up @ down on the named weight
    block = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1"
    key, param = f"{block}.processor.to_out_lora", f"{block}.to_out.0.weight"
    torch.testing.assert_close(pos[param], 0.8 * a[f"{key}.up.weight"] @ a[f"{key}.down.weight"], rtol=1e-5,
                               atol=1e-6)
    # stacking two = the summed deltas, in one go or chained
    both = _deltas(lora.apply_motion_loras(mm, [(a, 0.5, "a"), (b, -0.7, "b")]), mm)
    da = _deltas(lora.apply_motion_loras(mm, [(a, 0.5, "a")]), mm)
    db = _deltas(lora.apply_motion_loras(mm, [(b, -0.7, "b")]), mm)
    chained_module = lora.apply_motion_loras(lora.apply_motion_loras(mm, [(a, 0.5, "a")]), [(b, -0.7, "b")])
    chained = _deltas(chained_module, mm)
    assert chained_module.loras == (("a", 0.5), ("b", -0.7))
    for k in both:
        torch.testing.assert_close(both[k], da[k] + db[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(chained[k], da[k] + db[k], rtol=0, atol=1e-6)


def test_motion_lora_matches_diffusers():
    pytest.importorskip("peft", exc_type=ImportError)
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from fixtures import diffusers_motion_unet

    sd, strength = motion_lora_sd(), 0.8
    ours = motion_model("v2").with_options(motion=lora.apply_motion_loras(motion_modules("v2"), [(sd, strength, "d")]))
    ref = diffusers_motion_unet("v2")
    # diffusers' own converter renames the motion-module paths; its LoRA loader reads the processor-style names
    ref.load_lora_adapter(convert_animatediff_checkpoint_to_diffusers(dict(sd)), prefix=None, adapter_name="motion")
    ref.fuse_lora(lora_scale=strength)
    x, t, ctx = _video_inputs()
    got, want = _kinema_eps(ours, x, t, ctx), _diffusers_eps(ref, x, t, ctx)
    assert_net_close(got, want, "v2 + MotionLoRA eps")
    plain = _kinema_eps(motion_model("v2"), x, t, ctx)
    assert float((got - plain).abs().max()) > 1e-2  # the LoRA does change the result


def test_a_motion_lora_saved_from_a_ddp_wrapper_loads_as_the_plain_one(tmp_path):
    sd = motion_lora_sd()
    save_file({f"module.{k}": v for k, v in sd.items()}, str(tmp_path / "ddp.safetensors"))
    loaded = lora.load_motion_lora(str(tmp_path / "ddp.safetensors"))
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", ["processor", "peft"])
def test_a_motion_lora_in_diffusers_layout_equals_the_published_one(tmp_path, layout):
    """A MotionLoRA converted for diffusers: diffusers' renames with ``unet.`` before every key (what its conversion
    script writes: processor halves), or the peft halves diffusers holds after loading it (``lora_A/lora_B``)."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    sd, strength = motion_lora_sd(), 0.8
    renamed = convert_animatediff_checkpoint_to_diffusers(dict(sd))
    if layout == "peft":
        pytest.importorskip("peft", exc_type=ImportError)
        from fixtures import diffusers_motion_unet
        from peft import get_peft_model_state_dict

        ref = diffusers_motion_unet("v2")
        ref.load_lora_adapter(renamed, prefix=None, adapter_name="motion")
        renamed = get_peft_model_state_dict(ref, adapter_name="motion")
        assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in renamed)
    save_file({f"unet.{k}": v.contiguous() for k, v in renamed.items()}, str(tmp_path / "zoom.safetensors"))
    loaded = lora.load_motion_lora(str(tmp_path / "zoom.safetensors"))
    mm = motion_modules("v2")
    got = materialize(lora.apply_motion_loras(mm, [(loaded, strength, "diffusers")])).state_dict()
    want = materialize(lora.apply_motion_loras(mm, [(sd, strength, "published")])).state_dict()
    changed = [k for k in want if not torch.equal(want[k], mm.state_dict()[k])]
    assert len(changed) == sum(1 for k in sd if k.endswith("_lora.down.weight"))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-7, msg=key)


def test_v2_motion_lora_on_v3_skips_the_mid_block(caplog):
    mm = motion_modules("v3")
    sd = motion_lora_sd()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        new = materialize(lora.apply_motion_loras(mm, [(sd, 1.0, "zoom")]))
    mid_pairs = sum(1 for k in sd if k.startswith("mid_block.") and k.endswith("_lora.down.weight"))
    assert mid_pairs == 8
    assert f"{mid_pairs} weights for motion modules that this v3 motion module does not have (mid_block)" in caplog.text
    patched = [k for k, v in new.named_parameters() if v is not dict(mm.named_parameters())[k]]
    assert len(patched) == sum(1 for k in sd if k.endswith("_lora.down.weight")) - mid_pairs


def test_motion_lora_that_does_not_fit_is_refused():
    mm = motion_modules("v2")
    sd = motion_lora_sd()
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("down.weight") else v) for k, v in sd.items()}
    with pytest.raises(KinemaError, match="does not fit this motion module"):
        lora.apply_motion_loras(mm, [(wide, 1.0, "wide")])
    only_mid = {k: v for k, v in sd.items() if k.startswith("mid_block.")}
    with pytest.raises(KinemaError, match="none of the MotionLoRA 'mid' weights match"):
        lora.apply_motion_loras(motion_modules("v3"), [(only_mid, 1.0, "mid")])
    half = {k: v for k, v in sd.items() if not k.endswith("up.weight")}
    with pytest.raises(KinemaError, match="incomplete"):
        lora.apply_motion_loras(mm, [(half, 1.0, "half")])


# -- SD1.5 LoRA: key mapping -------------------------------------------------------------------------------------

def _value_key(t):
    return (tuple(t.shape), zlib.crc32(t.detach().float().contiguous().numpy().tobytes()))


def independent_diffusers_to_ldm():
    """diffusers UNet module path -> our LDM parameter name, found by matching tensor values between the demo UNet
    and diffusers' own conversion of the same checkpoint (independent of the engine's mapping)."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures import diffusers_unet2d

    ours = {}
    for k, v in unet().state_dict().items():
        if k.endswith(".weight") and v.ndim >= 2:
            ours.setdefault(_value_key(v), []).append(k)
    out = {}
    for k, v in diffusers_unet2d().state_dict().items():
        if k.endswith(".weight") and v.ndim >= 2:
            match = ours.get(_value_key(v), [])
            assert len(match) == 1, k
            out[k[: -len(".weight")]] = match[0]
    return out


def test_diffusers_to_ldm_mapping_matches_diffusers_conversion():
    ref = independent_diffusers_to_ldm()
    targets = lora.unet_lora_targets(unet())
    assert len(ref) == len({v for v in targets.values()})  # every layer with a weight
    for diff, param in ref.items():
        assert targets["lora_unet_" + diff.replace(".", "_")] == param
        assert targets[diff] == param and targets[f"unet.{diff}"] == param
        ldm = param[: -len(".weight")]
        assert targets["lora_unet_" + ldm.replace(".", "_")] == param



def test_the_block_map_names_only_modules_both_unets_have():
    """Every entry of the LDM -> diffusers block map is a module of our UNet and of diffusers' (no upsampler for the
    outermost up block, which has none in either), and no two LDM modules map to one diffusers module."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures import diffusers_unet2d

    model = unet()
    blocks = lora.ldm_to_diffusers_blocks(model.cfg)
    ours, theirs = dict(model.named_modules()), dict(diffusers_unet2d().named_modules())
    assert [k for k in blocks if k not in ours] == []
    assert [v for v in blocks.values() if v not in theirs] == []
    assert len(set(blocks.values())) == len(blocks)


# -- SD1.5 LoRA: merging -------------------------------------------------------------------------------------------

KNOWN = {  # kohya name -> (part, parameter), written by hand from the SD1.5 block structure
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0":
        ("unet", "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0.weight"),
    "lora_unet_up_blocks_1_attentions_2_proj_out": ("unet", "output_blocks.5.1.proj_out.weight"),
    "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_0_proj":
        ("unet", "output_blocks.9.1.transformer_blocks.0.ff.net.0.proj.weight"),
    "lora_unet_mid_block_resnets_1_conv2": ("unet", "middle_block.2.out_layers.3.weight"),
    "lora_unet_up_blocks_0_resnets_2_conv1": ("unet", "output_blocks.2.0.in_layers.2.weight"),
    "lora_te_text_model_encoder_layers_1_mlp_fc2": ("clip", "encoder.layers.1.mlp.fc2.weight"),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": ("clip", "encoder.layers.0.self_attn.out_proj.weight"),
}


def _param(module, name):
    params = dict(module.named_parameters())
    return params[name] if name in params else params[f"text_model.{name}"]


def test_kohya_lora_against_a_direct_computation():
    sd = demo.sd15_lora_state_dict()
    te, base_unet = text_encoder(), unet()
    before_unet, before_te = snapshot(base_unet), snapshot(te.model)
    new_unet, new_te = lora.apply_sd15_loras(base_unet, te, [(sd, 0.8, -0.6, "demo")])
    materialize(new_unet), materialize(new_te.model)
    assert_unchanged(base_unet, before_unet)
    assert_unchanged(te.model, before_te)
    for key, (part, param) in KNOWN.items():
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        scale = float(sd[f"{key}.alpha"]) / down.shape[0] * (0.8 if part == "unet" else -0.6)
        base = _param(base_unet if part == "unet" else te.model, param)
        want = base + scale * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        got = _param(new_unet if part == "unet" else new_te.model, param)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # every other weight is the original tensor; patched ones are new
    n_lora = sum(1 for k in sd if k.endswith(".lora_down.weight"))
    changed = [k for k, v in new_unet.named_parameters() if v is not dict(base_unet.named_parameters())[k]]
    changed += [k for k, v in new_te.model.named_parameters() if v is not dict(te.model.named_parameters())[k]]
    assert len(changed) == n_lora
    assert new_te.chunk_length == te.chunk_length and new_te.model is not te.model


def test_ldm_named_lora_equals_the_kohya_one():
    sd = demo.sd15_lora_state_dict()
    to_ldm = {d.replace(".", "_"): p[: -len(".weight")].replace(".", "_")
              for d, p in independent_diffusers_to_ldm().items()}
    ldm_sd = {}
    for k, v in sd.items():
        base, _, rest = k.partition(".")
        if base.startswith("lora_unet_"):
            base = "lora_unet_" + to_ldm[base[len("lora_unet_"):]]
        ldm_sd[f"{base}.{rest}"] = v
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in ldm_sd
    a, _ = lora.apply_sd15_loras(unet(), None, [(sd, 1.0, 1.0, "kohya")])
    b, _ = lora.apply_sd15_loras(unet(), None, [(ldm_sd, 1.0, 1.0, "ldm")])
    pa, pb = dict(materialize(a).named_parameters()), dict(materialize(b).named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("layout", ["comfyui_extracted", "ldm_checkpoint_prefix", "diffusers_lora_compatible"])
def test_other_unet_lora_layouts_equal_the_kohya_one(layout):
    """LDM names under ComfyUI's Extract and Save Lora prefix ("diffusion_model.") or a checkpoint's
    ("model.diffusion_model."), and diffusers' layout before peft ("unet.<path>.lora.down.weight")."""
    sd = demo.sd15_lora_state_dict()
    to_ldm = independent_diffusers_to_ldm()
    by_kohya = {d.replace(".", "_"): d for d in to_ldm}
    suffixes = {"lora_down.weight": "lora.down.weight", "lora_up.weight": "lora.up.weight", "alpha": "alpha"}
    other = {}
    for k, v in sd.items():
        base, _, rest = k.partition(".")
        if not base.startswith("lora_unet_"):
            continue
        diffusers = by_kohya[base[len("lora_unet_"):]]
        if layout == "diffusers_lora_compatible":
            other[f"unet.{diffusers}.{suffixes[rest]}"] = v
        else:
            prefix = "diffusion_model." if layout == "comfyui_extracted" else "model.diffusion_model."
            other[f"{prefix}{to_ldm[diffusers][: -len('.weight')]}.{rest}"] = v
    assert checkpoint.detect_format(other) == "lora"
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    a, _ = lora.apply_sd15_loras(unet(), None, [(unet_only, 1.0, 1.0, "kohya")])
    b, _ = lora.apply_sd15_loras(unet(), None, [(other, 1.0, 1.0, layout)])
    pa, pb = dict(materialize(a).named_parameters()), dict(materialize(b).named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], dict(unet().named_parameters())[k]) for k in pa)


@pytest.mark.parametrize("prefix", ["text_encoder.text_model.", "text_encoder."])
def test_a_peft_text_encoder_lora_equals_the_kohya_one(prefix):
    """diffusers' peft layout for the text encoder: text_encoder.text_model.<path>.lora_A/lora_B, or without the
    text_model. (the names of the CLIPTextModel's inner text_model, as some conversions write them)."""
    sd = demo.sd15_lora_state_dict()
    te = text_encoder()
    by_kohya = {n.removeprefix("text_model.").replace(".", "_"): n.removeprefix("text_model.")
                for n, m in te.model.named_modules() if isinstance(m, nn.Linear)}
    roles = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    kohya, peft = {}, {}
    for k, v in sd.items():
        base, _, rest = k.partition(".")
        if base.startswith("lora_te_text_model_"):
            kohya[k] = v
            peft[f"{prefix}{by_kohya[base[len('lora_te_text_model_'):]]}.{roles[rest]}"] = v
    assert kohya and len(peft) == len(kohya)
    _, a = lora.apply_sd15_loras(unet(), te, [(kohya, 1.0, 0.7, "kohya")])
    _, b = lora.apply_sd15_loras(unet(), te, [(peft, 1.0, 0.7, "peft")])
    pa, pb = dict(materialize(a.model).named_parameters()), dict(materialize(b.model).named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], p) for k, p in te.model.named_parameters())


@pytest.mark.parametrize("layout,prefix", [("lora_linear_layer", "text_encoder.text_model."),
                                           ("attention_processor", "text_encoder.text_model."),
                                           ("attention_processor", "text_encoder.")])
def test_an_earlier_diffusers_text_encoder_lora_equals_the_kohya_one(layout, prefix):
    """diffusers' text-encoder LoRA names before peft: ``text_encoder.text_model.<path>.lora_linear_layer.{down,up}``
    (0.18 to 0.21), and before that ``self_attn.{to_q,to_k,to_v,to_out}_lora.{down,up}`` with the MLP in
    ``lora_linear_layer`` names (what diffusers' own conversion reads). Neither carries an alpha."""
    sd = demo.sd15_lora_state_dict()
    te = text_encoder()
    by_kohya = {n.removeprefix("text_model.").replace(".", "_"): n.removeprefix("text_model.")
                for n, m in te.model.named_modules() if isinstance(m, nn.Linear)}
    early = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    kohya, diffusers = {}, {}
    for k, v in sd.items():
        base, _, rest = k.partition(".")
        if not base.startswith("lora_te_text_model_") or rest == "alpha":
            continue
        kohya[k] = v
        path, role = by_kohya[base[len("lora_te_text_model_"):]], rest.removeprefix("lora_").removesuffix(".weight")
        head, _, leaf = path.rpartition(".")
        if layout == "attention_processor" and leaf in early:
            diffusers[f"{prefix}{head}.{early[leaf]}_lora.{role}.weight"] = v
        else:
            diffusers[f"{prefix}{path}.lora_linear_layer.{role}.weight"] = v
    assert kohya and len(diffusers) == len(kohya)
    assert checkpoint.detect_format({k: v for k, v in diffusers.items() if "lora_linear_layer" in k}) == "lora"
    _, a = lora.apply_sd15_loras(unet(), te, [(kohya, 1.0, 0.7, "kohya")])
    _, b = lora.apply_sd15_loras(unet(), te, [(diffusers, 1.0, 0.7, layout)])
    assert lora.sd15_lora_patch(diffusers, unet(), te.model, layout).unmatched == ()
    pa, pb = dict(materialize(a.model).named_parameters()), dict(materialize(b.model).named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], p) for k, p in te.model.named_parameters())


def test_an_alpha_without_halves_is_skipped_not_refused():
    """Some trainers leave the alpha of a layer they did not train: the rest of the LoRA merges."""
    sd = demo.sd15_lora_state_dict()
    extra = {**sd, "lora_unet_conv_in.alpha": torch.tensor(4.0)}
    patch = lora.sd15_lora_patch(extra, unet(), None, "x.safetensors")
    assert patch.unet == lora.sd15_lora_patch(sd, unet(), None, "x.safetensors").unet
    assert "lora_unet_conv_in.alpha" in patch.unmatched


def test_a_lora_from_comfyuis_extract_and_save_lora_merges_whole():
    """ComfyUI's Extract and Save Lora: LDM names under "diffusion_model.", the text encoder under
    "text_encoders.clip_l.transformer.text_model.", and whole differences: ".diff_b" for biases, ".diff" for a
    norm's scale or a full-rank weight; each added times the strength, as ComfyUI does."""
    g = torch.Generator().manual_seed(4)
    base_unet, te = unet(), text_encoder()
    up, params = dict(base_unet.named_parameters()), dict(te.model.named_parameters())
    te_name = next(n for n in params if n.endswith("encoder.layers.0.mlp.fc1.weight"))
    te_layer = te_name.removeprefix("text_model.")[: -len(".weight")]
    changes = {  # key -> (part, parameter, value)
        "diffusion_model.input_blocks.1.1.proj_in.diff_b": ("unet", "input_blocks.1.1.proj_in.bias"),
        "diffusion_model.input_blocks.1.1.norm.diff": ("unet", "input_blocks.1.1.norm.weight"),
        "diffusion_model.out.2.diff": ("unet", "out.2.weight"),
        f"text_encoders.clip_l.transformer.text_model.{te_layer}.diff_b": ("clip", te_name.replace("weight", "bias")),
    }
    sd = {}
    for key, (part, param) in changes.items():
        shape = (up if part == "unet" else params)[param].shape
        sd[key] = torch.randn(shape, generator=g)
    w = up["input_blocks.1.1.proj_out.weight"]
    sd["diffusion_model.input_blocks.1.1.proj_out.lora_up.weight"] = torch.randn(w.shape[0], 2, 1, 1, generator=g)
    sd["diffusion_model.input_blocks.1.1.proj_out.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g)
    wt = params[te_name]
    sd[f"text_encoders.clip_l.transformer.text_model.{te_layer}.lora_up.weight"] = torch.randn(wt.shape[0], 2)
    sd[f"text_encoders.clip_l.transformer.text_model.{te_layer}.lora_down.weight"] = torch.randn(2, wt.shape[1])
    assert checkpoint.detect_format(sd) == "lora"
    new_unet, new_te = lora.apply_sd15_loras(base_unet, te, [(sd, 0.5, 0.25, "extracted")])
    got_unet, got_te = dict(materialize(new_unet).named_parameters()), dict(materialize(new_te.model).named_parameters())
    for key, (part, param) in changes.items():
        got, base = (got_unet, up) if part == "unet" else (got_te, params)
        torch.testing.assert_close(got[param], base[param] + (0.5 if part == "unet" else 0.25) * sd[key])
    lo = sd["diffusion_model.input_blocks.1.1.proj_out.lora_up.weight"].flatten(1)
    ld = sd["diffusion_model.input_blocks.1.1.proj_out.lora_down.weight"].flatten(1)
    torch.testing.assert_close(got_unet["input_blocks.1.1.proj_out.weight"], w + 0.5 * (lo @ ld).reshape(w.shape))
    assert not torch.equal(got_te[te_name], wt)
    # only differences (ComfyUI's "full_diff" type) is a LoRA too; one that fits no parameter is refused
    only = {k: v for k, v in sd.items() if k.endswith((".diff", ".diff_b"))}
    assert checkpoint.detect_format(only) == "lora"
    assert lora.sd15_lora_patch(only, base_unet, te.model, "full").unet.keys() == {
        p for part, p in changes.values() if part == "unet"}
    with pytest.raises(KinemaError, match="changes 'out.2.weight' by a difference of shape"):
        lora.sd15_lora_patch({"diffusion_model.out.2.diff": torch.zeros(3, 3)}, base_unet, None, "bad")


def test_kohya_lora_matches_diffusers():
    pytest.importorskip("peft", exc_type=ImportError)
    pytest.importorskip("diffusers", exc_type=ImportError)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from fixtures import diffusers_unet2d

    sd, sm, sc = demo.sd15_lora_state_dict(), 0.8, 0.6
    te = text_encoder()
    new_unet, new_te = lora.apply_sd15_loras(unet(), te, [(sd, sm, sc, "demo")])
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))  # diffusers' kohya conversion
    ref_unet = copy.deepcopy(diffusers_unet2d())  # never fuse into shared tensors
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=ref_unet, adapter_name="demo")
    ref_unet.fuse_lora(lora_scale=sm)
    x, t, ctx = _image_inputs()
    with torch.no_grad():
        got, want = new_unet(x, t, ctx), ref_unet(x, t, ctx).sample
    assert_net_close(got, want, "UNet + kohya LoRA eps")
    assert float((got - unet()(x, t, ctx)).abs().max()) > 1e-2

    ref_te = TextEncoder(copy.deepcopy(te.model))
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, text_encoder=ref_te.model,
                                                               adapter_name="demo")
    fuse_text_encoder_lora(ref_te.model, lora_scale=sc)
    got, _ = new_te.encode("a (red:1.2) fox in the snow")
    want, _ = ref_te.encode("a (red:1.2) fox in the snow")
    assert_net_close(got, want, "text encoder + kohya LoRA")
    assert float((got - te.encode("a (red:1.2) fox in the snow")[0]).abs().max()) > 1e-2


def test_v3_adapter_style_lora_matches_diffusers():
    pytest.importorskip("peft", exc_type=ImportError)
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures import diffusers_unet2d

    sd = demo.adapter_lora_state_dict()
    assert checkpoint.detect_format(sd) == "sd15_adapter_lora"
    assert {k.partition(".processor.")[0][-5:] for k in sd} == {"attn1", "attn2"}  # self- and cross-attention
    te = text_encoder()
    new_unet, new_te = lora.apply_sd15_loras(unet(), te, [(sd, 0.75, 1.0, "adapter")])
    assert new_te is te  # no text-encoder weights: the encoder is returned as it was
    ref = copy.deepcopy(diffusers_unet2d())
    ref.load_lora_adapter(dict(sd), prefix=None, adapter_name="adapter")  # diffusers reads the old processor names
    ref.fuse_lora(lora_scale=0.75)
    x, t, ctx = _image_inputs()
    with torch.no_grad():
        got, want = new_unet(x, t, ctx), ref(x, t, ctx).sample
    assert_net_close(got, want, "UNet + v3-adapter-style LoRA eps")
    assert float((got - unet()(x, t, ctx)).abs().max()) > 1e-2


def test_lora_stacking_and_zero_strength():
    a, b = demo.sd15_lora_state_dict(0), demo.sd15_lora_state_dict(1)
    base = unet()
    same, te = lora.apply_sd15_loras(base, None, [(a, 0.0, 0.0, "a")])
    assert same is base and te is None
    both, _ = lora.apply_sd15_loras(base, None, [(a, 0.5, 0.0, "a"), (b, -1.0, 0.0, "b")])
    da = _deltas(lora.apply_sd15_loras(base, None, [(a, 0.5, 0.0, "a")])[0], base)
    db = _deltas(lora.apply_sd15_loras(base, None, [(b, -1.0, 0.0, "b")])[0], base)
    for k, d in _deltas(both, base).items():
        torch.testing.assert_close(d, da[k] + db[k], rtol=0, atol=1e-6)
    for bad in (float("nan"), float("inf")):  # an API prompt's; the base model stays as it was
        with pytest.raises(KinemaError, match="a LoRA strength must be a finite number"):
            lora.apply_sd15_loras(base, None, [(a, bad, 0.0, "a")])


# -- SD1.5 LoRA: what is refused ----------------------------------------------------------------------------------

def test_sdxl_and_unfit_loras_are_refused():
    te = text_encoder()
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    assert checkpoint.detect_format(sdxl) == "sdxl_lora"
    with pytest.raises(KinemaError, match="is an SDXL LoRA"):
        lora.apply_sd15_loras(unet(), te, [(sdxl, 1.0, 1.0, "xl.safetensors")])
    # SDXL-sized cross attention (context 2048) on a layer SD1.5 has: shapes do not fit
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    wide = {f"{k}.lora_down.weight": torch.zeros(4, 2048), f"{k}.lora_up.weight": torch.zeros(64, 4)}
    with pytest.raises(KinemaError, match="does not fit this SD1.5 model.*another base model"):
        lora.apply_sd15_loras(unet(), te, [(wide, 1.0, 1.0, "wide")])
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"  # depth 2: SDXL-like, not in SD1.5
    nothing = {f"{k}.lora_down.weight": torch.zeros(4, 64), f"{k}.lora_up.weight": torch.zeros(64, 4)}
    with pytest.raises(KinemaError, match="none of the 1 weights of 'other' name a layer"):
        lora.apply_sd15_loras(unet(), te, [(nothing, 1.0, 1.0, "other")])
    with pytest.raises(KinemaError, match="no LoRA weights Kinema can read"):
        lora.apply_sd15_loras(unet(), te, [({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, 1.0, 1.0, "loha")])


def test_damaged_pairs_are_refused_before_any_merge():
    """An alpha of no value or a rank-0 pair is the file's KinemaError (not an IndexError / ZeroDivisionError)."""
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    pair = {f"{k}.lora_down.weight": torch.zeros(4, 64), f"{k}.lora_up.weight": torch.zeros(64, 4)}
    with pytest.raises(KinemaError, match="'x.safetensors'.*has an alpha of 0 values.*damaged"):
        lora.read_pairs({**pair, f"{k}.alpha": torch.tensor([])}, "x.safetensors")
    rank0 = {f"{k}.lora_down.weight": torch.zeros(0, 64), f"{k}.lora_up.weight": torch.zeros(64, 0),
             f"{k}.alpha": torch.tensor(4.0)}
    with pytest.raises(KinemaError, match="'x.safetensors'.*inconsistent halves"):
        lora.read_pairs(rank0, "x.safetensors")
    ranks_apart = {f"{k}.lora_down.weight": torch.zeros(4, 64), f"{k}.lora_up.weight": torch.zeros(64, 3)}
    with pytest.raises(KinemaError, match="'x.safetensors'.*inconsistent halves"):
        lora.read_pairs(ranks_apart, "x.safetensors")
    for dtype in (torch.int32, torch.bool):  # numbers that are not a LoRA's: never merged as if they were
        ints = {**pair, f"{k}.lora_up.weight": torch.zeros(64, 4, dtype=dtype)}
        with pytest.raises(KinemaError, match=f"'x.safetensors'.*holds torch.float32 / {dtype} values where a LoRA "
                                              "has floating-point ones"):
            lora.read_pairs(ints, "x.safetensors")


def test_unmatched_keys_are_counted_in_a_warning(caplog):
    sd = dict(demo.sd15_lora_state_dict())
    for i in range(3):
        sd[f"lora_unet_down_blocks_9_attentions_{i}_proj_in.lora_down.weight"] = torch.zeros(4, 32)
        sd[f"lora_unet_down_blocks_9_attentions_{i}_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        patch = lora.sd15_lora_patch(sd, unet(), text_encoder().model, "extra.safetensors")
    assert len(patch.unmatched) == 3
    assert "LoRA 'extra.safetensors': 3 of its keys name no layer" in caplog.text


# -- file formats ----------------------------------------------------------------------------------------------------

def test_detect_formats_of_the_demo_loras():
    assert checkpoint.detect_format(demo.motion_lora_state_dict()) == "motion_lora"
    assert checkpoint.detect_format(demo.sd15_lora_state_dict()) == "lora"
    assert checkpoint.detect_format(demo.adapter_lora_state_dict()) == "sd15_adapter_lora"
    assert demo.substitute("animatediff_motion_lora", "v2_lora_ZoomIn.ckpt") == demo.DEMO_MOTION_LORA
    assert demo.substitute("loras", "v3_sd15_adapter.ckpt") == demo.DEMO_ADAPTER_LORA
    assert demo.substitute("loras", "add_detail.safetensors") == demo.DEMO_LORA


def test_motion_lora_wrapped_in_state_dict_ckpt(tmp_path):
    path = tmp_path / "v2_lora_ZoomIn.ckpt"
    torch.save({"state_dict": demo.motion_lora_state_dict()}, str(path))
    sd = lora.load_motion_lora(str(path))
    assert sd.keys() == demo.motion_lora_state_dict().keys()


# -- nodes -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


def test_nodes_are_registered_and_documented(nodes):
    display = load_pack().NODE_DISPLAY_NAME_MAPPINGS
    for node_id in ("KinemaMotionLoRALoader", "KinemaLoRALoader"):
        cls = nodes[node_id]
        assert display[node_id].endswith("(Kinema)") and cls.CATEGORY.startswith("Kinema/") and cls.DESCRIPTION
        for name, entry in cls.INPUT_TYPES()["required"].items():
            assert entry[1].get("tooltip"), name
        assert set(cls.MODEL_INPUTS) <= set(cls.INPUT_TYPES()["required"])


def test_motion_lora_node_chain(nodes, host_dirs):
    assert demo.DEMO_MOTION_LORA in nodes["KinemaMotionLoRALoader"].INPUT_TYPES()["required"]["lora_name"][0]
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v2.safetensors", "fp32")
    before = snapshot(mm)
    loader = nodes["KinemaMotionLoRALoader"]()
    assert loader.apply(mm, demo.DEMO_MOTION_LORA, 0.0)[0] is mm
    (zoom,) = loader.apply(mm, demo.DEMO_MOTION_LORA, 1.0)
    (stacked,) = loader.apply(zoom, demo.DEMO_MOTION_LORA, -0.5)
    assert_unchanged(mm, before)
    assert stacked.loras == ((demo.DEMO_MOTION_LORA, 1.0), (demo.DEMO_MOTION_LORA, -0.5))
    d_stacked, d_half = _deltas(stacked, mm), _deltas(loader.apply(mm, demo.DEMO_MOTION_LORA, 0.5)[0], mm)
    for k in d_half:
        torch.testing.assert_close(d_stacked[k], d_half[k], rtol=0, atol=1e-6)
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, stacked, 1.0, "linear")
    assert video.motion is stacked and video.name == "kinema_demo_mm_v2.safetensors"
    x, t, ctx = _video_inputs()
    assert torch.isfinite(_kinema_eps(video, x, t, ctx)).all()
    assert not is_deferred(stacked) and is_deferred(zoom)  # only what runs holds merged weights


def test_lora_node(nodes, host_dirs):
    assert {demo.DEMO_LORA, demo.DEMO_ADAPTER_LORA} <= set(
        nodes["KinemaLoRALoader"].INPUT_TYPES()["required"]["lora_name"][0])
    model, clip, _ = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v3.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")
    before_unet, before_te = snapshot(model.unet), snapshot(clip.model)
    loader = nodes["KinemaLoRALoader"]()
    both = loader.apply(video, clip, demo.DEMO_LORA, 0.0, 0.0)
    assert both[0] is video and both[1] is clip
    new_model, new_clip = loader.apply(video, clip, demo.DEMO_LORA, 1.0, 0.0)
    assert new_clip is clip and new_model.unet is not video.unet and new_model.motion is mm
    assert new_model.beta_schedule == video.beta_schedule and new_model.name == video.name
    new_model2, new_clip2 = loader.apply(new_model, clip, demo.DEMO_ADAPTER_LORA, 1.0, 1.0)
    assert new_clip2 is clip  # the adapter has no text-encoder weights
    same_model, te_only = loader.apply(video, clip, demo.DEMO_LORA, 0.0, 1.0)
    assert same_model is video  # strength_model 0: the model as it came, no copy
    assert te_only is not clip and not torch.equal(te_only.encode("a fox")[0], clip.encode("a fox")[0])
    _, te_half = loader.apply(video, clip, demo.DEMO_LORA, 0.0, 0.5)  # the clip strength reaches the merge
    _, want = lora.apply_sd15_loras(video.unet, clip, [(lora.load_sd15_lora(host_dirs.resolve_model(
        "loras", demo.DEMO_LORA)), 0.0, 0.5, demo.DEMO_LORA)])
    assert torch.equal(te_half.encode("a fox")[0], want.encode("a fox")[0])
    assert not torch.allclose(te_half.encode("a fox")[0], te_only.encode("a fox")[0])
    assert_unchanged(model.unet, before_unet)
    assert_unchanged(clip.model, before_te)
    x, t, ctx = _video_inputs()
    assert is_deferred(new_model2.unet)
    assert torch.isfinite(_kinema_eps(new_model2, x, t, ctx)).all()
    # the first node of the chain only fed the second: it holds no merged weights of its own (ComfyUI keeps it)
    assert not is_deferred(new_model2.unet) and is_deferred(new_model.unet)
    base = dict(model.unet.named_parameters())
    assert all(p is base[n] for n, p in new_model.unet.named_parameters())


class NotATensor:  # a class torch.load(weights_only=True) refuses to unpickle
    pass


def _put(folder, name, write):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    write(path)
    return path


def test_nodes_refuse_the_wrong_files(nodes, host_dirs):
    import shutil

    models = host_dirs.get_models_dir()
    mlora_dir, lora_dir = os.path.join(models, "animatediff_motion_lora"), os.path.join(models, "loras")
    mm = motion_modules("v2")
    model = motion_model("v2")
    clip = text_encoder()
    made = []

    def copy_in(src, folder, name):
        made.append(_put(folder, name, lambda p: shutil.copy(src, p)))

    copy_in(os.path.join(lora_dir, demo.DEMO_ADAPTER_LORA), mlora_dir, "v3_sd15_adapter.safetensors")
    copy_in(os.path.join(lora_dir, demo.DEMO_LORA), mlora_dir, "some_sd_lora.safetensors")
    copy_in(os.path.join(models, "animatediff_models", "kinema_demo_mm_v2.safetensors"), mlora_dir, "mm.safetensors")
    copy_in(os.path.join(models, "checkpoints", "kinema_demo_sd15.safetensors"), mlora_dir, "ckpt.safetensors")
    copy_in(os.path.join(mlora_dir, demo.DEMO_MOTION_LORA), lora_dir, "zoom_in_motion_lora.safetensors")
    copy_in(os.path.join(models, "animatediff_models", "kinema_demo_mm_v2.safetensors"), lora_dir, "mm.safetensors")
    made.append(_put(lora_dir, "xl.safetensors", lambda p: save_file(
        {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}, p)))
    src = os.path.join(lora_dir, demo.DEMO_LORA)
    made.append(_put(lora_dir, "truncated.safetensors",
                     lambda p: open(p, "wb").write(open(src, "rb").read()[: os.path.getsize(src) // 2])))
    made.append(_put(mlora_dir, "pickled.ckpt", lambda p: torch.save(
        {"state_dict": demo.motion_lora_state_dict(), "extra": NotATensor()}, p)))
    mload, lload = nodes["KinemaMotionLoRALoader"](), nodes["KinemaLoRALoader"]()
    try:
        cases = [
            (lambda: mload.apply(mm, "v3_sd15_adapter.safetensors", 1.0),
             r"'v3_sd15_adapter.safetensors' is an SD1.5 UNet LoRA .*v3 adapter.* not an AnimateDiff MotionLoRA\. "
             r"It belongs in models/loras with the Load LoRA \(Kinema\) node"),
            (lambda: mload.apply(mm, "some_sd_lora.safetensors", 1.0),
             r"is a LoRA, not an AnimateDiff MotionLoRA\. It belongs in models/loras with the Load LoRA"),
            (lambda: mload.apply(mm, "mm.safetensors", 1.0),
             r"is an AnimateDiff motion module, not an AnimateDiff MotionLoRA\. It belongs in "
             r"models/animatediff_models"),
            (lambda: mload.apply(mm, "ckpt.safetensors", 1.0),
             r"is an SD1.5 checkpoint, not an AnimateDiff MotionLoRA"),
            (lambda: mload.apply(mm, "pickled.ckpt", 1.0), r"holds Python objects other than tensors"),
            (lambda: lload.apply(model, clip, "zoom_in_motion_lora.safetensors", 1.0, 1.0),
             r"is an AnimateDiff MotionLoRA, not an SD1.5 LoRA\. It belongs in models/animatediff_motion_lora with the "
             r"Load MotionLoRA \(Kinema\) node"),
            (lambda: lload.apply(model, clip, "mm.safetensors", 1.0, 1.0),
             r"is an AnimateDiff motion module, not an SD1.5"),
            (lambda: lload.apply(model, clip, "xl.safetensors", 1.0, 1.0),
             r"is an SDXL LoRA, not an SD1.5 LoRA\. Kinema"),
            (lambda: lload.apply(model, clip, "truncated.safetensors", 1.0, 1.0), r"is truncated"),
            (lambda: lload.apply(model, clip, "missing.safetensors", 1.0, 1.0), r"not found"),
        ]
        for call, match in cases:
            with pytest.raises(KinemaError, match=match):
                call()
    finally:
        for p in made:
            os.remove(p)


# -- shape checks, what is counted and recorded ------------------------------------------------------------------

def test_updates_of_another_shape_with_the_same_count_are_refused():
    """A LoRA update fits a layer only in its shape, not just its number of values: a LoCon up half must be 1x1
    (the kernel is down's), down's kernel must be the layer's, and a whole difference of a linear layer must not be
    its transpose; each is refused with the file's KinemaError instead of merging scrambled weights."""
    base = unet()  # input_blocks.0.0 (conv_in): a [32, 4, 3, 3] conv; time_embed.0: a [128, 32] linear
    conv, k = dict(base.named_parameters())["input_blocks.0.0.weight"], "lora_unet_conv_in"
    assert conv.shape == (32, 4, 3, 3)
    kernel_up = {f"{k}.lora_down.weight": torch.zeros(2, 4, 3, 3), f"{k}.lora_up.weight": torch.zeros(32, 2, 3, 3)}
    with pytest.raises(KinemaError, match=r"'up3' does not fit this SD1.5 model: it changes 'lora_unet_conv_in' "
                                          r"with up \(32, 2, 3, 3\) @ down \(2, 4, 3, 3\)"):
        lora.sd15_lora_patch(kernel_up, base, None, "up3")
    flat_kernel = {f"{k}.lora_down.weight": torch.zeros(2, 4, 1, 9), f"{k}.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(KinemaError, match=r"'1x9' does not fit this SD1.5 model: .*down \(2, 4, 1, 9\), the layer's "
                                          r"weight is \(32, 4, 3, 3\)"):
        lora.sd15_lora_patch(flat_kernel, base, None, "1x9")
    transposed = {"diffusion_model.time_embed.0.diff": torch.zeros(32, 128)}
    with pytest.raises(KinemaError, match=r"'t' does not fit this SD1.5 model: it changes 'time_embed.0.weight' by a "
                                          r"difference of shape \(32, 128\), the parameter is \(128, 32\)"):
        lora.sd15_lora_patch(transposed, base, None, "t")


def test_a_motion_lora_for_a_layer_the_motion_module_lacks_is_refused():
    """A MotionLoRA update for a layer that a motion module it has lacks (here a fused to_qkv) names that weight
    and the cause: a MotionLoRA for another motion module family."""
    sd = {k.replace("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
                    "processor.to_q_lora", "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
                    "attention_blocks.0.processor.to_qkv_lora"): v for k, v in motion_lora_sd().items()}
    with pytest.raises(KinemaError, match=r"^'fused' changes 'down_blocks\.0\.motion_modules\.0\.temporal_transformer\."
                                          r"transformer_blocks\.0\.attention_blocks\.0\.to_qkv\.weight', which the "
                                          r"motion module does not have: the MotionLoRA was made for another motion "
                                          r"module family$"):
        lora.apply_motion_loras(motion_modules("v2"), [(sd, 1.0, "fused")])


def test_whole_differences_that_apply_are_not_counted_unmatched(caplog):
    """A LoRA of only ComfyUI differences (.diff, .diff_b) reports none it applies as naming no layer (no warning);
    a difference for a parameter the model lacks is the one counted."""
    base = unet()
    params = dict(base.named_parameters())
    sd = {"diffusion_model.out.2.diff": torch.zeros_like(params["out.2.weight"]),
          "diffusion_model.out.2.diff_b": torch.zeros_like(params["out.2.bias"])}
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert lora.sd15_lora_patch(sd, base, None, "full").unmatched == ()
    assert "name no layer" not in caplog.text
    sd["diffusion_model.out.9.diff_b"] = torch.zeros(4)
    assert lora.sd15_lora_patch(sd, base, None, "full").unmatched == ("diffusion_model.out.9.diff_b",)


def test_a_motion_lora_at_strength_zero_is_not_recorded():
    """The copy's .loras lists the MotionLoRAs that change it: one given at strength 0 is left out."""
    loras = [(motion_lora_sd(0), 0.8, "a"), (motion_lora_sd(1), 0.0, "b")]
    assert lora.apply_motion_loras(motion_modules("v2"), loras).loras == (("a", 0.8),)


@pytest.mark.parametrize("extra,kind", [
    ("lora_mid.weight", "LoCon with Tucker decomposition"), ("dora_scale", "DoRA")])
def test_dora_and_tucker_locons_are_refused_not_merged_without_their_extra_part(extra, kind):
    """A LoRA with a part Kinema does not merge (LoCon's Tucker 'lora_mid', DoRA's 'dora_scale') is refused by
    name: its down and up halves alone would merge into a wrong update."""
    k = "lora_unet_conv_in"
    sd = {f"{k}.lora_down.weight": torch.zeros(2, 4, 3, 3), f"{k}.lora_up.weight": torch.zeros(32, 2, 1, 1),
          f"{k}.{extra}": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(KinemaError, match=f"'tucker' is a {kind}.* LoRA, which Kinema does not merge yet"):
        lora.sd15_lora_patch(sd, unet(), None, "tucker")


def test_a_text_encoder_lora_named_without_text_model_equals_the_kohya_one():
    """'lora_te_encoder_layers_...' (the kohya name without its 'text_model_') names the same layers."""
    sd = {k: v for k, v in demo.sd15_lora_state_dict().items() if k.startswith("lora_te_text_model_")}
    short = {k.replace("lora_te_text_model_", "lora_te_", 1): v for k, v in sd.items()}
    te = text_encoder().model
    want = lora.sd15_lora_patch(sd, unet(), te, "kohya").clip
    assert want and lora.sd15_lora_patch(short, unet(), te, "short").clip == want


def test_a_whole_difference_under_the_checkpoints_prefix_applies():
    """A ``.diff`` / ``.diff_b`` key under a checkpoint's 'model.diffusion_model.' changes the same parameter as one
    under ComfyUI's 'diffusion_model.'."""
    base = unet()
    bias = dict(base.named_parameters())["out.2.bias"]
    sd = {"model.diffusion_model.out.2.diff_b": torch.ones_like(bias)}
    patch = lora.sd15_lora_patch(sd, base, None, "prefixed")
    assert patch.unet.keys() == {"out.2.bias"} and patch.unmatched == ()
    assert checkpoint.detect_format(sd) == "lora"  # a file of such keys alone is a LoRA too


@pytest.mark.parametrize("key", [
    "lora_unet_label_emb_0_0.lora_down.weight", "unet.add_embedding.linear_1.lora_A.weight",
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"])
def test_an_sdxl_lora_is_named_by_any_of_its_sdxl_only_keys(key):
    """SDXL's UNet-only LoRAs (its label / add embedding) and diffusers' second text encoder name an SDXL LoRA,
    even beside weights that SD1.5 layers would take."""
    sd = {**demo.sd15_lora_state_dict(), key: torch.zeros(4, 8)}
    with pytest.raises(KinemaError, match=f"'xl' is an SDXL LoRA \\(key '{key}'\\)"):
        lora.sd15_lora_patch(sd, unet(), None, "xl")
