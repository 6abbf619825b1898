"""Load and save a whole SDXL model: a diffusers folder or a single-file checkpoint, in and out.

    sdxl = load_sdxl("sd_xl_base_1.0.safetensors", dtype=torch.bfloat16, device="cuda")
    sdxl = load_sdxl("stable-diffusion-xl-base-1.0/", vae="sdxl-vae-fp16-fix.safetensors")
    sdxl.save_single_file("out.safetensors"); sdxl.save_diffusers("out/")

Each model is built on the meta device (no memory) and the loaded tensors are assigned to it
(`load_state_dict(assign=True)`), so a 7 GB file needs about 7 GB, not twice that. Keys and shapes are checked
first, so a wrong file fails with a message that names what is wrong, before anything is half-loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..atomic import atomic_write
from ..io import CheckpointError, SafetensorsWriter, load_weights
from . import convert
from .clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .configs import get_config
from .tokenizer import CLIPTokenizer, sdxl_tokenizers
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}

# What diffusers needs to read a saved folder as a StableDiffusionXLPipeline.
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_model(part: str, config: Mapping) -> nn.Module:
    """An SDXL part from its config.json dict, with default-initialised weights (use `torch.device("meta")` to
    allocate nothing)."""
    if part == "unet":
        return UNet2DConditionModel(config)
    if part == "vae":
        return AutoencoderKL(config)
    text_class = CLIPTextModel if part == "text_encoder" else CLIPTextModelWithProjection
    return text_class(CLIPTextConfig.from_dict(config))


@dataclass
class SDXL:
    """The parts of an SDXL model, and the config.json dicts they were built from (`configs["scheduler"]` is the
    noise schedule the model was trained with)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    configs: dict[str, dict]

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    def models(self) -> dict[str, nn.Module]:
        return {part: getattr(self, part) for part in PARTS}

    def lora_components(self) -> dict[str, nn.Module]:
        """The parts a LoRA file can change, by the component names of minigen.sd.lora_files."""
        return {"unet": self.unet, "te1": self.text_encoder, "te2": self.text_encoder_2}

    def save_diffusers(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers folder (what `StableDiffusionXLPipeline.from_pretrained` and `load_sdxl` read)."""
        folder = Path(folder)
        save_diffusers_files(folder, self.configs, (self.tokenizer, self.tokenizer_2))
        for part, model in self.models().items():
            _save_tensors(model.state_dict(), folder / part / f"{WEIGHTS_NAME[part]}.safetensors", dtype)

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write one safetensors file in the `sd_xl_base_1.0.safetensors` layout (A1111, ComfyUI, diffusers'
        `from_single_file`). `dtype` casts every floating-point tensor; by default each keeps its own."""
        state = {part: model.state_dict() for part, model in self.models().items()}
        tensors = convert.to_single_file(state["unet"], state["vae"], state["text_encoder"], state["text_encoder_2"],
                                         self.configs["unet"], self.configs["vae"])
        _save_tensors(tensors, path, dtype)


def save_diffusers_files(folder: Path, configs: Mapping[str, Mapping],
                         tokenizers: tuple[CLIPTokenizer, CLIPTokenizer]) -> None:
    """Everything of a diffusers folder but the weights: each part's config.json, the scheduler's config, the two
    tokenizer folders and model_index.json."""
    for part in PARTS:
        _write_json(folder / part / "config.json", configs[part])
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        tokenizer.save(folder / name)
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    _write_json(folder / "model_index.json", MODEL_INDEX)


def read_diffusers_configs(folder: Path) -> dict[str, dict]:
    """The config dicts of a diffusers folder's parts, and its scheduler's (SDXL base's if it has none)."""
    configs = {part: _read_config(folder / part) for part in PARTS}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = read_json(scheduler) if scheduler.is_file() \
        else get_config("sdxl-base", "scheduler")
    return configs


def read_json(path: Path) -> dict:
    """A JSON object from a file of a diffusers folder; a file that is not one is an error naming it."""
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _write_json(path: Path, obj) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype | None) -> None:
    """Stream `tensors` to a safetensors file, casting floating-point ones to `dtype` one at a time."""
    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype
    specs = {name: (tuple(t.shape), target(t)) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, {"format": "pt"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t.to(target(t)))


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return f"{len(names)} (first: {', '.join(names[:n])}{', ...' if len(names) > n else ''})"


def assemble(part: str, config: Mapping, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
             device: str | torch.device, source: str) -> nn.Module:
    """Build `part` on the meta device and assign `state_dict`'s tensors (moved to device/dtype one by one) to it.

    The dict is emptied as it goes, so no tensor exists twice for longer than its own conversion.
    """
    if part.startswith("text_encoder"):
        state_dict = convert.normalize_clip_keys(state_dict)
    model = check_weights(part, config, state_dict, source)
    tensors = {}
    for key in list(state_dict):
        t = state_dict.pop(key)
        tensors[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(tensors, assign=True)
    return model


def check_weights(part: str, config: Mapping, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """`part` built on the meta device, once `state_dict` (diffusers names; meta tensors will do) is known to hold
    exactly its keys at its shapes; else a CheckpointError naming the missing, unexpected and misshapen keys."""
    with torch.device("meta"):
        model = build_model(part, config)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if wrong:
        problems.append(f"wrong shapes: {_first(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{source}: {part} does not match its config: " + "; ".join(problems))
    return model


def _read_folder_weights(folder: Path, stem: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A diffusers/transformers part's weights: `stem`.safetensors, its fp16 variant, a sharded index, or a pickle."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return load_weights(folder / name, allow_pickle=allow_pickle)[0]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        tensors = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            tensors.update(load_weights(folder / shard, allow_pickle=allow_pickle)[0])
        return tensors
    raise FileNotFoundError(f"{folder}: no weights file ({stem}.safetensors or a variant)")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (is this a diffusers SDXL folder?)")
    return read_json(path)


def _read_vae(path: Path, config: Mapping, allow_pickle: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """A replacement VAE: a diffusers `vae/` folder, or one file with diffusers or LDM names (prefixed or not)."""
    if path.is_dir():
        return _read_config(path), _read_folder_weights(path, WEIGHTS_NAME["vae"], allow_pickle)
    tensors, _ = load_weights(path, allow_pickle=allow_pickle)
    if any(k.startswith(convert.VAE_PREFIX) for k in tensors):  # a VAE cut out of a single file
        tensors = {k.removeprefix(convert.VAE_PREFIX): v for k, v in tensors.items()
                   if k.startswith(convert.VAE_PREFIX)}
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in tensors):
        try:
            tensors = convert.vae_to_diffusers(tensors, config)  # LDM names
        except KeyError as e:
            raise CheckpointError(f"{path}: not a VAE of this model ({e.args[0]})") from None
    return dict(config), tensors


RANDOM = "random:"  # `load_sdxl("random:tiny")`: a model of a preset's sizes with random weights, no file needed


def random_sdxl(preset: str = "tiny", seed: int = 0) -> SDXL:
    """An SDXL with random weights at a preset's sizes: "tiny" (SDXL's structure at toy widths, for tests, smoke runs
    and trying every tool in seconds) or "sdxl-base" (the full size)."""
    configs = get_config(preset)
    torch.manual_seed(seed)
    models = {part: build_model(part, configs[part]) for part in PARTS}
    tokenizer, tokenizer_2 = sdxl_tokenizers()
    return SDXL(**models, tokenizer=tokenizer, tokenizer_2=tokenizer_2, configs=configs)


def load_sdxl(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              vae: str | os.PathLike | None = None, allow_pickle: bool = False,
              configs: str | Mapping[str, Mapping] = "sdxl-base", vae_dtype: torch.dtype = torch.float32) -> SDXL:
    """Load SDXL from a diffusers folder or a single-file checkpoint.

    dtype/device: where the UNet and text encoders go; the VAE gets `vae_dtype` (fp32: SDXL's VAE overflows in fp16).
    vae: a replacement VAE (file or folder), e.g. the fp16-fix VAE.
    allow_pickle: accept .ckpt/.bin pickles (loaded with weights_only=True); refused otherwise.
    configs: for a single file, which has none inside: a preset name of `configs.py` or a dict of config dicts.
    Tokenizers come from the folder's tokenizer/ and tokenizer_2/, or the bundled CLIP vocabulary.
    path "random:<preset>" builds `random_sdxl(preset)` instead (a `vae` file then replaces its VAE too).
    """
    if str(path).startswith(RANDOM):
        try:
            sdxl = random_sdxl(str(path).removeprefix(RANDOM))
        except KeyError as e:
            raise ValueError(f"{path}: {e.args[0]}") from None
        if vae is not None:
            config, state = _read_vae(Path(vae), sdxl.configs["vae"], allow_pickle)
            sdxl.vae = assemble("vae", config, state, vae_dtype, device, str(vae))
        for part, model in sdxl.models().items():
            model.to(device, vae_dtype if part == "vae" else dtype)
        return sdxl
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such SDXL checkpoint: {path}")
    if path.is_dir():
        configs = read_diffusers_configs(path)
        states = {part: _read_folder_weights(path / part, WEIGHTS_NAME[part], allow_pickle) for part in PARTS}
        tokenizers = sdxl_tokenizers(path if (path / "tokenizer").is_dir() else None)
    else:
        configs = get_config(configs) if isinstance(configs, str) else {k: dict(v) for k, v in configs.items()}
        tensors, _ = load_weights(path, allow_pickle=allow_pickle)
        kind = convert.detect_model(tensors)
        if kind != "sdxl":
            raise CheckpointError(f"{path}: only SDXL is supported; this file looks like {convert.MODEL_NAMES[kind]}")
        try:
            states = convert.to_diffusers(tensors, configs["unet"], configs["vae"])
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
        del tensors
        tokenizers = sdxl_tokenizers()
    if vae is not None:
        configs["vae"], states["vae"] = _read_vae(Path(vae), configs["vae"], allow_pickle)
    models = {}
    for part in PARTS:
        source = str(vae) if part == "vae" and vae is not None else str(path)
        models[part] = assemble(part, configs[part], states.pop(part), vae_dtype if part == "vae" else dtype,
                                device, source)
    return SDXL(**models, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], configs=configs)
