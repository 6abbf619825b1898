"""Aspect-ratio buckets and SDXL's crop micro-conditioning.

SDXL trains on many aspect ratios at about the same pixel count. Each image goes to the bucket (a height x width in
multiples of 64) whose aspect ratio is nearest its own, is scaled to cover the bucket, then cropped to it (centre or
at random) and maybe mirrored. SDXL's UNet is told the image's original size and where the crop began
("SDXL", Podell et al. 2023, sec. 2.2), so that at sampling time crop (0, 0) asks for an uncropped picture.

    buckets = make_buckets(400 * 600)                     # seed 000: 600x400 paintings -> the 384x576 bucket
    sample = prepare_image(img, nearest_bucket(img.height, img.width, buckets), random_crop=True, flip=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

STEP = 64  # SDXL's latents are /8 and its UNet halves them twice more: sizes must be multiples of 32; SDXL uses 64


def make_buckets(max_area: int, step: int = STEP, min_side: int = 256, max_ratio: float = 4.0
                 ) -> list[tuple[int, int]]:
    """All (height, width) in multiples of `step` with the largest height for each width such that h * w <= max_area,
    no side below `min_side` (or one step, for tiny areas) and no aspect ratio beyond `max_ratio` (kohya's scheme)."""
    if max_area < step * step:
        raise ValueError(f"the training area {max_area} px is below one {step}x{step} bucket")
    min_side = min(min_side, step * int((max_area ** 0.5) // step))
    buckets = set()
    for w in range(step, max_area // step + 1, step):
        h = (max_area // w) // step * step
        if h >= min_side and w >= min_side and max(h / w, w / h) <= max_ratio:
            buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared in log space, so 2:1 and 1:2 are as far
    from 1:1); ties go to the larger bucket."""
    ratio = np.log(width / height)
    return min(buckets, key=lambda b: (abs(np.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # (3, H, W) float in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the file, before any resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image, as SDXL's time ids take it


def prepare_image(img: Image.Image, bucket: tuple[int, int], random_crop: bool = False, flip: bool = False,
                  generator: torch.Generator | None = None) -> PreparedImage:
    """Scale `img` to cover `bucket` (never stretching; small images are scaled up), crop to it, mirror if `flip`."""
    h, w = bucket
    scale = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))  # PIL's (width, height)
    resized = img.resize(size, Image.Resampling.LANCZOS) if size != img.size else img
    spare_h, spare_w = size[1] - h, size[0] - w
    if random_crop:
        top = int(torch.randint(spare_h + 1, (1,), generator=generator))
        left = int(torch.randint(spare_w + 1, (1,), generator=generator))
    else:
        top, left = spare_h // 2, spare_w // 2
    crop = resized.crop((left, top, left + w, top + h))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # The mirrored crop is the crop of the mirrored image that begins spare_w - left from its left edge.
        left = spare_w - left
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return PreparedImage(pixels, (img.height, img.width), (top, left))
