"""Sampler overhead beyond the model: minigen's loop vs a diffusers scheduler loop around the same trivial model.

Both loops run the same trajectory (SDXL's scheduler config, a 1024x1024 image's 128x128 latent by default) with a
model that costs almost nothing, so the time is the sampler's own arithmetic and bookkeeping. Prints ms per step and
the ratio minigen / diffusers (below 1: minigen is faster).

    python bench/bench_sample.py [--device cpu] [--steps 30] [--size 128] [--batch 1] [--repeat 10] [--threads 1]

Part 2, `--pipeline`: seconds per image of the whole text-to-image pipeline, minigen's Pipeline vs diffusers'
StableDiffusionXLPipeline on the same weights and settings, split into the UNet's time and the time beyond it (text
encoders, sampler, guidance, VAE decode, image conversion). By default the tiny random SDXL on CPU; with
`--device cuda --full`, full-size SDXL (random weights) at 1024x1024, 30 Euler steps, bf16, guidance 5.

    python bench/bench_sample.py --pipeline [--repeat 5]
    python bench/bench_sample.py --pipeline --device cuda --full [--repeat 3]
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

import full_models  # noqa: E402
from minigen.diffusion.samplers import sample  # noqa: E402
from minigen.diffusion.schedule import NoiseSchedule  # noqa: E402

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


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128, help="latent height and width (128: a 1024x1024 image)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the per-step work is small, and on a shared machine a second "
                             "thread mostly measures the neighbours)")
    parser.add_argument("--pipeline", action="store_true", help="part 2: the whole SDXL pipeline, per image")
    parser.add_argument("--full", action="store_true", help="with --pipeline: full-size SDXL, 1024x1024, bf16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pipeline:
        return pipeline_bench(args)
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


# ------------------------------------------------------------------------------------------ part 2: the pipeline
class UNetTimer:
    """Wraps a UNet's forward and adds up the time spent in it (synchronising CUDA so the time is the UNet's)."""

    def __init__(self, unet, device):
        self.total, self.device, self.forward = 0.0, device, unet.forward
        unet.forward = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.forward(*args, **kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.total += time.perf_counter() - start
        return out


def tiny_pipelines():
    """The tests' tiny random SDXL as a diffusers pipeline and, loaded from its saved folder, as minigen's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from sdxl_tiny import tiny_folder, tiny_pipeline

    from minigen.sd.pipeline import Pipeline

    return tiny_pipeline(), Pipeline.from_pretrained(tiny_folder())


def full_pipelines(device):
    """Full-size SDXL with random weights in bf16 on `device`, the same tensors in both."""
    import diffusers
    import transformers

    from minigen.sd.configs import get_config
    from minigen.sd.model import StableDiffusion, build_model
    from minigen.sd.pipeline import Pipeline
    from minigen.sd.tokenizer import model_tokenizers

    configs, plain = get_config("sdxl-base"), lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    # The VAE in bf16 too: diffusers hands a bf16 UNet's latents to the VAE as they are (an fp32 VAE fails there).
    dtypes = {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16,
              "text_encoder_2": torch.bfloat16}
    makers = {"unet": lambda: diffusers.UNet2DConditionModel(**plain(configs["unet"])),
              "vae": lambda: diffusers.AutoencoderKL(**plain(configs["vae"])),
              "text_encoder": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
              "text_encoder_2": lambda: transformers.CLIPTextModelWithProjection(
                  transformers.CLIPTextConfig(**configs["text_encoder_2"]))}
    theirs, ours = {}, {}
    for part, make in makers.items():  # random init on the device (bench/full_models.py), then the same tensors
        theirs[part] = full_models.build(f"diffusers {part}", make, device).to(device, dtypes[part]).eval()
        ours[part] = full_models.same_weights(f"minigen {part}", lambda: build_model(part, configs[part]),
                                              theirs[part].state_dict()).to(device, dtypes[part]).eval()
    tokenizers = tuple(model_tokenizers("sdxl").values())
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "minigen-bench-tokenizers"
    tokenizers[0].save(folder / "tokenizer")
    tokenizers[1].save(folder / "tokenizer_2")
    reference = diffusers.StableDiffusionXLPipeline(
        **theirs, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]))
    sdxl = StableDiffusion("sdxl", **ours, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], configs=configs)
    return reference, Pipeline(sdxl)


def pipeline_bench(args):
    if args.full:
        reference, ours = full_pipelines(args.device)
        size, steps = 1024, 30
    else:
        if args.device != "cpu":
            raise SystemExit("the tiny pipeline runs on the CPU; use --full for a GPU")
        reference, ours = tiny_pipelines()
        size, steps = 64, args.steps
    reference.set_progress_bar_config(disable=True)
    prompt, cfg = "a photo of an astronaut riding a horse on mars", 5.0
    timers = [UNetTimer(ours.model.unet, args.device), UNetTimer(reference.unet, args.device)]
    runs = [lambda: ours(prompt, steps=steps, guidance_scale=cfg, height=size, width=size,
                         generator=torch.Generator("cpu").manual_seed(0)),
            lambda: reference(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                              generator=torch.Generator("cpu").manual_seed(0)).images]
    with torch.no_grad():
        for run in runs:  # warm-up: first-call allocations, kernel selection
            run()
        best = [[float("inf"), 0.0] for _ in runs]  # per pipeline: best total, its UNet time
        for _ in range(args.repeat):
            for k, run in enumerate(runs):
                timers[k].total = 0.0
                start = time.perf_counter()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                total = time.perf_counter() - start
                if total < best[k][0]:
                    best[k] = [total, timers[k].total]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", device {args.device}, {'full-size SDXL bf16' if args.full else 'tiny SDXL fp32'}, {size}x{size}, "
          f"{steps} euler steps, guidance {cfg}, best of {args.repeat}")
    print(f"{'':10s} {'s/image':>9s} {'UNet s':>9s} {'beyond UNet s':>14s}")
    for name, (total, unet) in zip(("minigen", "diffusers"), best):
        print(f"{name:10s} {total:9.4f} {unet:9.4f} {total - unet:14.4f}")
    (ours_total, ours_unet), (ref_total, ref_unet) = best
    print(f"ratio minigen/diffusers: per image {ours_total / ref_total:.2f}, "
          f"beyond the UNet {(ours_total - ours_unet) / (ref_total - ref_unet):.2f}")


if __name__ == "__main__":
    main()
