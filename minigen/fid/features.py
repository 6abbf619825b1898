"""Images -> Inception features, as pytorch-fid (or clean-fid's resize) prepares them, for FID, KID and IS.

    from minigen.fid.inception import load_inception
    from minigen.fid.features import extract_features
    feats = extract_features(load_inception(device="cuda"), "real/", outputs=("2048",))  # a folder, paths, images, a tensor

Preprocessing (`mode`):
  - "pytorch-fid" (default): pixels / 255, bilinear resize of the float image to 299x299 (align_corners=False, no
    antialias), then 2x - 1: exactly pytorch-fid's `ToTensor` + `InceptionV3(resize_input, normalize_input)`.
  - "clean": clean-fid's resize: each channel as a float32 PIL image resized with PIL's bicubic filter (which
    antialiases), clipped to [0, 255]; then the same / 255 and 2x - 1. Only the resize follows clean-fid; its
    features come from clean-fid's own TorchScript model, so clean-fid's numbers are not promised here.

Images are decoded by threads (`workers`), unreadable files skipped and counted; under torchrun each rank extracts
whole batches of its share and the features are gathered in order (minigen.distributed).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .. import distributed
from ..images import list_images, open_rgb, to_rgb

INCEPTION_SIZE = 299
MODES = ("pytorch-fid", "clean")


def clean_resize(img: np.ndarray) -> np.ndarray:
    """clean-fid's resize: each channel of a uint8 (H, W, 3) image as float32, PIL bicubic to 299, clipped. (299, 299, 3)"""
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    channels = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(size, Image.BICUBIC))
                for c in range(img.shape[2])]
    return np.clip(np.stack(channels, axis=2), 0, 255)


def to_inception_input(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(H, W, 3) arrays with values in [0, 255] (sizes may differ; clean mode's are already 299x299 float32)
    -> (B, 3, 299, 299) in [-1, 1]."""
    out = torch.empty(len(images), 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device)
    # Resize images of one size together: one interpolate call per size, not per image.
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(img.shape[:2], []).append(i)
    for (h, w), idx in by_size.items():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device)  # (b, H, W, 3)
        x = x.permute(0, 3, 1, 2).float() / 255  # (b, 3, H, W) in [0, 1], as torchvision's ToTensor
        if (h, w) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        out[idx] = x
    return 2 * out - 1


def decode(path: str | os.PathLike, mode: str) -> np.ndarray | None:
    """One image file -> uint8 (H, W, 3), or float32 299x299 already resized in clean mode; None if unreadable."""
    img = open_rgb(path)
    if img is None:
        return None
    arr = np.asarray(img)
    return clean_resize(arr) if mode == "clean" else arr


def prepare(image, mode: str) -> np.ndarray:
    """An in-memory image (PIL, or uint8 (H, W, 3) array) -> what `decode` returns for a file."""
    arr = np.asarray(to_rgb(image)) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return clean_resize(arr) if mode == "clean" else arr


def iter_batches(images, batch_size: int, workers: int, mode: str, skipped: list
                 ) -> Iterator[list[np.ndarray]]:
    """Decoded batches. Files are decoded by `workers` threads (PIL releases the GIL while decoding and resizing)."""
    images = list(images)
    is_path = [isinstance(im, (str, os.PathLike)) for im in images]

    def load(i: int):
        return decode(images[i], mode) if is_path[i] else prepare(images[i], mode)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        batch = []
        # pool.map keeps order and decodes ahead of the model.
        for i, arr in enumerate(pool.map(load, range(len(images)))):
            if arr is None:
                skipped.append(images[i])
                continue
            batch.append(arr)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


@dataclass
class Features:
    """Inception outputs of an image set: `arrays[name]` is (N, D) float64; `skipped` lists unreadable files."""
    arrays: dict[str, np.ndarray]
    skipped: list = field(default_factory=list)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


@torch.inference_mode()
def extract_features(model: torch.nn.Module, images, outputs: Sequence[str] = ("2048",), batch_size: int = 50,
                     workers: int | None = None, mode: str = "pytorch-fid", progress: bool = True,
                     split_across_ranks: bool = False) -> Features:
    """Inception outputs (see minigen.fid.inception) for every readable image.

    images: a folder, a list of paths / PIL images / uint8 (H, W, 3) arrays, or a float tensor (N, 3, H, W) in [0, 1]
    (a generator's samples; resized on its device without a round trip through uint8). Unreadable files are skipped,
    warned about and listed in `.skipped`.
    split_across_ranks: under torchrun (minigen.distributed), each rank measures its share of the images, in whole
    batches, and every rank gets all the features in order: the same arrays one process computes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose from {MODES}")
    where = f" in {images}" if isinstance(images, (str, os.PathLike)) else ""
    if where:
        images = list_images(images)
    total = len(images)
    if split_across_ranks:
        _, images = distributed.share(images, batch_size)
    collected, skipped = measure(model, images, tuple(outputs), batch_size, workers, mode,
                                 progress and distributed.is_main())
    if split_across_ranks:
        parts = distributed.gather_objects((collected, skipped), "the other ranks' Inception features")
        collected = {name: [array for part, _ in parts for array in part[name]] for name in collected}
        skipped = [path for _, part in parts for path in part]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {total}", stacklevel=2)
    if all(not v for v in collected.values()):
        raise ValueError(f"no readable images{where}: all {len(skipped)} failed to decode")
    return Features({name: np.concatenate(v) for name, v in collected.items()}, skipped)


def measure(model: torch.nn.Module, images, outputs: tuple[str, ...], batch_size: int, workers: int | None,
            mode: str, progress: bool) -> tuple[dict[str, list[np.ndarray]], list]:
    """extract_features' work on one process: the outputs of each batch (float64 arrays) and the unreadable files."""
    device = next(model.parameters()).device
    skipped: list = []
    if torch.is_tensor(images):
        batches = (images[i: i + batch_size] for i in range(0, len(images), batch_size))
    else:
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        batches = iter_batches(images, batch_size, workers, mode, skipped)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    with tqdm(total=len(images), unit="img", desc="Inception", disable=not progress) as bar:
        for batch in batches:
            if torch.is_tensor(batch):
                x = tensor_to_inception_input(batch.to(device), mode)
            else:
                x = to_inception_input(batch, device)
            for name, value in model(x, outputs).items():
                collected[name].append(value.double().cpu().numpy())
            bar.update(len(batch))
        bar.update(len(images) - bar.n)  # skipped files
    return collected, skipped


def tensor_to_inception_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, 299, 299) in [-1, 1]."""
    if mode == "clean":
        raise ValueError("clean mode resizes with PIL: pass images as uint8 arrays or PIL images, not a tensor")
    x = x.float()
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


