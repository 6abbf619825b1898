"""LoRA files both ways between minigen and diffusers+peft, on a tiny random SDXL-architecture pipeline.

minigen's SDXL modules use diffusers' and transformers' module names, so minigen's LoRA is applied here to copies of
the same diffusers UNet and transformers text encoders; the outputs are compared with diffusers' `load_lora_weights`
(peft) on the same weights. Tolerance: fp32, atol = rtol = 1e-5: peft computes base(x) + scale * B(A(x)), the same
products as minigen, so only summation order differs (measured max abs diff ~1e-7 on outputs of scale ~1).
"""

import copy

import pytest
import torch

from minigen.io import save_safetensors
from minigen.lora import add_lora, lora_parameters, lora_weights
from minigen.lora_files import kohya_metadata, load_lora, save_lora

# the oracles (installed by `make test`), imported after conftest's torchvision shim
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TOL = dict(atol=1e-5, rtol=1e-5)
RANK, ALPHA = 4, 2.0  # scale 0.5: a wrong alpha rule shows


def tiny_parts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=72, norm_num_groups=8)
    common = dict(intermediate_size=37, num_attention_heads=4, vocab_size=1000, bos_token_id=0, eos_token_id=2,
                  max_position_embeddings=77)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, num_hidden_layers=2, projection_dim=32,
                                                     **common))
    return {"unet": unet.eval(), "te1": te1.eval(), "te2": te2.eval()}


def sgm_names(unet):
    """diffusers -> single-file (SGM) paths of the attention blocks of this UNet (layers_per_block 2).
    A stand-in for minigen.sdxl.convert's map; diffusers' own SGM parsing checks it in these tests."""
    names, per = {}, unet.config.layers_per_block
    for path, _ in unet.named_modules():
        parts = path.split(".")
        if len(parts) < 4 or parts[2] != "attentions":
            continue
        block, layer, rest = int(parts[1]), int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            sgm = f"input_blocks.{1 + block * (per + 1) + layer}.1"
        elif parts[0] == "up_blocks":
            sgm = f"output_blocks.{block * (per + 1) + layer}.1"
        else:
            continue
        names[path] = f"{sgm}.{rest}" if rest else sgm
    for path, _ in unet.named_modules():
        if path.startswith("mid_block.attentions.0"):
            names[path] = "middle_block.1" + path.removeprefix("mid_block.attentions.0")
    return names


def pipeline(parts):
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=parts["te1"], text_encoder_2=parts["te2"],
                                     tokenizer=None, tokenizer_2=None, unet=parts["unet"],
                                     scheduler=EulerDiscreteScheduler())


def outputs(parts):
    """The UNet's prediction and both text encoders' outputs on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    with torch.no_grad():
        h1 = parts["te1"](ids, output_hidden_states=True).hidden_states[-2]
        out2 = parts["te2"](ids, output_hidden_states=True)
        context = torch.cat([h1, out2.hidden_states[-2]], -1)  # (B, T, 72)
        time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
        eps = parts["unet"](torch.randn(2, 4, 8, 8, generator=g), 500, context,
                            added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
    return {"unet": eps, "te1": h1, "te2": out2.text_embeds}


def assert_same(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")


def randomize(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def base():
    return tiny_parts()


@pytest.fixture(scope="module")
def minigen_lora(base):
    """Base copies with a minigen LoRA on the UNet attention and both text encoders' attention, random weights."""
    parts = copy.deepcopy(base)
    add_lora(parts["unet"], "attention", RANK, ALPHA)
    add_lora(parts["te1"], "text", RANK, ALPHA)
    add_lora(parts["te2"], "text", RANK, ALPHA)
    for model in parts.values():
        randomize(lora_parameters(model))
    return parts


@pytest.fixture(scope="module")
def expected(base, minigen_lora):
    expected = outputs(minigen_lora)
    for k, v in outputs(base).items():  # the LoRA changes every output, so a part that fails to load shows
        assert (expected[k] - v).abs().max() > 0.1
    return expected


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_minigen_file_loads_in_diffusers_and_back(tmp_path, base, minigen_lora, expected, fmt):
    path = tmp_path / f"lora.{fmt}.safetensors"
    save_lora(path, {c: lora_weights(m) for c, m in minigen_lora.items()}, fmt,
              kohya_metadata(rank=RANK, alpha=ALPHA), unet_sgm_names=sgm_names(base["unet"]))

    pipe = pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(path))
    got = outputs({"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2})
    assert_same(got, expected)

    back = copy.deepcopy(base)
    load_lora(path, back, unet_sgm_names=sgm_names(base["unet"]))
    assert_same(outputs(back), expected)
    if fmt != "kohya":
        return
    # the same sampling run (2 Euler steps, latents out) with diffusers' LoRA and with minigen's LoRA'd modules
    run = dict(prompt_embeds=torch.randn(1, 7, 72, generator=torch.Generator().manual_seed(3)),
               pooled_prompt_embeds=torch.randn(1, 32, generator=torch.Generator().manual_seed(4)),
               num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="latent")
    lat_diffusers = pipe(**run, generator=torch.Generator().manual_seed(5)).images
    ours = pipeline(minigen_lora)
    lat_minigen = ours(**run, generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(lat_minigen, lat_diffusers, **TOL)


def diffusers_trained(base):
    """Base copies with peft adapters added as diffusers' SDXL LoRA example does, alpha != rank, random weights."""
    parts = copy.deepcopy(base)
    parts["unet"].add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for te in ("te1", "te2"):
        parts[te].add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for model in parts.values():
        randomize([p for n, p in model.named_parameters() if "lora_" in n])
    return parts


@pytest.mark.parametrize("layout", ["peft", "diffusers_convert"])
def test_diffusers_saved_lora_loads_in_minigen(tmp_path, base, layout):
    """save_lora_weights with peft state dicts (and the training script's convert_state_dict_to_diffusers, which
    writes the older `lora.down` / `lora_linear_layer` names), with the adapter metadata that carries alpha."""
    trained = diffusers_trained(base)
    expected = outputs(trained)
    layers, meta = {}, {}
    for c, arg in (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
        sd = get_peft_model_state_dict(trained[c])
        layers[f"{arg}_lora_layers"] = convert_state_dict_to_diffusers(sd) if layout != "peft" else sd
        meta[f"{arg}_lora_adapter_metadata"] = trained[c].peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, **layers, **meta)

    ours = copy.deepcopy(base)
    load_lora(tmp_path / "pytorch_lora_weights.safetensors", ours)
    assert_same(outputs(ours), expected)


def test_kohya_file_with_diffusers_block_names(tmp_path, base, minigen_lora, expected):
    """kohya files trained on a diffusers UNet name blocks `lora_unet_down_blocks_1_attentions_0_...`: both
    diffusers and minigen read them, to the same outputs."""
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("te1", "lora_te1_text_model_"), ("te2", "lora_te2_")):
        for path, t in lora_weights(minigen_lora[component]).items():
            name = prefix + path.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": t.down, f"{name}.lora_up.weight": t.up,
                            f"{name}.alpha": torch.tensor(ALPHA)})
    save_safetensors(tensors, tmp_path / "k.safetensors")
    ours = copy.deepcopy(base)
    load_lora(tmp_path / "k.safetensors", ours)
    assert_same(outputs(ours), expected)
    pipe = pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"))
    assert_same(outputs({"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}), expected)
