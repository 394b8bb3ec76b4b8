"""IP-Adapter SD1.5: the published file layouts, parity with diffusers on the same weights, and bad inputs.

The demo IP-Adapter (``fixtures_ip_adapter``) is loaded into Kinema from its flat keys and into diffusers'
``UNet2DConditionModel`` through diffusers' own IP-Adapter loader, which numbers the layers by its
``attn_processors`` order: the full-UNet parity therefore checks Kinema's layer mapping independently.
Tolerances: ``conftest.assert_net_close`` (1e-5 of max(1, max |reference|), fp32).
"""
from pathlib import Path

import pytest
import torch
from conftest import assert_net_close

pytest.importorskip("diffusers", exc_type=ImportError)

from fixtures import diffusers_unet2d, unet
from fixtures_clip_vision import transformers_tower
from fixtures_ip_adapter import (
    basic_state_dict,
    diffusers_ip_unet,
    faceid_plus_state_dict,
    faceid_state_dict,
    full_face_state_dict,
    ip_adapter,
    ip_adapter_state_dict,
    plus_state_dict,
    save_bin,
    save_safetensors,
    sdxl_state_dict,
    set_diffusers_scale,
)
from kinema.models import demo
from kinema.models.clip_vision import ImageEncoder, load_image_encoder
from kinema.models.errors import KinemaError
from kinema.models.ip_adapter import (
    build_ip_adapter,
    clip_image_embeds,
    content_tokens,
    cross_attention_layers,
    load_ip_adapter,
)
from kinema.models.unet import UNetConfig

HW = 16


def _inputs(batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, HW, HW, generator=g)
    ctx = torch.randn(batch, 77, 64, generator=g)
    embeds = torch.randn(batch, 64, generator=g)
    t = torch.tensor([800.0, 250.0, 40.0][:batch])
    return x, t, ctx, embeds


def _ours(x, t, ctx, embeds=None, scale=1.0):
    with torch.no_grad():
        if embeds is None:
            return unet()(x, t, ctx)
        adapter = ip_adapter()
        extra = adapter.cross_extra(unet().cfg, adapter.image_tokens(embeds), scale)
        return unet()(x, t, ctx, cross_extra=extra)


# -- the layer numbering ---------------------------------------------------------------------------------------------

def _ldm_slot(diffusers_name: str) -> tuple:
    """diffusers' attention path -> the LDM slot of the SD1.5 layout (2 ResBlocks a level, 3 levels of attention)."""
    parts = diffusers_name.split(".")
    if parts[0] == "mid_block":
        return ("middle", 0)
    block, attn = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return ("input", 1 + 3 * block + attn)
    return ("output", 3 * block + attn)


def test_layer_numbers_are_diffusers_attn_processor_positions():
    names = list(diffusers_unet2d().attn_processors)
    ours = cross_attention_layers(unet().cfg)
    assert len(names) == 2 * len(ours) == 32
    for k, (slot, j, width) in enumerate(ours):
        name = names[2 * k + 1]  # file layer number 2k+1
        assert name.endswith(f"transformer_blocks.{j}.attn2.processor"), name
        assert _ldm_slot(name) == slot, (name, slot)
        assert dict(unet().named_modules())[f"{_ldm_path(slot)}.transformer_blocks.{j}.attn2.to_q"].out_features == width
    assert ours[-1][0] == ("middle", 0) and ours[6][0] == ("output", 3)  # mid last; up blocks after down blocks


def _ldm_path(slot) -> str:
    return "middle_block.1" if slot[0] == "middle" else f"{slot[0]}_blocks.{slot[1]}.1"


def test_layer_mapping_follows_the_unet_config():
    deep = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                      transformer_depth=2, context_dim=64)
    assert [(s, j) for s, j, _ in cross_attention_layers(deep)] == [
        (("input", 3), 0), (("input", 3), 1), (("output", 0), 0), (("output", 0), 1),
        (("output", 1), 0), (("output", 1), 1), (("middle", 0), 0), (("middle", 0), 1)]


# -- parity with diffusers -------------------------------------------------------------------------------------------

def test_image_projection_matches_diffusers():
    from fixtures_ip_adapter import nested

    proj = diffusers_unet2d()._convert_ip_adapter_image_proj_to_diffusers(
        nested(ip_adapter_state_dict())["image_proj"], low_cpu_mem_usage=False)
    assert type(proj).__name__ == "ImageProjection"
    embeds = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = ip_adapter().image_tokens(embeds)
        ref = proj(embeds)
    assert ours.shape == (3, 4, 64)
    assert_net_close(ours, ref, "image tokens")
    assert float(ip_adapter().image_proj.norm.bias.abs().max()) > 0.05  # the LayerNorm's bias is exercised


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_unet_with_ip_adapter_matches_diffusers(scale):
    x, t, ctx, embeds = _inputs()
    ref_model = diffusers_ip_unet()
    assert set_diffusers_scale(ref_model, scale) == 16
    with torch.no_grad():
        ref = ref_model(x, t, ctx, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    ours = _ours(x, t, ctx, embeds, scale)
    assert_net_close(ours, ref, f"UNet eps with IP-Adapter at scale {scale}")
    # the image tokens matter: without them the output is far away
    assert float((ours - _ours(x, t, ctx)).abs().max()) > 0.05 * scale


def test_uncond_tokens_are_the_zero_embedding_and_match_diffusers():
    x, t, ctx, _ = _inputs(batch=1)
    adapter = ip_adapter()
    uncond = adapter.uncond_tokens(1)
    assert torch.equal(uncond, adapter.image_tokens(torch.zeros(1, 64)))
    ref_model = diffusers_ip_unet()
    set_diffusers_scale(ref_model, 1.0)
    with torch.no_grad():
        ref = ref_model(x, t, ctx, added_cond_kwargs={"image_embeds": [torch.zeros(1, 1, 64)]}).sample
        ours = unet()(x, t, ctx, cross_extra=adapter.cross_extra(unet().cfg, uncond, 1.0))
    assert_net_close(ours, ref, "UNet eps with the unconditional image tokens")


def test_scale_zero_is_the_plain_unet():
    x, t, ctx, embeds = _inputs()
    plain = _ours(x, t, ctx)
    assert torch.equal(_ours(x, t, ctx, embeds, 0.0), plain)
    assert torch.equal(_ours(x, t, ctx, embeds, torch.zeros(2)), plain)


def test_per_sample_scale_and_frames():
    """A scale tensor [(b f)] weighs each sample; tokens repeated over frames are what a video batch gets."""
    x, t, ctx, embeds = _inputs(batch=3)
    both = _ours(x, t, ctx, embeds, torch.tensor([1.0, 0.6, 0.0]))
    for i, s in enumerate((1.0, 0.6, 0.0)):
        one = _ours(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], embeds[i:i + 1], s)
        assert_net_close(both[i:i + 1], one, f"sample {i} at scale {s}")
    with pytest.raises(KinemaError, match="one value per batch entry"):
        ip_adapter().cross_extra(unet().cfg, ip_adapter().image_tokens(embeds), torch.ones(2))


def test_half_precision_adapter_in_a_float_unet():
    x, t, ctx, embeds = _inputs()
    half = build_ip_adapter(dict(ip_adapter_state_dict()), torch.float16, "demo")
    assert half.dtype == torch.float16
    with torch.no_grad():
        out = unet()(x, t, ctx, cross_extra=half.cross_extra(unet().cfg, half.image_tokens(embeds), torch.ones(2)))
    assert out.dtype == torch.float32
    assert_net_close(out, _ours(x, t, ctx, embeds, 1.0), "fp16 adapter", tol=2e-2)


# -- file formats ----------------------------------------------------------------------------------------------------

def test_bin_nested_and_safetensors_flat_give_the_same_model(tmp_path):
    sd = ip_adapter_state_dict()
    flat = load_ip_adapter(save_safetensors(sd, str(tmp_path / "ip-adapter_sd15.safetensors")))
    nested = load_ip_adapter(save_bin(sd, str(tmp_path / "ip-adapter_sd15.bin")))
    assert flat.cfg == nested.cfg
    assert (flat.cfg.clip_dim, flat.cfg.cross_dim, flat.cfg.tokens, len(flat.cfg.widths)) == (64, 64, 4, 16)
    a, b = flat.state_dict(), nested.state_dict()
    assert a.keys() == b.keys() == sd.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], sd[k]) for k in sd)
    assert nested.source == "ip-adapter_sd15.bin"
    assert load_ip_adapter(str(tmp_path / "ip-adapter_sd15.bin"), torch.float16).dtype == torch.float16


def test_demo_file_is_written_and_substituted(demo_models_dir):
    path = demo.write_demo_models(demo_models_dir)["ip_adapter"]
    assert path.endswith("ipadapter/" + demo.DEMO_IP_ADAPTER)
    assert demo.substitute("ipadapter", "ip-adapter_sd15.safetensors") == demo.DEMO_IP_ADAPTER
    adapter = load_ip_adapter(path)
    adapter.check_unet(demo.demo_unet_config())
    encoder = load_image_encoder(demo.clip_vision_state_dict(0), name="demo clip vision")
    adapter.check_image_encoder(encoder.embed_dim)
    ref = ip_adapter_state_dict()
    assert all(torch.equal(adapter.state_dict()[k], ref[k]) for k in ref)


# -- content images --------------------------------------------------------------------------------------------------

def test_content_images_are_resized_as_clip_image_processor_does():
    """IP-Adapter's images go through transformers' CLIPImageProcessor (PIL bicubic of the shortest side to 224,
    centre crop, CLIP mean/std): the encoder's ``clip`` style gives its pixels but for PIL's 8-bit rounding and
    filter details, far closer than SVD's whole-image squeeze would."""
    import numpy as np
    from kinema.models.clip_vision import preprocess_images
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()  # the defaults IP-Adapter's pipeline builds it with
    g = torch.Generator().manual_seed(3)
    for h, w in ((300, 480), (512, 384), (224, 224), (180, 260)):
        base = torch.rand(1, 3, h // 16, w // 16, generator=g)
        image = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic").clamp(0, 1)
        image = (image.permute(0, 2, 3, 1) * 255).round() / 255  # 8-bit values, as the PIL image holds
        pil = Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8))
        want = torch.from_numpy(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"]))
        got = preprocess_images(image, 224, "clip")
        assert got.shape == want.shape == (1, 3, 224, 224)
        diff = (got - want).abs()
        assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.01, (h, w, float(diff.max()), float(diff.mean()))
        if (h, w) != (224, 224):  # the SVD resize is much further off (no crop, another filter)
            assert float((preprocess_images(image, 224, "svd") - want).abs().mean()) > 5 * float(diff.mean())


def test_clip_resize_takes_transformers_size_for_the_longer_side():
    """The longer side is resized to transformers' int(224 * long / short) (160x360: 504, where 360 * (224 / 160)
    rounds down to 503), and the centre crop taken from that."""
    import numpy as np
    from kinema.models.clip_vision import preprocess_images
    from transformers.image_transforms import get_resize_output_image_size

    g = torch.Generator().manual_seed(5)
    for h, w in ((160, 360), (360, 160), (80, 680)):
        image = torch.rand(1, h, w, 3, generator=g)
        sh, sw = get_resize_output_image_size(np.zeros((3, h, w)), 224, default_to_square=False)
        resized = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=(sh, sw), mode="bicubic",
                                                  align_corners=False, antialias=True)
        top, left = (sh - 224) // 2, (sw - 224) // 2
        crop = resized[:, :, top:top + 224, left:left + 224]
        got = preprocess_images(image, 224, "clip")
        assert torch.allclose(got, preprocess_images(crop.permute(0, 2, 3, 1), 224, "clip"), atol=1e-6), (h, w)


def test_content_tokens_from_clip_vision():
    encoder = ImageEncoder(transformers_tower(seed=1, projection_dim=64))
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 60, 90, 3, generator=g)
    embeds = clip_image_embeds(encoder, images)
    assert embeds.shape == (2, 64)
    assert torch.equal(embeds, encoder.encode(images, style="clip"))  # CLIPImageProcessor's resize and crop
    assert not torch.allclose(embeds, clip_image_embeds(encoder, images, crop=False))
    adapter = ip_adapter()
    tokens, uncond = content_tokens(adapter, embeds, "mean")
    assert torch.allclose(tokens, adapter.image_tokens(embeds.mean(0, keepdim=True)), atol=1e-6)
    assert torch.equal(uncond, adapter.uncond_tokens())
    tokens, uncond = content_tokens(adapter, embeds, "concat")
    assert tokens.shape == uncond.shape == (1, 8, 64)
    assert torch.allclose(tokens[:, 4:], adapter.image_tokens(embeds[1:]), atol=1e-6)  # batched vs single matmul
    assert torch.equal(uncond[:, :4], uncond[:, 4:])
    with pytest.raises(KinemaError, match="combine"):
        content_tokens(adapter, embeds, "sum")


# -- bad inputs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,variant", [
    (plus_state_dict, "IP-Adapter Plus"),
    (full_face_state_dict, "Full Face"),
    (faceid_state_dict, "FaceID"),
    (faceid_plus_state_dict, "FaceID Plus"),
    (sdxl_state_dict, "SDXL"),
    # ip-adapter-plus_sdxl_vit-h: the Resampler's output is SDXL's 2048-wide context
    (lambda: {**plus_state_dict(), "image_proj.proj_out.weight": torch.zeros(2048, 64)}, "IP-Adapter Plus for SDXL"),
])
def test_unsupported_variants_are_named(make, variant, tmp_path):
    path = save_safetensors(make(), str(tmp_path / "variant.safetensors"))
    with pytest.raises(KinemaError, match=variant) as err:
        load_ip_adapter(path)
    assert "ip-adapter_sd15.safetensors" in str(err.value) and "variant.safetensors" in str(err.value)


def test_the_token_count_is_read_off_the_projection():
    two = build_ip_adapter(basic_state_dict(tokens=2), name="two_tokens.safetensors")
    assert two.cfg.tokens == 2 and two.image_tokens(torch.zeros(1, 64)).shape == (1, 2, 64)


def test_adapter_for_another_unet_is_refused():
    sd2 = build_ip_adapter(basic_state_dict(cross_dim=1024), name="sd2-like.safetensors")
    with pytest.raises(KinemaError, match="1024-wide text context"):
        sd2.cross_extra(unet().cfg, sd2.uncond_tokens())
    fewer = build_ip_adapter(basic_state_dict(widths=(32,) * 10), name="fewer.safetensors")
    with pytest.raises(KinemaError, match="10 cross-attention layers, the UNet has 16"):
        fewer.check_unet(unet().cfg)
    swapped = build_ip_adapter(basic_state_dict(widths=(64,) * 16), name="swapped.safetensors")
    with pytest.raises(KinemaError, match="layer 1 is 64 wide"):
        swapped.check_unet(unet().cfg)


def test_clip_vision_of_the_wrong_width_is_refused():
    adapter = ip_adapter()
    small = ImageEncoder(transformers_tower(seed=1, projection_dim=32))
    with pytest.raises(KinemaError, match="takes 64-wide CLIP image embeddings.*gives 32-wide"):
        adapter.check_image_encoder(small.embed_dim)
    with pytest.raises(KinemaError, match="64-wide"):
        adapter.image_tokens(torch.zeros(1, 32))
    vit_h = build_ip_adapter(basic_state_dict(clip_dim=1024), name="ip-adapter_sd15.safetensors")
    with pytest.raises(KinemaError, match="clip_vision_h") as err:
        vit_h.check_image_encoder(1280)
    assert "ViT-bigG" in str(err.value)


def test_a_clip_vision_tower_without_its_projection_is_refused():
    """A tower saved without ``visual_projection`` gives its pooled output, not CLIP image embeddings: refused by
    Apply IP-Adapter even where the widths agree (ViT-L/14's pooled output is 1024 wide, as ViT-H/14's
    ``image_embeds``), naming the file; the same tower with its projection is taken."""
    from kinema.models import addons

    adapter = ip_adapter()  # takes 64-wide embeddings
    tower = transformers_tower(seed=1, projection_dim=32)  # hidden width 64: its pooled output is 64 wide
    bare = {k: v for k, v in tower.state_dict().items() if not k.startswith("visual_projection")}
    encoder = load_image_encoder(bare, name="vision_tower.safetensors")
    assert not encoder.has_projection and encoder.embed_dim == adapter.cfg.clip_dim
    images = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(KinemaError, match="'vision_tower.safetensors' has no visual projection.*Load CLIP Vision"):
        addons.image_content(adapter, encoder, images)
    projected = ImageEncoder(transformers_tower(seed=1, projection_dim=64))
    assert addons.image_content(adapter, projected, images).tokens.shape == (1, 4, 64)


def test_files_that_are_not_ip_adapters(tmp_path):
    vision = save_safetensors(demo.clip_vision_state_dict(0), str(tmp_path / "clip.safetensors"))
    with pytest.raises(KinemaError, match="'clip.safetensors' is not an IP-Adapter.*CLIP vision.*models/clip_vision"):
        load_ip_adapter(vision)
    motion = save_safetensors(demo.motion_state_dict("v3"), str(tmp_path / "mm.safetensors"))
    with pytest.raises(KinemaError, match="not an IP-Adapter.*motion module"):
        load_ip_adapter(motion)
    half = {k: v for k, v in ip_adapter_state_dict().items() if k.startswith("image_proj.")}
    with pytest.raises(KinemaError, match="no 'ip_adapter.\\*' weights"):
        build_ip_adapter(half, name="half")
    broken = dict(ip_adapter_state_dict())
    del broken["ip_adapter.7.to_v_ip.weight"]
    with pytest.raises(KinemaError, match="lacks 'ip_adapter.7.to_v_ip.weight'"):
        build_ip_adapter(broken, name="broken")


def test_truncated_files(tmp_path):
    for name, save in (("ip.safetensors", save_safetensors), ("ip.bin", save_bin)):
        path = save(ip_adapter_state_dict(), str(tmp_path / name))
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(KinemaError, match="truncated|damaged"):
            load_ip_adapter(path)


def _misnumbered(sd: dict) -> dict:
    """The layers numbered 0, 2, 4, ... (each one below the file's number)."""
    out = {}
    for key, t in sd.items():
        if key.startswith("ip_adapter."):
            _, n, rest = key.split(".", 2)
            key = f"ip_adapter.{int(n) - 1}.{rest}"
        out[key] = t
    return out


@pytest.mark.parametrize("damage,message", [
    (lambda sd: {**sd, "image_proj.proj.weight": torch.zeros(4 * 64 + 8, 64), "image_proj.proj.bias": torch.zeros(264)},
     "the image projection gives 264 values, not a whole number of 64-wide tokens"),
    (_misnumbered, r"the cross-attention layers are numbered \[0, 2, 4, 6\]\.\.\., not 1, 3, 5"),
    (lambda sd: {**sd, "ip_adapter.1.to_v_ip.weight": torch.zeros(64, 64)},  # its to_k_ip is 32 wide
     r"'ip_adapter.1.to_v_ip.weight' has shape \(64, 64\), expected \[width, 64\]"),
], ids=["projection-rows", "layer-numbers", "to_v_ip-width"])
def test_damaged_basic_adapters_are_named(damage, message):
    """A basic IP-Adapter file whose shapes or layer numbers do not fit together is named as damaged, with what is
    wrong, when it is read: not built into a model that fails (or maps the layers wrongly) in the middle of a run."""
    with pytest.raises(KinemaError, match="'damaged.safetensors': " + message):
        build_ip_adapter(damage(basic_state_dict()), name="damaged.safetensors")


def test_image_tokens_of_another_width_are_refused():
    """``cross_extra`` checks the image tokens against the adapter's context width when it is made, not when the UNet
    reaches the first cross-attention."""
    adapter = ip_adapter()
    with pytest.raises(KinemaError, match=r"takes image tokens \[batch, tokens, 64\], got \(1, 4, 32\)"):
        adapter.cross_extra(unet().cfg, torch.zeros(1, 4, 32))
    with pytest.raises(KinemaError, match=r"got \(4, 64\)"):
        adapter.cross_extra(unet().cfg, adapter.uncond_tokens()[0])


@pytest.mark.parametrize("damage,message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "image_proj.norm.weight"},
     "lacks 'image_proj.norm.weight': the IP-Adapter file is incomplete"),
    (lambda sd: {**sd, "ip_adapter.1.to_out_ip.weight": torch.zeros(32, 64)},
     "'ip_adapter.1.to_out_ip.weight' is not a weight of the basic IP-Adapter"),
    (lambda sd: {**sd, "ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 64)}, "is an IP-Adapter FaceID"),
], ids=["missing-projection-tensor", "unknown-layer-weight", "lora-layers"])
def test_incomplete_or_unknown_basic_adapter_files_are_named(damage, message):
    """A basic IP-Adapter file lacking a projection tensor, with a layer weight the basic adapter has not, or with
    LoRA weights in its layers (FaceID) is refused with what is wrong, naming the file."""
    with pytest.raises(KinemaError, match="'odd.safetensors'.*" + message):
        build_ip_adapter(damage(basic_state_dict()), name="odd.safetensors")


def test_image_embeddings_that_are_not_a_2d_batch_are_refused():
    """``image_tokens`` takes CLIP image embeddings [count, width]; a [1, 1, width] tensor is a KinemaError
    naming the expected shape, not an einops error from the projection."""
    adapter = ip_adapter()
    with pytest.raises(KinemaError, match=r"takes CLIP image embeddings \[count, width\], got \(1, 1, 64\)"):
        adapter.image_tokens(torch.zeros(1, 1, adapter.cfg.clip_dim))


def test_a_half_precision_adapter_takes_the_float32_tokens_an_image_content_keeps():
    """``ImageContent`` keeps its tokens in float32 on the CPU; ``cross_extra`` moves them to the adapter's device
    and dtype, so an fp16 adapter gives fp16 keys/values (not a dtype error at the first cross-attention)."""
    from fixtures import unet
    from fixtures_ip_adapter import ip_adapter_state_dict

    half = build_ip_adapter(dict(ip_adapter_state_dict()), torch.float16, "demo")
    with torch.no_grad():
        tokens = ip_adapter().image_tokens(torch.randn(2, 64, generator=torch.Generator().manual_seed(4))).float()
        layers = half.check_unet(unet().cfg)
        (slot, j), key = next(iter(layers.items()))
        ((k, v, scale),) = half.cross_extra(unet().cfg, tokens, 0.5)(slot, j)
        want_k, want_v = half.ip_adapter[key](tokens.half())
    assert k.dtype == v.dtype == torch.float16 and scale == 0.5
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
