"""Full size on the CPU (`make test-slow`): one LoRA training step of the real SDXL base UNet (2.57B parameters) in
bf16 against diffusers + peft on the same random weights.

Memory: the diffusers UNet is built in bf16 (5.1 GB) and minigen's is built on the meta device and given the very
same tensors, so the two share one copy of the weights. Tolerance: bf16 keeps 8 bits of mantissa, and the two
implementations order their sums differently through 70 transformer blocks, so the loss must agree to 1%, the whole
LoRA gradient (all 560 layers, as the optimizer sees it) to 3% of its norm and the median layer to 3%. Measured on the
2-core CPU: 1.8% and 2.0%, in 7.5 minutes. Single layers whose gradients are tiny differ more (the worst measured:
32%): that is bf16 rounding of small numbers, not a different computation, so no bound is set on the worst layer.
fp32 parity on the same layers is proven to 1e-5 on small models elsewhere."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from minigen.lora.layers import add_lora
from minigen.sd.configs import get_config
from minigen.sd.unet import UNet2DConditionModel

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora_sdxl.py
RANK = 4


def both_unets():
    """(minigen's UNet, diffusers' UNet with peft's LoRA), base weights shared, LoRA weights equal and non-zero."""
    import diffusers
    from peft import LoraConfig

    config = get_config("sdxl-base", "unet")
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    finally:
        torch.set_default_dtype(saved)
    ref.requires_grad_(False)
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
    ours.load_state_dict(ref.state_dict(), assign=True)  # the same tensors: no second copy
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    add_lora(ours, [r"\." + re.escape(t) + "$" for t in TARGETS], RANK, RANK)
    g = torch.Generator().manual_seed(1)
    for path, module in ref.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        a.weight.data = torch.randn(a.weight.shape, generator=g).mul_(0.02)  # fp32, as diffusers' trainer casts
        b.weight.data = torch.randn(b.weight.shape, generator=g).mul_(0.02)  # non-zero: A gets gradients too
        adapter = ours.get_submodule(path).adapters["default"]
        adapter.down.weight.data.copy_(a.weight.data)
        adapter.up.weight.data.copy_(b.weight.data)
    ref.enable_gradient_checkpointing()
    ours.set_gradient_checkpointing(True)
    return ours, ref


@pytest.mark.slow
def test_full_size_lora_step_matches_diffusers_and_peft():
    ours, ref = both_unets()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 64, 64, generator=g)  # a 512x512 image's latents
    t = torch.tensor([500])
    context, pooled = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    ids, target = torch.tensor([[512.0, 512, 0, 0, 512, 512]]), torch.randn(1, 4, 64, 64, generator=g)
    losses, grads = {}, {}
    for name, unet in (("ours", ours), ("ref", ref)):
        ours.train(), ref.train()
        with torch.autocast("cpu", torch.bfloat16):
            if name == "ours":
                pred = unet(x, t, context, pooled, ids)
            else:
                pred = unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        losses[name] = loss.item()
        if name == "ours":
            grads[name] = {p: (l.adapters["default"].down.weight.grad, l.adapters["default"].up.weight.grad)
                           for p, l in ((p, ours.get_submodule(p)) for p, m in ours.named_modules()
                                        if hasattr(m, "adapters"))}
        else:
            grads[name] = {p: (m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad)
                           for p, m in ref.named_modules() if hasattr(m, "lora_A")}
        del pred, loss
    assert losses["ours"] == pytest.approx(losses["ref"], rel=1e-2)
    assert grads["ours"].keys() == grads["ref"].keys() and len(grads["ours"]) == 560
    got = torch.cat([g.flatten() for pair in grads["ours"].values() for g in pair])
    want = torch.cat([g.flatten() for path in grads["ours"] for g in grads["ref"][path]])
    layer_errors = sorted(((a - b).norm() / b.norm()).item() for path, pair in grads["ours"].items()
                          for a, b in zip(pair, grads["ref"][path]))
    summary = f"all {(got - want).norm() / want.norm():.4f}, median {layer_errors[len(layer_errors) // 2]:.4f}, " \
              f"worst {layer_errors[-1]:.4f}"
    assert (got - want).norm() <= 0.03 * want.norm(), summary  # the whole LoRA gradient, as the optimizer sees it
    assert layer_errors[len(layer_errors) // 2] <= 0.03, summary


def both_pipelines():
    """Full-size SDXL with random weights, all in bf16, one copy of the weights shared by diffusers'
    StableDiffusionXLPipeline and minigen's Pipeline. (The VAE in bf16 too: diffusers hands a bf16 UNet's latents
    to the VAE as they are, so an fp32 VAE beside a bf16 UNet fails there; minigen casts them.)"""
    import diffusers
    import transformers

    from minigen.sd.model import StableDiffusion, build_model
    from minigen.sd.pipeline import Pipeline
    from minigen.sd.tokenizer import model_tokenizers

    configs = get_config("sdxl-base")
    plain = {part: {k: v for k, v in configs[part].items() if not k.startswith("_")} for part in configs}
    makers = {"unet": lambda: diffusers.UNet2DConditionModel(**plain["unet"]),
              "vae": lambda: diffusers.AutoencoderKL(**plain["vae"]),
              "text_encoder": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**plain["text_encoder"])),
              "text_encoder_2": lambda: transformers.CLIPTextModelWithProjection(
                  transformers.CLIPTextConfig(**plain["text_encoder_2"]))}
    torch.manual_seed(0)
    theirs, ours = {}, {}
    for part, make in makers.items():
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in its dtype: no fp32 copy
        try:
            theirs[part] = make().eval()
        finally:
            torch.set_default_dtype(saved)
        with torch.device("meta"):
            ours[part] = build_model(part, configs[part])
        ours[part].load_state_dict(theirs[part].state_dict(), assign=True)
        ours[part].eval()
    tokenizers = tuple(model_tokenizers("sdxl").values())
    return theirs, Pipeline(StableDiffusion("sdxl", **ours, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], configs=configs)), \
        tokenizers, configs


@pytest.mark.slow
def test_full_size_pipeline_draws_diffusers_image(tmp_path):
    """2 Euler steps at 256x256 with guidance 5, everything in bf16. Tolerance: bf16 through the full UNet twice and the
    bf16 VAE: mean difference 2 levels of 255, the largest 16 (measured on the CPU: 0.9 and 7.2; 2.5 minutes)."""
    import diffusers
    import transformers

    theirs, ours, tokenizers, configs = both_pipelines()
    tokenizers[0].save(tmp_path / "tokenizer")
    tokenizers[1].save(tmp_path / "tokenizer_2")
    reference = diffusers.StableDiffusionXLPipeline(
        **theirs, tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]))
    settings = dict(num_inference_steps=2, guidance_scale=5.0, height=256, width=256)
    with torch.no_grad():
        want = reference("a lighthouse at dusk", generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
                         **settings).images.float()  # (1, 3, 256, 256) in [0, 1]
    got = ours("a lighthouse at dusk", steps=2, guidance_scale=5.0, height=256, width=256, output="float",
               generator=torch.Generator("cpu").manual_seed(0))
    error = (got - want).abs()
    assert error.mean() <= 2 / 255 and error.max() <= 16 / 255, (error.mean().item() * 255, error.max().item() * 255)
