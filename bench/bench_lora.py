"""One LoRA training step (forward, backward, AdamW step) of the SDXL UNet: minigen vs diffusers + peft set up as
diffusers' train_text_to_image_lora_sdxl.py does it (`unet.add_adapter(LoraConfig(r, lora_alpha=r,
init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`), with the same UNet config and
weights, the same targets, rank, dtype and batch, in one process. Prints seconds per step (wall and CPU) and peak
memory, and the ratios minigen / diffusers.

    python bench/bench_lora.py                             # CPU: a medium UNet (TINY x2 widths), 32x32 latents
    python bench/bench_lora.py --device cuda --full        # full-size SDXL UNet, 1024x1024, bf16, +- checkpointing
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import full_models

from minigen.lora.layers import add_lora, lora_parameters
from minigen.sd.configs import get_config
from minigen.sd.unet import UNet2DConditionModel

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' example; minigen's "attention" preset is the same set


def medium_config() -> dict:
    config = get_config("tiny", "unet")
    return config | {"block_out_channels": [64, 128, 192], "attention_head_dim": [4, 8, 12]}  # head dim 16


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM, the peak resident set, to now
            f.write("5")


def peak_bytes(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024 - baseline


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024


def build(kind: str, config: dict, state: dict, rank: int, dtype, device, checkpointing: bool):
    """The UNet with LoRA on TARGETS, base weights in `dtype`, LoRA weights fp32 (as both trainers keep them)."""
    if kind == "minigen":
        unet = full_models.same_weights("minigen UNet", lambda: UNet2DConditionModel(config), state).to(device, dtype)
        add_lora(unet, [r"\." + re.escape(t) + "$" for t in TARGETS], rank, rank, init="gaussian")
        unet.set_gradient_checkpointing(checkpointing)
        return unet, lora_parameters(unet)
    import diffusers
    from peft import LoraConfig

    unet = full_models.same_weights("diffusers UNet", lambda: diffusers.UNet2DConditionModel(
        **{k: v for k, v in config.items() if not k.startswith("_")}), state)
    unet.requires_grad_(False)
    unet.to(device, dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: LoRA weights in fp32
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, params


def step_fn(kind: str, unet, params, inputs, dtype, device):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x, t, context, pooled, ids, target = inputs

    def step(saved: dict | None = None):
        """One training step; with `saved`, also record the storage of every tensor kept for the backward pass."""
        def pack(t):
            if saved is not None:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            if kind == "minigen":
                pred = unet(x, t, context, pooled, ids)
            else:
                pred = unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        F.mse_loss(pred.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(step, device, repeats: int) -> tuple[float, float, int, int]:
    """Median wall and CPU seconds per step, peak memory growth during the steps (CUDA: allocated bytes; CPU: the
    resident set, which the allocator's caching blurs), and the bytes of activations saved for backward."""
    saved: dict[int, int] = {}
    step(saved)  # warm-up (allocations, optimizer state), counting the saved activations
    baseline = current_bytes(device)
    reset_peak(device)
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), peak_bytes(device, baseline), sum(saved.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="full-size SDXL UNet at 1024x1024 (128x128 latents), bf16")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=0, help="latent side (default: 128 with --full, else 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = get_config("sdxl-base", "unet") if args.full else medium_config()
    dtype = torch.bfloat16 if args.full else torch.float32
    side = args.latent or (128 if args.full else 32)
    state = full_models.random_state("minigen UNet", lambda: UNet2DConditionModel(config), config, device, dtype)
    B, D = args.batch, config["cross_attention_dim"]
    P = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = (torch.randn(B, 4, side, side, device=device, dtype=dtype), torch.full((B,), 500, device=device),
              torch.randn(B, 77, D, device=device, dtype=dtype), torch.randn(B, P, device=device, dtype=dtype),
              torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]] * B, device=device, dtype=dtype),
              torch.randn(B, 4, side, side, device=device))
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), cpu)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"UNet {'SDXL base' if args.full else 'medium'}, latents {B}x4x{side}x{side}, {dtype}, rank {args.rank}, "
          f"targets {TARGETS}")
    for checkpointing in ((False, True) if args.full else (False,)):
        results = {}
        for kind in ("minigen", "diffusers"):
            unet, params = build(kind, config, state, args.rank, dtype, device, checkpointing)
            results[kind] = measure(step_fn(kind, unet, params, inputs, dtype, device), device, args.repeats)
            del unet, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
            wall, cpu_s, peak, acts = results[kind]
            print(f"  {kind:9s} ckpt={checkpointing!s:5s}  {wall:7.3f} s/step wall  {cpu_s:7.3f} s/step CPU  "
                  f"peak +{peak / 2**30:6.3f} GiB  saved activations {acts / 2**30:6.3f} GiB")
        (mw, mc, mp, ma), (dw, dc, dp, da) = results["minigen"], results["diffusers"]
        print(f"  ratio minigen/diffusers: wall {mw / dw:.2f}  CPU {mc / dc:.2f}  peak memory {mp / max(dp, 1):.2f}  "
              f"saved activations {ma / max(da, 1):.2f}")


if __name__ == "__main__":
    main()
