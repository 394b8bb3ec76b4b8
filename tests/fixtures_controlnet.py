"""The demo ControlNet (engine side) and its diffusers twin on the same weights.

``controlnet_state_dict()`` is the pack's demo ControlNet (``demo.controlnet_state_dict``: keys
``control_model.*`` as lllyasviel's published ``.pth``, fitting the demo SD1.5 UNet). ``diffusers_controlnet()``
loads the same tensors into a diffusers ``ControlNetModel`` through ``original_to_diffusers``, a key mapping
written here from the two layouts (not diffusers' single-file converter, which the tests use as a second,
independent check, and not the engine's own diffusers -> original conversion, which it checks).
"""
from __future__ import annotations

import functools
import re

import torch
from fixtures import SEED
from kinema.models import demo
from kinema.models.controlnet import PREFIX, controlnet_from_state_dict

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@functools.cache
def controlnet_state_dict() -> dict[str, torch.Tensor]:
    """The demo ControlNet (fp32, seed ``SEED``), ``control_model.*`` keys. Read-only."""
    return demo.controlnet_state_dict(SEED, torch.float32)


def bare(sd: dict) -> dict[str, torch.Tensor]:
    """The state dict without the ``control_model.`` prefix (the fp16 repacks' layout)."""
    return {k.removeprefix(PREFIX): v for k, v in sd.items()}


@functools.cache
def controlnet():
    """The engine's ControlNet on the demo weights."""
    return controlnet_from_state_dict(controlnet_state_dict(), "demo_controlnet", torch.float32)


def hint_convs(sd: dict) -> list[int]:
    """Indices N of the ``input_hint_block.N`` convolutions of a bare state dict, in order."""
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})


def original_to_diffusers(sd: dict, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """An original-layout SD1.5 ControlNet (with or without prefix) in diffusers ``ControlNetModel`` names."""
    sd = bare(sd)
    hints = hint_convs(sd)
    hint_names = {hints[0]: "conv_in", hints[-1]: "conv_out"}
    hint_names.update({n: f"blocks.{i}" for i, n in enumerate(hints[1:-1])})
    per_level = layers_per_block + 1
    out = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        parts = module.split(".")
        if module in ("time_embed.0", "time_embed.2"):
            new = f"time_embedding.linear_{1 if module.endswith('0') else 2}"
        elif module == "input_blocks.0.0":
            new = "conv_in"
        elif parts[0] == "input_blocks":
            i, kind, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
            level, j = (i - 1) // per_level, (i - 1) % per_level
            if rest == "op":
                new = f"down_blocks.{level}.downsamplers.0.conv"
            elif kind == 0:
                new = f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
            else:
                new = f"down_blocks.{level}.attentions.{j}.{rest}"
        elif parts[0] == "middle_block":
            k, rest = int(parts[1]), ".".join(parts[2:])
            new = (f"mid_block.attentions.0.{rest}" if k == 1 else
                   f"mid_block.resnets.{k // 2}.{_resnet(rest)}")
        elif parts[0] == "zero_convs":
            new = f"controlnet_down_blocks.{parts[1]}"
        elif module == "middle_block_out.0":
            new = "controlnet_mid_block"
        elif parts[0] == "input_hint_block":
            new = f"controlnet_cond_embedding.{hint_names[int(parts[1])]}"
        else:
            raise KeyError(f"no diffusers name for '{key}'")
        out[f"{new}.{leaf}"] = value
    return out


def _resnet(rest: str) -> str:
    head = next(h for h in _RESNET if rest == h or rest.startswith(h + "."))
    return _RESNET[head] + rest[len(head):]


def diffusers_controlnet_config(sd: dict) -> dict:
    """The diffusers ``ControlNetModel`` config of an original-layout SD1.5 ControlNet, read off its shapes.

    The block structure is SD1.5's (3 cross-attention levels + 1 plain, 2 layers a level);
    ``attention_head_dim=8`` is diffusers' name for the number of heads.
    """
    sd = bare(sd)
    widths = tuple(sd[f"input_blocks.{1 + 3 * i}.0.out_layers.3.weight"].shape[0] for i in range(4))
    hints = hint_convs(sd)
    return {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "conditioning_channels": sd[f"input_hint_block.{hints[0]}.weight"].shape[1],
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "block_out_channels": widths,
        "layers_per_block": 2,
        "cross_attention_dim": sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": False,
        "conditioning_embedding_out_channels": tuple(sd[f"input_hint_block.{n}.weight"].shape[0] for n in hints[:-1:2]),
    }


@functools.cache
def diffusers_controlnet():
    """diffusers ``ControlNetModel`` with the demo ControlNet's weights (``original_to_diffusers``), strict."""
    from diffusers import ControlNetModel

    sd = controlnet_state_dict()
    model = ControlNetModel(**diffusers_controlnet_config(sd))
    model.load_state_dict(original_to_diffusers(sd), strict=True)
    return model.eval().requires_grad_(False)
