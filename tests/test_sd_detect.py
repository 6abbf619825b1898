"""The architecture read from a single file's tensors (minigen/sd/detect.py), for the full-size layouts people load.

Each layout's diffusers UNet config is a fact from diffusers' and ComfyUI's model lists (ComfyUI's
`model_detection.py` gives SSD-1B's and Vega's per-block transformer depths). The test builds minigen's model of
that config on the meta device (no memory), writes its tensor shapes under single-file names, detects the
architecture from those shapes alone, and checks that the detected config builds the same tensors as diffusers'
UNet2DConditionModel of the true config, with the parameter count people quote.
"""

import diffusers
import pytest
import torch

from minigen.sd.configs import get_config
from minigen.sd.convert import to_single_file
from minigen.sd.detect import detect
from minigen.sd.model import build_model

_SDXL_UNET = get_config("sdxl-base", "unet")
LAYOUTS = {  # name: (family, UNet config changes from its base, parameter count or None)
    "SD 1.x": ("sd1", get_config("sd15", "unet"), 859_520_964),
    "SD 2.x": ("sd2", get_config("sd21", "unet"), 865_910_724),
    "SDXL base": ("sdxl", _SDXL_UNET, 2_567_463_684),
    "SDXL refiner": ("sdxl-refiner", {
        **_SDXL_UNET, "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
        "transformer_layers_per_block": 4, "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}, None),
    "SSD-1B": ("sdxl", {**_SDXL_UNET, "transformer_layers_per_block": [1, 2, 4], "mid_block_type": "UNetMidBlock2D",
                        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]]}, None),
    "Segmind Vega": ("sdxl", {**_SDXL_UNET, "transformer_layers_per_block": [1, 1, 2],
                              "mid_block_type": "UNetMidBlock2D"}, None),
}


def _shapes(family: str, unet_config: dict) -> dict[str, tuple[int, ...]]:
    """A single file's {key: shape} for the layout, built on the meta device."""
    base = get_config({"sd1": "sd15", "sd2": "sd21"}.get(family, "sdxl-base"))
    configs = {"unet": unet_config, "vae": base["vae"]}
    if family in ("sd1", "sd2", "sdxl"):
        configs["text_encoder"] = base["text_encoder"]
    if family.startswith("sdxl"):
        configs["text_encoder_2"] = base["text_encoder_2"]
    with torch.device("meta"):
        states = {part: build_model(part, config).state_dict() for part, config in configs.items()}
        return {k: tuple(v.shape) for k, v in to_single_file(states, configs, family).items()}


def _diffusers_unet(config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("name", LAYOUTS)
def test_full_size_layout_is_detected_from_shapes(name):
    family, unet_config, params = LAYOUTS[name]
    arch = detect(_shapes(family, unet_config), {}, name)
    assert (arch.family, arch.name) == (family, name)
    detected = arch.configs["unet"]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_model("unet", detected).state_dict().items()}
    assert ours == _diffusers_unet(unet_config)  # the same tensors as diffusers' model of the true config
    assert _diffusers_unet(detected) == ours  # and diffusers builds the detected config to the same tensors
    assert detected["attention_head_dim"] == unet_config["attention_head_dim"]  # heads by the family's rule
    if params:
        assert sum(torch.Size(s).numel() for s in ours.values()) == params
    assert arch.describe(sum(torch.Size(s).numel() for s in ours.values())).startswith(f"{name} UNet, ")


def test_text_encoders_are_detected_from_shapes():
    for family, preset in (("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl-base")):
        arch = detect(_shapes(family, get_config(preset, "unet")), {}, preset)
        for part in ("text_encoder", "text_encoder_2"):
            if part in arch.configs:
                for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "hidden_act"):
                    assert arch.configs[part][key] == get_config(preset, part)[key], (preset, part, key)


def test_sd2_file_with_the_unused_last_block_loads_23_layers():
    """Real SD 2 files hold all 24 OpenCLIP ViT-H blocks; SD 2 reads the penultimate layer, so diffusers (and
    minigen) keep 23 and drop block 23."""
    shapes = _shapes("sd2", get_config("sd21", "unet"))
    shapes["cond_stage_model.model.transformer.resblocks.23.ln_1.weight"] = (1024,)
    assert detect(shapes, {}, "sd2").configs["text_encoder"]["num_hidden_layers"] == 23


@pytest.mark.parametrize("prediction,marker,expected", [
    (None, None, "epsilon"), (None, "v_pred", "v_prediction"), ("eps", "v_pred", "epsilon"), ("v", None, "v_prediction")])
def test_prediction_type_from_marker_or_flag(prediction, marker, expected):
    shapes = _shapes("sd2", get_config("sd21", "unet"))
    if marker:
        shapes[marker] = (0,)
    arch = detect(shapes, {}, "file", prediction=prediction)
    assert arch.prediction_type == expected


def test_unknown_layouts_are_refused_with_what_was_found():
    with pytest.raises(ValueError, match=r"not a Stable Diffusion single-file checkpoint \(an unknown model"):
        detect({"foo.weight": (1,)}, {}, "x.safetensors")
    shapes = _shapes("sd1", get_config("sd15", "unet"))
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(ValueError, match=r"x.safetensors: an unknown SD 1.x layout \(no tensor model.diffusion_model.out.2.weight\)"):
        detect(shapes, {}, "x.safetensors")
