"""Stable Diffusion models (SDXL today; SD 1.x and 2.x join it): UNet, VAE, text encoders, tokenizer, the key maps between checkpoint formats, LoRA files, and a loader.

Module names follow diffusers, so a diffusers folder loads with no renaming; `convert` maps single-file names.
"""

from .configs import SDXL_BASE, TINY, get_config
from .convert import detect_model, unet_module_to_diffusers, unet_module_to_sgm, unet_name_map, vae_name_map
from .model import SDXL, load_sdxl

__all__ = ["SDXL", "SDXL_BASE", "TINY", "get_config", "load_sdxl", "detect_model", "unet_module_to_diffusers",
           "unet_module_to_sgm", "unet_name_map", "vae_name_map"]
