"""Images in: finding them in folders, opening any of them as plain 8-bit RGB, sizes and crops.

Every reader in minigen (GAN training, LoRA training, FID) opens images through `open_rgb`, so a PNG with alpha,
a 16-bit scan or a rotated phone photo means the same pixels everywhere.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files below `root` (recursive, sorted); a missing path, a file, or a folder without images is an error."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    return paths


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: EXIF rotation applied, transparency composited on white, 16-bit scaled to 8-bit."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grey: PIL's convert("L") clips instead of scaling, so scale by hand.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image | None:
    """Open one image as RGB, fully decoded; None (with one warning) if it is corrupt or truncated."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
        return None


def parse_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '320x480' -> (320, 480). Sizes are always height x width."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"image size must look like 64 or 320x480 (height x width), got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image size must look like 64 or 320x480 (height x width), got {text!r}")
    return hw


def resize_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `img` until it covers height x width, then cut the centre: no stretching, no borders."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))
