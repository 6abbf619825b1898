"""minigen's SDXL UNet and VAE against diffusers' with the same random weights.

Tolerance: fp32, max abs difference <= 1e-5 of the output's largest magnitude. Both sides do the same float32
operations, but in different orders (fused SDPA kernels, GEGLU chunking), so bit equality is not expected; a wrong
layer, order or constant gives differences of order 1e-1.
"""

import pytest
import torch
import diffusers

from close import assert_close_to_scale
from minigen.sd import get_config
from minigen.sd.unet import UNet2DConditionModel
from minigen.sd.vae import AutoencoderKL


def _plain(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _assert_close(ours, ref):
    assert_close_to_scale(ours, ref, 1e-5)  # fp32, same weights, same math up to summation order


def _same_keys_and_shapes(ours, ref):
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(a) == sorted(b)
    assert a == b


def _unet_inputs(config, B=2, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(B, 4, h, w, generator=g),
        timestep=torch.tensor([10.0, 999.0][:B]),
        encoder_hidden_states=torch.randn(B, 77, config["cross_attention_dim"], generator=g),
        text_embeds=torch.randn(B, text_dim, generator=g),
        time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 8.0, 1024.0, 1024.0]][:B]),
    )


@pytest.fixture(scope="module")
def tiny_unets():
    config = get_config("tiny", "unet")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**_plain(config)).eval()
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    return config, ours, ref


@pytest.mark.parametrize("h, w", [(16, 16), (10, 14)])  # 10x14: odd sizes on the way down, resized on the way up
def test_unet_matches_diffusers(tiny_unets, h, w):
    config, ours, ref = tiny_unets
    inputs = _unet_inputs(config, h=h, w=w)
    with torch.no_grad():
        expected = ref(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}).sample
        _assert_close(ours(**inputs), expected)


def test_unet_gradient_checkpointing_gives_the_same_gradients(tiny_unets):
    config, ours, _ = tiny_unets
    inputs = _unet_inputs(config, B=1, h=8, w=8)
    grads = []
    for enabled in (False, True):
        ours.zero_grad()
        ours.set_gradient_checkpointing(enabled)
        ours(**inputs).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    ours.set_gradient_checkpointing(False)
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_vae_matches_diffusers():
    config = get_config("tiny", "vae")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**_plain(config)).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(ref.state_dict())
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist, ref_dist = ours.encode(images), ref.encode(images).latent_dist
        _assert_close(dist.mean, ref_dist.mean)
        _assert_close(dist.logvar, ref_dist.logvar)
        _assert_close(dist.sample(torch.Generator().manual_seed(3)),
                      ref_dist.sample(torch.Generator().manual_seed(3)))
        _assert_close(ours.decode(dist.mode()), ref.decode(ref_dist.mode()).sample)
    assert ours.scaling_factor == 0.13025


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_full_size_keys_and_shapes_match_diffusers(part):
    config = get_config("sdxl-base", part)
    ref_class, our_class = {"unet": (diffusers.UNet2DConditionModel, UNet2DConditionModel),
                            "vae": (diffusers.AutoencoderKL, AutoencoderKL)}[part]
    with torch.device("meta"):
        ours, ref = our_class(config), ref_class(**_plain(config))
    _same_keys_and_shapes(ours, ref)
    if part == "unet":  # diffusers' UNet2DConditionModel with SDXL base's config
        assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
        names = [n for n, _ in ours.named_modules()]
        assert sum(n.endswith("attn1.to_q") or n.endswith("attn2.to_q") for n in names) == 140
        assert sum(n.endswith(".to_out.0") for n in names) == 140
        assert sum(n.endswith("transformer_blocks." + n.split(".")[-1]) for n in names
                   if "transformer_blocks." in n and n.split(".")[-1].isdigit()) == 70


def test_unsupported_unet_config_is_named():
    config = get_config("tiny", "unet")
    config["resnet_time_scale_shift"] = "scale_shift"
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift' is not supported"):
        UNet2DConditionModel(config)


@pytest.mark.slow
def test_full_size_bf16_forward_matches_diffusers():
    """The real-size SDXL UNet (2.57B parameters, ~5.2 GB in bf16) with random weights, a 16x16 latent.

    bf16 keeps 8 mantissa bits, and the two implementations round at different places (fused attention, GEGLU),
    so they agree to about 1e-2 of the output scale, not 1e-5; a structural error gives differences of order 1.
    """
    config = get_config("sdxl-base", "unet")
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
    ref = diffusers.UNet2DConditionModel(**_plain(config)).to(torch.bfloat16).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)  # shares the tensors: one copy of the weights in memory
    inputs = {k: v.to(torch.bfloat16) for k, v in _unet_inputs(config, B=1).items()}
    with torch.no_grad():
        expected = ref(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}).sample
        got = ours(**inputs)
    assert got.dtype == torch.bfloat16
    assert_close_to_scale(got, expected, 2e-2)  # bf16: 8 mantissa bits through the whole UNet
