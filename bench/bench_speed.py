"""Each speed switch of minigen/speed.py against its default, on the workload it is for: seconds per call with the
switch off and on, the speed-up, peak memory, and how far the outputs moved (relative to their scale). The table is
what the defaults should be chosen from.

    python bench/bench_speed.py --device cuda --full --compile   # SDXL at 1024x1024 (bf16), VAE, DCGAN 64x64
    python bench/bench_speed.py                                  # CPU, tiny models (the smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import full_models
from bench_gan import sync
from bench_lora import build as build_lora_unet, current_bytes, peak_bytes, reset_peak
from bench_unet import build as build_unet, make_inputs
from minigen import speed
from minigen.gan.config import GANConfig
from minigen.gan.trainer import GANTrainer
from minigen.sd.configs import get_config
from minigen.sd.unet import UNet2DConditionModel
from minigen.sd.vae import AutoencoderKL

# A workload: given a switch's state (on or off), build what it runs and return one call of it, whose result is
# compared between off and on.
Workload = Callable[[bool], Callable[[], torch.Tensor]]


@dataclass
class Sizes:
    unet: dict
    vae: dict
    latent: int      # latent side for the UNet and the VAE decode
    big_latent: int  # latent side for VAE tiling: past the VAE's tile
    gan_width: int
    gan_batch: int
    dtype: torch.dtype


def measure(workload: Workload, on: bool, device: torch.device, repeats: int) -> tuple[float, int, torch.Tensor]:
    """(median seconds per call after a warm-up call, peak memory growth in bytes, the warm-up call's output)."""
    call = workload(on)
    baseline = current_bytes(device)
    reset_peak(device)
    out = call().detach().float().cpu()  # warm-up: compiles, allocates; the first output, before any update
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_bytes(device, baseline), out


def tf32_of(s: speed.Speed) -> contextlib.AbstractContextManager:
    """The row's TF32 state, or the run's (the device's default) when the row does not set it."""
    return contextlib.nullcontext() if s.tf32 is None else speed.tf32(s.tf32)


def unet_forward(sizes: Sizes, device, switches: Callable[[bool], speed.Speed]) -> Workload:
    """A sampling step's UNet forward with guidance's batch of 2."""
    def make(on: bool):
        s = switches(on)
        state = full_models.random_state("minigen UNet", lambda: UNet2DConditionModel(sizes.unet), sizes.unet, device,
                                         sizes.dtype)  # initialised once, for every row
        unet = speed.prepare_model(build_unet("minigen", sizes.unet, device, sizes.dtype, weights=state).eval(), s)
        inputs = make_inputs(sizes.unet, 2, sizes.latent, device, sizes.dtype)

        @torch.no_grad()
        def call():
            with speed.sdpa_context(s.sdpa):
                return unet(**inputs)
        return call
    return make


def lora_step(sizes: Sizes, device, dtype, switches: Callable[[bool], speed.Speed]) -> Workload:
    """One LoRA training step (rank 4, attention targets, AdamW), returning the loss."""
    def make(on: bool):
        s = switches(on)
        state = full_models.random_state("minigen UNet", lambda: UNet2DConditionModel(sizes.unet), sizes.unet, device,
                                         dtype)
        unet, params = build_lora_unet("minigen", sizes.unet, state, 4, dtype, device, checkpointing=False)
        speed.prepare_model(unet, s)
        optimizer = torch.optim.AdamW(params, lr=1e-4, **speed.optimizer_kernel(params, s))
        inputs = make_inputs(sizes.unet, 1, sizes.latent, device, dtype)
        target = torch.randn(1, 4, sizes.latent, sizes.latent, generator=torch.Generator().manual_seed(2)).to(device)

        def call():
            with tf32_of(s), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                loss = F.mse_loss(unet(**inputs).float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        return call
    return make


def vae_decode(sizes: Sizes, device, batch: int, side: int, switches: Callable[[bool], speed.Speed]) -> Workload:
    """The fp32 VAE decode of `batch` latents of side `side`."""
    def make(on: bool):
        s = switches(on)
        vae = speed.prepare_model(full_models.build("VAE", lambda: AutoencoderKL(sizes.vae), device).eval(), s)
        vae.slicing, vae.tiling = s.vae_slicing, s.vae_tiling
        latents = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(3)).to(device)
        return torch.no_grad()(lambda: vae.decode(latents))
    return make


def gan_step(sizes: Sizes, device, switches: Callable[[bool], speed.Speed]) -> Workload:
    """One DCGAN iteration at 64x64 (fp32), returning D's loss."""
    def make(on: bool):
        s = switches(on)
        cfg = GANConfig(ngf=sizes.gan_width, ndf=sizes.gan_width, batch=sizes.gan_batch, device=str(device),
                        channels_last=s.channels_last)
        trainer = GANTrainer(cfg, speed=s)
        real = (torch.rand(cfg.batch, 3, *cfg.size, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(device)

        def call():
            with tf32_of(s):
                return torch.tensor(trainer.step(real)["loss_d"])
        return call
    return make


def cases(sizes: Sizes, device: torch.device, compile_too: bool) -> list[tuple[str, str, str, Workload]]:
    """(switch, workload, its default, the workload with the switch off/on)."""
    cuda = device.type == "cuda"
    rows = [
        ("--tf32", "LoRA step, fp32 weights", "on (CUDA)",
         lora_step(sizes, device, torch.float32, lambda on: speed.Speed(tf32=on))),
        ("--tf32", "DCGAN step, fp32", "on (CUDA)", gan_step(sizes, device, lambda on: speed.Speed(tf32=on))),
        ("--channels-last", "UNet forward", "off", unet_forward(sizes, device, lambda on: speed.Speed(channels_last=on))),
        ("--channels-last", "LoRA step", "off",
         lora_step(sizes, device, sizes.dtype, lambda on: speed.Speed(channels_last=on))),
        ("--channels-last", "VAE decode", "off",
         vae_decode(sizes, device, 1, sizes.latent, lambda on: speed.Speed(channels_last=on))),
        ("--channels-last", "DCGAN step", "off (GANConfig)",
         gan_step(sizes, device, lambda on: speed.Speed(channels_last=on))),
        ("--fused-optimizer", "LoRA step", "on (CUDA)",
         lora_step(sizes, device, sizes.dtype, lambda on: speed.Speed(fused_optimizer=on))),
        ("--vae-slicing", "VAE decode, batch 4", "off",
         vae_decode(sizes, device, 4, sizes.latent, lambda on: speed.Speed(vae_slicing=on))),
        ("--vae-tiling", f"VAE decode, {sizes.big_latent}x{sizes.big_latent} latents", "off",
         vae_decode(sizes, device, 1, sizes.big_latent, lambda on: speed.Speed(vae_tiling=on))),
    ]
    for backend in ("flash", "efficient", "math", "cudnn") if cuda else ("flash", "math"):
        rows.append((f"--sdpa {backend}", "UNet forward", "auto",
                     unet_forward(sizes, device, lambda on, b=backend: speed.Speed(sdpa=b if on else "auto"))))
    if compile_too:
        rows += [("--compile", "UNet forward", "off", unet_forward(sizes, device, lambda on: speed.Speed(compile=on))),
                 ("--compile", "LoRA step", "off",
                  lora_step(sizes, device, sizes.dtype, lambda on: speed.Speed(compile=on))),
                 ("--compile", "DCGAN step", "off", gan_step(sizes, device, lambda on: speed.Speed(compile=on)))]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="full-size SDXL UNet and VAE, 128x128 latents, bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling per row)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.full:
        sizes = Sizes(get_config("sdxl-base", "unet"), get_config("sdxl-base", "vae"), 128, 256, 64, 128,
                      torch.bfloat16)
    else:
        sizes = Sizes(get_config("tiny", "unet"), get_config("tiny", "vae"), 8, 24, 8, 4, torch.float32)
    print(f"device {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}; UNet {'SDXL base' if args.full else 'tiny'}, latents {sizes.latent}x{sizes.latent}, "
          f"{sizes.dtype}")
    print("| switch | workload | default | off s | on s | speed-up | off peak GiB | on peak GiB | output change |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for switch, what, default, workload in cases(sizes, device, args.compile):
        with speed.tf32(device.type == "cuda"):  # the default, for the rows of the other switches
            (off_s, off_peak, off_out), (on_s, on_peak, on_out) = (measure(workload, on, device, args.repeats)
                                                                   for on in (False, True))
        change = (on_out - off_out).abs().max().item() / max(off_out.abs().max().item(), 1e-12)
        print(f"| {switch} | {what} | {default} | {off_s:.4f} | {on_s:.4f} | {off_s / on_s:.2f}x | "
              f"{off_peak / 2**30:.3f} | {on_peak / 2**30:.3f} | {change:.1e} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
