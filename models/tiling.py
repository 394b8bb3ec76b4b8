"""Spatial tiling with overlap and feathered blending, for VAE encode and decode on little memory.

A function that maps an image batch ``[n, c, h, w]`` to ``[n, c', h * s, w * s]`` (``s`` = 8 for a VAE decoder,
1/8 for an encoder) is run on overlapping tiles, and the tiles' outputs are blended with weights that ramp
linearly from 0 to 1 across each overlap (a tile side on the image border keeps weight 1), so neighbouring tiles
cross-fade instead of meeting at a seam. Everything the function sees at once is one tile of every image of the
batch: the SVD temporal decoder still mixes all frames of its chunk inside each tile.

Tiling is an approximation where the network looks further than the overlap (the VAE's mid-block attention and
GroupNorm statistics are global): the result stays close to the untiled one (tests measure how close) and has no
seams; with a tile at least as large as the image it is the untiled result exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import KinemaError


@dataclass(frozen=True)
class TileOptions:
    """``tile``: tile side in input pixels (0 = no tiling); ``overlap``: input pixels neighbouring tiles share."""

    tile: int = 0
    overlap: int = 0

    def validate(self, what: str = "tiling") -> None:
        if self.tile < 0 or self.overlap < 0:
            raise KinemaError(f"{what}: tile size and overlap must be 0 or more, got {self.tile} and {self.overlap}")
        if self.tile and self.overlap * 2 >= self.tile:
            raise KinemaError(f"{what}: the overlap ({self.overlap}) must be less than half the tile size "
                              f"({self.tile}); lower the overlap or raise the tile size")

    def smaller(self, minimum: int, unit: int = 1) -> TileOptions | None:
        """The next smaller tiling for an out-of-memory retry: half the tile, or ``minimum`` where half is less
        (tile and overlap multiples of ``unit``); None when the tile is ``minimum`` already."""
        tile = max(-(-minimum // unit) * unit, self.tile // 2 // unit * unit)
        if tile >= self.tile:
            return None
        return TileOptions(tile, min(self.overlap, tile // 4 // unit * unit))

    @staticmethod
    def first(size: int, minimum: int, unit: int = 1) -> TileOptions | None:
        """The tiling an out-of-memory retry starts with on an untiled image whose larger side is ``size``: tiles
        of half that side, or ``minimum`` where half is less, overlapping a sixteenth (multiples of ``unit``); None
        when a ``minimum`` tile covers the side."""
        tile = max(-(-minimum // unit) * unit, size // 2 // unit * unit)
        if tile >= size:
            return None
        return TileOptions(tile, max(unit, tile // 16 // unit * unit))


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with about ``overlap`` shared between neighbours (spread
    evenly, each a multiple of ``align``); the last tile ends at ``size``. One tile when it covers the side."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [round(i * (size - tile) / (count - 1) / align) * align for i in range(count)]


def _ramp(length: int, start: int, end: int, size: int, before: int | None, after: int | None) -> torch.Tensor:
    """1-D blend weight of a tile covering [start, end) of ``size`` (output units): ramps over the overlap with the
    previous tile (which ends at ``before``) and the next one (which starts at ``after``)."""
    pos = torch.arange(length, dtype=torch.float64) + 0.5
    w = torch.ones(length, dtype=torch.float64)
    if before is not None and before > start:
        w = torch.minimum(w, pos / (before - start))
    if after is not None and after < end:
        w = torch.minimum(w, (length - pos) / (end - after))
    return w.clamp_min(1e-3)


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, opts: TileOptions,
              scale: float) -> torch.Tensor:
    """``fn`` on overlapping spatial tiles of ``x`` [n, c, h, w], blended: -> [n, c', h*scale, w*scale].

    ``opts.tile``/``opts.overlap`` are in units of ``x``; with no tiling (or one tile) this is ``fn(x)``.
    """
    h, w = x.shape[-2:]
    if not opts.tile or (opts.tile >= h and opts.tile >= w):
        return fn(x)
    opts.validate()
    align = max(1, round(1 / scale))  # an encoder's tiles start on whole latent pixels
    if opts.tile % align or opts.overlap % align or h % align or w % align:
        raise KinemaError(f"tiles of {opts.tile} overlapping {opts.overlap} on {w}x{h} pixels: all must be "
                          f"multiples of {align}, so that the tiles cover the image on whole latent pixels")
    ys, xs = tile_starts(h, opts.tile, opts.overlap, align), tile_starts(w, opts.tile, opts.overlap, align)
    th, tw = min(opts.tile, h), min(opts.tile, w)

    def out_px(v: int) -> int:
        return round(v * scale)

    out = weight = None
    for iy, y0 in enumerate(ys):
        wy = _ramp(out_px(th), out_px(y0), out_px(y0 + th), out_px(h),
                   out_px(ys[iy - 1] + th) if iy else None, out_px(ys[iy + 1]) if iy + 1 < len(ys) else None)
        for ix, x0 in enumerate(xs):
            wx = _ramp(out_px(tw), out_px(x0), out_px(x0 + tw), out_px(w),
                       out_px(xs[ix - 1] + tw) if ix else None, out_px(xs[ix + 1]) if ix + 1 < len(xs) else None)
            part = fn(x[..., y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = part.new_zeros(part.shape[0], part.shape[1], out_px(h), out_px(w))
                weight = part.new_zeros(1, 1, out_px(h), out_px(w))
            wt = (wy[:, None] * wx[None, :]).to(part.dtype)
            sy, sx = slice(out_px(y0), out_px(y0) + part.shape[-2]), slice(out_px(x0), out_px(x0) + part.shape[-1])
            out[..., sy, sx] += part * wt
            weight[..., sy, sx] += wt
    return out / weight
