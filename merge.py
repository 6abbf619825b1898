"""Merge Stable Diffusion checkpoints in little memory (streams tensor by tensor).

    python merge.py A.safetensors B.safetensors -o merged.safetensors --alpha 0.3
    python merge.py A.safetensors B.safetensors --c C.safetensors --method add_difference -o out.safetensors
    python merge.py A.safetensors B.safetensors -o out.safetensors --block-alphas 0.2,0.5,0.8 --dtype fp16
    python merge.py A.safetensors B.safetensors -o out.safetensors --block-alphas 0,1,1,1,1,1,1,1,1,.5,0,0,0,0,0,0,0,0,0
    python merge.py A.safetensors --lora style.safetensors:0.8 --lora detail.safetensors:0.5 -o baked.safetensors
    python merge.py A.safetensors B_diffusers/ -o merged_diffusers/       # a diffusers folder out
    python merge.py model.ckpt --allow-pickle -o model.safetensors        # a pickle converted (A alone)
    python merge.py base.safetensors tuned.safetensors --rank 32 -o extracted_lora.safetensors
    python merge.py --lora style.safetensors:0.7 --lora detail.safetensors:0.3 --rank 32 -o merged_lora.safetensors
    python merge.py --config configs/merge_004.conf waifu.safetensors orangemix.safetensors -o merged.safetensors

A preset (configs/merge_*.conf) is a file of the same flags, `#` comments allowed; flags given on the command line
win over it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minigen import cli, speed
from minigen.merge.extract import extract_lora, merge_loras
from minigen.sd.lora_files import parse_lora_spec
from minigen.sd.checkpoint_files import OUTPUT_FORMATS, check_output
from minigen.io import FLOAT_DTYPES
from minigen.merge.bake import bake_loras
from minigen.merge.checkpoints import METHODS, MergeRecipe, merge_checkpoints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="merge.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a preset: a file of flags (configs/merge_*.conf)")
    p.add_argument("a", nargs="?", help="checkpoint A (single-file .safetensors or a diffusers folder; SD 1.x, 2.x or "
                                        "SDXL); its keys and order are the output's. With --rank: the base model")
    p.add_argument("b", nargs="?", help="checkpoint B (file or diffusers folder). With --rank: the fine-tuned model to "
                                        "extract a LoRA from")
    p.add_argument("--c", help="checkpoint C, for add_difference: A + alpha * (B - C)")
    p.add_argument("-o", "--output", required=True,
                   help="output: a .safetensors file, or a diffusers folder for any other name (must not be an "
                        "input; an existing one is refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing -o (without it an existing output is refused; it is replaced only once "
                        "the new one is complete)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="override the format guessed from -o (single_file for a .safetensors name, else diffusers)")
    p.add_argument("--method", choices=sorted(METHODS), default="weighted_sum",
                   help="weighted_sum: (1 - alpha) * A + alpha * B; add_difference: A + alpha * (B - C)")
    p.add_argument("--alpha", type=cli.number(float), default=0.5, help="weight of B (default 0.5)")
    p.add_argument("--block-alphas", metavar="W,W,...",
                   help="alphas by UNet block: 3 (input, middle, output blocks), or one per block as A1111's Merge "
                        "Block Weighted and supermerger write them (SD 1.x/2.x: 25, IN00..IN11,M00,OUT00..OUT11; "
                        "SDXL: 19, IN00..IN08,M00,OUT00..OUT08), optionally with BASE (the text encoders and the VAE) first: "
                        "26 / 20. Keys not weighted use --alpha")
    p.add_argument("--vae", default=None,
                   help="'copy' (A's), 'merge', or a VAE .safetensors to put in (default: copy; with a BASE-first "
                        "--block-alphas, merged at BASE's weight, as Merge Block Weighted and supermerger do)")
    p.add_argument("--skip-text-encoders", action="store_true", help="copy the text encoders from A unmerged")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), help="output dtype of float tensors (default: as in A)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:RATIO]",
                   help="bake this LoRA (kohya, LyCORIS or peft file: LoRA, LoCon, LoHa, LoKr, DoRA, full, "
                        "GLoRA) into A at RATIO (default 1); repeatable")
    p.add_argument("--rank", type=cli.number(int, 1), help="write a LoRA of this rank: extracted from B - A, or merged from --lora files")
    p.add_argument("--clamp-quantile", type=cli.number(float, 0, 1), default=0.99,
                   help="with --rank: clamp the factors at this quantile of their magnitudes (kohya's default 0.99)")
    p.add_argument("--strict", action="store_true", help="a shape mismatch is an error instead of keeping A's tensor")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled checkpoints (.ckpt, .pt, .pth, .bin): they can run code when loaded, so only "
                        "from a source you trust (loaded with weights_only=True, whole into memory)")
    cli.add_threads_arg(p)
    return p.parse_args(cli.preset_then(sys.argv[1:] if argv is None else argv))


def parse_block_alphas(text: str | None) -> tuple[float, ...] | None:
    """The numbers of --block-alphas; whether their count fits the model is `merging.block_weights`' to say."""
    if text is None:
        return None
    try:
        alphas = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--block-alphas takes numbers separated by commas, got {text!r}") from None
    for alpha in alphas:
        cli.check_number("--block-alphas", alpha)
    return alphas


def job_of(args: argparse.Namespace, loras: list) -> str:
    """Which job the inputs ask for: merge, bake (A with --lora; A alone: converted), extract or merge-loras; a
    ValueError if none."""
    if args.rank is not None:  # write a LoRA
        if args.a and args.b and not loras:
            return "extract"
        if loras and not (args.a or args.b):
            return "merge-loras"
        raise ValueError("--rank R takes A B (extract a LoRA from B - A) or --lora FILE --lora FILE (merge LoRAs)")
    if args.a and args.b and not loras:
        return "merge"
    if args.a and not args.b:
        return "bake"
    raise ValueError("give A B (merge), A --lora FILE (bake), A alone (convert), A B --rank R (extract a LoRA), "
                     "or --lora FILE --lora FILE --rank R (merge LoRAs)")


def check_not_replaced(args: argparse.Namespace) -> None:
    """Refuse an -o that is one of the inputs (whatever --overwrite says), then one that exists without --overwrite."""
    named = [args.a, args.b, args.c, args.vae if args.vae not in ("copy", "merge") else None,
             *(path for path, _ in map(parse_lora_spec, args.lora))]
    check_output(Path(args.output), [Path(p) for p in named if p is not None and os.path.exists(p)], 0)
    if os.path.lexists(args.output) and not args.overwrite:
        raise FileExistsError(f"-o {args.output} already exists: --overwrite replaces it (once the new output is "
                              f"complete), or give another name")


@cli.entry("merge.py")
def main(argv=None) -> int:
    args = parse_args(argv)
    speed.apply_threads(args.threads)
    recipe = MergeRecipe(method=args.method, alpha=args.alpha, block_alphas=parse_block_alphas(args.block_alphas),
                         vae=args.vae, merge_text_encoders=not args.skip_text_encoders, dtype=args.dtype)
    loras = [parse_lora_spec(spec) for spec in args.lora]
    job = job_of(args, loras)
    check_not_replaced(args)
    if job == "extract":
        n = extract_lora(args.a, args.b, args.output, args.rank, args.clamp_quantile, allow_pickle=args.allow_pickle)
    elif job == "merge-loras":
        n = merge_loras(loras, args.output, args.rank, args.clamp_quantile)
    if job in ("extract", "merge-loras"):
        print(f"{args.output}: LoRA of rank {args.rank} on {n} layers")
        return 0
    if job == "merge":
        report = merge_checkpoints(args.a, args.b, args.output, recipe, c=args.c, strict=args.strict,
                                   output_format=args.output_format, allow_pickle=args.allow_pickle)
    else:  # bake, or with no --lora convert (a pickle to safetensors, a file to a folder, ...)
        report = bake_loras(args.a, loras, args.output, dtype=args.dtype, output_format=args.output_format,
                            allow_pickle=args.allow_pickle)
    for line in report.lora_summaries:
        print(line)
    print(f"{args.output}: {report.merged} tensors merged, {report.copied} copied, "
          f"{report.output_bytes / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
