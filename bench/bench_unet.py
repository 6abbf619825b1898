"""SDXL UNet speed and memory: minigen vs diffusers, same config, same weights, same inputs, one process.

    python bench/bench_unet.py                         # CPU, medium config, 32x32 latent, fp32 and bf16
    python bench/bench_unet.py --device cuda --full    # the real SDXL UNet at 1024x1024 (128x128 latent)

For each dtype it times a forward pass (no grad) and a forward+backward pass (the training step's model part), both
implementations in this process, and measures the peak memory each pass adds above the weights:
`torch.cuda.max_memory_allocated` on a GPU; on the CPU the peak resident set (VmHWM) of a fresh child process that
runs one pass, because a warm allocator in a shared process reuses freed pages and hides the peak. It prints the
minigen/diffusers ratios (below 1 is better for minigen) and the outputs' max difference as a sanity check.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import diffusers  # noqa: E402
import full_models  # noqa: E402

from minigen.sd.configs import get_config  # noqa: E402
from minigen.sd.unet import UNet2DConditionModel  # noqa: E402

# A medium UNet that keeps SDXL's shape (head dim 64, attention at the two lower levels, depth 2, 2048-wide text,
# 2816-wide added conditioning) and runs on a shared 2-core CPU in minutes.
MEDIUM = {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 1, 2], "transformer_layers_per_block": [1, 2, 2],
          "norm_num_groups": 32}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated above the level at entry, on CUDA or (Linux) for the CPU process."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = rss_kib("VmHWM") * 1024 - self.base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(impl: str, config: dict, device, dtype, weights: dict | None = None):
    """One UNet, its random init run on `device` (bench/full_models.py); minigen's holds `weights` (diffusers' state
    dict, on `device` in `dtype`) when given, else its own random init."""
    if impl == "diffusers":
        model = full_models.build("diffusers UNet", lambda: diffusers.UNet2DConditionModel(
            **{k: v for k, v in config.items() if not k.startswith("_")}), device)
    elif weights is not None:
        model = full_models.same_weights("minigen UNet", lambda: UNet2DConditionModel(config), weights)
    else:
        model = full_models.build("minigen UNet", lambda: UNet2DConditionModel(config), device)
    return model.to(device=device, dtype=dtype)


def make_inputs(config: dict, batch: int, latent: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]  # SDXL: 1280
    inputs = {
        "sample": torch.randn(batch, 4, latent, latent, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
        "text_embeds": torch.randn(batch, text_dim, generator=g),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


def run_once(model, inputs, impl: str, backward: bool) -> torch.Tensor:
    with torch.set_grad_enabled(backward):
        if impl == "minigen":
            out = model(**inputs)
        else:
            out = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}).sample
        if backward:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
    return out.detach()


def time_pass(model, inputs, impl, backward, device, repeats):
    """(median seconds, output); on CUDA also the peak memory above the weights."""
    out = run_once(model, inputs, impl, backward)  # warm-up (allocator, kernels)
    times = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            run_once(model, inputs, impl, backward)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), (memory.peak if device.type == "cuda" else None), out


def cpu_peak_in_child(impl: str, backward: bool, dtype_name: str, argv: list[str]) -> int:
    """Peak RSS one pass adds, measured in a fresh process (see the module docstring); `argv`: this run's flags."""
    cmd = [sys.executable, __file__, *argv, "--dtypes", dtype_name, "--memory-worker", impl,
           "fwd+bwd" if backward else "forward"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the real SDXL UNet (2.57B parameters)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32; 128 with --full)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "PASS"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = get_config("sdxl-base", "unet")
    if not args.full:
        config.update(MEDIUM)
    latent = args.latent or (128 if args.full else 32)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    if args.memory_worker:  # child process: one pass of one implementation, print the peak bytes it added
        impl, which = args.memory_worker
        dtype = dtypes[args.dtypes[-1]]
        model, inputs = build(impl, config, device, dtype), make_inputs(config, args.batch, latent, device, dtype)
        with PeakMemory(device) as memory:
            run_once(model, inputs, impl, which == "fwd+bwd")
        print(memory.peak)
        return

    print(f"device {device}, {'full SDXL' if args.full else 'medium'} UNet, batch {args.batch}, latent {latent}x{latent}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    print(f"{'dtype':5} {'pass':9} {'minigen s':>10} {'diffusers s':>12} {'ratio':>6} "
          f"{'minigen MiB':>12} {'diffusers MiB':>14} {'ratio':>6} {'max |diff|':>11}")
    for name in args.dtypes:
        dtype = dtypes[name]
        ref = build("diffusers", config, device, dtype)
        ours = build("minigen", config, device, dtype, weights=ref.state_dict())
        inputs = make_inputs(config, args.batch, latent, device, dtype)
        for backward in ([False] if args.no_backward else [False, True]):
            t_ours, m_ours, out_ours = time_pass(ours, inputs, "minigen", backward, device, args.repeats)
            t_ref, m_ref, out_ref = time_pass(ref, inputs, "diffusers", backward, device, args.repeats)
            if device.type != "cuda":
                m_ours, m_ref = (cpu_peak_in_child(impl, backward, name, argv) for impl in ("minigen", "diffusers"))
            diff = (out_ours.float() - out_ref.float()).abs().max().item()
            mib = 1024 * 1024
            print(f"{name:5} {'fwd+bwd' if backward else 'forward':9} {t_ours:10.3f} {t_ref:12.3f} {t_ours / t_ref:6.2f} "
                  f"{m_ours / mib:12.0f} {m_ref / mib:14.0f} {m_ours / max(m_ref, 1):6.2f} {diff:11.2e}", flush=True)
        del ref, ours
        gc.collect()


if __name__ == "__main__":
    main()
