"""Reading LoRA files of every LoRA-family format into one form: {component: {layer name: LayerDelta}}.

Layouts and their names (components "unet", "te1", "te2"):
- kohya / LyCORIS: `<prefix><module path, dots as _>.<part>`, prefix `lora_unet_`, `lora_te_` (SD 1.x/2.x's one
  encoder), `lora_te1_`/`lora_te2_` (SDXL), or SimpleTuner's `lycoris_` (the UNet, diffusers path); the parts are
  those of `minigen.lora.formats.KINDS` (LoRA/LoCon, LoHa, LoKr, full, GLoRA, each with an optional `dora_scale`).
  sd-scripts names SDXL's UNet layers by SGM paths (`input_blocks_4_1_...`), SD 1.x/2.x's and LyCORIS on a diffusers
  UNet by diffusers paths (`down_blocks_0_attentions_0_...`): both are read for any family.
- diffusers/peft: `unet.<path>.lora_A.weight` / `.lora_B.weight` (+ `.lora_magnitude_vector`: peft DoRA),
  `text_encoder.`, `text_encoder_2.`; alpha from `.alpha` keys or the adapter metadata diffusers writes; and
  diffusers' older `lora.down/lora.up` and attention-processor forms.
Underscored names are resolved by looking them up among the model's own module paths, never by guessing where the
dots were. Nothing is dropped silently: a key of no known part, a layer of no known format, a layer matching no
module, or a change that does not fit its module's weight is an error naming it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Mapping

from torch import nn

from ..io import first_non_finite, load_weights
from ..lora.applying import add_lora_deltas
from ..lora.formats import SUFFIXES, SUMMARY_KINDS, LayerDelta, LayerFormatError
from .convert import NameMap, unet_name_map
from .detect import FAMILY_NAMES
from .lora_files import DIFFUSERS_PREFIX, KOHYA_PREFIX, ONE_ENCODER_PREFIX, LoRAFileError, te_path

KOHYA_READ_PREFIX = {**{p: c for c, p in KOHYA_PREFIX.items()}, ONE_ENCODER_PREFIX: "te1",
                     "lycoris_": "unet"}  # SimpleTuner's LyCORIS files: the UNet's diffusers paths
Parsed = dict[str, dict[str, LayerDelta]]  # {component: {layer name as the file writes it: LayerDelta}}

# Older diffusers names -> (module path, part), tried in order on the key with its component prefix removed.
_DIFFUSERS_FORMS = [
    (re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^(.*)\.processor\.to_out_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.to_out.0"),
    # text encoders in the attn-procs era: self_attn.to_q_lora means self_attn.q_proj
    (re.compile(r"^(.*self_attn)\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.{m[2][3]}_proj"),
    (re.compile(r"^(.*self_attn)\.to_out_lora\.(down|up)\.weight$"), lambda m: f"{m[1]}.out_proj"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"), lambda m: m[1]),
    (re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$"), lambda m: m[1]),
    (re.compile(r"^(.*)\.lora_(magnitude)_vector(?:\.default)?(?:\.weight)?$"), lambda m: m[1]),
    (re.compile(r"^(.*)\.(alpha)$"), lambda m: m[1]),
]
_DIFFUSERS_PARTS = {"down": "lora_down.weight", "A": "lora_down.weight", "up": "lora_up.weight",
                    "B": "lora_up.weight", "magnitude": "magnitude", "alpha": "alpha"}


def _diffusers_key(key: str) -> tuple[str, str | None]:
    """(module path, part) of a diffusers key without its component prefix; part None when no form fits."""
    for pattern, module in _DIFFUSERS_FORMS:
        m = pattern.match(key)
        if m:
            return module(m), _DIFFUSERS_PARTS[m.groups()[-1]]
    return key, None


def read_lora(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[Parsed, str, dict[str, str]]:
    """Parse a LoRA file into ({component: {name in the file: LayerDelta}}, layout, metadata); layout "kohya"
    (kohya and LyCORIS names) or "diffusers". `resolve_lora` matches names to a model.
    A pickled file (.pt, .bin) only with `allow_pickle` (loaded with weights_only=True). NaN or infinite values
    are refused: they would turn every image black."""
    tensors, metadata = load_weights(path, allow_pickle=allow_pickle)
    if not tensors:
        raise LoRAFileError(f"{path}: no tensors")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise LoRAFileError(f"{path}: tensor {bad} holds NaN or infinite values")
    kohya = all(k.startswith(tuple(KOHYA_READ_PREFIX)) for k in tensors)
    groups: dict[str, dict[str, dict]] = {}
    unknown = []
    for key, value in tensors.items():
        if kohya:
            name, _, part = key.partition(".")
            prefix = next(p for p in KOHYA_READ_PREFIX if name.startswith(p))
            component, name = KOHYA_READ_PREFIX[prefix], name.removeprefix(prefix)
            part = part if part in SUFFIXES and part != "magnitude" else None
        else:
            component = next((c for c, p in sorted(DIFFUSERS_PREFIX.items(), key=lambda cp: -len(cp[1]))
                              if key.startswith(p)), None)
            name, part = _diffusers_key(key[len(DIFFUSERS_PREFIX[component]):] if component else key)
            component = component or "unet"  # unet-only files from `save_attn_procs` have no prefix
        if part is None:
            unknown.append(key)
            continue
        groups.setdefault(component, {}).setdefault(name, {})[part] = value
    if unknown:
        raise LoRAFileError(f"{path}: {len(unknown)} keys are not LoRA weights of a known layout, "
                            f"e.g. {unknown[:3]}")
    parsed: Parsed = {}
    for component, layers in groups.items():
        for name, parts in layers.items():
            try:
                parsed.setdefault(component, {})[name] = LayerDelta.from_tensors(parts)
            except LayerFormatError as e:
                raise LoRAFileError(f"{path}: {component} layer {name!r}: {e}") from None
    if not kohya:
        _apply_peft_alphas(parsed, metadata)
    return parsed, "kohya" if kohya else "diffusers", metadata


def _apply_peft_alphas(parsed: Parsed, metadata: Mapping[str, str]) -> None:
    """diffusers >= 0.33 writes peft's LoraConfig per component in `lora_adapter_metadata` (`unet.lora_alpha`,
    `unet.alpha_pattern`, ...). Without it and without `.alpha` keys, peft's rule holds: alpha = rank."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    for component, layers in parsed.items():
        prefix = DIFFUSERS_PREFIX[component]
        default_alpha = config.get(prefix + "lora_alpha")
        pattern = config.get(prefix + "alpha_pattern") or {}
        for name, layer in layers.items():
            if layer.alpha_tensor is not None:
                continue
            alpha = next((a for p, a in pattern.items() if name == p or name.endswith("." + p)), default_alpha)
            if alpha is not None:
                layer.set_alpha(alpha)


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
            names += [te_path(path), path.removeprefix("text_model.")]
        for n in names:
            lookup[n] = lookup[n.replace(".", "_")] = path
    return lookup


def resolve_lora(parsed: Parsed, models: Mapping[str, nn.Module], unet_names: NameMap | None = None,
                 source: str = "LoRA file") -> Parsed:
    """Match the parsed file's names to the models' module paths ({component: {module path: LayerDelta}}) and check
    that every layer's change fits its module's weight; errors name the mismatch.
    unet_names: the UNet's diffusers <-> SGM name map (default: built from `models["unet"].config`)."""
    resolved: Parsed = {}
    for component, layers in parsed.items():
        if component not in models:
            raise LoRAFileError(f"{source} has {len(layers)} {component} layers, but no {component} model was "
                                f"given (got {sorted(models)})")
        model = models[component]
        if component == "unet" and unet_names is None and hasattr(model, "config"):
            unet_names = unet_name_map(dict(model.config))
        lookup = _module_lookup(model, component, unet_names)
        missing = [n for n in layers if n not in lookup]
        if missing:
            raise LoRAFileError(
                f"{source}: {len(missing)} of {len(layers)} {component} layers match no module of this model, "
                f"e.g. {missing[:3]} (a LoRA for another model?)")
        resolved[component] = {}
        for name, layer in layers.items():
            path = lookup[name]
            module = model.get_submodule(path)
            module = getattr(module, "base", module)
            if not layer.fits(tuple(module.weight.shape)):
                raise LoRAFileError(f"{source}: {component} layer {path} has weight {tuple(module.weight.shape)}, "
                                    f"but the file's {layer.kind} layer {name} changes {layer.shape()} (a LoRA for "
                                    f"another model?)")
            if "diff_b" in layer.tensors and (module.bias is None or module.bias.shape != layer.tensors["diff_b"].shape):
                raise LoRAFileError(f"{source}: {component} layer {path}'s bias does not fit the file's diff_b "
                                    f"{tuple(layer.tensors['diff_b'].shape)}")
            resolved[component][path] = layer
    return resolved


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


def lora_family(parsed: Parsed, metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(family, what says so) of the model a parsed LoRA file (`read_lora`) was made for; (None, "") when nothing
    does. Read from its metadata, else its layers: a second text encoder's means SDXL, and a cross-attention layer's
    input width that of a released family (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    family, evidence = _metadata_family(metadata)
    if family:
        return family, evidence
    if "te2" in parsed:  # (a LoRA may train the second encoder alone: no sign of the refiner)
        return "sdxl", f"its layers include SDXL's second text encoder's, e.g. {next(iter(parsed['te2']))}"
    for name, layer in parsed.get("unet", {}).items():
        width = layer.shape()[1]  # (out, in[, ...])
        if name.replace(".", "_").endswith("attn2_to_k") and width in CROSS_ATTENTION_WIDTHS:
            return CROSS_ATTENTION_WIDTHS[width], f"its cross-attention layer {name} takes {width}-wide text"
    return None, ""


def check_lora_family(parsed: Parsed, metadata: Mapping[str, str], family: str, source: str) -> None:
    """Refuse (LoRAFileError naming both) a LoRA that says it was made for another family than the model's.
    A family minigen does not know (a diffusers folder, "unknown") is not checked. SDXL base and refiner count as
    one here: what tells them apart is shapes, which `resolve_lora` checks layer by layer."""
    theirs, evidence = lora_family(parsed, metadata)
    if theirs and family in FAMILY_NAMES and theirs.split("-")[0] != family.split("-")[0]:
        raise LoRAFileError(f"{source} is a LoRA for {FAMILY_NAMES[theirs]} ({evidence}), the model is "
                            f"{FAMILY_NAMES[family]}")


def lora_summary(parsed: Parsed, layout: str, metadata: Mapping[str, str]) -> str:
    """One line on a file: its layout, its layers by kind (DoRA: those with a magnitude, of any kind) and its
    family, e.g. `kohya layout: LoRA 140, LoCon 24, LoHa 0, LoKr 0, full 0, GLoRA 0, DoRA 24; made for SDXL`."""
    layers = [layer for layers in parsed.values() for layer in layers.values()]
    counts = Counter(layer.summary_kind for layer in layers) + Counter("DoRA" for layer in layers if layer.dora)
    family, _ = lora_family(parsed, metadata)
    made_for = f"made for {FAMILY_NAMES.get(family, family)}" if family else "family not stated"
    return f"{layout} layout: " + ", ".join(f"{k} {counts[k]}" for k in SUMMARY_KINDS) + f"; {made_for}"


def load_lora(path: str | os.PathLike, models: Mapping[str, nn.Module], name: str = "default",
              multiplier: float = 1.0, unet_names: NameMap | None = None, allow_pickle: bool = False,
              family: str | None = None, removable: bool = True) -> tuple[dict[str, str], str]:
    """Read a LoRA file of any supported format and apply it to `models` ({"unet", "te1", "te2"}: module) as the
    adapter `name` at `multiplier` (merged: `remove_lora` takes it off). Returns (the file's metadata, its one-line
    summary, `lora_summary`). allow_pickle: see read_lora.
    family: the model's; a LoRA made for another is refused first (check_lora_family).
    removable: False adds the changes into the weights for good (`add_lora_deltas`)."""
    parsed, layout, metadata = read_lora(path, allow_pickle)
    if family is not None:
        check_lora_family(parsed, metadata, family, str(path))
    resolved = resolve_lora(parsed, models, unet_names, source=str(path))
    for component, layers in resolved.items():
        add_lora_deltas(models[component], layers, name, multiplier, removable)
    return metadata, lora_summary(parsed, layout, metadata)
