"""Data-parallel training speed: images/s of one GAN step and one LoRA step on 1 and N processes, the scaling
efficiency, and the bytes each rank all-reduces per step (counted from the tensors handed to the collective). Prints a
Markdown table. Each rank gets --threads CPU threads (default 1: N ranks on N cores) or, on CUDA, its own GPU.

    python bench/bench_ddp.py                         # CPU (gloo): 1 and 2 processes
    python bench/bench_ddp.py --device cuda --procs 1 2 4 8
    python bench/bench_ddp.py --smoke                 # tiny and quick: checks that it runs

GAN step: `GANTrainer.step` (D and G updates, gradients summed over ranks) and `parallel.agree` (the losses
and stop flag), with --sync-bn: its bytes are G's and D's gradients plus the batch-norm moments. LoRA step: the tiny
SDXL's UNet (`random_model("tiny")`) with attention LoRA, forward, backward, `distributed.sum_gradients` over the
adapters, AdamW: its bytes are the adapters' fp32 gradients alone, never the frozen UNet's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minigen import distributed
from minigen.gan import parallel
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer
from minigen.lora.layers import add_lora, lora_parameters
from minigen.sd.model import random_model

# (per-rank batch, GAN size, GAN widths, LoRA latent side, timed steps)
SETTINGS = {"full": (16, (64, 64), 16, 16, 5), "smoke": (2, (32, 32), 4, 8, 1)}


class AllReduceCounter:
    """Counts the bytes of every tensor this process passes to torch.distributed.all_reduce while it is installed."""

    def __init__(self):
        self.bytes, self.original = 0, dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self.original(tensor, *args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def gan_step(device: str, batch: int, size: tuple[int, int], width: int) -> tuple[Callable[[], None], int]:
    """One training iteration of the DCGAN, and the bytes of its trainable parameters."""
    cfg = GANConfig(size=size, ngf=width, ndf=width, nz=32, batch=batch, sync_bn=True, device=device)
    trainer = GANTrainer(cfg, device)
    real = torch.rand(batch, 3, *size, device=device) * 2 - 1  # (B, 3, H, W)

    def step():
        parallel.agree(trainer.step(real), False)
    params = [*trainer.G.parameters(), *trainer.D.parameters()]
    return step, sum(p.numel() * p.element_size() for p in params)


def lora_step(device: str, batch: int, side: int) -> tuple[Callable[[], None], int]:
    """One LoRA training step of the tiny SDXL UNet, and the bytes of its adapters."""
    unet = random_model("tiny").unet.to(device)
    add_lora(unet, "attention", rank=4)
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    config = dict(unet.config)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, 4, side, side, generator=generator), torch.full((batch,), 500),  # latents, t
              torch.randn(batch, 77, config["cross_attention_dim"], generator=generator),  # (B, 77, D) text
              torch.randn(batch, pooled, generator=generator),  # (B, P) pooled text
              torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]] * batch)]  # (B, 6) time ids
    x, t, context, pooled_text, ids = (v.to(device) for v in inputs)
    target = torch.randn(batch, 4, side, side, generator=generator).to(device)

    def step():
        F.mse_loss(unet(x, t, context, pooled_text, ids), target).backward()
        distributed.sum_gradients(params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() * p.element_size() for p in params)


def measure(step: Callable[[], None], steps: int, device: str) -> tuple[float, int]:
    """(median wall seconds per step after one warm-up step, bytes all-reduced by this rank in one step)."""
    step()
    times, counted = [], []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with AllReduceCounter() as counter:
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        counted.append(counter.bytes)
    return statistics.median(times), counted[-1]


def worker(rank: int, ranks: int, port: int, args: argparse.Namespace, result: str) -> None:
    """One rank of a job of `ranks` processes: both steps; rank 0 writes the results as JSON to `result`."""
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(args.threads)
    batch, size, width, side, steps = SETTINGS["smoke" if args.smoke else "full"]
    with distributed.process_group(args.device) as device:
        rows = {}
        for name, (step, params) in (("GAN", gan_step(device, batch, size, width)),
                                     ("LoRA", lora_step(device, batch, side))):
            seconds, exchanged = measure(step, steps, device)
            rows[name] = {"seconds": seconds, "images": batch * ranks, "bytes": exchanged, "param_bytes": params}
        if distributed.is_main():
            Path(result).write_text(json.dumps(rows))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, args: argparse.Namespace) -> dict:
    """Both steps on `ranks` processes (spawned; one process runs here, without a process group)."""
    with tempfile.TemporaryDirectory() as folder:
        result = str(Path(folder) / "result.json")
        if ranks == 1:
            worker(0, 1, 0, args, result)
        else:
            mp.spawn(worker, (ranks, free_port(), args, result), nprocs=ranks)
        return json.loads(Path(result).read_text())


def table(results: dict[int, dict]) -> str:
    lines = ["| step | processes | global batch | s/step | images/s | scaling efficiency | all-reduced per step | "
             "trainable parameters |", "|---|---|---|---|---|---|---|---|"]
    for name in ("GAN", "LoRA"):
        base = results[min(results)][name]
        base_rate = base["images"] / base["seconds"]
        for ranks, rows in sorted(results.items()):
            row = rows[name]
            rate = row["images"] / row["seconds"]
            lines.append(f"| {name} | {ranks} | {row['images']} | {row['seconds']:.3f} | {rate:.1f} | "
                         f"{rate / (base_rate * ranks / min(results)):.0%} | {row['bytes']:,} B | "
                         f"{row['param_bytes']:,} B |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--smoke", action="store_true", help="tiny networks, one timed step: checks that it runs")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and max(args.procs) > torch.cuda.device_count():
        p.error(f"--procs {max(args.procs)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    batch, size, _, side, _ = SETTINGS["smoke" if args.smoke else "full"]
    print(f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s) per process; per-rank batch "
          f"{batch}; GAN {size[0]}x{size[1]} --sync-bn, LoRA tiny SDXL UNet at {side}x{side} latents, rank 4")
    text = table({ranks: run(ranks, args) for ranks in args.procs})
    print(text)
    return text


if __name__ == "__main__":
    main()
