"""Tiny CLIP image towers with random weights, in the layouts users have on disk.

- ``open_clip_tower``: open_clip's own ``VisionTransformer`` (the reference implementation of
  SVD's image encoder), when the ``open_clip_torch`` package is installed. Only its
  ``transformer`` module is loaded, not the package: ``import open_clip`` needs torchvision,
  which this environment does not have (installing it would replace torch). Where
  torchvision is missing, a stand-in for the one name that module imports from it
  (``FrozenBatchNorm2d``, used only to freeze ResNet towers) is provided while it loads.
- ``transformers_tower``: a transformers ``CLIPVisionModelWithProjection`` (the layout of
  ComfyUI's ``models/clip_vision`` files).

Weights are drawn from a seeded generator, so every call with the same arguments gives the
same tensors.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded noise (norm weights around 1), in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise)
    return module.eval()


@functools.lru_cache(maxsize=1)
def _open_clip_transformer_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("_kinema_open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["_kinema_open_clip"] = package
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = nn.BatchNorm2d
        stubs = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
        sys.modules.update(stubs)
    try:
        return importlib.import_module("_kinema_open_clip.transformer")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def open_clip_transformer_module():
    """open_clip's ``transformer`` module, or skip the test when open_clip is not installed."""
    module = _open_clip_transformer_module()
    if module is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    return module


def open_clip_tower(seed: int = 0, width: int = 128, layers: int = 2, heads: int | None = None, patch: int = 14,
                    image: int = 56, output_dim: int = 32, quick_gelu: bool = False) -> nn.Module:
    """open_clip ``VisionTransformer`` with random weights (ViT-H/14 structure, tiny sizes)."""
    oc = open_clip_transformer_module()
    tower = oc.VisionTransformer(
        image_size=image, patch_size=patch, width=width, layers=layers, heads=heads or max(1, width // 64),
        mlp_ratio=4.0, output_dim=output_dim, act_layer=oc.QuickGELU if quick_gelu else nn.GELU,
    )
    return randomize(tower, seed)


def transformers_tower(seed: int = 0, width: int = 64, layers: int = 2, heads: int | None = None, patch: int = 14,
                       image: int = 56, projection_dim: int = 32, activation: str = "gelu") -> nn.Module:
    """transformers ``CLIPVisionModelWithProjection`` with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads or max(1, width // 64), image_size=image, patch_size=patch,
                              projection_dim=projection_dim, hidden_act=activation, layer_norm_eps=1e-5)
    return randomize(CLIPVisionModelWithProjection(config), seed)
