"""The sampler table of a model trained from scratch (`make sd-demo`): FID against Twemoji and seconds to draw N
images for each sampler the samplers' papers compare: DDPM 1000 and 250 steps (Ho et al. 2020), DDIM 50 (Song et
al. 2021), Euler 30 and Euler ancestral 30 (Karras et al. 2022), DPM++ 2M 20 with and without Karras sigmas (Lu et
al. 2022).

    python fid.py --save-stats ~/.cache/minigen/twemoji runs/twemoji_stats.npz     # once: the reference
    python bench/bench_sd_samplers.py runs/sd-demo/model.safetensors --ref runs/twemoji_stats.npz --colour-captions
    python bench/bench_sd_samplers.py MODEL --ref STATS --only euler:30 dpmpp_2m:20 --num 200

The prompts are N captions of the training set drawn with --seed (the same for every sampler; with
--colour-captions as a model trained with them saw them), image k starts from noise seed k: the samplers differ
and nothing else. FID: fid.py (2048-d pool3 features, pytorch-fid's preprocessing) of the PNGs in out/<sampler>/
against --ref. Prints a table and writes samplers.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from minigen.captions import captioned_images
from minigen.colours import colour_caption
from minigen.datasets import CAPTIONS_FROM_NAMES, resolve_dataset
from minigen.evaluate.inputs import Settings
from minigen.evaluate.run import encode_prompts, generate_batch
from minigen.images import open_rgb
from minigen.plot import save_png
from minigen.sd.pipeline import Pipeline

SAMPLERS = {"ddpm:1000": ("ddpm", 1000, False), "ddpm:250": ("ddpm", 250, False), "ddim:50": ("ddim", 50, False),
            "euler:30": ("euler", 30, False), "euler_a:30": ("euler_a", 30, False),
            "dpmpp_2m:20": ("dpmpp_2m", 20, False), "dpmpp_2m_karras:20": ("dpmpp_2m", 20, True)}


def fid(ref: str, folder: Path) -> float:
    """fid.py's FID of `folder` against `ref` (its last output line is JSON)."""
    done = subprocess.run([sys.executable, "fid.py", ref, str(folder), "--threads", "1"], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["fid"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--ref", required=True, help="reference statistics (.npz) or image folder")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--data", default="twemoji", help="the captions' dataset")
    p.add_argument("--colour-captions", action="store_true",
                   help="the captions as train_sd.py --colour-captions gave them (\"yellow grinning face\")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", choices=list(SAMPLERS), default=list(SAMPLERS))
    p.add_argument("--out", default=None, help="default: samplers/ beside the model")
    args = p.parse_args()
    out = Path(args.out or Path(args.model).parent / "samplers")
    torch.set_num_threads(1)
    items = captioned_images(resolve_dataset(args.data), caption_of_name=CAPTIONS_FROM_NAMES.get(args.data))
    chosen = random.Random(args.seed).choices(items, k=args.num)
    prompts = [colour_caption(i.caption, open_rgb(i.path)) if args.colour_captions else i.caption for i in chosen]
    pipe = Pipeline.from_pretrained(args.model)
    embeddings = encode_prompts(pipe, prompts, Settings(guidance_scale=args.cfg))
    table = {}
    for name in args.only:
        sampler, steps, karras = SAMPLERS[name]
        settings = Settings(steps=steps, guidance_scale=args.cfg, sampler=sampler, karras=karras)
        folder = out / name
        start = time.perf_counter()
        for k in tqdm(range(0, args.num, args.batch), desc=name, unit="batch"):
            seeds = list(range(k, min(k + args.batch, args.num)))
            images = generate_batch(pipe, embeddings[k:k + len(seeds)], seeds, settings)  # (B, H, W, 3) uint8
            for seed, image in zip(seeds, images):
                save_png(image_of(image), folder / f"{seed:05d}.png")
        seconds = time.perf_counter() - start
        table[name] = {"fid": fid(args.ref, folder), "seconds": round(seconds, 1), "steps": steps}
        print(f"{name:20} FID {table[name]['fid']:7.1f}   {seconds:7.1f} s for {args.num} images", flush=True)
    (out / "samplers.json").write_text(json.dumps({"model": args.model, "num": args.num, "cfg": args.cfg,
                                                   "samplers": table}, indent=1) + "\n")
    return 0


def image_of(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.cpu().numpy())


if __name__ == "__main__":
    sys.exit(main())
