"""Tiny depth models in the layouts users download: transformers model folders.

Each folder is written by transformers' own ``save_pretrained`` (``config.json`` and
``model.safetensors``) next to a ``preprocessor_config.json`` with the keys of the published
``DPTImageProcessor`` files, at tiny sizes:

- ``dpt``: DPT-Large's structure (ViT with readout projection, 4 ViT stages into the neck),
  hidden 32, 4 layers, patch 16, 64x64 input; size given as {"height", "width"}, bicubic.
- ``dpt_hybrid``: DPT-Hybrid / MiDaS v3 hybrid: a BiT (ResNet with weight-standardised convs)
  stem feeding the ViT, its first two stages going straight to the neck; fixed 64x64 input; size
  given as an int (the older processor files), bilinear.
- ``depth_anything``: Depth Anything (v1 and v2 share the layout): a DINOv2 backbone (patch 14),
  keep_aspect_ratio, multiples of 14, ImageNet mean/std, size 56.
- ``depth_anything_metric``: the same with the metric head (sigmoid * max_depth: metres).
- ``clip``: a CLIP vision model folder (not a depth model), for the errors.

Weights are drawn from a seeded generator (norm weights around 1, others at a fan-in scale), so
the networks give outputs of order one and every weight matters; the same name and seed give
the same tensors.
"""
from __future__ import annotations

import json
import math
import os

import torch

KINDS = ("dpt", "dpt_hybrid", "depth_anything", "depth_anything_metric", "clip")

_PROCESSOR = {  # the keys of the published DPTImageProcessor configs
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "DPTImageProcessor",
    "rescale_factor": 1 / 255,
}
PREPROCESSORS = {
    "dpt": {**_PROCESSOR, "ensure_multiple_of": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "keep_aspect_ratio": False, "resample": 3, "size": {"height": 64, "width": 64}},
    "dpt_hybrid": {**_PROCESSOR, "ensure_multiple_of": 1, "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.5, 0.5, 0.5], "keep_aspect_ratio": False, "resample": 2, "size": 64},
    "depth_anything": {**_PROCESSOR, "do_pad": False, "ensure_multiple_of": 14,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                       "keep_aspect_ratio": True, "resample": 3, "size": {"height": 56, "width": 56}},
}
PREPROCESSORS["depth_anything_metric"] = PREPROCESSORS["depth_anything"]


def _config(kind: str):
    from transformers import CLIPVisionConfig, DepthAnythingConfig, DPTConfig

    vit = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
           "image_size": 64, "patch_size": 16, "backbone_out_indices": [0, 1, 2, 3], "fusion_hidden_size": 16}
    if kind == "dpt":
        return DPTConfig(**vit, neck_hidden_sizes=[8, 16, 32, 32], architectures=["DPTForDepthEstimation"])
    if kind == "dpt_hybrid":
        bit = {"model_type": "bit", "embedding_size": 8, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1],
               "layer_type": "bottleneck", "global_padding": "same", "out_features": ["stage1", "stage2", "stage3"],
               "embedding_dynamic_padding": True, "num_groups": 2}
        return DPTConfig(**vit, is_hybrid=True, backbone_config=bit, backbone_featmap_shape=[1, 32, 4, 4],
                         neck_hidden_sizes=[8, 16, 32, 32], architectures=["DPTForDepthEstimation"])
    if kind.startswith("depth_anything"):
        dinov2 = {"model_type": "dinov2", "image_size": 56, "patch_size": 14, "hidden_size": 32,
                  "num_hidden_layers": 4, "num_attention_heads": 2, "mlp_ratio": 2, "out_indices": [1, 2, 3, 4],
                  "reshape_hidden_states": False}
        metric = kind.endswith("metric")
        return DepthAnythingConfig(backbone_config=dinov2, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                   fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
                                   depth_estimation_type="metric" if metric else "relative",
                                   max_depth=20 if metric else 1, architectures=["DepthAnythingForDepthEstimation"])
    if kind == "clip":
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=16, architectures=["CLIPVisionModel"])
    raise ValueError(kind)


def build_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """The transformers model of ``kind`` with seeded weights, in eval mode."""
    import transformers

    cfg = _config(kind)
    model = getattr(transformers, cfg.architectures[0])(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in name or name.endswith(("lambda1", "weight"))):
                p.copy_((1.0 if not name.endswith("bias") else 0.0) + 0.05 * noise)
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def write_folder(folder: str, kind: str, seed: int = 0) -> str:
    """Write the ``kind`` model folder (save_pretrained + preprocessor_config.json); returns ``folder``."""
    build_model(kind, seed).save_pretrained(folder)
    if kind in PREPROCESSORS:
        with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(PREPROCESSORS[kind], f, indent=2)
    return folder


def smooth_frames(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[f, h, w, 3] natural-looking frames (smooth shapes, 8-bit values) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    out = []
    for _ in range(frames):
        a = torch.rand(3, 3, generator=g) * 6
        chans = [torch.sin(a[c, 0] * y + a[c, 1] * x + a[c, 2]) for c in range(3)]
        out.append(torch.stack(chans, -1) * 0.45 + 0.5)
    return (torch.stack(out) * 255).round() / 255
