"""FID while a DCGAN trains: the per-epoch hook behind `train_gan.py --fid-every N`.

    hook = fid_hook(cfg)              # loads the Inception now (no weights: an error before any training)
    train(cfg, epoch_hooks=[hook])    # every cfg.fid_every epochs {"fid": ...} goes into log.jsonl and curves.png

The reference is the training set as the GAN sees it: each image resized and centre-cropped to `cfg.size` by
`ImageFolder` (the generator cannot draw detail above its own resolution, so the original files would only add a
constant offset). Its Inception statistics are computed once and kept as a pytorch-fid `.npz` in
`$MINIGEN_CACHE/fid_stats/`, named by the folder, size, image count and dims; later runs and resumes reuse it.

The samples are `cfg.fid_samples` images from the same seeded noise every time, in batches of 64 (`noise_batches`,
as `train_gan.py --sample` draws them), so values compare across epochs, and the hook's FID after an epoch is what
`fid.py <cached .npz> <folder>` gives on `--sample N --seed S` PNGs of that epoch's checkpoint. Samples are rounded
to 8 bits first, as those PNGs are. Features, statistics and the distance are minigen.fid.metrics' (pytorch-fid's
preprocessing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..fid import features, metrics
from ..cache import cache_dir
from .data import ImageFolder
from ..datasets import resolve_dataset
from ..images import list_images
from .config import GANConfig
from .trainer import EpochHook, GANTrainer, noise_batches
from ..fid.inception import FEATURE_DIMS, load_inception
from ..plot import signed_to_uint8

SAMPLE_BATCH = 64  # generator batch: with batch-statistics sampling, the batch size changes the images


def stats_path(data_folder: Path, size: tuple[int, int], dims: int) -> Path:
    """Where the training set's statistics are cached: one file per folder, size, image count and dims."""
    folder, count = data_folder.resolve(), len(list_images(data_folder))
    key = hashlib.sha256(f"{folder}|{size[0]}x{size[1]}|{count}|{dims}".encode()).hexdigest()[:12]
    return cache_dir() / "fid_stats" / f"{folder.name}_{size[0]}x{size[1]}_{count}img_{dims}d_{key}.npz"


def training_stats(model: torch.nn.Module, cfg: GANConfig, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the training images at cfg.size: read from the cache, or computed once and cached."""
    data_folder = resolve_dataset(cfg.data)
    path = stats_path(data_folder, cfg.size, cfg.fid_dims)
    if path.is_file():
        return metrics.load_stats(path)
    dataset = ImageFolder(data_folder, cfg.size, progress=progress)
    images = list(dataset.images.permute(0, 2, 3, 1).numpy())  # N x (H, W, 3) uint8
    feats = features.extract_features(model, images, (str(cfg.fid_dims),), progress=progress)
    mu, sigma = metrics.statistics(feats[str(cfg.fid_dims)])
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics.save_stats(path, mu, sigma)
    return mu, sigma


def fid_hook(cfg: GANConfig, model: torch.nn.Module | None = None, progress: bool = True) -> EpochHook:
    """A `train(..., epoch_hooks=[...])` hook returning {"fid": value} after every cfg.fid_every-th epoch.

    model: an FID Inception (default: `load_inception` from cfg.fid_weights or the usual places; a missing file is a
    FileNotFoundError now, before training, saying how to get one).
    """
    if cfg.fid_every < 1:
        raise ValueError(f"--fid-every must be a number of epochs >= 1 to measure FID, got {cfg.fid_every}")
    if cfg.fid_dims not in FEATURE_DIMS:
        raise ValueError(f"--fid-dims must be one of {', '.join(map(str, FEATURE_DIMS))}, got {cfg.fid_dims}")
    if cfg.fid_samples < 2:
        raise ValueError(f"--fid-samples must be at least 2 (a covariance), got {cfg.fid_samples}")
    if model is None:
        try:
            model = load_inception(cfg.fid_weights or None, cfg.device, flag="--fid-weights")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--fid-every needs the FID Inception weights: {e}") from None
    train_mu, train_sigma = training_stats(model, cfg, progress)
    dims = str(cfg.fid_dims)

    def fid(trainer: GANTrainer) -> dict[str, float]:
        if trainer.epoch % cfg.fid_every:
            return {}
        samples = [image for z in noise_batches(cfg.fid_samples, cfg.nz, SAMPLE_BATCH, cfg.seed)
                   for image in signed_to_uint8(trainer.generate(z))]  # N x (H, W, 3) uint8, as the PNGs of --sample
        feats = features.extract_features(model, samples, (dims,), progress=progress)
        mu, sigma = metrics.statistics(feats[dims])
        return {"fid": metrics.frechet_distance(mu, sigma, train_mu, train_sigma)}

    return fid
