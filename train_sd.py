"""Train a small Stable Diffusion (SD 1.x family) from scratch: the VAE first, then the UNet and the text encoder
together on the VAE's cached latents, then a grid of the validation prompts (minigen/finetune/from_scratch.py).

    python train_sd.py --config configs/sd_demo.conf            # make sd-demo: Twemoji at 32x32 on the CPU
    python train_sd.py --config configs/sd_demo_cuda.conf       # a larger model on one GPU
    python train_sd.py --resume runs/sd-demo/unet/checkpoint.safetensors --epochs 30   # continue, or train more
    python train_sd.py --config configs/sd_demo.conf --stage unet    # keep the trained VAE, retrain the rest
    python train_sd.py --config configs/sd_demo_cuda.conf --plan     # the memory one UNet-stage step needs

A preset (configs/sd_*.conf) is a file of the same flags, one per line; flags given after it win; with --resume the
run's saved settings come first. Outputs in --out: vae/ and unet/ (each stage's checkpoint, log.jsonl, loss.png,
samples/progress.png), model.safetensors (an SD 1.x single file), model/ (a diffusers folder) and grid.png (each
validation prompt --grid-samples times). The model loads in sample.py, train_lora.py, eval.py, merge.py and diffusers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from minigen import cli, distributed, speed
from minigen.images import parse_size
from minigen.finetune.trainer import load_checkpoint
from minigen.sd.prompt_grid import draw_prompts, save_prompt_grid
from minigen.sd.pipeline import Pipeline
from minigen.finetune.from_scratch import STAGES, FromScratchTrainer, SDTrainConfig, stage_settings, vae_model_path
from minigen.finetune.memory_plan import MemoryPlan, check_fits, plan_lora_step
from minigen.sd.configs import get_config
from minigen.training import claim_out, run_settings
from train_lora import HELP as LORA_HELP, add_settings_flags, trainer_parser

HELP = {**LORA_HELP,
        "data": "a folder of images with captions, or a built-in dataset (twemoji: captions from the emoji's names)",
        "preset": "the architecture, built with random weights from --seed (minigen/sd/configs.py: emoji-sd1)",
        "stage": "where to start: vae (train everything) or unet (keep --out's trained VAE, train the rest)",
        "vae_epochs": "passes over the data of the VAE stage",
        "vae_lr": "the VAE stage's learning rate",
        "vae_batch": "images per step of the VAE stage",
        "kl_weight": "the VAE's KL term's weight (per latent element, against the mean L1 error per pixel)",
        "vae_mse_weight": "the weight of a mean squared error term beside the VAE's mean L1 error (0: L1 alone)",
        "epochs": "passes over the data of the UNet + text encoder stage (the total, on --resume too)",
        "lr": "the UNet's learning rate (and the text encoder's, without --text-encoder-lr)",
        "text_encoder_lr": "the text encoder's learning rate (0: --lr)",
        "batch": "images per step of the UNet + text encoder stage, on each process",
        "caption_dropout": "the share of captions replaced by \"\": teaches the unconditional prediction "
                           "classifier-free guidance needs",
        "colour_captions": "put each image's dominant colour, measured from its pixels, in front of its caption "
                           "unless it names one (\"grinning face\" -> \"yellow grinning face\"; minigen/colours.py)",
        "out": "the run's folder"}
# LoRATrainConfig's settings that mean nothing here: the model is built from --preset, every weight trains.
HIDDEN = frozenset({"model", "rank", "alpha", "targets", "lora_dropout", "conv_rank", "conv_alpha", "dora",
                    "train_text_encoder",
                    "format", "instance_prompt", "class_data", "class_prompt", "prior_loss_weight", "cache_latents",
                    "random_crop", "mixed_precision", "gradient_checkpointing", "clip_skip", "prediction_type"})


# What a run writes: in each stage's folder, and in --out at the end.
STAGE_FILES = ("checkpoint.safetensors", "model.safetensors", "log.jsonl", "loss.png", "samples/*.png")
RESULT_FILES = ("model.safetensors", "model/**/*", "grid.png")


def build_parser() -> argparse.ArgumentParser:
    p = trainer_parser("train_sd.py", __doc__, "configs/sd_demo*.conf")
    p.add_argument("--grid-samples", type=int, help="samples of each validation prompt in grid.png (default: 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds a run, deleting the files of the stages that "
                        "train again and the results (without it such a folder is refused; --stage unet keeps the VAE)")
    p.add_argument("--plan", action="store_true", help="print the memory plan of one step of the UNet stage (no "
                   "weights made, no GPU needed), then exit")
    p.add_argument("--force", action="store_true", help="start on a GPU even when the plan says it will not fit")
    speed.add_speed_args(p, ("tf32", "compile", "channels_last", "sdpa", "fused_optimizer"), "the UNet")
    add_settings_flags(p, SDTrainConfig, HELP, HIDDEN)
    return p


def saved_settings(checkpoint: str) -> dict:
    return run_settings(load_checkpoint(checkpoint)[1], checkpoint, SDTrainConfig)


def parse(argv: list[str]) -> tuple[argparse.Namespace, SDTrainConfig]:
    fields = {f.name for f in dataclasses.fields(SDTrainConfig)} - HIDDEN
    args, settings = cli.layered_settings(build_parser(), argv, fields, saved_settings)
    if "plan" not in args:
        settings["device"] = cli.resolve_device(settings.get("device"), "a from-scratch run takes about 20 minutes")
    cfg = SDTrainConfig(**settings)
    cli.check_number("--grid-samples", getattr(args, "grid_samples", 8), 1)
    return args, cfg


@cli.entry("train_sd.py")
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    speed.apply_threads(getattr(args, "threads", None))
    if "plan" in args:
        print(planned_unet_step(cfg).describe())
        return 0
    resume = getattr(args, "resume", None)
    if resume and getattr(args, "overwrite", False):
        raise ValueError("--overwrite starts a fresh run and --resume continues one: give one of them")
    claim = not resume  # a resumed run continues in its own folder, into the UNet stage too
    if resume and cfg.stage == "vae" and int(load_checkpoint(resume)[1]["epoch"]) >= cfg.vae_epochs:
        cfg, resume = dataclasses.replace(cfg, stage="unet"), None  # the VAE stage had finished: on to the UNet
    if cfg.stage == "unet" and not resume and not vae_model_path(cfg).is_file():
        raise FileNotFoundError(f"--stage unet needs a trained VAE in {vae_model_path(cfg)} (from --stage vae)")
    progress = not getattr(args, "quiet", False)
    with distributed.process_group(cfg.device) as device, speed.switched(speed.speed_from_args(args), device) as fast:
        if device.startswith("cuda"):  # before anything is written
            plan = planned_unet_step(cfg)
            if distributed.is_main():
                print(plan.describe())
            check_fits(plan, torch.device(device), force="force" in args)
        if claim and distributed.is_main():
            claim_run(cfg, getattr(args, "overwrite", False))
        for stage in STAGES[STAGES.index(cfg.stage):]:
            trainer = FromScratchTrainer(dataclasses.replace(cfg, stage=stage), progress=progress, device=device,
                                         speed=fast)
            if resume:
                trainer.load_checkpoint(resume)
                resume = None
            if trainer.train() == "interrupted":
                return 130  # the command that continues was printed
        if distributed.is_main():
            draw_grid(trainer, cfg, getattr(args, "grid_samples", 8), progress)
            print_outputs(Path(cfg.out))
    return 0


def planned_unet_step(cfg: SDTrainConfig) -> MemoryPlan:
    """The memory plan of one step of the UNet stage, the larger one: the UNet and the text encoder train whole (fp32
    weights, their gradients and the optimizer's state) on cached latents; the VAE stage trains a few million
    weights on small pixel batches."""
    return plan_lora_step(stage_settings(dataclasses.replace(cfg, stage="unet")), get_config(cfg.preset),
                          from_scratch=True)


def claim_run(cfg: SDTrainConfig, overwrite: bool) -> None:
    """A fresh run (or --stage unet) into an --out holding one: refused, or with --overwrite the files of the stages
    about to train and the results are deleted first (training.claim_out)."""
    out, stages = Path(cfg.out), STAGES[STAGES.index(cfg.stage):]
    patterns = [f"{stage}/{name}" for stage in stages for name in STAGE_FILES] + list(RESULT_FILES)
    checkpoints = [out / stage / "checkpoint.safetensors" for stage in reversed(STAGES)]
    latest = next((path for path in checkpoints if path.is_file()), checkpoints[-1])
    claim_out(out, patterns, overwrite, latest,
              f"{' and '.join(stages)} checkpoints, logs and pictures, the model and grid.png")


def draw_grid(trainer: FromScratchTrainer, cfg: SDTrainConfig, per_prompt: int, progress: bool) -> None:
    """grid.png: each validation prompt per_prompt times, from the validation seed on."""
    if not cfg.validation_prompts:
        return
    for model in trainer.model.models().values():
        model.eval()
    height, width = parse_size(cfg.validation_size or cfg.resolution)
    images = draw_prompts(Pipeline(trainer.model), cfg.validation_prompts, per_prompt, seed=cfg.validation_seed,
                          progress=progress, steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale,
                          height=height, width=width)
    save_prompt_grid(images, cfg.validation_prompts, Path(cfg.out) / "grid.png")


def print_outputs(out: Path) -> None:
    outputs = {"model": "model.safetensors", "diffusers": "model", "grid": "grid.png",
               "progress": "unet/samples/progress.png", "VAE": "vae/samples/progress.png", "loss curve": "unet/loss.png"}
    for label, name in outputs.items():
        if (out / name).exists():
            print(f"{label + ':':12}{out / name}")


if __name__ == "__main__":
    sys.exit(main())
