"""The settings of a LoRA run (`train_lora.py`'s flags, a preset's lines, a checkpoint's saved settings), checked
when made: every choice against its allowed values, every number against its range."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from .. import cli
from ..images import parse_size

MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The allowed values of LoRATrainConfig's numbers (see cli.check_fields); caption_dropout is checked apart.
NUMBER_RANGES = {
    "prior_loss_weight": (0, None), "max_images": (0, None), "bucket_step": (8, None), "rank": (1, None),
    "alpha": (0, None), "conv_rank": (0, None), "conv_alpha": (0, None), "lora_dropout": (0, 1), "text_encoder_lr": (0, None), "noise_offset": (0, None),
    "min_snr_gamma": (0, None), "lr": cli.POSITIVE, "weight_decay": (0, None), "warmup_steps": (0, None),
    "batch": (1, None), "grad_accum": (1, None), "max_grad_norm": (0, None), "epochs": (1, None),
    "seed": cli.SEED_RANGE, "save_every_epochs": (1, None), "save_every_steps": (0, None),
    "validation_steps": (1, None), "validation_seed": cli.SEED_RANGE, "guidance_scale": (0, None),
    "clip_skip": (1, None),
}


@dataclass
class LoRATrainConfig:
    # model and data
    model: str = ""  # SD 1.x, 2.x or SDXL: a diffusers folder or single file; "random:tiny-sd1" etc. (tests, smoke)
    data: str = ""  # a folder of images with captions, or a built-in dataset ("met")
    caption_prefix: str = ""  # e.g. a trigger word, or seed 001's "Still from the Anime, "
    caption_fallback: str = ""  # caption of images without one
    caption_dropout: float = 0.0
    instance_prompt: str = ""  # DreamBooth: one prompt for every image of --data
    class_data: str = ""  # DreamBooth prior preservation: class images and their prompt
    class_prompt: str = ""
    prior_loss_weight: float = 1.0
    max_images: int = 0  # 0: all; else the first N (quick trials, the smoke run)
    resolution: str = "1024"  # HxW (or one number): buckets hold about this many pixels
    bucket_step: int = 64
    random_crop: bool = False
    flip: bool = False
    cache_latents: str = "memory"  # memory, disk (out/cache), off (encode every step: needed for random crops)
    # LoRA
    rank: int = 4
    alpha: float = 0.0  # 0: alpha = rank (scale 1)
    targets: str = "attention"  # attention (to_q/k/v/out.0, as the seeds), kohya (also proj_in/out, feed-forward)
    conv_rank: int = 0  # LoCon: > 0 also trains the resnets' and samplers' 3x3 convolutions (sd-scripts' conv_dim)
    conv_alpha: float = 0.0  # their alpha (sd-scripts' conv_alpha); 0: alpha = conv_rank (scale 1)
    dora: bool = False  # DoRA (Liu et al. 2024) on every adapter, as peft's use_dora
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    clip_skip: int = 1  # A1111's count for the captions' (and validation prompts') encoding: 2 = penultimate layer
    text_encoder_lr: float = 0.0  # 0: same as lr
    # objective
    prediction_type: str = ""  # empty: the model's (its scheduler config: v_prediction for SD 2 768-v); or epsilon, v_prediction
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0: off
    # optimisation
    optimizer: str = "adamw"  # adamw, adafactor, sgd
    lr: float = 1e-4
    weight_decay: float = 1e-2  # AdamW's (diffusers' default); Adafactor and SGD take none
    lr_scheduler: str = "constant"  # constant, cosine, linear (after warm-up)
    warmup_steps: int = 0
    batch: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "no"  # no, bf16, fp16 (frozen weights in that dtype, LoRA weights fp32)
    gradient_checkpointing: bool = False
    epochs: int = 1
    seed: int = 0
    # output
    out: str = "runs/lora"
    save_every_epochs: int = 1
    save_every_steps: int = 0  # 0: only at epoch ends
    format: str = "kohya"  # kohya (every program loads it) or diffusers (diffusers and peft only: sd/lora_files.py)
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    validation_size: str = ""  # HxW; empty: the resolution
    validation_seed: int = 0
    guidance_scale: float = 5.0
    device: str = "cpu"

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "adafactor", "sgd"), "lr_scheduler": ("constant", "cosine", "linear"),
                   "mixed_precision": tuple(MIXED_PRECISION), "prediction_type": ("", "epsilon", "v_prediction"),
                   "cache_latents": ("memory", "disk", "off"), "format": ("kohya", "diffusers")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        cli.check_fields(self, NUMBER_RANGES)
        for name in ("resolution", "validation_size"):
            if getattr(self, name):
                try:
                    parse_size(getattr(self, name))
                except ValueError as e:
                    raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.random_crop and self.cache_latents != "off":
            raise ValueError("--random-crop draws a new crop every epoch, so latents cannot be cached: "
                             "add --cache-latents off")
        self.validation_prompts = list(self.validation_prompts)


def add_adapters(models: dict[str, torch.nn.Module], cfg: LoRATrainConfig) -> None:
    """The run's adapters on {"unet"[, "te1", "te2"]}: `cfg.targets` on the UNet at rank/alpha, with --conv-rank
    also its 3x3 convolutions (LoCon, at conv_rank/conv_alpha as sd-scripts' conv_dim/conv_alpha), and the text
    encoders' attention given; each DoRA with --dora. The same calls in the same order: the same initial weights for
    one seed."""
    from ..lora.layers import add_lora

    alpha, kw = cfg.alpha or None, dict(dropout=cfg.lora_dropout, dora=cfg.dora)
    add_lora(models["unet"], cfg.targets, cfg.rank, alpha, **kw)
    if cfg.conv_rank:
        add_lora(models["unet"], "conv", cfg.conv_rank, cfg.conv_alpha or None, **kw)
    for component in ("te1", "te2"):
        if component in models:
            add_lora(models[component], "text", cfg.rank, alpha, **kw)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (diffusers' get_scheduler shapes):
    linear warm-up from 0 over `warmup` steps, then constant, cosine to 0, or linear to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def network_args(cfg: LoRATrainConfig) -> dict[str, str]:
    """`ss_network_args` metadata of a LoCon run (sd-scripts' conv_dim and conv_alpha) or a DoRA one (LyCORIS'
    dora_wd), else none."""
    args = {"conv_dim": str(cfg.conv_rank), "conv_alpha": str(cfg.conv_alpha or cfg.conv_rank)} if cfg.conv_rank else {}
    args |= {"dora_wd": "True"} if cfg.dora else {}
    return {"ss_network_args": json.dumps(args)} if args else {}
