"""LoRA files both ways between minigen and diffusers+peft, on a tiny random SDXL-architecture pipeline.

minigen's UNet and text encoders get the same random weights as diffusers' UNet and transformers' CLIP models
(same module names). minigen's LoRA on minigen's models is compared with diffusers' `load_lora_weights` (peft) on
diffusers' models. Tolerance: fp32, atol 2e-5 and rtol 1e-5 on outputs of scale ~1-3: the models agree to ~1e-6
(their own parity tests) and peft computes base(x) + scale * B(A(x)) as minigen does, so only summation order differs.
Between two minigen models the tolerance is 1e-6.
"""

import copy

import pytest
import torch
from close import assert_close_to_scale

from minigen.io import save_safetensors
from minigen.lora.layers import add_lora, lora_parameters, lora_weights
from minigen.sd.lora_files import kohya_metadata, save_lora
from minigen.sd.lora_reading import load_lora
from minigen.sd import get_config
from minigen.sd.convert import unet_name_map
from minigen.sd.clip import CLIPTextConfig as OurCLIPConfig, CLIPTextModel as OurCLIP
from minigen.sd.clip import CLIPTextModelWithProjection as OurCLIPWithProjection
from minigen.sd.unet import UNet2DConditionModel as OurUNet

# the oracles (installed by `make test`), imported after conftest's torchvision shim
import transformers  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

CROSS = dict(atol=2e-5, rtol=1e-5)  # minigen vs diffusers models
SAME = dict(atol=1e-6, rtol=1e-6)  # minigen vs minigen
RANK, ALPHA = 4, 2.0  # scale 0.5: a wrong alpha rule shows


def configs():
    """Smaller than minigen's TINY preset (2 levels, 2-layer encoders of different widths) to keep the tests fast."""
    unet = {**get_config("tiny", "unet"), "block_out_channels": [32, 64], "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "sample_size": 8,
            "cross_attention_dim": 72, "projection_class_embeddings_input_dim": 32 + 6 * 8}
    unet = {k: v for k, v in unet.items() if not k.startswith("_")}
    te = {**get_config("tiny", "text_encoder"), "num_hidden_layers": 2, "vocab_size": 1000}
    te2 = {**get_config("tiny", "text_encoder_2"), "hidden_size": 40, "num_hidden_layers": 2, "vocab_size": 1000}
    return unet, te, te2


def tiny_parts():
    """({"unet", "te1", "te2"}: diffusers/transformers models, the same for minigen) with the same random weights."""
    unet_config, te_config, te2_config = configs()
    torch.manual_seed(0)
    ref = {"unet": UNet2DConditionModel(**unet_config),
           "te1": transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_config)),
           "te2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**te2_config))}
    ours = {"unet": OurUNet(unet_config), "te1": OurCLIP(OurCLIPConfig.from_dict(te_config)),
            "te2": OurCLIPWithProjection(OurCLIPConfig.from_dict(te2_config))}
    for c in ref:
        ours[c].load_state_dict(ref[c].state_dict())
        ref[c].eval(), ours[c].eval()
    return ref, ours


def pipeline(parts):
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=parts["te1"], text_encoder_2=parts["te2"],
                                     tokenizer=None, tokenizer_2=None, unet=parts["unet"],
                                     scheduler=EulerDiscreteScheduler())


def outputs(parts):
    """The UNet's prediction and both text encoders' outputs on fixed inputs, for minigen's or diffusers' models."""
    ours = isinstance(parts["unet"], OurUNet)
    hidden = {} if ours else {"output_hidden_states": True}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    with torch.no_grad():
        h1 = parts["te1"](ids, **hidden).hidden_states[-2]
        out2 = parts["te2"](ids, **hidden)
        context = torch.cat([h1, out2.hidden_states[-2]], -1)  # (B, T, 72)
        cond = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps = parts["unet"](x, 500, context, **cond) if ours else parts["unet"](x, 500, context,
                                                                              added_cond_kwargs=cond).sample
    return {"unet": eps, "te1": h1, "te2": out2.text_embeds}


def assert_same(a, b, tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


def loaded_in_diffusers(ref, path):
    pipe = pipeline(copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    return pipe


def pipe_parts(pipe):
    return {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}


def randomize(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def models():
    return tiny_parts()


@pytest.fixture(scope="module")
def minigen_lora(models):
    """minigen's models with a minigen LoRA on the UNet attention and both text encoders' attention, random."""
    parts = copy.deepcopy(models[1])
    add_lora(parts["unet"], "attention", RANK, ALPHA)
    add_lora(parts["te1"], "text", RANK, ALPHA)
    add_lora(parts["te2"], "text", RANK, ALPHA)
    for model in parts.values():
        randomize(lora_parameters(model))
    return parts


@pytest.fixture(scope="module")
def expected(models, minigen_lora):
    expected = outputs(minigen_lora)
    for k, v in outputs(models[1]).items():  # the LoRA changes every output, so a part that fails to load shows
        assert (expected[k] - v).abs().max() > 0.1
    return expected


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_minigen_file_loads_in_diffusers_and_back(tmp_path, models, minigen_lora, expected, fmt):
    ref, ours = models
    path = tmp_path / f"lora.{fmt}.safetensors"
    save_lora(path, {c: lora_weights(m) for c, m in minigen_lora.items()}, fmt,
              kohya_metadata(rank=RANK, alpha=ALPHA), unet_names=unet_name_map(ours["unet"].config))
    pipe = loaded_in_diffusers(ref, path)
    assert_same(outputs(pipe_parts(pipe)), expected, CROSS)

    back = copy.deepcopy(ours)
    load_lora(path, back)
    assert_same(outputs(back), expected, SAME)
    if fmt != "kohya":
        return
    # A sampling run (2 Euler steps, latents out) with peft's LoRA, and with minigen's LoRA layers loaded from the
    # same file into the same diffusers modules: the same latents.
    run = dict(prompt_embeds=torch.randn(1, 7, 72, generator=torch.Generator().manual_seed(3)),
               pooled_prompt_embeds=torch.randn(1, 32, generator=torch.Generator().manual_seed(4)),
               num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="latent")
    with_peft = pipe(**run, generator=torch.Generator().manual_seed(5)).images
    ref_ours = copy.deepcopy(ref)
    load_lora(path, ref_ours)
    with_minigen = pipeline(ref_ours)(**run, generator=torch.Generator().manual_seed(5)).images
    # minigen fuses a file's layers into the weights, peft adds B A x beside W x: fp32 rounding apart, which the
    # sampler scales up with the latents (scale ~700 here): 2e-7 of that scale measured, 2e-6 allowed
    assert_close_to_scale(with_minigen, with_peft, 2e-6)


def diffusers_trained(ref):
    """diffusers' models with peft adapters added as diffusers' SDXL LoRA example does, alpha != rank, random."""
    parts = copy.deepcopy(ref)
    parts["unet"].add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for te in ("te1", "te2"):
        parts[te].add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for model in parts.values():
        randomize([p for n, p in model.named_parameters() if "lora_" in n])
    return parts


@pytest.mark.parametrize("layout", ["peft", "diffusers_convert"])
def test_diffusers_saved_lora_loads_in_minigen(tmp_path, models, layout):
    """save_lora_weights with peft state dicts (and the training script's convert_state_dict_to_diffusers, which
    writes the older `lora.down` / `lora_linear_layer` names), with the adapter metadata that carries alpha."""
    ref, ours = models
    trained = diffusers_trained(ref)
    expected = outputs(trained)
    layers, meta = {}, {}
    for c, arg in (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2")):
        sd = get_peft_model_state_dict(trained[c])
        layers[f"{arg}_lora_layers"] = convert_state_dict_to_diffusers(sd) if layout != "peft" else sd
        meta[f"{arg}_lora_adapter_metadata"] = trained[c].peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, **layers, **meta)

    ours = copy.deepcopy(ours)
    load_lora(tmp_path / "pytorch_lora_weights.safetensors", ours)
    assert_same(outputs(ours), expected, CROSS)


def test_kohya_file_with_diffusers_block_names(tmp_path, models, minigen_lora, expected):
    """kohya files trained on a diffusers UNet name blocks `lora_unet_down_blocks_1_attentions_0_...`: both
    diffusers and minigen read them, to the same outputs."""
    ref, ours = models
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("te1", "lora_te1_"), ("te2", "lora_te2_")):
        for path, t in lora_weights(minigen_lora[component]).items():
            name = prefix + path.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": t.down, f"{name}.lora_up.weight": t.up,
                            f"{name}.alpha": torch.tensor(ALPHA)})
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in tensors
    save_safetensors(tensors, tmp_path / "k.safetensors")
    back = copy.deepcopy(ours)
    load_lora(tmp_path / "k.safetensors", back)
    assert_same(outputs(back), expected, SAME)
    assert_same(outputs(pipe_parts(loaded_in_diffusers(ref, tmp_path / "k.safetensors"))), expected, CROSS)
