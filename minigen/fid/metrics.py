"""Image-set metrics that agree with the tools people trust: FID (pytorch-fid), KID and IS (torch-fidelity), PSNR, SSIM.
The features they take come from `minigen.fid.features`.

    from minigen.fid import metrics
    from minigen.fid.features import extract_features
    mu, sigma = metrics.statistics(feats["2048"])                          # feats: extract_features(...)
    metrics.save_stats("real.npz", mu, sigma)                              # the .npz pytorch-fid reads and writes
    fid = metrics.frechet_distance(mu, sigma, *metrics.load_stats("fake.npz"))
    kid_mean, kid_std = metrics.kid(feats_a["2048"], feats_b["2048"])
    is_mean, is_std = metrics.inception_score(extract_features(model, imgs, ("logits_unbiased",))["logits_unbiased"])
    metrics.psnr(a, b); metrics.ssim(a, b)                                 # uint8 (H, W, 3) arrays of one size
"""

from __future__ import annotations

import errno
import math
import os
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..images import list_images, open_rgb

IS_SPLITS = 10  # torch-fidelity's default number of Inception Score splits


# ---------------------------------------------------------------------------------------------------------------
# FID: Gaussian statistics and the Fréchet distance


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64, as pytorch-fid. Warns when N <= D."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 images (the covariance of one sample is undefined), got {n}")
    if not np.isfinite(features).all():
        raise ValueError(f"the Inception features of {n} images hold NaN or inf values (non-finite weights?)")
    if n < d + 1:
        warnings.warn(f"{n} images give a singular {d}x{d} covariance: FID needs at least {d + 1} images for a "
                      f"meaningful value (and tens of thousands to compare with published numbers)", stacklevel=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str = "statistics") -> None:
    """Refuse what cannot be a Gaussian's mean (D,) and covariance (D, D): other shapes, non-numbers, NaN or inf, a
    sigma that is not symmetric. `source` names them in the message (a file, or "statistics")."""
    for name, array in (("mu", mu), ("sigma", sigma)):
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{source}: {name} must hold real numbers, got dtype {array.dtype}")
    if mu.ndim != 1 or len(mu) == 0 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{source}: mu must be (D,) and sigma (D, D) with D >= 1; got mu {mu.shape}, "
                         f"sigma {sigma.shape}")
    for name, array in (("mu", mu), ("sigma", sigma)):
        bad = int(np.size(array) - np.isfinite(array).sum())
        if bad:
            raise ValueError(f"{source}: {name} holds {bad} NaN or inf values")
    scale = np.abs(sigma).max()
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise ValueError(f"{source}: sigma is not symmetric, so it is not a covariance matrix")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrt(S1 S2)) of two covariance matrices (symmetric, positive semi-definite), exactly, in float64.

    S1 S2 is not symmetric, but it is similar to a symmetric matrix: with R = sqrt(S1) (symmetric),
        S1 S2 = R (R S2 R) R^-1,
    so S1 S2 and M = R S2 R have the same eigenvalues (also when S1 is singular: AB and BA share their non-zero
    eigenvalues, here A = R, B = R S2). M is symmetric PSD, its eigenvalues l_i >= 0, and the principal square root
    of S1 S2 has the eigenvalues sqrt(l_i), so its trace is sum_i sqrt(l_i). (The Fréchet distance of two Gaussians
    is Dowson & Landau 1982; FID is Heusel et al. 2017.)
    Two symmetric eigendecompositions (LAPACK's syevd) cost a fraction of scipy's general `sqrtm` (a complex Schur
    form): at 2048 dims seconds instead of a minute or more.
    """
    eigenvalues, vectors = np.linalg.eigh(sigma1)  # S1 = V diag(e) V^T; (D,), (D, D)
    # Rounding makes eigenvalues that are 0 in exact arithmetic slightly negative: a PSD matrix has none below 0.
    root1 = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T  # sqrt(S1), (D, D)
    m = root1 @ sigma2 @ root1  # (D, D), symmetric up to rounding (eigvalsh reads one triangle)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, progress: bool = False) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)): the Fréchet distance of two Gaussians, pytorch-fid's
    `calculate_frechet_distance` to within 1e-6 relative (tests/test_fid_parity.py).

    # Patch: pytorch-fid takes scipy's `sqrtm` of the product (a general, complex Schur method: over a minute at
    # 2048 dims on a laptop CPU), adds 1e-6 to both diagonals when that is not finite and drops a small imaginary
    # part. `trace_sqrt_product` computes the same trace from two symmetric eigendecompositions, which are real and
    # always finite, so neither fallback is needed.
    progress: print "Fréchet distance (D-d)..." and the time taken to stderr (the step is silent otherwise).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (were they computed with the same --dims?)")
    check_statistics(mu1, sigma1, "the first statistics")
    check_statistics(mu2, sigma2, "the second statistics")
    if progress:
        print(f"Fréchet distance ({len(mu1)}-d)...", end=" ", file=sys.stderr, flush=True)
    start = time.perf_counter()
    diff = mu1 - mu2  # (D,)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, with the reason
        distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
    if progress:
        print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if not math.isfinite(distance):
        raise ValueError(f"the Fréchet distance is {distance}: the statistics are too large for float64")
    # Patch: rounding can leave a distance of -3e-7 for identical statistics, which pytorch-fid prints as it is; a
    # squared distance is never negative, so it is clamped at 0.
    return max(distance, 0.0)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write `mu` and `sigma` to an .npz that pytorch-fid reads (np.savez_compressed, atomically). An OS error
    while writing (a full disk) names the file; nothing is left behind."""
    try:
        with atomic_write(path) as f:
            np.savez_compressed(f, mu=mu, sigma=sigma)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


ZIP_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"  # how an .npz (a zip archive) and an .npy file begin
# What np.load and reading an archive's members raise on a damaged file: zipfile, zlib and numpy's own format errors.
NPZ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from an .npz such as pytorch-fid's. Refused, naming the file: anything that is not an
    .npz archive, missing arrays, pickled (object) arrays, other shapes, NaN/inf values, a non-symmetric sigma."""
    if Path(path).is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not an .npz statistics file", str(path))
    with open(path, "rb") as f:
        start = f.read(6)
    # np.load tells the formats apart by these first bytes, and reads anything else as a pickle
    if start.startswith(NPY_MAGIC):
        raise ValueError(f"{path}: expected an .npz archive with 'mu' and 'sigma', found a single array (.npy)")
    if not start.startswith(ZIP_MAGIC):
        raise ValueError(f"{path}: not a readable .npz file (an .npz is a zip archive; this file does not start "
                         f"like one)")
    try:
        archive = np.load(path, allow_pickle=False)
    except NPZ_ERRORS as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    with archive:
        missing = {"mu", "sigma"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: an FID statistics file needs arrays 'mu' and 'sigma'; "
                             f"missing {sorted(missing)} (has {sorted(archive.files)})")
        try:
            mu, sigma = archive["mu"], archive["sigma"]
        except NPZ_ERRORS as e:  # a damaged member, or an object array that would need pickle to load
            raise ValueError(f"{path}: cannot read 'mu' and 'sigma' ({e})") from None
    check_statistics(mu, sigma, str(path))
    return mu.astype(np.float64), sigma.astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# KID and IS (torch-fidelity's definitions and defaults)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma <x, y> + coef0)^degree, gamma = 1 / D by default."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased squared MMD of two equal-size samples: diagonals of K_xx and K_yy left out, K_xy whole."""
    m = len(k_xx)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020, **kernel_args) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets (torch-fidelity's defaults).

    Subsets are drawn without replacement with numpy's RandomState(seed), first from set 1 then set 2, as torch-fidelity
    does. With fewer images than `subset_size`, the subset size shrinks to the smaller set (as clean-fid does).
    """
    n1, n2 = len(features1), len(features2)
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"KID of features of different dims: {features1.shape[1]} vs {features2.shape[1]}")
    if min(n1, n2) < subset_size:
        subset_size = min(n1, n2)
        warnings.warn(f"KID subset size reduced to {subset_size}: fewer images than the default 1000", stacklevel=2)
    if subset_size < 2:
        raise ValueError("KID needs at least 2 images in each set")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = features1[rng.choice(n1, subset_size, replace=False)]
        y = features2[rng.choice(n2, subset_size, replace=False)]
        values.append(mmd2_unbiased(polynomial_kernel(x, x, **kernel_args), polynomial_kernel(x, y, **kernel_args),
                                    polynomial_kernel(y, y, **kernel_args)))
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = IS_SPLITS, seed: int = 2020) -> tuple[float, float]:
    """Inception Score exp(E[KL(p(y|x) || p(y))]): mean and std over `splits` parts, torch-fidelity's way.

    Rows are shuffled with RandomState(seed) first, computed in float64. torch-fidelity feeds the classifier's
    logits without bias ("logits_unbiased"); pass those to reproduce its numbers.
    """
    logits = torch.as_tensor(np.asarray(logits)).double()  # (N, classes)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    logits = logits[np.random.RandomState(seed).permutation(n)]
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[part].mean(dim=0, keepdim=True)  # (1, classes): the marginal over this split
        kl = (p[part] * (log_p[part] - p_y.log())).sum(dim=1)  # (n_split,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------------
# Paired-image metrics


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images: 10 log10(range^2 / MSE); inf when identical."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images of different shapes: {a.shape} vs {b.shape}")
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
    valid region only, mean over pixels and channels (scikit-image's `structural_similarity` with
    gaussian_weights=True, use_sample_covariance=False)."""
    from scipy.ndimage import correlate1d

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"SSIM of images of different shapes: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    w = gaussian_window()

    def blur(x):  # separable Gaussian over H and W of (H, W, C)
        return correlate1d(correlate1d(x, w, axis=0, mode="reflect"), w, axis=1, mode="reflect")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    crop = len(w) // 2  # skimage drops the border where the window hangs over the edge
    return float(s[crop:-crop, crop:-crop].mean())


def paired_metrics(folder_a: str | os.PathLike, folder_b: str | os.PathLike) -> dict[str, float]:
    """Mean PSNR and SSIM over images with the same relative path in both folders (the others are ignored)."""
    a_root, b_root = Path(folder_a), Path(folder_b)
    b_files = {p.relative_to(b_root): p for p in list_images(b_root)}
    pairs = [(p, b_files[p.relative_to(a_root)]) for p in list_images(a_root) if p.relative_to(a_root) in b_files]
    if not pairs:
        raise ValueError(f"PSNR needs paired images: no file name in {a_root} is also in {b_root}")
    psnrs, ssims = [], []
    for pa, pb in tqdm(pairs, unit="pair", desc="PSNR/SSIM"):
        ia, ib = open_rgb(pa), open_rgb(pb)
        if ia is None or ib is None:
            continue
        if ia.size != ib.size:
            raise ValueError(f"paired images differ in size: {pa} {ia.size} vs {pb} {ib.size}")
        ia, ib = np.asarray(ia), np.asarray(ib)
        psnrs.append(psnr(ia, ib))
        ssims.append(ssim(ia, ib))
    if not psnrs:
        raise ValueError(f"PSNR needs paired images: none of the {len(pairs)} pairs in {a_root} and {b_root} "
                         f"could be read")
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "pairs": len(psnrs)}
