"""FID, minigen vs pytorch-fid, on the same real images and device: feature extraction speed, the Fréchet step, and
the whole job end to end (network load, both folders' statistics, the distance), ratios printed.

    python bench/bench_fid.py [--images 64] [--device cpu]      # all three; features and values compared
    python bench/bench_fid.py --real-fid [--twemoji 1000]        # the FID figures of BENCHMARKS.md

Images: the built-in Twemoji (72x72, composited on white; all one size, so pytorch-fid can batch them) and Met
paintings (JPEG of mixed sizes), or any --data folder. pytorch-fid gets the same weights (minigen's converted file;
its unused classifier zero-filled) and its own DataLoader with the same workers.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigen.datasets import resolve_dataset  # noqa: E402
from minigen.fid import features, inception, metrics  # noqa: E402
from minigen.images import list_images  # noqa: E402


def dataset(name: str) -> list[Path]:
    """The image files of a built-in dataset (fetched and converted once; Twemoji composited on white, so
    pytorch-fid's convert("RGB") and minigen read the same pixels), or of a folder."""
    return list_images(resolve_dataset(name))


def pytorch_fid_model(weights: Path, device: str, channels_last: bool):
    import pytorch_fid.inception as pf_inception

    state, _ = inception.load_weights(weights)
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    pf_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    model = pf_inception.InceptionV3([3]).eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (pytorch-fid's DataLoader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


def timed_cpu(fn):
    """fn's result, wall seconds and CPU seconds: on a shared machine the CPU seconds are the steadier measure."""
    start = cpu_seconds()
    out, wall = timed(fn)
    return out, wall, cpu_seconds() - start


def bench_throughput(args, weights: Path) -> None:
    from pytorch_fid.fid_score import get_activations

    files = dataset(args.data)[: args.images]
    ours = inception.load_inception(weights, args.device)
    theirs = pytorch_fid_model(weights, args.device, channels_last=False)
    run_ours = lambda: features.extract_features(ours, files, batch_size=args.batch_size,  # noqa: E731
                                                workers=args.workers, progress=False)["2048"]
    run_theirs = lambda: get_activations(files, theirs, args.batch_size, 2048, args.device,  # noqa: E731
                                         args.workers)
    run_ours()  # warm-up (first-call kernel selection)
    f_ours, t_ours = timed(run_ours)
    f_theirs, t_theirs = timed(run_theirs)
    n = len(files)
    print(f"{n} {args.data} images (-> 299), batch {args.batch_size}, {args.workers} workers, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  minigen     {n / t_ours:7.2f} img/s")
    print(f"  pytorch-fid {n / t_theirs:7.2f} img/s")
    print(f"  ratio       {t_theirs / t_ours:7.2f}x")
    print(f"  max |feature difference| {np.abs(f_ours - f_theirs).max():.2e} (features up to {np.abs(f_theirs).max():.2f})")
    mu1, s1 = metrics.statistics(f_ours)
    mu2, s2 = metrics.statistics(f_theirs)
    print(f"  FID(minigen features, pytorch-fid features) = {metrics.frechet_distance(mu1, s1, mu2, s2):.2e}")


def bench_frechet(dims: int = 2048) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(dims + 500, dims)), rng.normal(0.1, 1.1, size=(dims + 500, dims))
    mu1, s1 = metrics.statistics(a)
    mu2, s2 = metrics.statistics(b)
    ours, t_ours = timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2))
    theirs, t_theirs = timed(lambda: calculate_frechet_distance(mu1, s1, mu2, s2))
    print(f"Fréchet distance at {dims} dims: minigen {t_ours:.2f} s, pytorch-fid {t_theirs:.2f} s, "
          f"values {ours:.6f} vs {theirs:.6f}")


def bench_end_to_end(args, weights: Path) -> None:
    """What `fid.py A B` does against what pytorch-fid's calculate_fid_given_paths does (its model loaded with the same
    weights): load the network, the statistics of both halves of the images, the Fréchet distance. With
    --frechet-dims below 2048 (the smoke run), both take the distance over the first that many features."""
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance

    files = dataset(args.data)[: 2 * args.images]
    halves, d = (files[0::2], files[1::2]), args.frechet_dims

    def ours() -> float:
        model = inception.load_inception(weights, args.device)
        stats = [metrics.statistics(features.extract_features(model, half, batch_size=args.batch_size,
                                                             workers=args.workers, progress=False)["2048"][:, :d])
                 for half in halves]
        return metrics.frechet_distance(*stats[0], *stats[1])

    def theirs() -> float:
        model = pytorch_fid_model(weights, args.device, channels_last=False)
        stats = [calculate_activation_statistics(half, model, args.batch_size, 2048, args.device, args.workers)
                 for half in halves]
        (mu1, s1), (mu2, s2) = ((mu[:d], sigma[:d, :d]) for mu, sigma in stats)
        return calculate_frechet_distance(mu1, s1, mu2, s2)

    fid_ours, t_ours, cpu_ours = timed_cpu(ours)
    fid_theirs, t_theirs, cpu_theirs = timed_cpu(theirs)
    print(f"FID end to end, {len(halves[0])} vs {len(halves[1])} images, {d}-d: minigen {t_ours:.1f} s "
          f"({cpu_ours:.1f} CPU s), pytorch-fid {t_theirs:.1f} s ({cpu_theirs:.1f} CPU s), ratio {t_theirs / t_ours:.2f}x"
          f" ({cpu_theirs / cpu_ours:.2f}x in CPU s); FID {fid_ours:.4f} vs {fid_theirs:.4f}")


def real_fid(args, weights: Path) -> None:
    model = inception.load_inception(weights, args.device)
    met = dataset("met")
    twemoji = dataset("twemoji")
    if args.twemoji < len(twemoji):
        twemoji = [twemoji[i] for i in sorted(np.random.RandomState(0).choice(len(twemoji), args.twemoji, False))]

    def features(files):
        return features.extract_features(model, files, batch_size=args.batch_size, workers=args.workers)["2048"]

    def halves(feats):  # a fixed random split
        order = np.random.RandomState(0).permutation(len(feats))
        return metrics.statistics(feats[order[: len(feats) // 2]]), metrics.statistics(feats[order[len(feats) // 2:]])

    met_feats, tw_feats = features(met), features(twemoji)
    (met_a, met_b), (tw_a, tw_b) = halves(met_feats), halves(tw_feats)
    print(f"FID met half vs half ({len(met) // 2} vs {len(met) - len(met) // 2}): "
          f"{metrics.frechet_distance(*met_a, *met_b):.2f}")
    print(f"FID twemoji half vs half ({len(twemoji) // 2} vs {len(twemoji) - len(twemoji) // 2}): "
          f"{metrics.frechet_distance(*tw_a, *tw_b):.2f}")
    print(f"FID twemoji ({len(twemoji)}) vs met ({len(met)}): "
          f"{metrics.frechet_distance(*metrics.statistics(tw_feats), *metrics.statistics(met_feats)):.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--weights", help="default: minigen's lookup (run `make fid-weights` first)")
    p.add_argument("--real-fid", action="store_true", help="compute the FID figures of BENCHMARKS.md instead")
    p.add_argument("--twemoji", type=int, default=4009, help="Twemoji images used by --real-fid (a fixed sample)")
    p.add_argument("--data", default="twemoji", help="images for the speed benches: a built-in dataset or a folder")
    p.add_argument("--frechet-dims", type=int, default=2048, help="size of the covariances the Fréchet step is timed on")
    args = p.parse_args(argv)
    if args.real_fid:
        real_fid(args, Path(args.weights) if args.weights else inception.find_weights())
        return
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as folder:
        weights = weights_or_random(args.weights, Path(folder))
        bench_throughput(args, weights)
        bench_frechet(args.frechet_dims)
        bench_end_to_end(args, weights)


def weights_or_random(path: str | None, folder: Path) -> Path:
    """--weights, else minigen's lookup, else random weights of the FID Inception's architecture (seed 0) saved in
    `folder`, said in the output: speed needs no trained weights (a bare GPU machine has none); the FID values are
    then meaningless."""
    if path:
        return Path(path)
    try:
        return inception.find_weights()
    except FileNotFoundError:
        from minigen.io import save_safetensors

        torch.manual_seed(0)
        random_weights = folder / "random-inception.safetensors"
        save_safetensors(inception.FIDInceptionV3(classifier=False).state_dict(), random_weights)
        print("Inception weights: none on this machine; timed with random weights of its architecture (seed 0): the "
              "speeds hold, the FID values are meaningless")
        return random_weights


if __name__ == "__main__":
    main()
