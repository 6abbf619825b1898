"""LoRA files: kohya (written by default), diffusers/peft, and diffusers' older `lora.down/lora.up` form.

Inside minigen a LoRA is {component: {module path: LoRATensors}}, components "unet", "te1", "te2", module paths in
diffusers/transformers names (minigen's SDXL modules share them).

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
- older diffusers: `...attn1.processor.to_q_lora.down.weight`, `...to_q.lora.down.weight`, `...lora_linear_layer.down`.
Underscored kohya names are resolved by looking them up among the model's own module paths, never by guessing
where the dots were; a name or shape that fits no module is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..io import CheckpointError, first_non_finite, load_weights, save_safetensors
from ..lora import LoRATensors, add_lora_weights
from .convert import NameMap, unet_name_map
from .detect import FAMILY_NAMES

COMPONENTS = ("unet", "te1", "te2")
KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}  # SDXL's
ONE_ENCODER_PREFIX = "lora_te_"  # sd-scripts' prefix for the one text encoder of SD 1.x/2.x
KOHYA_READ_PREFIX = {**{p: c for c, p in KOHYA_PREFIX.items()}, ONE_ENCODER_PREFIX: "te1"}
DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
LoRA = dict[str, dict[str, LoRATensors]]  # {component: {module path: LoRATensors}}


# What the diffusers/peft layout costs (measured by loading such files in each program): say it where it is written.
DIFFUSERS_FORMAT_NOTE = ("a diffusers/peft-layout LoRA: diffusers and peft read it fully, but ComfyUI drops its UNet "
                         "layers, A1111 applies nothing, Forge, InvokeAI and sd-scripts refuse it; the kohya layout "
                         "(the default) loads the same in all of them")


class LoRAFileError(CheckpointError):
    """A LoRA file that does not fit the model: unknown module names, wrong shapes, or an unknown layout."""


def _te_path(path: str) -> str:
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
                path = _te_path(path)
            elif family.startswith("sdxl"):
                path = unet_names.to_single_file(path)  # KeyError names a path the map lacks
            out |= kohya_layer(kohya_prefix(component, family), path, t.up, t.down, t.alpha)
    return out


def kohya_prefix(component: str, family: str) -> str:
    """sd-scripts' name prefix of a component's layers: SD 1.x/2.x's one text encoder is `lora_te_`."""
    return ONE_ENCODER_PREFIX if component == "te1" and family in ("sd1", "sd2") else KOHYA_PREFIX[component]


def kohya_layer(prefix: str, path: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """One layer's kohya keys: `<prefix><path with dots as underscores>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`. prefix: `lora_unet_`, `lora_te_`, `lora_te1_`, ... (KOHYA_PREFIX)."""
    name = prefix + path.replace(".", "_")
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(alpha))}


def diffusers_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    """diffusers/peft keys: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`."""
    out = {}
    for component, modules in lora.items():
        for path, t in modules.items():
            name = DIFFUSERS_PREFIX[component] + (path if component == "unet" else _te_path(path))
            out[f"{name}.lora_A.weight"] = t.down
            # Patch: peft files carry no alpha (scale 1); baking alpha/rank into B keeps W + scale * B A in any reader.
            out[f"{name}.lora_B.weight"] = t.up.float() * (t.alpha / t.rank)
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


# ----------------------------------------------------------------------------------------------------------- reading

# Older diffusers names -> (module path, "down"|"up"), tried in order on the key with its component prefix removed.
_OLD_FORMS = [
    (re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^(.*)\.processor\.to_out_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.to_out.0"),
    # text encoders in the attn-procs era: self_attn.to_q_lora means self_attn.q_proj
    (re.compile(r"^(.*self_attn)\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.{m[2][3]}_proj"),
    (re.compile(r"^(.*self_attn)\.to_out_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.out_proj"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), lambda m: m[1]),
    (re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$"), lambda m: m[1]),
]


def _parse_diffusers_key(key: str) -> tuple[str, str] | None:
    for pattern, module in _OLD_FORMS:
        m = pattern.match(key)
        if m:
            role = m.groups()[-1]
            return module(m), {"A": "down", "B": "up"}.get(role, role)
    return None


def read_lora(path: str | os.PathLike, allow_pickle: bool = False
              ) -> tuple[dict[str, dict[str, dict]], str, dict[str, str]]:
    """Parse a LoRA file into ({component: {name in the file: {"down", "up", "alpha"}}}, format, metadata).
    Names are kohya's underscored names or dotted diffusers paths; `resolve_lora` matches them to a model.
    A pickled file (.pt, .bin) only with `allow_pickle` (loaded with weights_only=True). NaN or infinite values
    are refused: they would turn every image black."""
    tensors, metadata = load_weights(path, allow_pickle=allow_pickle)
    if not tensors:
        raise LoRAFileError(f"{path}: no tensors")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise LoRAFileError(f"{path}: tensor {bad} holds NaN or infinite values")
    kohya = all(k.startswith(tuple(KOHYA_READ_PREFIX)) for k in tensors)
    parsed: dict[str, dict[str, dict]] = {}
    unknown = []
    for key, value in tensors.items():
        if kohya:
            name, _, part = key.partition(".")
            prefix = next(p for p in KOHYA_READ_PREFIX if name.startswith(p))
            component, name = KOHYA_READ_PREFIX[prefix], name.removeprefix(prefix)
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        else:
            component = next((c for c, p in sorted(DIFFUSERS_PREFIX.items(), key=lambda cp: -len(cp[1]))
                              if key.startswith(p)), None)
            rest = key[len(DIFFUSERS_PREFIX[component]):] if component else key
            if rest.endswith(".alpha"):
                name, role = rest.removesuffix(".alpha"), "alpha"
            else:
                name, role = _parse_diffusers_key(rest) or (rest, None)
            component = component or "unet"  # unet-only files from `save_attn_procs` have no prefix
        if role is None:
            unknown.append(key)
            continue
        parsed.setdefault(component, {}).setdefault(name, {})[role] = value
    if unknown:
        raise LoRAFileError(f"{path}: {len(unknown)} keys are not LoRA weights of a known layout, "
                            f"e.g. {unknown[:3]}")
    fmt = "kohya" if kohya else "diffusers"
    for component, entries in parsed.items():
        for name, e in entries.items():
            _check_layer(e, path, f"{component} module {name!r}")
    if kohya:  # sd-scripts' rule for a file without .alpha: alpha = rank
        for entries in parsed.values():
            for e in entries.values():
                e.setdefault("alpha", e["down"].shape[0])
    else:
        _apply_peft_alphas(parsed, metadata)
    return parsed, fmt, metadata


def _check_layer(e: dict, path: str | os.PathLike, layer: str) -> None:
    """What applying a layer needs: both factors, of one rank, (out, rank) and (rank, in, ...); one alpha."""
    if "down" not in e or "up" not in e:
        raise LoRAFileError(f"{path}: {layer} lacks its {'up' if 'down' in e else 'down'} weight")
    up, down = e["up"], e["down"]
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
        raise LoRAFileError(f"{path}: {layer} has up {tuple(up.shape)} and down {tuple(down.shape)}: they must be "
                            "(out, rank) and (rank, in) of one rank")
    if "alpha" in e and torch.as_tensor(e["alpha"]).numel() != 1:
        raise LoRAFileError(f"{path}: {layer} has {torch.as_tensor(e['alpha']).numel()} alphas, not one")


def _apply_peft_alphas(parsed: dict[str, dict[str, dict]], metadata: Mapping[str, str]) -> None:
    """diffusers >= 0.33 writes peft's LoraConfig per component in `lora_adapter_metadata` (`unet.lora_alpha`,
    `unet.alpha_pattern`, ...). Without it and without `.alpha` keys, peft's rule holds: alpha = rank."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    for component, entries in parsed.items():
        prefix = DIFFUSERS_PREFIX[component]
        default_alpha = config.get(prefix + "lora_alpha")
        pattern = config.get(prefix + "alpha_pattern") or {}
        for name, e in entries.items():
            if "alpha" in e:
                continue
            alpha = next((a for p, a in pattern.items() if name == p or name.endswith("." + p)), default_alpha)
            e["alpha"] = alpha if alpha is not None else e["down"].shape[0]


def _module_lookup(model: nn.Module, component: str, unet_names: NameMap | None) -> dict[str, str]:
    """Every name a file may use for a layer of `model` -> the layer's module path."""
    lookup = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or ".adapters." in path:
            continue
        path = path.removesuffix(".base")  # a layer already wrapped by a LoRALayer
        names = [path]
        if component == "unet" and unet_names:
            try:
                names.append(unet_names.to_single_file(path))
            except KeyError:  # a module outside the mapped blocks (none that LoRA targets)
                pass
        if component != "unet":  # with and without `text_model.` (transformers 5's CLIPTextModel has none)
            names += [_te_path(path), path.removeprefix("text_model.")]
        for n in names:
            lookup[n] = lookup[n.replace(".", "_")] = path
    return lookup


def resolve_lora(parsed: dict[str, dict[str, dict]], models: Mapping[str, nn.Module],
                 unet_names: NameMap | None = None, source: str = "LoRA file") -> LoRA:
    """Match the parsed file's names to the models' module paths and check every shape; errors name the mismatch.
    unet_names: the UNet's diffusers <-> SGM name map (default: built from `models["unet"].config`)."""
    lora: LoRA = {}
    for component, entries in parsed.items():
        if component not in models:
            raise LoRAFileError(f"{source} has {len(entries)} {component} layers, but no {component} model was "
                                f"given (got {sorted(models)})")
        model = models[component]
        if component == "unet" and unet_names is None and hasattr(model, "config"):
            unet_names = unet_name_map(dict(model.config))
        lookup = _module_lookup(model, component, unet_names)
        missing = [n for n in entries if n not in lookup]
        if missing:
            raise LoRAFileError(
                f"{source}: {len(missing)} of {len(entries)} {component} layers match no module of this model, "
                f"e.g. {missing[:3]} (a LoRA for another model?)")
        lora[component] = {}
        for name, e in entries.items():
            path = lookup[name]
            layer = model.get_submodule(path)
            layer = getattr(layer, "base", layer)
            w = layer.weight  # (out, in[, 1, 1])
            down, up = e["down"], e["up"]
            if down.dim() > 2 and tuple(down.shape[2:]) != (1, 1) or tuple(w.shape[2:]) not in ((), (1, 1)):
                raise LoRAFileError(f"{source}: {component} layer {path} is a {tuple(w.shape[2:])} convolution and "
                                    f"the file's down is {tuple(down.shape)}: LoRA on k x k convolutions (LoCon, "
                                    f"LyCORIS) is not supported, only Linear and 1x1 layers")
            if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0] or up.shape[1] != down.shape[0]:
                raise LoRAFileError(
                    f"{source}: {component} layer {path} has weight {tuple(w.shape)}, but the file's down is "
                    f"{tuple(down.shape)} and up {tuple(up.shape)} (a LoRA for another model?)")
            lora[component][path] = LoRATensors(down.float(), up.float(), float(e["alpha"]))
    return lora


# What says which model family a LoRA was made for, most explicit first.
# sd-scripts' ss_base_model_version prefix -> family (`sd_v2_v`: SD 2 predicting v)
VERSION_FAMILIES = {"sdxl": "sdxl", "sd_v1": "sd1", "sd_v2": "sd2"}
# SAI modelspec.architecture prefix -> family, most specific first
ARCHITECTURE_FAMILIES = {"stable-diffusion-xl-v1-refiner": "sdxl-refiner", "stable-diffusion-xl": "sdxl",
                         "stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2"}
# the text width the UNet's cross-attention takes (attn2.to_k's input) in each family's released models
CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


def family_of_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file's metadata names (sd-scripts' or SAI's key), or None."""
    return _metadata_family(metadata)[0]


def _metadata_family(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    for key, families in (("ss_base_model_version", VERSION_FAMILIES), ("modelspec.architecture", ARCHITECTURE_FAMILIES)):
        value = metadata.get(key, "")
        family = next((f for prefix, f in families.items() if value.startswith(prefix)), None)
        if family:
            return family, f"its metadata has {key} {value}"
    return None, ""


def lora_family(parsed: Mapping[str, Mapping[str, dict]], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(family, what says so) of the model a parsed LoRA file (`read_lora`) was made for; (None, "") when nothing
    does. Read from its metadata, else its layers: a second text encoder's means SDXL, and a cross-attention layer's
    input width that of a released family (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    family, evidence = _metadata_family(metadata)
    if family:
        return family, evidence
    if "te2" in parsed:  # (a LoRA may train the second encoder alone: no sign of the refiner)
        return "sdxl", f"its layers include SDXL's second text encoder's, e.g. {next(iter(parsed['te2']))}"
    for name, e in parsed.get("unet", {}).items():
        width = e["down"].shape[1]  # (rank, in)
        if name.replace(".", "_").endswith("attn2_to_k") and width in CROSS_ATTENTION_WIDTHS:
            return CROSS_ATTENTION_WIDTHS[width], f"its cross-attention layer {name} takes {width}-wide text"
    return None, ""


def check_lora_family(parsed: Mapping[str, Mapping[str, dict]], metadata: Mapping[str, str], family: str,
                      source: str) -> None:
    """Refuse (LoRAFileError naming both) a LoRA that says it was made for another family than the model's.
    A family minigen does not know (a diffusers folder, "unknown") is not checked. SDXL base and refiner count as
    one here: what tells them apart is shapes, which `resolve_lora` checks layer by layer."""
    theirs, evidence = lora_family(parsed, metadata)
    if theirs and family in FAMILY_NAMES and theirs.split("-")[0] != family.split("-")[0]:
        raise LoRAFileError(f"{source} is a LoRA for {FAMILY_NAMES[theirs]} ({evidence}), the model is "
                            f"{FAMILY_NAMES[family]}")


def load_lora(path: str | os.PathLike, models: Mapping[str, nn.Module], name: str = "default",
              multiplier: float = 1.0, unet_names: NameMap | None = None, allow_pickle: bool = False,
              family: str | None = None) -> dict[str, str]:
    """Read a LoRA file of any supported layout and add it to `models` ({"unet", "te1", "te2"}: module) as the
    adapter `name` with `multiplier`. Returns the file's metadata. allow_pickle: see read_lora.
    family: the model's; a LoRA made for another is refused first (check_lora_family)."""
    parsed, _, metadata = read_lora(path, allow_pickle)
    if family is not None:
        check_lora_family(parsed, metadata, family, str(path))
    lora = resolve_lora(parsed, models, unet_names, source=str(path))
    for component, weights in lora.items():
        add_lora_weights(models[component], weights, name, multiplier)
    return metadata


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
