"""Run a convolutional coder over a large image in overlapping tiles, blended, as diffusers' AutoencoderKL does with
`enable_tiling()`: the VAE's memory becomes that of one tile, whatever the image size.

The input is cut into square tiles of `tile` pixels (or latents) starting every `tile * (1 - OVERLAP)`; each goes
through the coder on its own, giving tiles of `out_tile`. Going across in reading order, each output tile's first
`out_tile * OVERLAP` rows fade in linearly over the bottom rows of the tile above it, then its first columns over
the last columns of the tile to its left (already blended themselves); the first `out_tile * (1 - OVERLAP)` rows and
columns of each are kept. Pixels away from the seams are the tile's own: a coder whose receptive field is wider than
a tile (the VAE's mid-block attention sees the whole image) gives somewhat other pixels than untiled.
"""

from __future__ import annotations

from typing import Callable

import torch

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def blend(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """In place: `tile`'s first `extent` rows (dim 2) or columns (dim 3) go linearly from `before`'s last ones (the
    tile above or to the left; weight 1 at the first) to its own. (B, C, h, w)"""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    shape = [1] * tile.dim()
    shape[dim] = extent
    ramp = (torch.arange(extent, device=tile.device, dtype=tile.dtype) / extent).reshape(shape)  # 0 .. <1 along dim
    head = tile.narrow(dim, 0, extent)
    head.copy_(before.narrow(dim, before.shape[dim] - extent, extent) * (1 - ramp) + head * ramp)


def tiled(coder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, out_tile: int) -> torch.Tensor:
    """coder over x (B, C, H, W) in overlapping tiles of side `tile`, whose outputs have side `out_tile`, blended:
    (B, C', H * out_tile / tile, W * out_tile / tile)."""
    stride = int(tile * (1 - OVERLAP))
    extent = int(out_tile * OVERLAP)
    keep = out_tile - extent
    H, W = x.shape[2:]
    rows = [[coder(x[:, :, i:i + tile, j:j + tile]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                blend(rows[i - 1][j], out, extent, dim=2)
            if j > 0:
                blend(row[j - 1], out, extent, dim=3)
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)
