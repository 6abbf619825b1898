"""Stable Diffusion 1.x, 2.x and XL: UNet, VAE, text encoders, tokenizer, the key maps between checkpoint formats,
the architecture read from a file's weights, LoRA files, a loader and the text-to-image pipeline.

Module names follow diffusers, so a diffusers folder loads with no renaming; `checkpoint_keys`, `convert` and
`text_names` map single-file names, `detect` finds which model a single file holds, `checkpoint_files` reads and
writes whole checkpoints, `lora_files` and `lora_reading` give LoRA files' layers the model's names, `pipeline`
draws, `png_info` writes and reads the settings in an image. Imports the shared modules, `diffusion` and `lora`.
"""

from .configs import SDXL_BASE, TINY, get_config
from .detect import detect, detect_family
from .model import StableDiffusion, load_model, random_model

__all__ = ["StableDiffusion", "SDXL_BASE", "TINY", "get_config", "load_model", "random_model", "detect",
           "detect_family"]
