"""The SD1.5 UNet's structure: its norms' eps, the config read off a state dict, the per-block cross-attention hook.

The parity tests (``test_parity.py``) run the demo layout only (4 levels, 2 ResBlocks a level, transformer depth 1,
attention on the first three levels) at activations too large for a GroupNorm eps to show, so what they cannot see
is pinned here: on UNets of other layouts built from ``UNetConfig`` (on the meta device where only shapes matter,
else at tiny widths).
"""
import pytest
import torch
from kinema.models import demo
from kinema.models.errors import KinemaError
from kinema.models.ip_adapter import cross_attention_layers
from kinema.models.layers import ResBlock, SharedContext
from kinema.models.unet import UNetConfig, UNetModel, infer_unet_config


def _meta_state_dict(cfg: UNetConfig) -> dict:
    """The state dict of ``UNetModel(cfg)`` on the meta device: the shapes a checkpoint of that layout has."""
    with torch.device("meta"):
        return UNetModel(cfg).state_dict()


# -- GroupNorm eps -------------------------------------------------------------------------------------------------

def test_resblock_and_output_group_norms_have_the_eps_of_the_original():
    """The ResBlocks' two GroupNorms and the output norm keep torch's default eps 1e-5, as the original LDM
    (``normalization(ch)``: GroupNorm32(32, ch)) and diffusers (SD1.5's ``norm_eps``: its ``ResnetBlock2D``
    norm1/norm2 and ``conv_norm_out``); only the transformers' norms take 1e-6 (``test_parity``). The parity runs'
    activations are too large for eps to show, so it is read off the modules of the demo layout."""
    with torch.device("meta"):
        ours = UNetModel(demo.demo_unet_config())
    blocks = [m for m in ours.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 * 4 + 2 + 3 * 4  # input, middle and output blocks' ResBlocks
    assert {b.in_layers[0].eps for b in blocks} == {b.out_layers[0].eps for b in blocks} == {1e-5}
    assert isinstance(ours.out[0], torch.nn.GroupNorm) and ours.out[0].eps == 1e-5


# -- the config read off a state dict --------------------------------------------------------------------------------

#: unlike the demo in every field a state dict shows: 3 levels, 1 ResBlock a level, attention on the deeper two only,
#: 2 transformer blocks each, a 48-wide context, linear projections
OTHER_LAYOUT = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                          attention_levels=(1, 2), transformer_depth=2, context_dim=48, linear_proj=True)


def test_config_of_another_layout_is_read_back_from_its_state_dict():
    """``infer_unet_config`` gives back the config a UNet was made with, for a layout the demo files never have (the
    level widths from each level's first ResBlock, the depth and context width from the transformers)."""
    assert OTHER_LAYOUT != demo.demo_unet_config()
    assert infer_unet_config(_meta_state_dict(OTHER_LAYOUT)) == OTHER_LAYOUT
    prefixed = {f"model.diffusion_model.{k}": v for k, v in _meta_state_dict(OTHER_LAYOUT).items()}
    assert infer_unet_config(prefixed, "model.diffusion_model.") == OTHER_LAYOUT


def test_uneven_levels_are_refused():
    """A level with fewer ResBlocks than the others (input block 5, level 1's second ResBlock, gone) is no SD1.5
    layout: refused by name, not read as 2 ResBlocks a level (which would leave weights unloaded)."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(0, 1),
                     context_dim=48)
    sd = {k: v for k, v in _meta_state_dict(cfg).items() if not k.startswith("input_blocks.5.")}
    assert "input_blocks.4.1.proj_in.weight" in sd
    with pytest.raises(KinemaError, match=r"not an SD1\.5 layout \(uneven levels\)"):
        infer_unet_config(sd)


def test_a_unet_without_cross_attention_is_refused():
    """A UNet with no transformer in its input blocks is refused with the pack's message, not an IndexError."""
    sd = _meta_state_dict(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(), context_dim=48))
    with pytest.raises(KinemaError, match="no cross-attention layers: it is not an SD1.5 UNet"):
        infer_unet_config(sd)


# -- the cross-attention hook ----------------------------------------------------------------------------------------

def test_cross_extra_is_asked_for_every_transformer_block():
    """With 2 transformer blocks a slot, the UNet asks ``cross_extra(slot, j)`` once for each block j of each slot,
    exactly the ``(slot, j)`` of ``cross_attention_layers`` (the IP-Adapter's layer mapping): block 1 of a slot
    asking with j = 0 would get block 0's image keys/values."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                     transformer_depth=2, context_dim=16)
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    asked = []

    def record(slot, j):
        asked.append((slot, j))
        return []

    with torch.no_grad():
        model(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 3, 16), cross_extra=record)
    want = [(slot, j) for slot, j, _ in cross_attention_layers(cfg)]
    assert len(want) == 14 and {j for _, j in want} == {0, 1}
    assert sorted(asked) == sorted(want)


def test_an_inpainting_unet_keeps_its_four_output_channels():
    """SD1.5 inpainting takes 9 input channels (latent, mask, masked latent) and gives 4: ``out_channels`` is read
    off ``out.2``, not taken from ``input_blocks.0.0``; a ControlNet (no ``out``) has as many as it takes."""
    inpaint = UNetConfig(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                         attention_levels=(0, 1), context_dim=48)  # 2 transformers a level: each level named once
    sd = _meta_state_dict(inpaint)
    assert infer_unet_config(sd) == inpaint
    no_out = {k: v for k, v in sd.items() if not k.startswith("out.")}
    assert infer_unet_config(no_out).out_channels == 9


def test_a_state_dict_without_a_unet_names_the_missing_key():
    key = r"'model\.diffusion_model\.input_blocks\.0\.0\.weight'"
    with pytest.raises(KinemaError, match=f"no UNet found: the key {key} is missing"):
        infer_unet_config({"first_stage_model.x": torch.zeros(1)}, "model.diffusion_model.")


def test_the_keys_and_values_of_one_prompt_for_many_frames_are_projected_once(monkeypatch):
    """The UNet shares a per-frame context whose frames repeat: each cross-attention projects the keys and values of
    each distinct prompt once (2 prompts of 3 frames: 2 rows, not 6), with the output of the per-frame projection."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                     context_dim=16)
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    rows = []
    model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.register_forward_hook(
        lambda _module, args, _out: rows.append(args[0].shape[0]))
    x, t = torch.randn(6, 4, 8, 8), torch.full((6,), 10.0)
    context = torch.randn(2, 5, 16).repeat_interleave(3, dim=0)
    with torch.no_grad():
        shared = model(x, t, context)
        assert rows == [2]
        monkeypatch.setattr(SharedContext, "of", staticmethod(lambda c: c))  # every frame projected
        per_frame = model(x, t, context)
    assert rows == [2, 6]
    torch.testing.assert_close(shared, per_frame, rtol=1e-5, atol=1e-6)


def test_a_bfloat16_unet_takes_float32_timesteps_and_control_residuals():
    """The timestep embedding (float32) and a ControlNet's residuals in another precision are cast to the UNet's
    dtype: every block computes in bfloat16 (zero residuals, broadcast, change nothing)."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                     context_dim=16)
    torch.manual_seed(0)
    model = UNetModel(cfg).eval().to(torch.bfloat16)
    x, ctx = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 3, 16, dtype=torch.bfloat16)
    t = torch.tensor([999.0, 10.0])
    control = [torch.zeros(1, 1, 1, 1)] * (len(model.input_blocks) + 1)
    with torch.no_grad():
        plain = model(x, t, ctx)
        controlled = model(x, t, ctx, control=control)
    assert plain.dtype == controlled.dtype == torch.bfloat16
    assert torch.equal(controlled, plain)
