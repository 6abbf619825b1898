"""Baking and extracting LoRAs on SD 1.x and 2.x single files (merge.py A --lora, merge.py A B --rank R).

sd-scripts names an SD 1/2 LoRA's UNet layers by diffusers paths (`lora_unet_down_blocks_0_attentions_0_...`) and
SD 2's text encoder is OpenCLIP's, with q, k and v fused in one tensor of the single file: the LoRA extracted from
B - A at full rank, baked back into A, must give B's LoRA layers back to float rounding.
"""

import pytest
import torch
from safetensors.torch import load_file

from minigen.merge.extract import extract_lora
from minigen.merge.bake import bake_loras
from minigen.sd.lora_reading import read_lora
from minigen.sd.model import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset,text_prefix", [("tiny-sd1", "cond_stage_model.transformer."),
                                                ("tiny-sd2", "cond_stage_model.model.")])
def test_extract_then_bake_gives_b_back(preset, text_prefix, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    random_model(preset, seed=0).save_single_file(a)
    random_model(preset, seed=1).save_single_file(b)
    lora = tmp_path / "lora.safetensors"
    n = extract_lora(a, b, lora, rank=128, clamp_quantile=1.0, progress=False)  # rank >= every width: exact
    names = load_file(str(lora))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert not any(k.startswith("lora_unet_input_blocks") for k in names)  # sd-scripts' SD 1/2 naming, not SGM
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names
    assert n == len(read_lora(lora)[0]["unet"]) + len(read_lora(lora)[0]["te1"])

    baked = tmp_path / "baked.safetensors"
    bake_loras(a, [(lora, 1.0)], baked, progress=False)
    got, want, base = load_file(str(baked)), load_file(str(b)), load_file(str(a))
    attn = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    qkv = (text_prefix + "transformer.resblocks.0.attn.in_proj_weight" if preset == "tiny-sd2"
           else text_prefix + "text_model.encoder.layers.0.self_attn.q_proj.weight")
    for key in (attn, qkv):
        assert (got[key] - want[key]).abs().max() < 1e-5 * want[key].abs().max(), key  # B's layer back
        assert (base[key] - want[key]).abs().max() > 1e-2  # and the LoRA did move it from A's
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # a 3x3 resnet conv: no LoRA layer
    assert torch.equal(got[conv], base[conv])
