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


def blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: `tile`'s first `extent` rows go linearly from `above`'s last rows (row 0) to its own. (B, C, h, w)"""
    extent = min(above.shape[2], tile.shape[2], extent)
    ramp = torch.arange(extent, device=tile.device, dtype=tile.dtype)[:, None] / extent  # (extent, 1): 0 .. <1
    tile[:, :, :extent] = above[:, :, above.shape[2] - extent:] * (1 - ramp) + tile[:, :, :extent] * ramp


def blend_columns(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: `tile`'s first `extent` columns go linearly from `left`'s last columns to its own. (B, C, h, w)"""
    extent = min(left.shape[3], tile.shape[3], extent)
    ramp = torch.arange(extent, device=tile.device, dtype=tile.dtype) / extent  # (extent,)
    tile[..., :extent] = left[..., left.shape[3] - extent:] * (1 - ramp) + tile[..., :extent] * ramp


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
                blend_rows(rows[i - 1][j], out, extent)
            if j > 0:
                blend_columns(row[j - 1], out, extent)
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)
