"""Differentiable augmentation for GAN training on small datasets (`train_gan.py --diffaugment translation,cutout`).

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training": the same kind of random transform
is applied to the real and to the generated images every time the discriminator sees them, in D's update and in G's.
D then cannot memorise the few thousand training images (it rarely sees one the same way twice), and since every
transform is differentiable, G's gradient passes through it to G. Because the transforms hit both sides alike, G
still learns the un-augmented images: D only ever compares augmented reals with augmented fakes.

Transforms, as in the paper's reference code: `color` (brightness, saturation, contrast), `translation` (shift by up
to 1/8 of each side, zero-filled), `cutout` (zero a random square half the image's side). Zero is mid-grey for
images in [-1, 1]. The random numbers come from the run's CPU generator (`Randomness`), so runs resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

TRANSFORMS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # the paper's: shifts up to 1/8 of the side
CUTOUT_RATIO = 0.5         # the paper's: a square half the side


def parse_policy(policy: str) -> tuple[str, ...]:
    """'translation,cutout' -> ('translation', 'cutout'); '' -> (); an unknown name is a ValueError."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown:
        raise ValueError(f"--diffaugment: unknown transform {unknown[0]!r}: give a comma list of "
                         f"{', '.join(TRANSFORMS)} (or '' for none)")
    return names


@dataclass
class Randomness:
    """Where the transforms' random numbers come from: `generator`, drawn for a batch of `n` images of which this
    process keeps `rows` (all of them in one process; under torchrun this rank's share of the global batch, so the
    augmentation equals a one-process run's)."""
    generator: torch.Generator
    n: int
    rows: Callable[[torch.Tensor], torch.Tensor] = lambda values: values

    def rand(self, *shape: int) -> torch.Tensor:
        """(B, *shape) draws from U[0, 1), one row per image."""
        return self.rows(torch.rand(self.n, *shape, generator=self.generator))

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """(B, *shape) integers in [low, high), one row per image."""
        return self.rows(torch.randint(low, high, (self.n, *shape), generator=self.generator))


def diff_augment(x: torch.Tensor, policy: str, random: Randomness) -> torch.Tensor:
    """x (B, C, H, W) with the policy's transforms applied in order, each with its own random draw per image."""
    for name in parse_policy(policy):
        x = {"color": color, "translation": translation, "cutout": cutout}[name](x, random)
    return x


def color(x: torch.Tensor, random: Randomness) -> torch.Tensor:
    """Per image: add a brightness in [-0.5, 0.5), scale the saturation by [0, 2), the contrast by [0.5, 1.5)."""
    x = x + (random.rand(1, 1, 1).to(x) - 0.5)  # (B, 1, 1, 1) draws
    gray = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    x = (x - gray) * (random.rand(1, 1, 1).to(x) * 2) + gray
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - mean) * (random.rand(1, 1, 1).to(x) + 0.5) + mean


def translation(x: torch.Tensor, random: Randomness) -> torch.Tensor:
    """Shift each image by up to 1/8 of its height and width (whole pixels), filling what comes in with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = random.randint(-sy, sy + 1, 1, 1).to(x.device)  # (B, 1, 1)
    dx = random.randint(-sx, sx + 1, 1, 1).to(x.device)
    # Output pixel (i, j) reads input (i + dy, j + dx); off the image it reads the one-pixel zero border.
    rows = (torch.arange(h, device=x.device)[None, :, None] + dy).clamp(-1, h) + 1  # (B, H, 1), into the padded image
    cols = (torch.arange(w, device=x.device)[None, None, :] + dx).clamp(-1, w) + 1  # (B, 1, W)
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H + 2, W + 2)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def cutout(x: torch.Tensor, random: Randomness) -> torch.Tensor:
    """Zero one square of half the height and width per image, centred anywhere (clipped at the edges)."""
    _, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = random.randint(0, h + 1 - ch % 2, 1, 1) - ch // 2  # (B, 1, 1), may be < 0
    left = random.randint(0, w + 1 - cw % 2, 1, 1) - cw // 2
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]  # (1, H, 1), (1, 1, W)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (B, H, W)
    return x * (~inside)[:, None].to(x)  # (B, 1, H, W) mask, broadcast over channels
