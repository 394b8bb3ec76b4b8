"""Step previews of a video being sampled: a few of its frames side by side in one latent image, for the host's
latent previewer (ComfyUI's latent2rgb or TAESD) to turn into the picture shown on the sampler node."""
from __future__ import annotations

import math

import torch

#: frames a preview shows at most: first, last and evenly between (a previewer decodes every pixel it gets)
PREVIEW_FRAMES = 4


def contact_sheet(x0: torch.Tensor, frames: int = PREVIEW_FRAMES) -> torch.Tensor:
    """[f, c, h, w] -> [1, c, rows * h, cols * w]: up to ``frames`` frames, first and last included, evenly spaced,
    in a grid of ``ceil(sqrt(n))`` columns filled row by row (a cell left over stays zero: the latent's mean grey)."""
    if x0.ndim != 4:
        raise ValueError(f"expected a video latent [f, c, h, w], got shape {tuple(x0.shape)}")
    count = max(1, min(frames, x0.shape[0]))
    picks = torch.linspace(0, x0.shape[0] - 1, count).round().long().tolist()
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    _, c, h, w = x0.shape
    sheet = x0.new_zeros(1, c, rows * h, cols * w)
    for n, i in enumerate(picks):
        r, q = divmod(n, cols)
        sheet[0, :, r * h:(r + 1) * h, q * w:(q + 1) * w] = x0[i]
    return sheet
