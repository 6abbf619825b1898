"""DCGAN training speed: images/s and the achieved FLOP/s as a fraction of this machine's matmul peak, measured in
the same process. Variants: the default step, channels-last memory layout, and torch.compile (--compile).

    python bench/bench_gan.py                                  # CPU, the `make demo` networks
    python bench/bench_gan.py --ngf 64 --ndf 64 --batch 128    # seed 002's networks
    python bench/bench_gan.py --device cuda --compile          # where a GPU is lent
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from minigen.images import parse_size
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall seconds, and CPU seconds of this process: on a shared machine the CPU time is the fair measure."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of the best of `repeats` fp32 n x n matmuls: the yardstick."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    runs = []
    for _ in range(repeats):
        with Clock(device) as clock:
            a @ b
        runs.append(clock)
    return 2 * n ** 3 / min(c.wall for c in runs), 2 * n ** 3 / min(c.cpu for c in runs)


def step_flops(cfg: GANConfig) -> int:
    """FLOPs of one training iteration (D on real and fake, G through D, and their backward passes)."""
    trainer = GANTrainer(dataclasses.replace(cfg, device="cpu", channels_last=False))
    real = torch.rand(cfg.batch, 3, *cfg.size) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        trainer.step(real)
    return counter.get_total_flops()


def time_steps(cfg: GANConfig, iters: int, compile_models: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per iteration, medians of `iters` after two warm-up iterations."""
    trainer = GANTrainer(cfg)
    if compile_models:
        trainer.G, trainer.D = torch.compile(trainer.G), torch.compile(trainer.D)
    real = (torch.rand(cfg.batch, 3, *cfg.size) * 2 - 1).to(trainer.device)
    runs = []
    for _ in range(iters + 2):
        with Clock(trainer.device) as clock:
            trainer.step(real)
        runs.append(clock)
    runs = runs[2:]
    return sorted(c.wall for c in runs)[len(runs) // 2], sorted(c.cpu for c in runs)[len(runs) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=(64, 64))
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--ndf", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GANConfig(size=args.size, ngf=args.ngf, ndf=args.ndf, batch=args.batch, device=args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak_wall, peak_cpu = matmul_peak(device)
    flops = step_flops(cfg)
    print(f"matmul peak (fp32, 2048^3): {peak_wall / 1e9:.1f} GFLOP per wall second, {peak_cpu / 1e9:.1f} per CPU "
          f"second; one iteration at {cfg.size[0]}x{cfg.size[1]}, ngf {cfg.ngf}, ndf {cfg.ndf}, batch {cfg.batch}: "
          f"{flops / 1e9:.2f} GFLOP")
    variants = [("default", cfg, False), ("channels_last", dataclasses.replace(cfg, channels_last=True), False)]
    if args.compile:
        variants.append(("torch.compile", cfg, True))
    print(f"{'variant':<15}{'wall s/it':>10}{'images/s':>9}{'of peak':>9}{'CPU s/it':>10}{'of CPU peak':>12}"
          f"{'vs default':>11}")
    base = None
    for label, variant, compile_models in variants:
        wall, cpu = time_steps(variant, args.iters, compile_models)
        base = base or wall
        print(f"{label:<15}{wall:>10.3f}{cfg.batch / wall:>9.1f}{flops / wall / peak_wall:>9.1%}{cpu:>10.3f}"
              f"{flops / cpu / peak_cpu:>12.1%}{base / wall:>10.2f}x")


if __name__ == "__main__":
    main()
