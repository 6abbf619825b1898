"""Key maps between diffusers names and the single-file (SGM/LDM) names of a Stable Diffusion checkpoint, both ways.

A single file such as `sd_xl_base_1.0.safetensors` or `v1-5-pruned-emaonly.safetensors` holds its models under
prefixes that depend on the family (`FAMILY_PREFIXES`):

    model.diffusion_model.               UNet, SGM names  (input_blocks.4.1.transformer_blocks.0.attn1.to_q)
    first_stage_model.                   VAE, LDM names   (encoder.down.0.block.1.nin_shortcut)
    cond_stage_model.transformer.        SD 1.x: CLIP ViT-L, the HF layout (text_model.encoder.layers.0...)
    cond_stage_model.model.              SD 2.x: OpenCLIP ViT-H layout (transformer.resblocks.0.attn.in_proj_weight)
    conditioner.embedders.0.transformer. SDXL: CLIP ViT-L, the HF layout
    conditioner.embedders.1.model.       SDXL: OpenCLIP bigG layout (the refiner has it alone, at embedders.0)

minigen's modules use diffusers' names, so a diffusers folder loads as it is and this file maps the rest:
- the UNet and VAE by *module-path prefixes* built from their configs (`unet_name_map`, `vae_name_map`). A prefix
  map renames any key or module path, so the LoRA code uses the same map to turn
  `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` into kohya's
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`;
- the VAE's mid-block attention, stored as 1x1 convolutions in LDM files and as linear layers in diffusers;
- OpenCLIP towers, whose attention stores q, k and v fused in one `in_proj_weight` and whose projection is stored
  transposed.

Facts learned from diffusers' `loaders/single_file_utils.py` and ComfyUI's `supported_models.py`; the code is
minigen's own.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Callable, Mapping

import torch

from .checkpoint_keys import (BIGG_PREFIX, CLIP_L_PREFIX, FAMILY_PREFIXES, REFINER_TEXT_PREFIX, SD1_TEXT_PREFIX,
                              SD2_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ignored_key)
from .configs import get_config
from .text_names import BIGG_LAYER_PARTS, text_converters


class NameMap:
    """Renames dotted names (keys or module paths) by their longest mapped prefix, in either direction."""

    def __init__(self, prefixes: Mapping[str, str], what: str):
        self.forward_map = dict(prefixes)
        self.backward_map = {v: k for k, v in prefixes.items()}
        if len(self.backward_map) != len(self.forward_map):
            raise ValueError(f"{what}: name map is not one-to-one")
        self.what = what

    @staticmethod
    def _rename(name: str, table: Mapping[str, str], what: str) -> str:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return ".".join([table[head], *parts[n:]])
        raise KeyError(f"{what}: no mapping for {name!r}")

    def to_single_file(self, name: str) -> str:
        """diffusers name -> single-file (SGM/LDM) name, without the model's file prefix."""
        return self._rename(name, self.forward_map, self.what)

    def to_diffusers(self, name: str) -> str:
        """single-file (SGM/LDM) name, without the model's file prefix -> diffusers name."""
        return self._rename(name, self.backward_map, self.what)


# ----------------------------------------------------------------------------------------------------------- UNet

# diffusers ResnetBlock2D part -> SGM ResBlock part (in_layers = [norm, act, conv], out_layers = [norm, act, drop, conv])
_UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                      "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


@functools.lru_cache(maxsize=16)
def _cached_name_map(prefixes_of: Callable[[dict], dict], config_json: str, what: str) -> NameMap:
    return NameMap(prefixes_of(json.loads(config_json)), what)


def _name_map(prefixes_of: Callable[[dict], dict], config: Mapping, what: str) -> NameMap:
    """NameMap(prefixes_of(config)), built once per distinct config: converting key by key (the streaming merger)
    asks for the same map thousands of times."""
    return _cached_name_map(prefixes_of, json.dumps(config, sort_keys=True, default=str), what)


def unet_name_map(config: Mapping | None = None) -> NameMap:
    """The diffusers <-> SGM name map of a UNet2DConditionModel config (SDXL base if None)."""
    return _name_map(_unet_prefixes, config or get_config("sdxl-base", "unet"), "UNet")


def _unet_prefixes(config: dict) -> dict[str, str]:
    prefixes = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL's added conditioning
        prefixes.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})

    def resnet(diffusers: str, sgm: str) -> None:
        for d_part, s_part in _UNET_RESNET_PARTS.items():
            prefixes[f"{diffusers}.{d_part}"] = f"{sgm}.{s_part}"

    # SGM numbers every block of the down path in one list: conv_in, then per level `layers` (resnet, attention)
    # pairs and one downsampler; the up path has `layers + 1` pairs per level, the upsampler joins the last pair.
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    for i, block_type in enumerate(down):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if block_type.startswith("CrossAttn"):
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < len(down) - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        resnet("mid_block.resnets.0", "middle_block.0")
    if mid_type == "UNetMidBlock2DCrossAttn":
        prefixes["mid_block.attentions.0"] = "middle_block.1"
        resnet("mid_block.resnets.1", "middle_block.2")
    for i, block_type in enumerate(up):
        attention = block_type.startswith("CrossAttn")
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < len(up) - 1:
            last = i * (layers + 1) + layers
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return prefixes


def unet_module_to_sgm(path: str, config: Mapping | None = None) -> str:
    """A diffusers UNet module path or key -> its SGM name (no `model.diffusion_model.` prefix).
    For many names, build `unet_name_map(config)` once and call its `to_single_file`."""
    return unet_name_map(config).to_single_file(path)


def unet_module_to_diffusers(path: str, config: Mapping | None = None) -> str:
    """An SGM UNet module path or key (no `model.diffusion_model.` prefix) -> its diffusers name."""
    return unet_name_map(config).to_diffusers(path)


# ------------------------------------------------------------------------------------------------------------ VAE

_VAE_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_name_map(config: Mapping | None = None) -> NameMap:
    """The diffusers <-> LDM name map of an AutoencoderKL config (SDXL's if None)."""
    return _name_map(_vae_prefixes, config or get_config("sdxl-base", "vae"), "VAE")


def _vae_prefixes(config: dict) -> dict[str, str]:
    prefixes = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                        "quant_conv", "post_quant_conv")}
    prefixes.update({"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"})

    def resnet(diffusers: str, ldm: str) -> None:
        for d_part, l_part in _VAE_RESNET_PARTS.items():
            prefixes[f"{diffusers}.{d_part}"] = f"{ldm}.{l_part}"

    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    for coder in ("encoder", "decoder"):
        resnet(f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1")
        resnet(f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2")
        for d_part, l_part in _VAE_ATTENTION_PARTS.items():
            prefixes[f"{coder}.mid_block.attentions.0.{d_part}"] = f"{coder}.mid.attn_1.{l_part}"
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < levels - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(levels):  # LDM numbers the decoder's levels from the lowest resolution up: reversed
        ldm_level = levels - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}")
        if i < levels - 1:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    return prefixes


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith("weight") and \
        "group_norm" not in diffusers_key


# ------------------------------------------------------------------------------------------ whole checkpoints

def unet_to_single_file(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict:
    names = unet_name_map(config)
    return {UNET_PREFIX + names.to_single_file(k): v for k, v in state_dict.items()}


def unet_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict:
    names = unet_name_map(config)
    return {names.to_diffusers(k.removeprefix(UNET_PREFIX)): v for k, v in state_dict.items()}


def vae_to_single_file(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict:
    names = vae_name_map(config)
    out = {}
    for key, value in state_dict.items():
        if _is_vae_attention_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]  # linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[VAE_PREFIX + names.to_single_file(key)] = value
    return out


def vae_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None) -> dict:
    names = vae_name_map(config)
    out = {}
    for key, value in state_dict.items():
        key = names.to_diffusers(key.removeprefix(VAE_PREFIX))
        if _is_vae_attention_weight(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[key] = value
    return out


def part_converters(family: str, configs: Mapping[str, Mapping]) -> dict[str, tuple[Callable, Callable]]:
    """{part: (diffusers state dict -> single-file tensors, single-file tensors -> diffusers state dict)}."""
    converters = {"unet": (lambda sd: unet_to_single_file(sd, configs["unet"]),
                           lambda sd: unet_to_diffusers(sd, configs["unet"])),
                  "vae": (lambda sd: vae_to_single_file(sd, configs["vae"]),
                          lambda sd: vae_to_diffusers(sd, configs["vae"]))}
    for part, prefix in FAMILY_PREFIXES[family].items():
        if part.startswith("text_encoder"):
            to_file, to_diffusers = text_converters(prefix)
            converters[part] = (functools.partial(to_file, prefix=prefix),
                                functools.partial(to_diffusers, prefix=prefix))
    return converters


def split_single_file(state_dict: Mapping[str, torch.Tensor], family: str) -> tuple[dict[str, dict], list[str]]:
    """Split a single-file state dict by part prefix: ({part: {key: tensor}}, keys of no part). Ignored keys (see
    `ignored_key`) are dropped."""
    prefixes = FAMILY_PREFIXES[family]
    parts: dict[str, dict] = {part: {} for part in prefixes}
    unknown = []
    for key, value in state_dict.items():
        if ignored_key(key):
            continue
        for part, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[part][key] = value
                break
        else:
            unknown.append(key)
    return parts, unknown


def to_single_file(states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Mapping],
                   family: str) -> dict:
    """{part: diffusers state dict} -> one single-file state dict in the family's layout."""
    converters = part_converters(family, configs)
    return {k: v for part, sd in states.items() for k, v in converters[part][0](sd).items()}


def to_diffusers(state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping],
                 family: str) -> dict[str, dict]:
    """One single-file state dict -> {part: diffusers state dict} for the family's parts.
    Keys under no part's prefix (and not ignored) are a KeyError (first few named)."""
    parts, unknown = split_single_file(state_dict, family)
    if unknown:
        raise KeyError(f"{len(unknown)} keys belong to no part of {family}, e.g. {unknown[:5]}")
    converters = part_converters(family, configs)
    return {part: converters[part][1](sd) for part, sd in parts.items()}


# ------------------------------------------------------------------------------------------------ LoRA targets

TE1_PREFIXES = (CLIP_L_PREFIX, SD1_TEXT_PREFIX)  # CLIP ViT-L in SDXL, in SD 1.x: the HF layout
OPENCLIP_COMPONENTS = {BIGG_PREFIX: "te2", REFINER_TEXT_PREFIX: "te2", SD2_TEXT_PREFIX: "te1"}  # fused q/k/v


def lora_targets(keys: list[str], unet_names: NameMap | None = None) -> dict[tuple[str, str], tuple[str, int | None]]:
    """{(component, layer name as LoRA files write it): (checkpoint key, third of its rows or None)} of a single file.

    kohya names are module paths with dots as underscores: for SDXL the UNet's SGM paths
    (`input_blocks_4_1_..._to_q`), for SD 1.x/2.x its diffusers paths (`down_blocks_0_attentions_0_...`: give
    `unet_names`, the UNet's name map, to register those too), and the text encoders' transformers paths
    (`text_model_encoder_layers_0_self_attn_q_proj`). OpenCLIP towers (bigG, SD 2's ViT-H) store q, k and v fused in
    one `in_proj_weight` (3 * width, width): their q/k/v LoRAs land on the first, second or third of those rows.
    Dotted forms are registered too, for diffusers/peft files, and text-encoder names without `text_model.`.
    """
    targets = {}
    openclip_to_hf = {sf: hf for hf, sf in BIGG_LAYER_PARTS.items()}  # OpenCLIP module -> transformers module
    openclip_layer = re.compile("(" + "|".join(map(re.escape, OPENCLIP_COMPONENTS)) +
                                r")transformer\.resblocks\.(\d+)\.(.+)")
    for key in keys:
        found = []  # (component, dotted layer name, third)
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            path = key[len(UNET_PREFIX):-len(".weight")]
            found.append(("unet", path, None))
            if unet_names is not None:
                found.append(("unet", unet_names.to_diffusers(path), None))
        elif key.startswith(TE1_PREFIXES) and key.endswith(".weight"):
            found.append(("te1", key.split(".transformer.", 1)[1][:-len(".weight")], None))
        elif m := openclip_layer.fullmatch(key):
            component, hf = OPENCLIP_COMPONENTS[m[1]], f"text_model.encoder.layers.{m[2]}."
            if m[3] == "attn.in_proj_weight":
                found += [(component, f"{hf}self_attn.{p}_proj", i) for i, p in enumerate("qkv")]
            elif m[3].endswith(".weight") and m[3][:-len(".weight")] in openclip_to_hf:
                found.append((component, hf + openclip_to_hf[m[3][:-len(".weight")]], None))
        for component, name, third in found:
            # text encoders also without `text_model.`: transformers 5's CLIPTextModel has none, so LoRAs made on
            # it (LyCORIS on a diffusers pipeline: `lora_te_encoder_layers_0_...`) name the layers without it
            for n in {name, name.removeprefix("text_model.")} if component != "unet" else {name}:
                targets[(component, n)] = targets[(component, n.replace(".", "_"))] = (key, third)
    return targets
