"""Train a LoRA for Stable Diffusion (SD 1.x, 2.x, SDXL) on a captioned image folder, or continue a run.

    python train_lora.py --config configs/lora_001.conf --model sd_xl_base_1.0.safetensors --data conan/
    python train_lora.py --model sdxl-base/ --data met --rank 16 --lr 1e-4 --validation-prompts "a harbour at dusk"
    python train_lora.py --model v1-5-pruned-emaonly.safetensors --data anime/ --clip-skip 2 --resolution 512
    python train_lora.py --resume runs/lora/checkpoint.safetensors          # continues with the saved settings
    torchrun --nproc_per_node 4 train_lora.py --config ...                  # data-parallel on 4 GPUs

A preset (configs/lora_*.conf) is a file of the same flags, one per line, `#` comments allowed; flags given on the
command line after it win. With --resume the run's saved settings come first, then the preset, then the command line.
Outputs in --out: lora-epoch-NNNN.safetensors (each epoch), lora.safetensors (the last), checkpoint.safetensors,
samples/epoch_NNNN.png and samples/progress.png (validation from the same noise), loss.png, log.jsonl.
Under torchrun every rank trains on its share of each global batch (--batch x ranks x --grad-accum images); only
the LoRA's gradients are exchanged, and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import torch

from minigen import cli, distributed, speed
from minigen.training import run_settings
from minigen.lora_config import LoRATrainConfig
from minigen.lora_training import LoRATrainer, load_checkpoint
from minigen.memory_plan import check_fits, plan_lora_step


HELP = {"format": "kohya (loads the same in diffusers, ComfyUI, A1111, Forge, InvokeAI, sd-scripts) or diffusers "
                  "(read fully by diffusers and peft only)",
        "model": "SD 1.x, 2.x or SDXL: a diffusers folder, a single .safetensors file, or random:tiny-sd1, "
                 "random:tiny-sd2, random:tiny (a random tiny model of that family, to try things)",
        "clip_skip": "encode captions and validation prompts from this layer, A1111's count (2: the penultimate "
                     "layer, what many SD 1.x anime models were trained with); written into the LoRA's metadata",
        "prediction_type": "epsilon or v_prediction (default: the model's own, read from its scheduler config)",
        "conv_rank": "LoCon: also train the 3x3 convolutions of the UNet's resnets and samplers at this rank "
                     "(sd-scripts' conv_dim; 0: none)",
        "conv_alpha": "their alpha (sd-scripts' conv_alpha; 0: alpha = conv rank)",
        "dora": "DoRA (weight-decomposed LoRA, Liu et al. 2024) on every adapter, as peft's use_dora: the kohya file "
                "carries LyCORIS' dora_scale (ComfyUI, A1111), the diffusers one peft's lora_magnitude_vector",
        "device": "cuda, cuda:1, cpu, ... (given nowhere: cuda when torch sees a GPU, else the CPU, with a warning)"}


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: only the flags actually given appear, so a preset or a checkpoint's settings fill in the rest.
    p = argparse.ArgumentParser(prog="train_lora.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a preset: a file of flags (configs/lora_*.conf)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=cli.number(int, 1), help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan of one training step (no weights loaded, no GPU needed), then exit")
    p.add_argument("--force", action="store_true", help="start on a GPU even when the plan says it will not fit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickled --model checkpoint (.ckpt, .bin) you trust; loaded with weights_only=True")
    p.add_argument("--sdxl", dest="model", help="the old name of --model (deprecated)")
    speed.add_speed_args(p, ("tf32", "compile", "channels_last", "sdpa", "fused_optimizer"), "the UNet")
    hints = typing.get_type_hints(LoRATrainConfig)
    for f in dataclasses.fields(LoRATrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{HELP.get(f.name, '')} (default: {default!r})".lstrip()
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="*", metavar="PROMPT", help=text)
        else:
            p.add_argument(flag, type=hints[f.name], help=text)
    return p


def saved_settings(checkpoint: str) -> dict:
    metadata = load_checkpoint(checkpoint)[1]
    return run_settings(renamed_settings(metadata), checkpoint, LoRATrainConfig)


def renamed_settings(metadata: dict[str, str]) -> dict[str, str]:
    """A checkpoint's metadata with its settings in today's names: runs before --model saved it as `sdxl`."""
    try:
        settings = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError):
        return metadata  # run_settings names the problem
    if isinstance(settings, dict) and "sdxl" in settings:
        settings["model"] = settings.pop("sdxl")
        return {**metadata, "config": json.dumps(settings)}
    return metadata


def parse(argv: list[str]) -> tuple[argparse.Namespace, LoRATrainConfig]:
    fields = {f.name for f in dataclasses.fields(LoRATrainConfig)}
    args, settings = cli.layered_settings(build_parser(), argv, fields, saved_settings)
    if "plan" not in args:  # no device given anywhere: a GPU when there is one, else the CPU with a warning
        settings["device"] = cli.resolve_device(settings.get("device"), "a LoRA step of a full-size model takes minutes")
    return args, LoRATrainConfig(**settings)


@cli.entry("train_lora.py")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    cli.apply_threads(getattr(args, "threads", None))
    if "plan" in args:
        print(plan_lora_step(cfg).describe())
        return 0
    with distributed.process_group(cfg.device) as device, speed.switched(speed.speed_from_args(args), device) as fast:
        if device.startswith("cuda"):
            plan = plan_lora_step(cfg)
            if distributed.is_main():
                print(plan.describe())
            check_fits(plan, torch.device(device), force="force" in args)
        trainer = LoRATrainer(cfg, progress=not getattr(args, "quiet", False),
                              allow_pickle=getattr(args, "allow_pickle", False), device=device, speed=fast)
        if "resume" in args:
            trainer.load_checkpoint(args.resume)
        trainer.train()
        if distributed.is_main():
            print_outputs(Path(cfg.out))
    return 0


def print_outputs(out: Path) -> None:
    """The run's main files, only those it wrote (no samples without --validation-prompts)."""
    outputs = {"lora": "lora.safetensors", "samples": "samples/progress.png", "loss curve": "loss.png",
               "checkpoint": "checkpoint.safetensors"}
    for label, name in outputs.items():
        if (out / name).is_file():
            print(f"{label + ':':12}{out / name}")


if __name__ == "__main__":
    sys.exit(main())
