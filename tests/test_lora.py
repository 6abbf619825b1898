"""LoRA math: the merged weight, zero-initialised outputs, gradients only in adapters, exact merge/unmerge, several
LoRAs at once, injection presets, and file round trips with clear errors for a file made for another model."""

import math

import pytest
import torch
from torch import nn

from minigen.lora.layers import (LoRALayer, add_lora, lora_names, lora_parameters, lora_weights, merge_lora, remove_lora,
                                 set_multiplier, unmerge_lora)
from minigen.sd.lora_files import LoRAFileError, kohya_metadata, parse_lora_spec, save_lora
from minigen.sd.lora_reading import load_lora, read_lora
from minigen.io import read_header
from minigen.sd.convert import NameMap


class Block(nn.Module):
    """A toy transformer-block naming: attention projections, a feed-forward, and a 1x1 conv proj_in."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.attn1 = nn.Module()
        for n in ("to_q", "to_k", "to_v"):
            setattr(self.attn1, n, nn.Linear(dim, dim, bias=False))
        self.attn1.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.ff = nn.Linear(dim, dim)

    def forward(self, x):  # (B, C, H, W)
        x = self.proj_in(x)
        # contiguous: on CPU, torch's linear on a non-contiguous input rounds differently with and without autograd
        t = x.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        a = self.attn1.to_q(t) + self.attn1.to_k(t) * self.attn1.to_v(t)
        return self.ff(self.attn1.to_out[0](a))


def toy():
    torch.manual_seed(0)
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([Block(), Block()])
    model.forward = lambda x: model.transformer_blocks[1](model.transformer_blocks[0](x).transpose(1, 2)
                                                          .reshape(x.shape))
    return model


def randomize_up(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        if p.abs().sum() == 0:  # the zero-initialised up weights
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_zero_init_leaves_outputs_unchanged_and_only_lora_gets_gradients():
    model, x = toy(), torch.randn(2, 8, 3, 3)
    before = model.forward(x)
    wrapped = add_lora(model, "attention", rank=4, alpha=2)
    assert len(wrapped) == 8  # to_q, to_k, to_v, to_out.0 in each of the two blocks
    assert torch.equal(model.forward(x), before)  # up = 0: exactly the base model
    model.forward(x).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("init", ["kohya", "gaussian"])
def test_merged_weight_is_w_plus_scale_up_down_and_unmerge_is_exact(init):
    model, x = toy(), torch.randn(2, 8, 3, 3)
    w0 = model.transformer_blocks[0].attn1.to_q.weight.detach().clone()
    add_lora(model, "attention", rank=4, alpha=2, init=init)
    randomize_up(model)
    layer = model.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, LoRALayer)
    down, up = layer.adapters["default"].down.weight, layer.adapters["default"].up.weight
    if init == "gaussian":
        assert abs(down.std().item() - 1 / 4) < 0.1
    else:  # kaiming-uniform(a=sqrt(5)) on fan_in 8: bound 1/sqrt(8)
        assert down.abs().max().item() <= 1 / math.sqrt(8)
    unmerged_out = model.forward(x)
    merge_lora(model)
    torch.testing.assert_close(layer.base.weight, w0 + 0.5 * up @ down, rtol=0, atol=1e-6)  # scale = 2/4
    # fp32 merged vs unmerged forward differ only by rounding of the summed products
    torch.testing.assert_close(model.forward(x), unmerged_out, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    assert torch.equal(layer.base.weight, w0)  # exact: the original weight is restored, not recomputed


def test_1x1_conv_and_kohya_preset():
    model, x = toy(), torch.randn(2, 8, 3, 3)
    wrapped = add_lora(model, [r"proj_in$", r"\.ff$"], rank=2)
    assert wrapped == ["transformer_blocks.0.ff", "transformer_blocks.0.proj_in",
                       "transformer_blocks.1.ff", "transformer_blocks.1.proj_in"]
    randomize_up(model)
    conv = model.transformer_blocks[0].proj_in
    w0 = conv.base.weight.detach().clone()
    out = model.forward(x)
    merge_lora(model)
    torch.testing.assert_close(model.forward(x), out, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    assert torch.equal(conv.base.weight, w0)


def test_several_loras_with_their_own_multipliers():
    model, x = toy(), torch.randn(2, 8, 3, 3)
    base = model.forward(x)
    add_lora(model, "attention", rank=4, name="a", multiplier=0.8)
    add_lora(model, "attention", rank=2, name="b", multiplier=0.5)
    randomize_up(model)
    assert lora_names(model) == ["a", "b"]
    both = model.forward(x)
    # the adapters are additive: output(a, b) - base = (output(a) - base) + (output(b) - base) for a linear toy
    layer = model.transformer_blocks[0].attn1.to_q
    t = torch.randn(5, 8)
    expected = layer.base(t) + 0.8 * layer.adapters["a"](t) + 0.5 * layer.adapters["b"](t)
    torch.testing.assert_close(layer(t), expected)
    set_multiplier(model, "b", 0.0)
    only_a = model.forward(x)
    assert not torch.allclose(only_a, both)
    set_multiplier(model, "b", 0.5)
    merge_lora(model, ["a"])  # one merged, one live: the same outputs
    torch.testing.assert_close(model.forward(x), both, rtol=1e-5, atol=1e-6)
    remove_lora(model, "b")
    torch.testing.assert_close(model.forward(x), only_a, rtol=1e-5, atol=1e-6)
    remove_lora(model)  # unmerges "a" and puts the plain layers back
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert torch.equal(model.forward(x), base)


def test_adding_more_layers_to_a_lora_keeps_them_trainable():
    model = toy()
    add_lora(model, "attention", rank=2)
    add_lora(model, [r"\.ff$"], rank=2)  # the same adapter name "default" on more layers
    assert all(p.requires_grad for p in lora_parameters(model)) and len(lora_parameters(model)) == 2 * 10
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    with pytest.raises(ValueError, match="already have a LoRA named 'default'"):
        add_lora(model, "kohya", rank=2)
    assert len(lora_parameters(model)) == 2 * 10  # nothing added


def test_no_matching_module_is_an_error():
    with pytest.raises(ValueError, match="matches"):
        add_lora(toy(), [r"q_proj$"])


# the toy's "single-file" block names, as minigen.sd.convert.unet_name_map gives SDXL's
TOY_NAMES = NameMap({"transformer_blocks.0": "input_blocks.1.1", "transformer_blocks.1": "input_blocks.2.1"}, "toy")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_file_round_trip_gives_the_same_outputs(tmp_path, fmt):
    model, x = toy(), torch.randn(2, 8, 3, 3)
    add_lora(model, "kohya", rank=4, alpha=1)
    randomize_up(model)
    expected = model.forward(x)
    meta = kohya_metadata(base_model="sd_xl_base_1.0", rank=4, alpha=1, trigger_phrase="Still from the Anime",
                          steps=10)
    path = tmp_path / f"lora_{fmt}.safetensors"
    save_lora(path, {"unet": lora_weights(model)}, fmt, meta, unet_names=TOY_NAMES)
    header, written_meta = read_header(path)
    if fmt == "kohya":
        assert "lora_unet_input_blocks_1_1_attn1_to_q.lora_down.weight" in header
        assert "lora_unet_input_blocks_1_1_attn1_to_q.alpha" in header
        assert written_meta["modelspec.trigger_phrase"] == "Still from the Anime"
        assert written_meta["ss_network_dim"] == "4"
    else:
        assert "unet.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in header
    remove_lora(model)
    load_lora(path, {"unet": model}, unet_names=TOY_NAMES)
    torch.testing.assert_close(model.forward(x), expected, rtol=1e-5, atol=1e-6)


def test_file_for_another_model_names_the_mismatch(tmp_path):
    model = toy()
    add_lora(model, "attention", rank=2)
    weights = lora_weights(model)
    save_lora(tmp_path / "ok.safetensors", {"unet": weights}, "diffusers")
    remove_lora(model)
    # unknown module names
    renamed = {k.replace("transformer_blocks", "single_blocks"): v for k, v in weights.items()}
    save_lora(tmp_path / "names.safetensors", {"unet": renamed}, "diffusers")
    with pytest.raises(LoRAFileError, match=r"match no module.*single_blocks"):
        load_lora(tmp_path / "names.safetensors", {"unet": model})
    # right names, wrong width
    other = nn.Module()
    other.transformer_blocks = nn.ModuleList([Block(16), Block(16)])
    with pytest.raises(LoRAFileError, match=r"attn1\.to_\w+(\.0)? has weight \(16, 16\).*LoRA layer \S+ changes \(8, 8\)"):
        load_lora(tmp_path / "ok.safetensors", {"unet": other})
    # a LoCon file whose kernel is not the convolution's (5x5 on a 3x3)
    conv = nn.Module()
    conv.transformer_blocks = nn.ModuleList([nn.Module()])
    conv.transformer_blocks[0].conv1 = nn.Conv2d(8, 8, 3)
    from minigen.io import save_safetensors
    save_safetensors({"lora_unet_transformer_blocks_0_conv1.lora_down.weight": torch.zeros(2, 8, 5, 5),
                      "lora_unet_transformer_blocks_0_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1)},
                     tmp_path / "locon.safetensors")
    with pytest.raises(LoRAFileError, match=r"conv1 has weight \(8, 8, 3, 3\).*LoRA layer \S+ changes \(8, 8, 5, 5\)"):
        load_lora(tmp_path / "locon.safetensors", {"unet": conv})
    # text-encoder layers but no text encoder given
    save_lora(tmp_path / "te.safetensors", {"te1": weights}, "kohya")
    with pytest.raises(LoRAFileError, match="no te1 model"):
        load_lora(tmp_path / "te.safetensors", {"unet": model})
    assert not any(isinstance(m, LoRALayer) for m in model.modules())  # a failed load adds nothing


def test_older_diffusers_form_and_missing_alpha(tmp_path):
    from minigen.io import save_safetensors
    model = toy()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    save_safetensors({"unet.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
                      "unet.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
                      "unet.transformer_blocks.1.attn1.to_q.lora.down.weight": down,
                      "unet.transformer_blocks.1.attn1.to_q.lora.up.weight": up,
                      "unet.transformer_blocks.1.attn1.to_q.alpha": torch.tensor(1.0)}, tmp_path / "old.safetensors")
    parsed, fmt, _ = read_lora(tmp_path / "old.safetensors")
    assert fmt == "diffusers"
    assert parsed["unet"]["transformer_blocks.0.attn1.to_out.0"].scale == 1  # no alpha: alpha = rank
    assert parsed["unet"]["transformer_blocks.1.attn1.to_q"].scale == 0.5  # alpha 1, rank 2
    load_lora(tmp_path / "old.safetensors", {"unet": model})
    merge_lora(model)
    out = model.transformer_blocks[0].attn1.to_out[0]
    torch.testing.assert_close(out.base.weight, out.original_weight + up @ down)
    q = model.transformer_blocks[1].attn1.to_q
    torch.testing.assert_close(q.base.weight, q.original_weight + 0.5 * up @ down)


def test_full_size_sdxl_targets_and_kohya_names():
    """On the meta device (no memory): the presets find SDXL's 140 each of to_q/to_k/to_v/to_out.0, and the kohya
    names are the single-file ones A1111 and ComfyUI expect."""
    from minigen.sd.lora_files import kohya_state_dict
    from minigen.sd import get_config
    from minigen.sd.convert import unet_name_map
    from minigen.sd.unet import UNet2DConditionModel
    config = get_config("sdxl-base", "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
        wrapped = add_lora(unet, "attention", rank=4)
        assert len(wrapped) == 560 and sum(p.endswith(".to_out.0") for p in wrapped) == 140
        kohya_wider = len(add_lora(unet, "kohya", rank=4, name="wide"))
        # plus ff.net.0.proj and ff.net.2 of 70 blocks and proj_in/out of 11 Transformer2DModels: the 722 modules
        # sd-scripts reports for an SDXL UNet LoRA
        assert kohya_wider == 560 + 2 * 70 + 2 * 11 == 722
    keys = kohya_state_dict({"unet": lora_weights(unet)}, unet_name_map(config))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0.alpha" in keys
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in keys
    assert len(keys) == 560 * 3


def test_lora_spec():
    assert parse_lora_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_lora_spec("b") == ("b", 1.0)
    assert parse_lora_spec("C:/loras/c.safetensors") == ("C:/loras/c.safetensors", 1.0)
    assert parse_lora_spec("C:/loras/c.safetensors:-0.5") == ("C:/loras/c.safetensors", -0.5)
