"""SVD's CLIP image encoder: layouts, key conversion, config inference, preprocessing, parity with open_clip."""
import pytest
import torch

from fixtures_clip_vision import open_clip_tower, transformers_tower
from kinema.models import clip_vision
from kinema.models.clip_vision import SVD_PREFIX, load_image_encoder
from kinema.models.errors import KinemaError


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pixels(b=2, size=56, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _images(b, h, w, seed=2):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _svd_file(tower):
    """An SVD-like checkpoint: the tower under the published prefix, next to other parts."""
    sd = {SVD_PREFIX + k: v for k, v in tower.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 8, 3, 3)
    sd["model.diffusion_model.time_stack.0.weight"] = torch.zeros(2)
    sd["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    return sd


def _diffusers_preprocess(images, size):
    """The reference: diffusers' SVD pipeline (its copy of kornia's resize) and CLIP's normalisation."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = images.permute(0, 3, 1, 2) * 2.0 - 1.0
    x = (_resize_with_antialiasing(x, (size, size)) + 1.0) / 2.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- parity with open_clip (the original)

def test_svd_layout_matches_open_clip():
    tower = open_clip_tower(seed=0, width=128, heads=2)
    encoder = load_image_encoder(_svd_file(tower), name="svd.safetensors")
    cfg = encoder.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size,
            cfg.intermediate_size, cfg.projection_dim, cfg.hidden_act, cfg.layer_norm_eps) == \
        (128, 2, 2, 14, 56, 512, 32, "gelu", 1e-5)
    pixels = _pixels()
    with torch.no_grad():
        expected = tower(pixels)
        got = encoder.model(pixel_values=pixels).image_embeds
    assert got.shape == (2, 32)
    assert _relative_error(got, expected) < 1e-5


def test_encode_matches_open_clip_with_the_original_preprocessing():
    tower = open_clip_tower(seed=3, width=128, heads=2)
    encoder = load_image_encoder(_svd_file(tower))
    images = _images(2, 40, 72)
    with torch.no_grad():
        expected = tower(_diffusers_preprocess(images, 56))
    got = encoder.encode(images)
    assert got.shape == (2, 32) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert _relative_error(got, expected) < 1e-5


def test_activation_and_heads_overrides():
    quick = open_clip_tower(seed=4, width=128, heads=4, quick_gelu=True)
    pixels = _pixels(1)
    with torch.no_grad():
        expected = quick(pixels)
        right = load_image_encoder(_svd_file(quick), num_heads=4, activation="quick_gelu")
        assert _relative_error(right.model(pixel_values=pixels).image_embeds, expected) < 1e-5
        wrong = load_image_encoder(_svd_file(quick))  # width 128: 2 heads, gelu
        assert wrong.model.config.num_attention_heads == 2
        assert _relative_error(wrong.model(pixel_values=pixels).image_embeds, expected) > 1e-3


def test_open_clip_file_with_text_tower():
    tower = open_clip_tower(seed=5, width=64)
    sd = {"visual." + k: v for k, v in tower.state_dict().items()}
    # the text tower of an open_clip file has resblocks of its own at the top level
    sd.update({"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(192, 64), "token_embedding.weight":
               torch.zeros(10, 64), "ln_final.weight": torch.ones(64), "text_projection": torch.zeros(64, 32),
               "logit_scale": torch.tensor(1.0), "positional_embedding": torch.zeros(77, 64)})
    assert clip_vision.find_image_tower(sd) == ("open_clip", "visual.")
    encoder = load_image_encoder(sd)
    pixels = _pixels(1)
    with torch.no_grad():
        assert _relative_error(encoder.model(pixel_values=pixels).image_embeds, tower(pixels)) < 1e-5


def test_open_clip_conversion_splits_the_fused_projection_into_weights_of_its_own():
    """open_clip's fused in_proj becomes q/k/v (its thirds, in order); the model holds copies, not the file's
    (possibly mapped) memory."""
    sd = _svd_file(open_clip_tower(seed=6, width=64))
    encoder = load_image_encoder(sd)
    in_proj = sd[SVD_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    attn = encoder.model.vision_model.encoder.layers[0].self_attn
    ptr = in_proj.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().data_ptr() != ptr
    assert attn.v_proj.weight.untyped_storage().data_ptr() != ptr
    assert torch.equal(attn.q_proj.weight, in_proj[:64]) and torch.equal(attn.k_proj.weight, in_proj[64:128])
    assert torch.equal(attn.v_proj.weight, in_proj[128:])
    assert torch.equal(encoder.model.visual_projection.weight, sd[SVD_PREFIX + "proj"].t())
    assert not any(t.is_meta for t in encoder.model.state_dict().values())
    assert torch.equal(encoder.model.vision_model.embeddings.position_ids, torch.arange(17).expand(1, -1))


# ---------------------------------------------------------------- key conversion

def test_round_trip_transformers_open_clip_transformers():
    hf = transformers_tower(seed=7).state_dict()
    published = clip_vision.transformers_to_open_clip(hf, prefix=SVD_PREFIX)
    assert all(k.startswith(SVD_PREFIX) for k in published)
    assert published[SVD_PREFIX + "proj"].shape == (64, 32)
    assert published[SVD_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape == (192, 64)
    back = clip_vision.open_clip_to_transformers(published, prefix=SVD_PREFIX)
    assert set(back) == set(hf) - {"vision_model.embeddings.position_ids"}
    for k, v in back.items():
        assert torch.equal(v, hf[k]), k


def test_published_keys_are_open_clip_keys():
    reference = open_clip_tower(seed=8, width=64).state_dict()
    hf = transformers_tower(seed=8).state_dict()
    converted = clip_vision.transformers_to_open_clip(hf)
    assert set(converted) == set(reference)
    for k, v in reference.items():
        assert converted[k].shape == v.shape, k


def test_published_layout_saves_and_loads(tmp_path):
    from safetensors.torch import save_file

    from kinema.models.checkpoint import load_state_dict

    model = transformers_tower(seed=9)
    path = str(tmp_path / "svd_image_encoder.safetensors")
    save_file(clip_vision.transformers_to_open_clip(model.state_dict(), prefix=SVD_PREFIX), path)
    encoder = load_image_encoder(load_state_dict(path), name="svd_image_encoder.safetensors")
    pixels = _pixels(1)
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(pixel_values=pixels).image_embeds,
                                   model(pixel_values=pixels).image_embeds, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- ComfyUI's clip_vision files (transformers names)

def test_comfyui_transformers_layout_loads():
    model = transformers_tower(seed=10)
    sd = dict(model.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(17).expand(1, -1)  # files saved by transformers 4
    sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 64)
    sd["text_projection.weight"] = torch.zeros(32, 64)
    sd["logit_scale"] = torch.tensor(2.6)
    sd["multi_modal_projector.linear_1.bias"] = torch.zeros(8)  # LLaVA-style files: ignored, as ComfyUI does
    assert clip_vision.find_image_tower(sd) == ("transformers", "")
    encoder = load_image_encoder(sd, name="clip_vision_h.safetensors")
    assert encoder.has_projection and encoder.embed_dim == 32 and encoder.image_size == 56
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(pixel_values=pixels).image_embeds,
                                   model(pixel_values=pixels).image_embeds, rtol=1e-6, atol=1e-6)


def test_tower_without_projection_gives_the_pooled_output():
    model = transformers_tower(seed=11)
    sd = {"image_encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("visual_projection")}
    encoder = load_image_encoder(sd)
    assert not encoder.has_projection and encoder.embed_dim == 64
    images = _images(3, 56, 56)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=clip_vision.preprocess_images(images, 56)).pooler_output
    got = encoder.encode(images)
    assert got.shape == (3, 64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_dtype_is_applied():
    encoder = load_image_encoder(transformers_tower(seed=12).state_dict(), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    reference = load_image_encoder(transformers_tower(seed=12).state_dict())
    images = _images(1, 30, 30)
    got = encoder.encode(images)
    assert got.dtype == torch.float32 and got.shape == (1, 32)
    assert _relative_error(got, reference.encode(images)) < 0.1


# ---------------------------------------------------------------- config inference (real sizes, meta tensors)

def _meta_open_clip(width, layers, patch, grid, mlp, proj):
    def t(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"conv1.weight": t(width, 3, patch, patch), "class_embedding": t(width),
          "positional_embedding": t(grid * grid + 1, width), "proj": t(width, proj),
          "transformer.resblocks.0.mlp.c_fc.weight": t(mlp, width),
          f"transformer.resblocks.{layers - 1}.ln_1.weight": t(width)}
    return clip_vision.open_clip_to_transformers(sd)


@pytest.mark.parametrize("sizes, heads, act", [
    ((1280, 32, 14, 16, 5120, 1024), 16, "gelu"),  # ViT-H/14: SVD, clip_vision_h
    ((1024, 24, 14, 16, 4096, 768), 16, "quick_gelu"),  # OpenAI ViT-L/14
    ((1024, 24, 14, 24, 4096, 768), 16, "quick_gelu"),  # OpenAI ViT-L/14 at 336
    ((1664, 48, 14, 16, 8192, 1280), 16, "gelu"),  # ViT-bigG/14: clip_vision_g
    ((768, 12, 16, 14, 3072, 512), 12, "gelu"),  # a width without a known head count: one per 64
])
def test_config_inferred_from_shapes(sizes, heads, act):
    width, layers, patch, grid, mlp, proj = sizes
    cfg = clip_vision.infer_vision_config(_meta_open_clip(*sizes))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.image_size, cfg.intermediate_size,
            cfg.projection_dim, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps) == \
        (width, layers, patch, grid * patch, mlp, proj, heads, act, 1e-5)


# ---------------------------------------------------------------- what is not a CLIP vision tower

@pytest.mark.parametrize("sd, message", [
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1)},
     "SD1.5 checkpoint"),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(1),
      "down_blocks.3.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(1)}, "motion module"),
    ({"foo.weight": torch.zeros(1)}, "not a CLIP vision model"),
    ({"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 14, 14),
      "vision_model.head.weight": torch.zeros(1)}, "no class token"),
    ({"visual.trunk.patch_embed.proj.weight": torch.zeros(1)}, "timm"),
])
def test_non_vision_state_dicts_raise(sd, message):
    with pytest.raises(KinemaError, match=message):
        load_image_encoder(sd, name="wrong.safetensors")


def test_unsupported_variant_and_incomplete_towers_raise():
    tower = open_clip_tower(seed=13, width=64)
    sd = _svd_file(tower)
    sd[SVD_PREFIX + "transformer.resblocks.0.ls_1.gamma"] = torch.ones(64)
    with pytest.raises(KinemaError, match="ls_1.gamma.*not part of a plain CLIP ViT"):
        load_image_encoder(sd)
    sd = _svd_file(tower)
    del sd[SVD_PREFIX + "transformer.resblocks.0.mlp.c_fc.bias"]
    with pytest.raises(KinemaError, match="missing 1 CLIP vision weights"):
        load_image_encoder(sd, name="svd.safetensors")
    hf = dict(transformers_tower(seed=13).state_dict())
    hf["vision_model.encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(64)
    with pytest.raises(KinemaError, match="q_norm.*not supported"):
        load_image_encoder(hf)
    with pytest.raises(KinemaError, match="no CLIP vision tower under 'visual.'"):
        load_image_encoder(_svd_file(tower), prefix="visual.")
    two = {**_svd_file(tower), **{"visual." + k: v for k, v in tower.state_dict().items()}}
    assert clip_vision.find_image_tower(two) == ("open_clip", SVD_PREFIX)
    three = {**{"visual." + k: v for k, v in tower.state_dict().items()},
             **{"other.visual." + k: v for k, v in tower.state_dict().items()}}
    with pytest.raises(KinemaError, match="2 CLIP vision towers"):
        clip_vision.find_image_tower(three)


# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("shape", [(2, 40, 72), (1, 480, 300), (1, 1000, 230), (1, 300, 480)])
def test_preprocessing_matches_the_svd_original(shape):
    images = _images(*shape)
    got = clip_vision.preprocess_images(images, 224)
    expected = _diffusers_preprocess(images, 224)
    assert got.shape == (shape[0], 3, 224, 224) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-5


def test_preprocessing_constants_and_identity_at_224():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert clip_vision.CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and clip_vision.CLIP_STD == tuple(OPENAI_CLIP_STD)
    images = _images(1, 224, 224)
    mean = torch.tensor(clip_vision.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_vision.CLIP_STD).view(1, 3, 1, 1)
    expected = (images.permute(0, 3, 1, 2) - mean) / std  # no blur, no resampling, no crop, no clamp
    torch.testing.assert_close(clip_vision.preprocess_images(images), expected, rtol=0, atol=1e-6)
    one_pixel = clip_vision.preprocess_images(torch.full((1, 1, 1, 4), 0.5))  # alpha dropped
    assert one_pixel.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("bad", [torch.rand(40, 72, 3), torch.rand(1, 40, 72, 1), [[0.5]], torch.rand(1, 0, 8, 3)])
def test_bad_images_raise(bad):
    with pytest.raises(KinemaError):
        clip_vision.preprocess_images(bad)


def _patches_14x16(sd):
    key = "vision_model.embeddings.patch_embedding.weight"
    return {**sd, key: torch.zeros(*sd[key].shape[:3], 16)}


@pytest.mark.parametrize("edit, num_heads, message", [
    (dict, 3, "a CLIP vision tower of width 64 cannot have 3 attention heads"),  # 64 channels do not split in 3
    (dict, 0, "a CLIP vision tower of width 64 cannot have 0 attention heads"),
    (_patches_14x16, None, "the CLIP vision patches are 14x16: only square patches are supported"),
], ids=["3 heads", "0 heads", "14x16 patches"])
def test_a_config_the_weights_cannot_have_is_refused_with_the_packs_message(edit, num_heads, message):
    """A head count that does not divide the width, or non-square patches, is refused by Kinema, saying what is
    wrong, before transformers' own check or a shape mismatch on loading speaks."""
    sd = edit(transformers_tower(seed=14).state_dict())
    with pytest.raises(KinemaError, match=f"^{message}$"):
        load_image_encoder(sd, num_heads=num_heads)


def test_a_fused_projection_of_no_whole_three_widths_and_a_missing_q_k_or_v_are_refused():
    """An in_proj whose rows are no multiple of 3 cannot be split into q, k and v; a transformers tower lacking one
    of q/k/v cannot be fused into in_proj: both are KinemaErrors naming the weight."""
    with pytest.raises(KinemaError, match=r"'visual.transformer.resblocks.0.attn.in_proj_weight' has shape \(10, 4\)"):
        clip_vision.open_clip_to_transformers(
            {"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(10, 4)}, "visual.")
    sd = dict(transformers_tower(seed=3).state_dict())
    del sd["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KinemaError, match=r"lack 'vision_model.encoder.layers.1.self_attn.k_proj.weight'$"):
        clip_vision.transformers_to_open_clip(sd)


def test_a_conv1_and_class_embedding_without_attention_blocks_are_no_tower():
    """Only a conv1 and a class_embedding next to the residual blocks' fused attention make an open_clip tower:
    two such stray keys beside a transformers tower are not taken for a second tower."""
    sd = {**transformers_tower(seed=3).state_dict(), "visual.conv1.weight": torch.zeros(1),
          "visual.class_embedding": torch.zeros(1)}
    assert clip_vision.find_image_tower(sd) == ("transformers", "")


def test_prefix_chooses_one_of_two_transformers_towers():
    """With two transformers towers under prefixes of the same length, prefix= loads the chosen one's weights, none
    of the other's."""
    one, two = transformers_tower(seed=3).state_dict(), transformers_tower(seed=4).state_dict()
    sd = {**{"a." + k: v for k, v in one.items()}, **{"b." + k: v for k, v in two.items()}}
    for prefix, want in (("a.", one), ("b.", two)):
        got = clip_vision.load_image_encoder(sd, prefix=prefix).model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items() if k in got), prefix


def test_the_alpha_channel_is_dropped_before_preprocessing():
    """RGBA images are encoded as their RGB channels: the fourth channel is the one dropped."""
    rgba = torch.rand(1, 40, 72, 4, generator=torch.Generator().manual_seed(6))
    for style in clip_vision.RESIZE_STYLES:
        assert torch.equal(clip_vision.preprocess_images(rgba, 224, style),
                           clip_vision.preprocess_images(rgba[..., :3].contiguous(), 224, style)), style


def test_an_unknown_resize_style_is_refused():
    with pytest.raises(KinemaError, match="unknown CLIP resize style 'crop': one of svd, clip"):
        clip_vision.preprocess_images(torch.rand(1, 8, 8, 3), 224, "crop")
