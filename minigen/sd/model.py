"""Load and save a whole Stable Diffusion model (SD 1.x, SD 2.x, SDXL): a diffusers folder or a single-file
checkpoint, in and out. The architecture is read from the weights (`detect.py`), so no config is needed.

    model = load_model("sd_xl_base_1.0.safetensors", dtype=torch.bfloat16, device="cuda")
    model = load_model("v1-5-pruned-emaonly.safetensors")                       # SD 1.x, found from its tensors
    model = load_model("stable-diffusion-xl-base-1.0/", vae="sdxl-vae-fp16-fix.safetensors")
    model.save_single_file("out.safetensors"); model.save_diffusers("out/")

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
from .clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, normalize_clip_keys
from .configs import PRESETS, get_config
from .checkpoint_keys import FAMILY_PREFIXES
from .detect import CONFIGS_METADATA, PREDICTIONS, Architecture, base_preset, detect, family_of_configs, layout_name
from .tokenizer import CLIPTokenizer, model_tokenizers
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # every part a family may have, in a fixed order
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}


def model_index(family: str) -> dict:
    """What diffusers needs to read a saved folder as the family's pipeline."""
    pipeline = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                "sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}[family]
    index = {"_class_name": pipeline, "_diffusers_version": "0.19.0.dev0",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for part, tokenizer, cls in (("text_encoder", "tokenizer", "CLIPTextModel"),
                                 ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")):
        present = part in FAMILY_PREFIXES[family]
        index[part] = ["transformers", cls] if present else [None, None]
        index[tokenizer] = ["transformers", "CLIPTokenizer"] if present else [None, None]
    if family.startswith("sdxl"):
        index["force_zeros_for_empty_prompt"] = family == "sdxl"
    if family == "sdxl-refiner":  # its UNet takes an aesthetic score where the base takes the target size
        index["requires_aesthetics_score"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def build_model(part: str, config: Mapping) -> nn.Module:
    """A part from its config.json dict, with default-initialised weights (use `torch.device("meta")` to allocate
    nothing)."""
    if part == "unet":
        return UNet2DConditionModel(config)
    if part == "vae":
        return AutoencoderKL(config)
    text_class = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    return text_class(CLIPTextConfig.from_dict(config))


@dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion model, and the config.json dicts they were built from (`configs["scheduler"]`
    is the noise schedule the model was trained with). family: "sd1", "sd2", "sdxl" or "sdxl-refiner"; a part the
    family lacks is None (SD 1.x/2.x have one text encoder, the refiner only `text_encoder_2`)."""

    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None
    configs: dict[str, dict]

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.family, self.configs, layout_name(self.family, self.configs["unet"]))

    def describe(self) -> str:
        """One line naming what was loaded: `SD 1.x UNet, 859.5M params, eps`."""
        return self.architecture.describe(sum(p.numel() for p in self.unet.parameters()))

    def models(self) -> dict[str, nn.Module]:
        return {part: getattr(self, part) for part in PARTS if getattr(self, part) is not None}

    def lora_components(self) -> dict[str, nn.Module]:
        """The parts a LoRA file can change, by the component names of minigen.sd.lora_files."""
        components = {"unet": self.unet, "te1": self.text_encoder, "te2": self.text_encoder_2}
        return {name: model for name, model in components.items() if model is not None}

    def save_diffusers(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers folder (what diffusers' `from_pretrained` and `load_model` read)."""
        folder = Path(folder)
        save_diffusers_files(folder, self.configs, self.family, self.tokenizers())
        for part, model in self.models().items():
            _save_tensors(model.state_dict(), None, folder / part / f"{WEIGHTS_NAME[part]}.safetensors", dtype)

    def tokenizers(self) -> dict[str, CLIPTokenizer]:
        return {name: t for name, t in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)) if t}

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write one safetensors file in the family's layout (`sd_xl_base_1.0.safetensors`,
        `v1-5-pruned-emaonly.safetensors`: A1111, ComfyUI, diffusers' `from_single_file`). `dtype` casts every
        floating-point tensor; by default each keeps its own. The configs go into the metadata (`minigen.configs`),
        so layouts the tensor shapes alone do not settle load back exactly."""
        _save_tensors(*self.single_file_tensors(), path, dtype)

    def single_file_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors under the family's single-file names, and the metadata that carries the configs."""
        states = {part: model.state_dict() for part, model in self.models().items()}
        return (convert.to_single_file(states, self.configs, self.family),
                {CONFIGS_METADATA: json.dumps(self.configs, sort_keys=True)})


def save_diffusers_files(folder: Path, configs: Mapping[str, Mapping], family: str,
                         tokenizers: Mapping[str, CLIPTokenizer]) -> None:
    """Everything of a diffusers folder but the weights: each part's config.json, the scheduler's config, the
    tokenizer folders and model_index.json."""
    for part in PARTS:
        if part in configs:
            _write_json(folder / part / "config.json", configs[part])
    for name, tokenizer in tokenizers.items():
        tokenizer.save(folder / name)
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    _write_json(folder / "model_index.json", model_index(family))


def read_model_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json ({} when it has none); one of another pipeline is refused, naming it."""
    if not (folder / "model_index.json").is_file():
        return {}
    index = read_json(folder / "model_index.json")
    if "unet" not in index or not {"text_encoder", "text_encoder_2"} & index.keys():
        raise ValueError(f"{folder} is a diffusers folder of {index.get('_class_name', 'another model')}, "
                         "not Stable Diffusion (it has no unet or no text encoder)")
    return index


def read_diffusers_configs(folder: Path) -> dict[str, dict]:
    """The config dicts of a diffusers folder's parts (those it has) and its scheduler's (the family's default if it
    has none)."""
    read_model_index(folder)
    configs = {part: _read_config(folder / part) for part in PARTS if (folder / part).is_dir()}
    for part in ("unet", "vae"):
        if part not in configs:
            raise FileNotFoundError(f"{folder}: no {part}/ folder (is this a diffusers Stable Diffusion folder?)")
    if not any(part in configs for part in ("text_encoder", "text_encoder_2")):
        raise FileNotFoundError(f"{folder}: no text_encoder/ folder (is this a diffusers Stable Diffusion folder?)")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = read_json(scheduler) if scheduler.is_file() \
        else get_config(base_preset(family_of_configs(configs)), "scheduler")
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


def _save_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                  path: str | os.PathLike, dtype: torch.dtype | None) -> None:
    """Stream `tensors` to a safetensors file, casting floating-point ones to `dtype` one at a time."""
    def target(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype
    specs = {name: (tuple(t.shape), target(t)) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, {"format": "pt", **(metadata or {})}) as writer:
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
        state_dict = normalize_clip_keys(state_dict)
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
        raise FileNotFoundError(f"{folder}: no config.json (is this a diffusers Stable Diffusion folder?)")
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


RANDOM = "random:"  # `load_model("random:tiny")`: a model of a preset's sizes with random weights, no file needed


def parse_random(spec: str) -> tuple[str, int]:
    """"random:<preset>[@seed]" -> (preset, seed): `random:tiny` and `random:tiny@1` are two different models (seed
    0 and 1), so two of them can be merged. A preset or seed that does not exist is a ValueError naming the spec."""
    preset, _, seed = str(spec).removeprefix(RANDOM).partition("@")
    if preset not in PRESETS:
        raise ValueError(f"{spec}: no preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if seed and not seed.isdigit():
        raise ValueError(f"{spec}: the seed after @ must be a whole number >= 0, got {seed!r}")
    return preset, int(seed or 0)


def random_model(preset: str = "tiny", seed: int = 0) -> StableDiffusion:
    """A model with random weights at a preset's sizes (`configs.PRESETS`): "tiny", "tiny-refiner", "tiny-sd1",
    "tiny-sd2" (each family's structure at toy widths, for tests, smoke runs and trying every tool in seconds) or a
    full size ("sdxl-base", "sd15", "sd21")."""
    configs = get_config(preset)
    family = family_of_configs(configs)
    torch.manual_seed(seed)
    models = {part: build_model(part, configs[part]) if part in configs else None for part in PARTS}
    tokenizers = model_tokenizers(family)
    return StableDiffusion(family, **models, tokenizer=tokenizers.get("tokenizer"),
                           tokenizer_2=tokenizers.get("tokenizer_2"), configs=configs)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               vae: str | os.PathLike | None = None, allow_pickle: bool = False, prediction: str | None = None,
               vae_dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load SD 1.x, SD 2.x or SDXL from a diffusers folder or a single-file checkpoint.

    dtype/device: where the UNet and text encoders go; the VAE gets `vae_dtype` (fp32: SD's VAEs overflow in fp16).
    vae: a replacement VAE (file or folder), e.g. the fp16-fix VAE.
    allow_pickle: accept .ckpt/.bin pickles (loaded with weights_only=True); refused otherwise.
    prediction: "epsilon" or "v_prediction", for a file that does not say (SD 2.x 768-v); overrides the file.
    A single file's architecture is read from its tensors (`detect.detect`); a folder's from its configs.
    Tokenizers come from the folder's tokenizer/ and tokenizer_2/, or the bundled CLIP vocabulary.
    path "random:<preset>[@seed]" builds `random_model(preset, seed)` instead (a `vae` file then replaces its VAE too).
    """
    if str(path).startswith(RANDOM):
        model = random_model(*parse_random(str(path)))
        if prediction:
            model.configs["scheduler"]["prediction_type"] = PREDICTIONS[prediction]
        if vae is not None:
            config, state = _read_vae(Path(vae), model.configs["vae"], allow_pickle)
            model.vae = assemble("vae", config, state, vae_dtype, device, str(vae))
        for part, module in model.models().items():
            module.to(device, vae_dtype if part == "vae" else dtype)
        return model
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        configs = read_diffusers_configs(path)
        if prediction:
            configs["scheduler"]["prediction_type"] = PREDICTIONS[prediction]
        family = family_of_configs(configs)
        states = {part: _read_folder_weights(path / part, WEIGHTS_NAME[part], allow_pickle)
                  for part in PARTS if part in configs}
        tokenizers = model_tokenizers(family, path)
    else:
        tensors, metadata = load_weights(path, allow_pickle=allow_pickle)
        try:
            arch = detect({k: tuple(t.shape) for k, t in tensors.items()}, metadata or {}, str(path), prediction)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        family, configs = arch.family, arch.configs
        try:
            states = convert.to_diffusers(tensors, configs, family)
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
        del tensors
        tokenizers = model_tokenizers(family)
    if vae is not None:
        configs["vae"], states["vae"] = _read_vae(Path(vae), configs["vae"], allow_pickle)
    models = {}
    for part in PARTS:
        if part not in states:
            models[part] = None
            continue
        source = str(vae) if part == "vae" and vae is not None else str(path)
        models[part] = assemble(part, configs[part], states.pop(part), vae_dtype if part == "vae" else dtype,
                                device, source)
    return StableDiffusion(family, **models, tokenizer=tokenizers.get("tokenizer"),
                           tokenizer_2=tokenizers.get("tokenizer_2"), configs=configs)
