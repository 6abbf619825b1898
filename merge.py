"""Merge Stable Diffusion checkpoints in little memory (streams tensor by tensor).

    python merge.py A.safetensors B.safetensors -o merged.safetensors --alpha 0.3
    python merge.py A.safetensors B.safetensors --c C.safetensors --method add_difference -o out.safetensors
    python merge.py A.safetensors B.safetensors -o out.safetensors --block-alphas 0.2,0.5,0.8 --dtype fp16
    python merge.py A.safetensors --lora style.safetensors:0.8 --lora detail.safetensors:0.5 -o baked.safetensors
"""

from __future__ import annotations

import argparse
import sys

from minigen.io import CheckpointError
from minigen.merging import METHODS, OUTPUT_DTYPES, MergeRecipe, bake_loras, merge_checkpoints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="checkpoint A (.safetensors, single-file layout); its keys and order are the output's")
    p.add_argument("b", nargs="?", help="checkpoint B (leave out with --lora)")
    p.add_argument("--c", help="checkpoint C, for add_difference: A + alpha * (B - C)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (must not be an input)")
    p.add_argument("--method", choices=sorted(METHODS), default="weighted_sum",
                   help="weighted_sum: (1 - alpha) * A + alpha * B; add_difference: A + alpha * (B - C)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of B (default 0.5)")
    p.add_argument("--block-alphas", metavar="IN,MID,OUT",
                   help="alphas for the UNet's input, middle and output blocks (other keys use --alpha)")
    p.add_argument("--vae", default="copy", help="'copy' (from A, the default), 'merge', or a VAE .safetensors to put in")
    p.add_argument("--skip-text-encoders", action="store_true", help="copy the text encoders from A unmerged")
    p.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="output dtype of float tensors (default: as in A)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:RATIO]",
                   help="bake this LoRA (kohya or peft file) into A at RATIO (default 1); repeatable")
    p.add_argument("--strict", action="store_true", help="a shape mismatch is an error instead of keeping A's tensor")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    block_alphas = None
    if args.block_alphas:
        block_alphas = tuple(float(x) for x in args.block_alphas.split(","))
        if len(block_alphas) != 3:
            sys.exit(f"--block-alphas needs three numbers (input, middle, output), got {args.block_alphas!r}")
    recipe = MergeRecipe(method=args.method, alpha=args.alpha, block_alphas=block_alphas, vae=args.vae,
                         merge_text_encoders=not args.skip_text_encoders, dtype=args.dtype)
    if (args.b is None) == (not args.lora):
        sys.exit("merge.py: give either checkpoint B (to merge) or --lora files (to bake into A), not both or neither")
    loras = []
    for spec in args.lora:
        path, _, ratio = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        loras.append((path, float(ratio)))
    try:
        if loras:
            report = bake_loras(args.a, loras, args.output, dtype=args.dtype)
        else:
            report = merge_checkpoints(args.a, args.b, args.output, recipe, c=args.c, strict=args.strict)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"merge.py: {e}")
    print(f"{args.output}: {report.merged} tensors merged, {report.copied} copied, "
          f"{report.output_bytes / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
