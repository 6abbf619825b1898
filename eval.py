"""Judge LoRAs against the base model: the same prompts from the same seeds, FID/KID/IS against a reference folder,
PSNR/SSIM against the base images, a table (Markdown + JSON), grids and an FID-per-epoch plot.

    python eval.py --model sd_xl_base_1.0.safetensors --lora style.safetensors --lora runs/lora/ \
        --prompts prompts.txt --ref met --num 2 --seed 0 --steps 30 --cfg 5 --out outputs/eval

--lora: a LoRA file (FILE[:MULTIPLIER]) or a training run's folder of epoch checkpoints; repeatable.
--prompts: a text file, one prompt a line, or a dataset folder (or built-in name) whose images have .txt captions.
--ref: the reference image folder (or built-in dataset name) for FID and KID, e.g. the training images.
Under torchrun (torchrun --nproc_per_node 4 eval.py ...) the GPUs share the images; the report is the same.
"""

from __future__ import annotations

import argparse
import sys

from minigen import cli, distributed, speed
from minigen.evaluate.report import markdown_table
from minigen.evaluate.inputs import Settings
from minigen.evaluate.run import evaluate
from minigen.fid.inception import FEATURE_DIMS
from minigen.diffusion.names import karras_of, resolve_sampler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="SD 1.x, 2.x or SDXL: a diffusers folder or a single .safetensors file (or random:tiny)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickled --model checkpoint (.ckpt, .bin) you trust; loaded with weights_only=True")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE] or RUN_FOLDER",
                   help="a LoRA file and its multiplier, or a run folder of epoch checkpoints; repeatable")
    p.add_argument("--prompts", required=True, help="prompt file (one a line) or captioned dataset folder")
    p.add_argument("--max-prompts", type=cli.number(int, 1), default=None, help="use only the first N prompts")
    p.add_argument("--ref", required=True, help="reference image folder (or built-in dataset) for FID and KID")
    p.add_argument("--num", "--images-per-prompt", dest="num", type=cli.number(int, 1), default=1,
                   help="images per prompt; image i uses seed SEED+i (under torchrun say --images-per-prompt: "
                        "torchrun takes --num for its own --numa-binding)")
    p.add_argument("--seed", type=cli.seed_number, default=0)
    p.add_argument("--negative", default=None,
                   help="negative prompt (default: none: zero embeddings for SDXL, \"\" for SD 1.x/2.x)")
    p.add_argument("--steps", type=cli.number(int, 1), default=30)
    p.add_argument("--cfg", type=cli.number(float), default=5.0, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--sampler", type=cli.parsed_by(resolve_sampler, "sampler"), default="euler",
                   help="ddpm, ddim, euler, euler_a, dpmpp_2m, or A1111's or ComfyUI's name (\"DPM++ 2M Karras\")")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, dpmpp_2m)")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=cli.number(int, 8), default=None,
                       help="a multiple of 8 (default: the model's own: 1024 for SDXL, 512 for SD 1.5, 32 for tiny)")
    p.add_argument("--batch-size", type=cli.number(int, 1), default=4, help="images generated together (several prompts)")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception weights (default: minigen's cache or pytorch-fid's; see fid.py)")
    p.add_argument("--dims", type=int, default=2048, choices=FEATURE_DIMS,
                   help="Inception features for FID and KID (default 2048, the pool3 features of published FIDs)")
    p.add_argument("--is-splits", type=cli.number(int, 1), default=10, help="Inception Score splits (needs that many images)")
    p.add_argument("--grid-prompts", type=cli.number(int, 1), default=8, help="prompts (rows) shown in each grid")
    p.add_argument("--out", default="outputs/eval")
    cli.add_device_args(p)
    speed.add_speed_args(p, ("tf32", "channels_last", "sdpa", "vae_slicing"), "the UNet and VAE")
    args = p.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) % 8:
            p.error(f"--{name} must be a multiple of 8 (the VAE's scale), got {getattr(args, name)}")
    if args.seed + args.num - 1 > cli.SEED_RANGE[1]:
        p.error(f"--seed {args.seed} with --num {args.num} uses seeds up to {args.seed + args.num - 1}, past "
                f"the largest, {cli.SEED_RANGE[1]}")
    return args


@cli.entry("eval.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    speed.apply_threads(args.threads)
    args.device = cli.resolve_device(args.device, "minutes per image with a full-size model; Inception at a few images/s")
    sampler, named_karras = args.sampler
    settings = Settings(args.steps, args.cfg, sampler, karras_of(named_karras, args.karras), args.height, args.width,
                        args.negative)
    # under torchrun: this rank's device
    with distributed.process_group(args.device) as device, speed.switched(speed.speed_from_args(args), device) as fast:
        report = evaluate(args.model, args.lora, args.prompts, args.ref, args.out, num_images=args.num,
                          seed=args.seed, settings=settings, batch_size=args.batch_size, max_prompts=args.max_prompts,
                          grid_prompts=args.grid_prompts, inception_weights=args.inception_weights, dims=args.dims,
                          is_splits=args.is_splits, device=device, dtype=cli.chosen_dtype(args), speed=fast,
                          allow_pickle=args.allow_pickle)
        if not distributed.is_main():
            return 0
    print(markdown_table(report["rows"]), end="")
    print(f"wrote {args.out}/results.md, results.json, {len(report['grids'])} grid(s)"
          + (", fid_per_epoch.png" if report["fid_per_epoch"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
