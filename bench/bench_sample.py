"""Sampler overhead beyond the model: minigen's loop vs a diffusers scheduler loop around the same trivial model.

Both loops run the same trajectory (SDXL's scheduler config, a 1024x1024 image's 128x128 latent by default) with a
model that costs almost nothing, so the time is the sampler's own arithmetic and bookkeeping. Prints ms per step and
the ratio minigen / diffusers (below 1: minigen is faster).

    python bench/bench_sample.py [--device cpu] [--steps 30] [--size 128] [--batch 1] [--repeat 10] [--threads 1]
"""

import argparse
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:  # the CUDA-build torchvision of the oracle set needs these ops defined on CPU torch (see tests/conftest.py)
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
except RuntimeError:
    pass

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

from minigen.diffusion import NoiseSchedule, sample  # noqa: E402

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
            set_alpha_to_one=False)
CASES = [("ddpm", DDPMScheduler, False), ("ddim", DDIMScheduler, False), ("euler", EulerDiscreteScheduler, False),
         ("euler_a", EulerAncestralDiscreteScheduler, False), ("dpmpp_2m", DPMSolverMultistepScheduler, False),
         ("dpmpp_2m", DPMSolverMultistepScheduler, True)]


def trivial_model(x, t):
    return x * 0.5


def diffusers_run(scheduler, shape, steps, device):
    generator = torch.Generator("cpu").manual_seed(0)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = trivial_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def minigen_run(schedule, sampler, karras, shape, steps, device):
    return sample(trivial_model, shape, schedule, sampler, steps, karras=karras, device=device,
                  generator=torch.Generator("cpu").manual_seed(0))


def best_times(fns, repeat, device):
    """Best wall time of each function; the runs are interleaved so that load from other processes hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="latent height and width (128: a 1024x1024 image)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the per-step work is small, and on a shared machine a second "
                             "thread mostly measures the neighbours)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, 4, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", device {args.device}, latents {shape}, {args.steps} steps, best of {args.repeat}")
    print(f"{'sampler':16s} {'minigen ms/step':>16s} {'diffusers ms/step':>18s} {'ratio':>7s}")
    for sampler, scheduler_cls, karras in CASES:
        config = dict(SDXL, use_karras_sigmas=karras)
        scheduler, schedule = scheduler_cls.from_config(config), NoiseSchedule.from_config(config)
        ours, theirs = best_times([lambda: minigen_run(schedule, sampler, karras, shape, args.steps, args.device),
                                   lambda: diffusers_run(scheduler, shape, args.steps, args.device)],
                                  args.repeat, args.device)
        name = sampler + (" karras" if karras else "")
        print(f"{name:16s} {1000 * ours / args.steps:16.3f} {1000 * theirs / args.steps:18.3f} {ours / theirs:7.2f}")


if __name__ == "__main__":
    main()
