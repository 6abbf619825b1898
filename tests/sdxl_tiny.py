"""Tiny random SDXL models for tests: a diffusers StableDiffusionXLPipeline, saved as a diffusers folder and as a
single file. Import it from your tests (it is a plain module, not a conftest):

    from sdxl_tiny import tiny_pipeline, tiny_folder, tiny_single_file

The models keep SDXL's structure at toy widths (`minigen.sd.configs.TINY`); tokenizers use CLIP's real vocabulary.
Everything is built once per test session and cached; the files live in a temporary folder removed at exit.
Treat what you get as read-only (copy before changing).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from minigen.sd.configs import get_config
from minigen.sd.tokenizer import model_tokenizers


def _plain(config: dict) -> dict:
    """A config.json dict without its `_class_name`-style entries, as diffusers' constructors take it."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="minigen-sdxl-tiny-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build_tiny_pipeline(seed: int = 0):
    """A fresh tiny random diffusers StableDiffusionXLPipeline (fp32, CPU)."""
    import diffusers
    import transformers

    configs = get_config("tiny")
    tokenizer_dir = _workdir() / f"tokenizers-{seed}"
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tuple(model_tokenizers("sdxl").values())):
        tokenizer.save(tokenizer_dir / name)
    torch.manual_seed(seed)
    return diffusers.StableDiffusionXLPipeline(
        vae=diffusers.AutoencoderKL(**_plain(configs["vae"])),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
        text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2"),
        unet=diffusers.UNet2DConditionModel(**_plain(configs["unet"])),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]),
    ).to(torch.float32)


@functools.lru_cache(maxsize=None)
def tiny_pipeline():
    """The session's tiny diffusers pipeline (seed 0), the one saved by `tiny_folder` and `tiny_single_file`."""
    return build_tiny_pipeline(0)


@functools.lru_cache(maxsize=None)
def tiny_folder() -> Path:
    """`tiny_pipeline()` written by diffusers' `save_pretrained` (safetensors, fp32)."""
    folder = _workdir() / "tiny-sdxl"
    tiny_pipeline().save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def tiny_single_file() -> Path:
    """`tiny_pipeline()` as one `sd_xl_base_1.0.safetensors`-layout file, written by minigen (fp32).
    Load it with `load_model(path)`, or diffusers' `from_single_file(path, config=tiny_folder())`."""
    from minigen.sd.model import load_model

    path = _workdir() / "tiny-sdxl.safetensors"
    load_model(tiny_folder()).save_single_file(path)
    return path
