"""The SDXL key maps, proven against diffusers' own single-file converters.

Full size on the meta device (keys and shapes only, no memory): diffusers' model -> our single-file names ->
diffusers' converter must give back exactly the diffusers keys and shapes. Tiny configs with real random tensors:
the same round trip must give back the same values, and ours must invert it.
"""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minigen.sd import convert, get_config, text_names
from minigen.sd.clip import normalize_clip_keys
from minigen.sd.detect import detect_family

SIZES = ["sdxl-base", "tiny"]


def _state_dict(model_class, config, preset, *args):
    """A diffusers/transformers model's state dict: meta tensors at full size, seeded random ones on tiny."""
    device = "meta" if preset == "sdxl-base" else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config, *args) if args or not isinstance(config, dict) else model_class(**config)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _assert_same(expected, actual, preset):
    assert sorted(expected) == sorted(actual)
    for k, v in expected.items():
        assert actual[k].shape == v.shape, k
        if preset != "sdxl-base":
            assert torch.equal(actual[k], v), k


def _unet_config(preset):
    return {k: v for k, v in get_config(preset, "unet").items() if not k.startswith("_")}


@pytest.mark.parametrize("preset", SIZES)
def test_unet_map_is_inverted_by_diffusers(preset):
    config = _unet_config(preset)
    ours = _state_dict(UNet2DConditionModel, config, preset)
    single = convert.unet_to_single_file(ours, config)
    if preset == "sdxl-base":  # the key count of the real sd_xl_base_1.0.safetensors
        assert len(single) == 1680
        assert sum(v.numel() for v in single.values()) == 2_567_463_684
        for key in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                    "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "label_emb.0.2.bias",
                    "middle_block.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.8.0.skip_connection.bias"):
            assert convert.UNET_PREFIX + key in single, key
    back = sfu.convert_ldm_unet_checkpoint(single, config)
    _assert_same(ours, back, preset)
    _assert_same(ours, convert.unet_to_diffusers(single, config), preset)


def test_unet_module_paths_for_lora():
    # kohya names are these SGM module paths with "_" for "."; LoRA targets are the attention projections
    assert convert.unet_module_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert convert.unet_module_to_sgm("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0") == \
        "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0"
    assert convert.unet_module_to_sgm("mid_block.attentions.0.proj_in") == "middle_block.1.proj_in"
    assert convert.unet_module_to_diffusers("input_blocks.8.1.transformer_blocks.3.ff.net.0.proj") == \
        "down_blocks.2.attentions.1.transformer_blocks.3.ff.net.0.proj"
    with pytest.raises(KeyError, match="no mapping"):
        convert.unet_module_to_sgm("down_blocks.9.attentions.0")


@pytest.mark.parametrize("preset", SIZES)
def test_vae_map_is_inverted_by_diffusers(preset):
    config = {k: v for k, v in get_config(preset, "vae").items() if not k.startswith("_")}
    ours = _state_dict(AutoencoderKL, config, preset)
    single = convert.vae_to_single_file(ours, config)
    if preset == "sdxl-base":
        assert abs(sum(v.numel() for v in single.values()) - 83.65e6) < 0.01e6
        assert single[convert.VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
        assert convert.VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight" in single
    back = sfu.convert_ldm_vae_checkpoint(single, config)
    _assert_same(ours, back, preset)
    _assert_same(ours, convert.vae_to_diffusers(single, config), preset)


@pytest.mark.parametrize("preset", SIZES)
@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2"])
def test_text_encoder_maps_are_inverted_by_diffusers(preset, part):
    config = CLIPTextConfig.from_dict(get_config(preset, part))
    model_class = CLIPTextModel if part == "text_encoder" else CLIPTextModelWithProjection
    ours = normalize_clip_keys(_state_dict(model_class, config, preset))
    prefix = convert.FAMILY_PREFIXES["sdxl"][part]
    to_single = text_names.hf_clip_to_single_file if part == "text_encoder" else text_names.openclip_to_single_file
    single = to_single(ours, prefix)
    if part == "text_encoder":
        back = sfu.convert_ldm_clip_checkpoint(single)
        expected_count = 123_060_480 if preset == "sdxl-base" else None
    else:
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(config)
        back = sfu.convert_open_clip_checkpoint(model, single, prefix=prefix)
        expected_count = 694_659_840 if preset == "sdxl-base" else None
        assert single[prefix + "text_projection"].shape == (config.hidden_size, config.projection_dim)
        assert single[prefix + "transformer.resblocks.9.attn.in_proj_weight"].shape == \
            (3 * config.hidden_size, config.hidden_size)
    if expected_count:
        assert sum(v.numel() for v in ours.values()) == expected_count
    _assert_same(ours, back, preset)
    to_diffusers = text_names.hf_clip_to_diffusers if part == "text_encoder" else text_names.openclip_to_diffusers
    _assert_same(ours, to_diffusers(single, prefix), preset)


def test_detect_family():
    unet = "model.diffusion_model.out.2.weight"
    assert detect_family([unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                          "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_family([unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert detect_family([unet, "cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_family([unet, "conditioner.embedders.0.model.ln_final.weight"]) == "sdxl-refiner"
    assert detect_family(["cond_stage_model.model.ln_final.weight"]) == "unknown"  # no UNet
    assert detect_family(["down_blocks.0.resnets.0.conv1.weight"]) == "diffusers"
    assert detect_family(["foo.bar"]) == "unknown"


def test_single_file_split_rejects_foreign_keys():
    with pytest.raises(KeyError, match="1 keys belong to no part of sdxl"):
        convert.to_diffusers({"cond_stage_model.transformer.x": torch.zeros(1)}, get_config("tiny"), "sdxl")
