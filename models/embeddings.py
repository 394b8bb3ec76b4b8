"""Textual-inversion embeddings: the vectors an ``embedding:name`` in a prompt stands for.

An embedding file holds one or more vectors as wide as the text encoder's token embeddings (768 for SD1.5's
CLIP ViT-L). The layouts read (through ``checkpoint.load_state_dict``, so a pickle that would run code is
refused):

- Automatic1111's ``.pt``: ``{"string_to_param": {"*": [n, 768]}, "name": ..., "step": ...}``;
- ``.safetensors`` with ``emb_params`` [n, 768] (Automatic1111's) or ``clip_l`` [n, 768] (SDXL embeddings,
  whose ``clip_l`` half is the SD1.5-sized one, as ComfyUI takes it);
- diffusers' ``learned_embeds.bin``: ``{"<token>": [768]}``;
- any file holding a single tensor.

``load_embedding`` returns the vectors [n, width] in float32; a file of another width (SD2's 1024) or with
several unnamed tensors is a KinemaError naming it. The encoder (``encoders.TextEncoder.encode``) puts the
vectors in place of tokens, as ComfyUI does.
"""
from __future__ import annotations

import os

import torch

from . import checkpoint
from .errors import KinemaError

#: the tensor names tried, in order, when a file holds several
KNOWN_KEYS = ("string_to_param.*", "emb_params", "clip_l")


def load_embedding(path: str, width: int) -> torch.Tensor:
    """The vectors of the embedding file at ``path``: [n, width] float32 (see the module doc)."""
    name = os.path.basename(path)
    tensors = checkpoint.own_copies(checkpoint.load_state_dict(path))
    found = next((tensors[k] for k in KNOWN_KEYS if k in tensors), None)
    if found is None:
        if len(tensors) != 1:
            shown = ", ".join(sorted(tensors)[:6])
            raise KinemaError(f"the embedding '{name}' holds {len(tensors)} tensors ({shown}) and none of the known "
                              f"names ({', '.join(KNOWN_KEYS)}): it is not a textual-inversion embedding")
        found = next(iter(tensors.values()))
    if not found.is_floating_point() or found.dim() not in (1, 2) or found.numel() == 0:
        raise KinemaError(f"the embedding '{name}' holds a tensor of shape {list(found.shape)} ({found.dtype}): not "
                          "textual-inversion vectors; download it again")
    if found.shape[-1] != width:
        raise KinemaError(f"the embedding '{name}' holds vectors {found.shape[-1]} wide, and this text encoder takes "
                          f"{width}: it was made for another model (SD2's are 1024 wide); use an SD1.5 embedding")
    vectors = found.reshape(-1, width).float()
    if not bool(torch.isfinite(vectors).all()):
        raise KinemaError(f"the embedding '{name}' holds NaN or infinite values: download it again")
    return vectors
