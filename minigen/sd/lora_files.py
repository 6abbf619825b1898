"""Writing LoRA files: kohya (the default) and diffusers/peft; names, metadata and `--lora path:multiplier`.
(Reading every LoRA-family format is `lora_reading`'s.)

Inside minigen a trained LoRA is {component: {module path: LoRATensors}}, components "unet", "te1", "te2", module
paths in diffusers/transformers names (minigen's SDXL modules share them).

- kohya (sd-scripts; what A1111, ComfyUI, Forge and diffusers all load): `lora_unet_<module path, dots as _>` and
  the text encoders' transformers paths, each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`. sd-scripts
  names layers by the module paths of the UNet it trains, which differs by family:
  SDXL: its own SGM UNet, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` (made with
  `minigen.sd.convert`'s UNet name map), encoders `lora_te1_text_model_...` and `lora_te2_...`;
  SD 1.x/2.x: the diffusers UNet, `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, and the one
  encoder `lora_te_text_model_encoder_layers_0_self_attn_q_proj`.
  Reading accepts SGM or diffusers block names and `lora_te_` or `lora_te1_` for any family.
- diffusers/peft: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`. peft stores
  no alpha: W' = W + B A, alpha == rank. minigen bakes scale = alpha/rank into lora_B when writing, so every reader
  (with or without diffusers' `lora_adapter_metadata`) gets the same weights; it reads that metadata when present.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from ..io import CheckpointError, save_safetensors
from ..lora.layers import LoRATensors
from .convert import NameMap, unet_name_map

COMPONENTS = ("unet", "te1", "te2")
KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}  # SDXL's
ONE_ENCODER_PREFIX = "lora_te_"  # sd-scripts' prefix for the one text encoder of SD 1.x/2.x
DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
LoRA = dict[str, dict[str, LoRATensors]]  # {component: {module path: LoRATensors}}


# What the diffusers/peft layout costs (measured by loading such files in each program): say it where it is written.
DIFFUSERS_FORMAT_NOTE = ("a diffusers/peft-layout LoRA: diffusers and peft read it fully, but ComfyUI drops its UNet "
                         "layers, A1111 applies nothing, Forge, InvokeAI and sd-scripts refuse it; the kohya layout "
                         "(the default) loads the same in all of them")


class LoRAFileError(CheckpointError):
    """A LoRA file that does not fit the model: unknown module names, wrong shapes, or an unknown layout."""


def te_path(path: str) -> str:
    """Text-encoder paths with the `text_model.` prefix real SDXL files carry (transformers 5's CLIPTextModel drops it)."""
    return path if path.startswith("text_model.") else "text_model." + path


# ----------------------------------------------------------------------------------------------------------- writing

def save_lora(path: str | os.PathLike, lora: LoRA, format: str = "kohya", metadata: Mapping[str, str] | None = None,
              unet_names: NameMap | None = None, dtype: torch.dtype | None = None, family: str = "sdxl") -> None:
    """Write `lora` ({component: {module path: LoRATensors}}) as a kohya or diffusers file (atomic).

    family: the model's ("sd1", "sd2", "sdxl", "sdxl-refiner"), which decides kohya's names (see the module's doc).
    unet_names: the UNet's diffusers <-> SGM name map, for SDXL's kohya UNet names (default: SDXL base's).
    dtype: the tensors' dtype in the file (default: as they are, fp32 from training)."""
    unknown = set(lora) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown LoRA components {sorted(unknown)}; expected some of {COMPONENTS}")
    metadata = dict(metadata or {})
    if format == "kohya":
        tensors = kohya_state_dict(lora, unet_names or unet_name_map(), family)
    elif format == "diffusers":
        tensors = diffusers_state_dict(lora)
        warnings.warn(f"{path}: {DIFFUSERS_FORMAT_NOTE}", stacklevel=2)
        metadata["minigen.format_note"] = DIFFUSERS_FORMAT_NOTE
    else:
        raise ValueError(f"unknown LoRA file format {format!r}: use 'kohya' or 'diffusers'")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


def kohya_state_dict(lora: LoRA, unet_names: NameMap, family: str = "sdxl") -> dict[str, torch.Tensor]:
    """kohya keys as sd-scripts writes them for `family`: SDXL `lora_unet_<SGM path>` / `lora_te1_text_model_...`,
    SD 1.x/2.x `lora_unet_<diffusers path>` / `lora_te_text_model_...`; each with `.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (a 0-d tensor, as sd-scripts stores it)."""
    out = {}
    for component, modules in lora.items():
        for path, t in modules.items():
            if component != "unet":
                path = te_path(path)
            elif family.startswith("sdxl"):
                path = unet_names.to_single_file(path)  # KeyError names a path the map lacks
            out |= kohya_layer(kohya_prefix(component, family), path, t.up, t.down, t.alpha, t.magnitude)
    return out


def kohya_prefix(component: str, family: str) -> str:
    """sd-scripts' name prefix of a component's layers: SD 1.x/2.x's one text encoder is `lora_te_`."""
    return ONE_ENCODER_PREFIX if component == "te1" and family in ("sd1", "sd2") else KOHYA_PREFIX[component]


def kohya_layer(prefix: str, path: str, up: torch.Tensor, down: torch.Tensor, alpha: float,
                magnitude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's kohya keys: `<prefix><path with dots as underscores>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`, and DoRA's magnitude as LyCORIS writes it, `.dora_scale` (out, 1[, 1, 1]), what ComfyUI and A1111
    read. prefix: `lora_unet_`, `lora_te_`, `lora_te1_`, ... (KOHYA_PREFIX)."""
    name = prefix + path.replace(".", "_")
    layer = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
             f"{name}.alpha": torch.tensor(float(alpha))}
    if magnitude is not None:
        layer[f"{name}.dora_scale"] = magnitude.reshape(-1, *[1] * (down.dim() - 1))
    return layer


def diffusers_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    """diffusers/peft keys: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`."""
    out = {}
    for component, modules in lora.items():
        for path, t in modules.items():
            name = DIFFUSERS_PREFIX[component] + (path if component == "unet" else te_path(path))
            out[f"{name}.lora_A.weight"] = t.down
            # Patch: peft files carry no alpha (scale 1); baking alpha/rank into B keeps W + scale * B A in any reader.
            out[f"{name}.lora_B.weight"] = t.up.float() * (t.alpha / t.rank)
            if t.magnitude is not None:  # peft's shapes: (out,) on a Linear, (1, out, 1, 1) on a convolution
                shape = (-1,) if t.down.dim() == 2 else (1, -1, 1, 1)
                out[f"{name}.lora_magnitude_vector"] = t.magnitude.reshape(shape)
    return out


# model family -> (sd-scripts' ss_base_model_version, SAI modelspec.architecture without "/lora"), from sd-scripts'
# library/model_util.py (get_model_version_str_for_sd1_sd2) and library/sai_model_spec.py (build_metadata)
KOHYA_MODEL_VERSIONS = {"sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
                        "sd2": ("sd_v2", "stable-diffusion-v2-512"), "sd1": ("sd_v1", "stable-diffusion-v1")}
SD2_768_V = "stable-diffusion-v2-768-v"  # SD 2's architecture when it predicts v
# sd-scripts writes SD 1/2 LoRAs as on diffusers modules, SDXL's as on SGM ones (sai_model_spec.build_metadata)
IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers"}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def model_version(family: str, v_prediction: bool = False) -> tuple[str, str]:
    """(ss_base_model_version, modelspec.architecture) of a LoRA for `family`: sd-scripts appends "_v" to an SD 1/2
    version that predicts v (`sd_v2_v`) and names SD 2 768-v's architecture apart."""
    version, architecture = KOHYA_MODEL_VERSIONS.get(family, KOHYA_MODEL_VERSIONS["sdxl"])
    if v_prediction and family in ("sd1", "sd2"):
        version += "_v"
        architecture = SD2_768_V if family == "sd2" else architecture
    return version, architecture + "/lora"


def kohya_metadata(*, base_model: str = "", rank: int, alpha: float, resolution: tuple[int, int] = (1024, 1024),
                   trigger_phrase: str = "", steps: int = 0, epoch: int = 0, title: str = "LoRA",
                   date: str = "", model: str = "sdxl", prediction: str = "epsilon", clip_skip: int = 1,
                   extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes (A1111 and kohya's GUI show them) and the SAI `modelspec.*` keys (1.0.1).
    model: the family the LoRA is for (a key of KOHYA_MODEL_VERSIONS). prediction: "epsilon" or "v_prediction".
    clip_skip: A1111's count the captions were encoded with (1: none), sd-scripts' `ss_clip_skip`."""
    w, h = resolution
    v = prediction == "v_prediction"
    version, architecture = model_version(model, v)
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": version, "ss_sd_model_name": base_model, "ss_resolution": f"({w}, {h})",
        "ss_steps": str(steps), "ss_epoch": str(epoch), "ss_output_name": title,
        "ss_v2": str(model == "sd2"), "ss_v_parameterization": str(v),
        # sd-scripts writes its --clip_skip as given: None when not given
        "ss_clip_skip": str(clip_skip) if clip_skip > 1 else "None",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATION.get(model, SGM_IMPLEMENTATION),
        "modelspec.title": title, "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if clip_skip > 1:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    if date:
        meta["modelspec.date"] = date
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`path[:multiplier]` as `sample.py --lora a.safetensors:0.8` takes it; no multiplier means 1.

    Only a trailing `:<number>` is a multiplier, so `C:\\x.safetensors` or `C:/x.safetensors` stay paths; a tail that
    is neither a number nor a path (`a.safetensors:abc`) or a non-finite multiplier is a ValueError."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or Path(spec).exists():
        return spec, 1.0
    try:
        multiplier = float(tail)
    except ValueError:
        if any(c in tail for c in "/\\."):  # a colon that is part of the path
            return spec, 1.0
        raise ValueError(f"{spec}: the multiplier after ':' must be a number, got {tail!r}") from None
    if not math.isfinite(multiplier):
        raise ValueError(f"{spec}: the multiplier must be a finite number, got {tail}")
    return path, multiplier
