"""What model a checkpoint holds, read from its tensors: the family and every part's diffusers config.

A single file carries no config, only tensors, so the architecture is read from their names, shapes and counts, as
ComfyUI's model detection does (facts from its `model_detection.py` and `supported_models.py`):

    family      which text-encoder prefixes are present (`convert.FAMILY_PREFIXES`); the UNet decides within SDXL
    levels      the downsamplers' positions in `input_blocks`; channels from each level's first resnet
    attention   a level has cross-attention when its blocks hold a `proj_in`; depth = its `transformer_blocks` count,
                read per block (SSD-1B and Vega drop blocks unevenly); 1x1-conv or linear projection from proj_in's rank
    context     attn2.to_k's input width; added conditioning from `label_emb` (SDXL), whose input is the pooled
                width plus one embedding per time id (6; the refiner's 5)
    text        layers counted, widths from the embedding and MLP shapes; HF layout = CLIP ViT-L (quick_gelu),
                OpenCLIP layout = gelu

What no tensor shape holds - the number of attention heads - follows the families' rule (ComfyUI's): SD 1.x has 8
heads everywhere, the others 64-wide heads, CLIP 64-wide heads. minigen writes each part's config into the files it
saves (metadata key `minigen.configs`), so smaller layouts (the tiny test models) load exactly too. The prediction
type comes from that metadata, from the `v_pred` / `ztsnr` marker keys some trainers write, or from `--prediction`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .configs import PRESETS, get_config
from .checkpoint_keys import FAMILY_PREFIXES, UNET_PREFIX, VAE_PREFIX, ignored_key
from .convert import unet_name_map
from .unet import MID_BLOCKS, unet_depths

CONFIGS_METADATA = "minigen.configs"  # safetensors metadata key: json of {part: config dict}
PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
MODEL_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL (base)",
               "sdxl-refiner": "Stable Diffusion XL refiner",
               "diffusers": "a diffusers-format state dict (not a single-file checkpoint)",
               "unknown": "an unknown model"}
# SDXL-family UNets told apart by transformer depth per level (ComfyUI's `transformer_depth`, one entry per level)
SDXL_VARIANTS = {(0, 2, 10): "SDXL base", (0, 2, 4): "SSD-1B", (0, 1, 2): "Segmind Vega"}


def detect_family(keys: Iterable[str]) -> str:
    """The model family of a single file from its key names: a key of FAMILY_PREFIXES, "diffusers" or "unknown".
    Families are told apart by their text encoders' prefixes, most specific first."""
    keys = list(keys)
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)
    if not has(UNET_PREFIX):
        return "diffusers" if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys) else "unknown"
    for family in ("sdxl", "sdxl-refiner", "sd2", "sd1"):
        text = [p for part, p in FAMILY_PREFIXES[family].items() if part.startswith("text_encoder")]
        if all(has(p) for p in text):
            return family
    return "unknown"


@dataclass
class Architecture:
    """A checkpoint's family ("sd1", "sd2", "sdxl", "sdxl-refiner"), its parts' diffusers configs (with "scheduler"),
    and a readable name of the UNet layout ("SD 1.x", "SSD-1B", ...)."""

    family: str
    configs: dict[str, dict]
    name: str

    @property
    def prediction_type(self) -> str:
        return self.configs["scheduler"].get("prediction_type", "epsilon")

    def describe(self, unet_params: int) -> str:
        """One line: `SD 1.x UNet, 859.5M params, eps`."""
        short = {"epsilon": "eps", "v_prediction": "v-prediction", "sample": "x0"}[self.prediction_type]
        return f"{self.name} UNet, {unet_params / 1e6:.1f}M params, {short}"


def family_of_configs(configs: Mapping[str, Mapping]) -> str:
    """The family of a set of part configs (a diffusers folder's)."""
    if "text_encoder_2" in configs:
        return "sdxl" if "text_encoder" in configs else "sdxl-refiner"
    return "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"


def layout_name(family: str, unet: Mapping) -> str:
    """The readable name of a UNet layout: the family's, or an SDXL variant's by its depths."""
    if family == "sdxl":
        depths = unet.get("transformer_layers_per_block", 1)
        depths = tuple(d if kind.startswith("CrossAttn") else 0
                       for d, kind in zip(depths if isinstance(depths, list) else [depths] * 3,
                                          unet["down_block_types"]))
        return SDXL_VARIANTS.get(depths, "SDXL-layout") if unet["block_out_channels"][0] == 320 else "SDXL-layout"
    return FAMILY_NAMES[family]


def detect(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], source: str,
           prediction: str | None = None) -> Architecture:
    """The architecture of a single file from {key: shape} and its metadata. ValueError naming `source` when the
    layout is unknown or inconsistent. prediction ("epsilon"/"eps", "v_prediction"/"v") overrides the file's."""
    family = detect_family(shapes)
    if family not in FAMILY_PREFIXES:
        raise ValueError(f"{source}: not a Stable Diffusion single-file checkpoint ({MODEL_NAMES[family]}; "
                         f"{len(shapes)} tensors, e.g. {sorted(shapes)[:3]})")
    stored = _stored_configs(metadata, source)
    if stored is not None and family_of_configs(stored) != family:
        stored = None  # the metadata came along from another model (a merge's first input, say): read the tensors
    try:
        configs = stored or _configs_from_shapes(shapes, family)
    except KeyError as e:
        raise ValueError(f"{source}: an unknown {FAMILY_NAMES[family]} layout (no tensor {e.args[0]})") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"{source}: an unknown {FAMILY_NAMES[family]} layout ({e})") from None
    if "scheduler" not in configs:  # the family's noise schedule; the prediction type as the file says, else eps
        configs["scheduler"] = {**get_config(base_preset(family), "scheduler"), "prediction_type": "epsilon"}
    marked = _marked_prediction(shapes)
    if prediction or marked:
        configs["scheduler"]["prediction_type"] = PREDICTIONS[prediction] if prediction else marked
    if "ztsnr" in shapes:  # zero terminal SNR (Lin et al. 2023): rescaled betas, sampled with trailing spacing
        configs["scheduler"].update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return Architecture(family, configs, layout_name(family, configs["unet"]))


def kohya_unet_names(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], source: str):
    """The UNet name map kohya's LoRA files of this checkpoint's family need to be resolved against it: SD 1.x/2.x
    LoRAs name UNet layers by diffusers paths (SDXL's by the single file's own SGM paths: None)."""
    if detect_family(shapes) not in ("sd1", "sd2"):
        return None
    return unet_names(shapes, metadata, source)


def unet_names(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], source: str):
    """The UNet's diffusers <-> single-file name map of this checkpoint, whatever its family: what resolves LoRA
    layers named by diffusers paths (peft files, LyCORIS on a diffusers UNet) against a single file. None for an
    SDXL-like file whose UNet config cannot be read (a partial file): its LoRAs' SGM names need no map."""
    try:
        return unet_name_map(detect(shapes, metadata, source).configs["unet"])
    except ValueError:
        if detect_family(shapes) in ("sd1", "sd2"):  # sd-scripts names their layers by diffusers paths: needed
            raise
        return None


def base_preset(family: str) -> str:
    """The `configs.PRESETS` name of a family's reference model (its defaults for what a file does not hold)."""
    return {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl-base", "sdxl-refiner": "sdxl-base"}[family]


def _stored_configs(metadata: Mapping[str, str], source: str) -> dict | None:
    if CONFIGS_METADATA not in metadata:
        return None
    try:
        configs = json.loads(metadata[CONFIGS_METADATA])
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {CONFIGS_METADATA} is not valid JSON ({e})") from None
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()) or \
            "unet" not in configs:
        raise ValueError(f"{source}: metadata {CONFIGS_METADATA} is not a dict of part configs")
    return configs


def _marked_prediction(keys: Iterable[str]) -> str | None:
    """sd-scripts and ComfyUI mark v-prediction files with an empty `v_pred` tensor."""
    return "v_prediction" if "v_pred" in keys else None


def _configs_from_shapes(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict[str, dict]:
    base = get_config(base_preset(family))
    configs = {"unet": {**base["unet"], **_unet_config(shapes, family)},
               "vae": {**base["vae"], **_vae_config(shapes)}}
    for part, prefix in FAMILY_PREFIXES[family].items():
        if part.startswith("text_encoder"):
            template = base.get(part) or base["text_encoder_2"]
            configs[part] = {**template, **_text_config(shapes, prefix)}
    if configs["unet"]["addition_embed_type"] == "text_time":  # label_emb's input: the pooled text, then the time ids
        ids = 5 if family == "sdxl-refiner" else 6
        unet = configs["unet"]
        unet["addition_time_embed_dim"] = (unet["projection_class_embeddings_input_dim"]
                                           - configs["text_encoder_2"]["projection_dim"]) // ids
    known = _known_preset(configs, family)
    if known is not None:  # a layout minigen has a preset of: its head counts too (no shape holds them)
        for part in configs:
            for key in ("attention_head_dim", "num_attention_heads"):
                if key in known[part]:
                    configs[part][key] = known[part][key]
    elif family != "sd1" and any(c % 64 for c in configs["unet"]["block_out_channels"]):
        raise ValueError(f"channel widths {configs['unet']['block_out_channels']} are not multiples of the 64-wide "
                         f"heads of a {FAMILY_NAMES[family]} UNet; this file needs its configs (metadata "
                         f"{CONFIGS_METADATA}, which minigen writes)")
    return configs


def _layout(part: str, config: Mapping) -> tuple:
    """What the tensor shapes settle of a part's config (everything but the head counts)."""
    if part == "unet":
        keys = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "addition_embed_type", "projection_class_embeddings_input_dim")
        return tuple(config.get(k) for k in keys) + (unet_depths(config), config.get("mid_block_type", MID_BLOCKS[0]))
    if part == "vae":
        return tuple(config.get(k) for k in ("block_out_channels", "layers_per_block", "latent_channels"))
    return tuple(config.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act"))


def _known_preset(configs: Mapping[str, Mapping], family: str) -> dict | None:
    """The preset of `configs.PRESETS` whose layout the detected configs have, if any."""
    for name in PRESETS:
        preset = get_config(name)
        if set(preset) - {"scheduler"} == set(configs) and family_of_configs(preset) == family and \
                all(_layout(part, configs[part]) == _layout(part, preset[part]) for part in configs):
            return preset
    return None


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the one group of `pattern` takes among the keys."""
    regex = re.compile(pattern)
    return len({m[1] for k in keys if (m := regex.match(k))})


def _unet_config(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict:
    p = UNET_PREFIX
    conv_in = shapes[p + "input_blocks.0.0.weight"]  # (C0, in, 3, 3)
    inputs = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    downsampler = re.compile(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    downsamplers = sorted(int(m[1]) for k in shapes if (m := downsampler.match(k)))
    layers = downsamplers[0] - 1 if downsamplers else inputs - 1
    levels = len(downsamplers) + 1
    if inputs != levels * (layers + 1):
        raise ValueError(f"{inputs} input blocks do not make {levels} levels of {layers} layers")
    channels, down_depths, linear, context = [], [], None, None
    for i in range(levels):
        first = f"{p}input_blocks.{1 + i * (layers + 1)}"
        channels.append(shapes[f"{first}.0.out_layers.3.weight"][0])
        down_depths.append(_count(shapes, re.escape(first) + r"\.1\.transformer_blocks\.(\d+)\."))
        if down_depths[-1]:
            linear = len(shapes[f"{first}.1.proj_in.weight"]) == 2
            context = shapes[f"{first}.1.transformer_blocks.0.attn2.to_k.weight"][1]
    if context is None:
        raise ValueError("no cross-attention block found")
    up_depths = [[_count(shapes, re.escape(f"{p}output_blocks.{i * (layers + 1) + j}.1.transformer_blocks.") + r"(\d+)\.")
                  for j in range(layers + 1)] for i in range(levels)]
    mid_depth = _count(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid_depth and down_depths[-1] and mid_depth != down_depths[-1]:
        raise ValueError(f"the mid block's transformer depth {mid_depth} differs from the last level's "
                         f"{down_depths[-1]}, which diffusers' config cannot express")
    config = {
        "in_channels": conv_in[1], "out_channels": shapes[p + "out.2.weight"][0], "block_out_channels": channels,
        "layers_per_block": layers, "cross_attention_dim": context, "use_linear_projection": linear,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in up_depths],
        # diffusers gives the mid block the last level's depth
        "transformer_layers_per_block": [d or 1 for d in down_depths[:-1]] + [down_depths[-1] or mid_depth or 1],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else
        ("UNetMidBlock2D" if p + "middle_block.0.in_layers.0.weight" in shapes else None),
    }
    if unet_depths(config)[1] != up_depths:  # the up path does not mirror the down path (SSD-1B, Vega)
        config["reverse_transformer_layers_per_block"] = up_depths
    # heads, not a width (diffusers' misnomer): SD 1.x has 8 at every level, the others 64-wide ones
    config["attention_head_dim"] = 8 if family == "sd1" else [max(c // 64, 1) for c in channels]
    if p + "label_emb.0.0.weight" in shapes:
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes[p + "label_emb.0.0.weight"][1]
    else:
        config["addition_embed_type"] = None
    return config


def _vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    p = VAE_PREFIX + "encoder.down."
    levels = _count(shapes, re.escape(p) + r"(\d+)\.")
    return {"block_out_channels": [shapes[f"{p}{i}.block.0.conv1.weight"][0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": _count(shapes, re.escape(p) + r"0\.block\.(\d+)\."),
            "latent_channels": shapes[VAE_PREFIX + "quant_conv.weight"][0] // 2}


def _text_config(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict:
    if prefix.endswith(".transformer."):  # HF layout: CLIP ViT-L (older files lack `text_model.`)
        p = prefix + ("text_model." if any(k.startswith(prefix + "text_model.") for k in shapes) else "")
        layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        width = shapes[p + "embeddings.token_embedding.weight"][1]
        inner = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        config = {"hidden_act": "quick_gelu"}
    else:  # OpenCLIP layout (bigG, ViT-H); SD 2 drops the last block (convert.SD2_UNUSED_BLOCK)
        kept = [k for k in shapes if not ignored_key(k)]  # without the block SD 2 does not use
        layers = _count(kept, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        width = shapes[prefix + "token_embedding.weight"][1]
        inner = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        config = {"hidden_act": "gelu"}
        if prefix + "text_projection" in shapes:
            config["projection_dim"] = shapes[prefix + "text_projection"][1]
    return {**config, "hidden_size": width, "intermediate_size": inner, "num_hidden_layers": layers,
            "num_attention_heads": max(width // 64, 1)}
