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
import warnings
from pathlib import Path

import torch

from minigen import cli, distributed, speed
from minigen.training import run_settings
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer, load_checkpoint
from minigen.finetune.memory_plan import check_fits, plan_lora_step


HELP = {"format": "kohya (loads the same in diffusers, ComfyUI, A1111, Forge, InvokeAI, sd-scripts) or diffusers "
                  "(read fully by diffusers and peft only)",
        "model": "SD 1.x, 2.x or SDXL: a diffusers folder, a single .safetensors file, or random:tiny-sd1, "
                 "random:tiny-sd2, random:tiny (a random tiny model of that family, to try things)",
        "clip_skip": "encode captions and validation prompts from this layer, A1111's count (2: the penultimate "
                     "layer, what many SD 1.x anime models were trained with); written into the LoRA's metadata",
        "prediction_type": "epsilon or v_prediction (default: the model's own, read from its scheduler config)",
        "device": "cuda, cuda:1, cpu, ... (given nowhere: cuda when torch sees a GPU, else the CPU, with a warning)",
        "data": "a folder of images with captions (.txt beside each, or metadata.jsonl), or a built-in dataset (met)",
        "caption_prefix": "put before every caption, e.g. a trigger word or seed 001's \"Still from the Anime, \"",
        "caption_fallback": "the caption of images that have none",
        "caption_dropout": "the share of captions replaced by \"\" in each epoch, in [0, 1): teaches the "
                           "unconditional prediction classifier-free guidance needs",
        "instance_prompt": "DreamBooth: one prompt for every image of --data (captions then unused)",
        "class_data": "DreamBooth prior preservation: a folder of class images, trained on beside --data",
        "class_prompt": "DreamBooth: the prompt of the --class-data images",
        "prior_loss_weight": "DreamBooth: the weight of the class images' loss",
        "max_images": "use only the first N images (0: all); for quick trials",
        "resolution": "HxW or one number: images are bucketed by aspect ratio to about this many pixels",
        "bucket_step": "bucket sides are multiples of this many pixels",
        "random_crop": "a new random crop each epoch instead of the centre (needs --cache-latents off)",
        "flip": "also train on each image mirrored left-right",
        "cache_latents": "memory, disk (in --out/cache) or off: encode the images with the VAE once, or every step",
        "rank": "the LoRA rank r: the width of each adapter's down and up matrices",
        "alpha": "LoRA alpha: the update is scaled by alpha / rank (0: alpha = rank, scale 1)",
        "targets": "attention (to_q/k/v/out.0, as the seeds) or kohya (also proj_in/out and the feed-forward layers)",
        "lora_dropout": "dropout on the adapters' input while training, in [0, 1)",
        "train_text_encoder": "train LoRA adapters on the text encoder(s) too",
        "text_encoder_lr": "the text encoders' learning rate (0: --lr)",
        "noise_offset": "add this much per-channel offset noise (Guttenberg 2023): darker darks, brighter brights",
        "min_snr_gamma": "Min-SNR loss weighting, gamma (Hang et al. 2023; 5 is usual; 0: off)",
        "optimizer": "adamw, adafactor (less memory: seed 000) or sgd",
        "lr": "the learning rate",
        "weight_decay": "AdamW's decoupled weight decay (Adafactor and SGD take none)",
        "lr_scheduler": "constant, cosine or linear decay after the warm-up",
        "warmup_steps": "optimizer steps of linear warm-up from 0",
        "batch": "images per step on each process",
        "grad_accum": "steps whose gradients add up before each optimizer step",
        "max_grad_norm": "clip the gradients' norm to this (0: no clipping)",
        "mixed_precision": "no, bf16 or fp16: the frozen weights in that dtype, the LoRA weights in fp32",
        "gradient_checkpointing": "recompute activations in the backward pass: far less memory, ~30%% slower",
        "epochs": "the total number of passes over the data (on --resume too: give more to train more)",
        "seed": "the seed of every random draw: the same seed and settings train the same LoRA",
        "out": "the run's folder",
        "save_every_epochs": "write lora-epoch-NNNN.safetensors and the checkpoint every N epochs",
        "save_every_steps": "also save the checkpoint every N optimizer steps (0: only at epoch ends)",
        "validation_prompts": "prompts drawn after every epoch from the same noise (samples/)",
        "validation_steps": "sampling steps of the validation images",
        "validation_size": "HxW of the validation images (default: --resolution)",
        "validation_seed": "the seed of the validation images' noise",
        "guidance_scale": "classifier-free guidance of the validation images",
        "conv_rank": "LoCon: also train the 3x3 convolutions of the UNet's resnets and samplers at this rank "
                     "(sd-scripts' conv_dim; 0: none)",
        "conv_alpha": "their alpha (sd-scripts' conv_alpha; 0: alpha = conv rank)",
        "dora": "DoRA (weight-decomposed LoRA, Liu et al. 2024) on every adapter, as peft's use_dora: the kohya file "
                "carries LyCORIS' dora_scale (ComfyUI, A1111), the diffusers one peft's lora_magnitude_vector"}


def trainer_parser(prog: str, description: str, presets: str) -> argparse.ArgumentParser:
    """The flags every trainer of settings-with-presets has (train_sd.py's too): --config, --resume, --quiet,
    --threads."""
    # SUPPRESS: only the flags actually given appear, so a preset or a checkpoint's settings fill in the rest.
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help=f"a preset: a file of flags ({presets})")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    cli.add_threads_arg(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = trainer_parser("train_lora.py", __doc__, "configs/lora_*.conf")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan of one training step (no weights loaded, no GPU needed), then exit")
    p.add_argument("--force", action="store_true", help="start on a GPU even when the plan says it will not fit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickled --model checkpoint (.ckpt, .bin) you trust; loaded with weights_only=True")
    p.add_argument("--sdxl", dest="model", help="the old name of --model (deprecated)")
    speed.add_speed_args(p, ("tf32", "compile", "channels_last", "sdpa", "fused_optimizer"), "the UNet")
    add_settings_flags(p, LoRATrainConfig, HELP)
    return p


def add_settings_flags(p: argparse.ArgumentParser, config_type: type, helps: dict[str, str],
                       hidden: frozenset[str] = frozenset()) -> None:
    """A flag for each field of the settings dataclass `config_type` but those `hidden` (train_sd.py's settings are
    a LoRATrainConfig's and more)."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if f.name in hidden:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{helps.get(f.name, '')} (default: {default!r})".lstrip()
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="*", metavar="PROMPT", help=text)
        else:
            p.add_argument(flag, type=hints[f.name], help=text)


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


def planned_step(cfg: LoRATrainConfig, allow_pickle: bool):
    """The memory plan of one step, saying first that it takes a while (a full-size UNet: about a minute on 2 cores)."""
    if distributed.is_main():
        print("planning one training step's memory on fake tensors (no weight is read; about a minute for a "
              "full-size UNet on 2 CPU cores)...", file=sys.stderr, flush=True)
    return plan_lora_step(cfg, allow_pickle=allow_pickle)


@cli.entry("train_lora.py")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    speed.apply_threads(getattr(args, "threads", None))
    if cfg.device.startswith("cuda") and cfg.mixed_precision == "bf16" and cli.gpu_half_precision() == "fp16":
        warnings.warn("this GPU has no bf16 arithmetic (it would be emulated, slowly): training in fp16 with the loss "
                      "scaler instead (--mixed-precision fp16 says so)", stacklevel=1)
        cfg = dataclasses.replace(cfg, mixed_precision="fp16")
    allow_pickle = getattr(args, "allow_pickle", False)
    if "plan" in args:
        print(planned_step(cfg, allow_pickle).describe())
        return 0
    switches = speed.speed_from_args(args)
    with distributed.process_group(cfg.device) as device, speed.switched(switches, device, cfg.optimizer) as fast:
        if device.startswith("cuda"):
            plan = planned_step(cfg, allow_pickle)
            if distributed.is_main():
                print(plan.describe())
            check_fits(plan, torch.device(device), force="force" in args)
        trainer = LoRATrainer(cfg, progress=not getattr(args, "quiet", False),
                              allow_pickle=allow_pickle, device=device, speed=fast)
        if "resume" in args:
            trainer.load_checkpoint(args.resume)
        if trainer.train() == "interrupted":
            return 130  # as train_gan.py and any program stopped by Ctrl-C: the resume command is printed
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
