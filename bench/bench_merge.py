"""Peak memory and wall time of minigen's streaming merge against the naive one (load both, compute, save_file).

Two random fp16 checkpoints with SDXL's full set of tensor shapes (about 6.9 GB each at --scale 1) are written to a
temporary folder, merged by each method in its own subprocess (peak resident memory from that child's rusage), and
removed after. --scale s keeps an evenly spread fraction s of the tensors (for machines without ~21 GB free for the
naive path).

    python bench/bench_merge.py --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigen.io import SafetensorsWriter  # noqa: E402
from minigen.sd.checkpoint_files import TensorFile  # noqa: E402
from minigen.merge.checkpoints import MergeRecipe, merge_checkpoints  # noqa: E402

VAE_PREFIX = "first_stage_model."


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of `sd_xl_base_1.0.safetensors`, by its single-file name: minigen's SDXL models built on the meta
    device (no memory), their diffusers names mapped by `minigen.sd.convert`."""
    from minigen.sd import get_config
    from minigen.sd.convert import to_single_file
    from minigen.sd.model import PARTS, build_model

    configs = get_config("sdxl-base")
    with torch.device("meta"):
        state = to_single_file({part: build_model(part, configs[part]).state_dict() for part in PARTS}, configs, "sdxl")
    return {k: tuple(v.shape) for k, v in state.items()}


def make_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with SafetensorsWriter(path, {k: (s, torch.float16) for k, s in shapes.items()}) as w:
        for k, s in shapes.items():
            w.write(k, torch.randn(s, generator=g, dtype=torch.float16))


def run_minigen(a: str, b: str, out: str, alpha: float) -> None:
    merge_checkpoints(a, b, out, MergeRecipe(alpha=alpha), progress=False)


def run_naive(a: str, b: str, out: str, alpha: float) -> None:
    """What a merger script usually does: both state dicts in memory, the result built in memory, then saved."""
    from safetensors.torch import load_file, save_file
    sd_a, sd_b = load_file(a), load_file(b)
    merged = {k: v if k.startswith(VAE_PREFIX) else (1 - alpha) * v + alpha * sd_b[k] for k, v in sd_a.items()}
    save_file(merged, out)


def measure(method: str, a: Path, b: Path, out: Path, alpha: float) -> dict:
    """Run one method in a fresh subprocess, which reports its own peak resident memory (VmHWM).

    Not the child's rusage: Linux carries the parent's high-water mark into ru_maxrss across fork + exec, and this
    parent holds diffusers and transformers.
    """
    run = subprocess.run([sys.executable, __file__, "--child", method, str(a), str(b), str(out), str(alpha)],
                         stdout=subprocess.PIPE, check=True)
    return json.loads(run.stdout)


def max_difference(x: Path, y: Path, keys: list[str]) -> float:
    fx, fy = TensorFile(x), TensorFile(y)
    return max((fx.get(k).float() - fy.get(k).float()).abs().max().item() for k in keys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of SDXL's tensors to use (1 = full size)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--device", default="cpu", choices=["cpu"],
                   help="merging is disk-bound streaming on the CPU; there is no accelerator path to measure")
    p.add_argument("--tmp", help="folder for the temporary checkpoints (default: the system's temporary folder)")
    args = p.parse_args()

    shapes = sdxl_shapes()
    keys = list(shapes)
    # An evenly spread share of the bytes: walk the keys with a budget of scale * each size, taking a tensor when the
    # budget covers it. This keeps the mix of sizes; the largest tensor (the peak-memory case) is always kept.
    largest = max(keys, key=lambda k: torch.Size(shapes[k]).numel())
    kept, budget = {}, 0.0
    for k, s in shapes.items():
        size = torch.Size(s).numel()
        budget += args.scale * size
        if budget >= size or k == largest:
            kept[k] = s
            budget -= size
    size_gb = sum(torch.Size(s).numel() * 2 for s in kept.values()) / 1e9
    print(f"{len(kept)} of {len(shapes)} SDXL tensors (scale {args.scale}), {size_gb:.2f} GB per fp16 checkpoint; "
          f"largest {largest} {shapes[largest]}")

    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_merge_") as tmp:
        tmp = Path(tmp)
        a, b = tmp / "a.safetensors", tmp / "b.safetensors"
        t = time.perf_counter()
        make_checkpoint(a, kept, 0)
        make_checkpoint(b, kept, 1)
        print(f"made the two inputs in {time.perf_counter() - t:.1f} s")
        results = {}
        for method in ("minigen", "naive"):  # both read inputs already in the page cache (just written)
            out = tmp / f"{method}.safetensors"
            results[method] = measure(method, a, b, out, args.alpha)
            print(f"{method:8s} peak RSS {results[method]['peak_gb']:6.2f} GB   wall {results[method]['wall_s']:6.1f} s")
        sample = list(kept)[:: max(1, len(kept) // 50)]
        print(f"max |minigen - naive| over {len(sample)} tensors: "
              f"{max_difference(tmp / 'minigen.safetensors', tmp / 'naive.safetensors', sample):.2e} "
              f"(minigen rounds once from fp32, naive computes in fp16)")
    m, n = results["minigen"], results["naive"]
    print(f"ratios naive/minigen: peak memory {n['peak_gb'] / m['peak_gb']:.1f}x, wall time {n['wall_s'] / m['wall_s']:.2f}x")


def child(method: str, a: str, b: str, out: str, alpha: str) -> None:
    t = time.perf_counter()
    {"minigen": run_minigen, "naive": run_naive}[method](a, b, out, float(alpha))
    wall = time.perf_counter() - t
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "peak_gb": hwm_kb * 1024 / 1e9}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
