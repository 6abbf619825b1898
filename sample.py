"""Text to image with an SDXL checkpoint: the same images diffusers' StableDiffusionXLPipeline gives for a seed.

    python sample.py --model sd_xl_base_1.0.safetensors --prompt "a photo of an astronaut riding a horse on mars" \
        --steps 30 --cfg 5 --sampler dpmpp_2m --karras --seed 0 --num 4 --lora style.safetensors:0.8 --out outputs/

--model: a diffusers folder or a single-file checkpoint. One `--seed` draws the noise of the whole batch (as
diffusers' `generator=torch.Generator("cpu").manual_seed(seed)` with `num_images_per_prompt`); with no seed a random
one is chosen and printed. Images are written as <out>/<seed>-000.png, <seed>-001.png, ...
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from minigen import cli
from minigen.io import check_can_create
from minigen.diffusion import SAMPLERS
from minigen.lora_files import parse_lora_spec
from minigen.sdxl.pipeline import SDXLPipeline, check_settings, save_images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="SDXL diffusers folder or single .safetensors file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None, help="negative prompt (default: none, i.e. zero embeddings as SDXL)")
    p.add_argument("--steps", type=cli.number(int, 1), default=30)
    p.add_argument("--cfg", type=cli.number(float, 0), default=5.0,
                   help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--rescale", type=cli.number(float, 0, 1), default=0.0,
                   help="guidance rescale in [0, 1] (Lin et al. 2023)")
    p.add_argument("--sampler", default="euler", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, dpmpp_2m)")
    p.add_argument("--eta", type=cli.number(float, 0, 1), default=0.0, help="DDIM's eta in [0, 1]")
    p.add_argument("--seed", type=cli.seed_number, default=None)
    p.add_argument("--height", type=cli.number(int, 8), default=1024, help="a multiple of 8")
    p.add_argument("--width", type=cli.number(int, 8), default=1024, help="a multiple of 8")
    p.add_argument("--num", type=cli.number(int, 1), default=1, help="images in the batch")
    p.add_argument("--out", default="outputs")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA file and its multiplier (default 1); repeat to stack several")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled model or LoRA files (.ckpt, .bin, .pt) you trust; loaded with weights_only=True")
    cli.add_device_args(p)
    return p.parse_args(argv)


@cli.entry("sample.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    cli.apply_threads(args.threads)
    cli.check_device(args.device)
    check_settings(args.sampler, args.steps, args.height, args.width, args.num)  # before loading gigabytes
    check_can_create(args.out, folder=True, what="--out")
    loras = [parse_lora_spec(spec) for spec in args.lora]
    pipe = SDXLPipeline.from_pretrained(args.model, dtype=cli.chosen_dtype(args), device=args.device,
                                        allow_pickle=args.allow_pickle)
    for path, multiplier in loras:
        pipe.add_lora(path, multiplier, allow_pickle=args.allow_pickle)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    images = pipe(args.prompt, args.negative, steps=args.steps, guidance_scale=args.cfg,
                  guidance_rescale=args.rescale, sampler=args.sampler, karras=args.karras, eta=args.eta,
                  height=args.height, width=args.width, num_images=args.num,
                  generator=torch.Generator("cpu").manual_seed(seed), progress=True)
    for path in save_images(images, args.out, str(seed)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
