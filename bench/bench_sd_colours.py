"""Prompt following of an emoji model trained from scratch (`make sd-demo`): for "red/orange/yellow/green/blue/
purple/brown/black heart" (and circle, square), N samples each, is the dominant non-background colour the prompt's?
Chance is 1 in 8.

    python bench/bench_sd_colours.py runs/sd-demo/model.safetensors            # 24 prompts x 8 samples
    python bench/bench_sd_colours.py MODEL --sampler dpmpp_2m --steps 20 --cfg 4 --out runs/sd-demo/colours

The judge (minigen/colours.py, shared with `train_sd.py --colour-captions`): every pixel that is not background
(near white) goes to the nearest of the eight colours of Twemoji's palette; the colour with most pixels is the
dominant one. The same judge run on the 24 real Twemoji (e.g. 1f534.png, the red circle) must find each one's
colour first, or the test is not measuring what it says: the script checks that and prints it. It also judges the
24 emoji passed through the model's VAE alone: a colour lost there cannot be drawn. Writes colours.png (a row per
prompt) and colours.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minigen.finetune.buckets import prepare_image
from minigen.colours import PALETTE, dominant_colour
from minigen.datasets import resolve_dataset
from minigen.images import open_rgb
from minigen.sd.prompt_grid import draw_prompts, save_prompt_grid
from minigen.sd.pipeline import Pipeline

# The real emoji of each prompt, in PALETTE's order.
SHAPES = {"heart": ("2764", "1f9e1", "1f49b", "1f49a", "1f499", "1f49c", "1f90e", "1f5a4"),
          "circle": ("1f534", "1f7e0", "1f7e1", "1f7e2", "1f535", "1f7e3", "1f7e4", "26ab"),
          "square": ("1f7e5", "1f7e7", "1f7e8", "1f7e9", "1f7e6", "1f7ea", "1f7eb", "2b1b")}


def prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, the real emoji's file stem) for every colour and shape."""
    return [(f"{colour} {shape}", colour, stem) for shape, stems in SHAPES.items()
            for colour, stem in zip(PALETTE, stems)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: colours/ beside the model")
    args = p.parse_args()
    out = Path(args.out or Path(args.model).parent / "colours")
    cases = prompts()
    twemoji = resolve_dataset("twemoji")
    reals = [open_rgb(twemoji / f"{stem}.png") for _, _, stem in cases]
    real_right = sum(dominant_colour(np.asarray(r)) == c for r, (_, c, _) in zip(reals, cases))
    print(f"the judge on the real emoji: {real_right}/{len(cases)} right")
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.model)
    start = time.perf_counter()
    images = draw_prompts(pipe, [c[0] for c in cases], args.samples, seed=args.seed, steps=args.steps,
                          guidance_scale=args.cfg, sampler=args.sampler)  # (P, N, 3, H, W) in [0, 1]
    seconds = time.perf_counter() - start
    round_trip = vae_round_trip(pipe, reals, tuple(images.shape[-2:]))
    vae_right = sum(f == c for f, (_, c, _) in zip(round_trip, cases))
    print(f"the judge on the real emoji through the model's VAE: {vae_right}/{len(cases)} right "
          f"({' '.join(f or '-' for f in round_trip)})")
    rows = {}
    for (prompt, colour, _), row in zip(cases, images):
        found = [dominant_colour((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in row]
        rows[prompt] = {"right": sum(f == colour for f in found), "found": found}
    right = sum(r["right"] for r in rows.values())
    total = len(cases) * args.samples
    by_shape = {s: sum(rows[f"{c} {s}"]["right"] for c in PALETTE) / (len(PALETTE) * args.samples) for s in SHAPES}
    out.mkdir(parents=True, exist_ok=True)
    save_prompt_grid(images, [c[0] for c in cases], out / "colours.png")
    result = {"model": args.model, "accuracy": right / total, "by_shape": by_shape, "judge_on_real": real_right,
              "judge_on_vae_round_trip": vae_right,
              "samples": args.samples, "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
              "seconds": round(seconds, 1), "prompts": rows}
    (out / "colours.json").write_text(json.dumps(result, indent=1) + "\n")
    for prompt, r in rows.items():
        print(f"{prompt:15} {r['right']}/{args.samples}  {' '.join(f or '-' for f in r['found'])}")
    print(f"colour accuracy {right}/{total} = {right / total:.1%} (chance 12.5%); by shape "
          + ", ".join(f"{s} {v:.0%}" for s, v in by_shape.items()) + f"; {seconds:.0f} s; {out / 'colours.png'}")
    return 0


@torch.no_grad()
def vae_round_trip(pipe: Pipeline, reals: list, size: tuple[int, int]) -> list[str | None]:
    """The judge on the real emoji encoded and decoded by the model's VAE at the samples' size: the colours the VAE
    alone lets through, so a colour it loses here no prompt can reach."""
    vae = pipe.model.vae.eval()
    x = torch.stack([prepare_image(r, size).pixels for r in reals])  # (24, 3, H, W) in [-1, 1]
    x = x.to(next(vae.parameters()).device)
    y = vae.decode(vae.encode(x).mean).clamp(-1, 1)  # (24, 3, H, W)
    pixels = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (24, H, W, 3)
    return [dominant_colour(p) for p in pixels]


if __name__ == "__main__":
    sys.exit(main())
