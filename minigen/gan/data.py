"""A folder of images as one uint8 tensor: the DCGAN's training set (`ImageFolder`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..images import list_images, open_rgb, resize_crop


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

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None,
              rows: slice = slice(None)) -> torch.Tensor:
        """Images at indices[rows] as float (B, 3, H, W) in [-1, 1], each mirrored with probability 1/2 if hflip. The
        flips are drawn for all of `indices` (a global batch), so a rank's rows are mirrored as one process's are."""
        flip = torch.rand(len(indices), generator=generator)[rows] < 0.5 if self.hflip else None  # (B,)
        x = self.images[indices[rows]].to(torch.get_default_dtype()).div_(127.5).sub_(1.0)  # fp32 unless set
        if flip is not None:
            x[flip] = x[flip].flip(-1)
        return x
