"""The speed switches (minigen/speed.py) on the CPU: each leaves results as they were (up to rounding), the flags
refuse bad values, and fused AdamW is chosen only where it can run (VAE slicing and tiling: test_vae_tiling.py).
What they gain is a GPU question: bench/bench_speed.py measures it (`make bench-gpu`)."""

from __future__ import annotations

import argparse
import pytest
import torch

from close import assert_close_to_scale
from cli_errors import assert_clean_error
from minigen import speed
from minigen.gan import dcgan
from minigen.sd import get_config
from minigen.sd.unet import UNet2DConditionModel
from minigen.sd.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(get_config("tiny", "vae")).eval()


@pytest.fixture(scope="module")
def tiny_unet():
    config = get_config("tiny", "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(config).eval()
    g = torch.Generator().manual_seed(1)
    text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 999.0]),
              torch.randn(2, 77, config["cross_attention_dim"], generator=g), torch.randn(2, text, generator=g),
              torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2))
    return config, unet, inputs


def channels_last_copy(model: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    model.load_state_dict(like.state_dict())
    return speed.prepare_model(model.eval(), speed.Speed(channels_last=True))


@torch.no_grad()
def test_channels_last_unet_and_vae_give_the_same_outputs(tiny_unet, tiny_vae):
    config, unet, inputs = tiny_unet
    vae = tiny_vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    unet_nhwc = channels_last_copy(UNet2DConditionModel(config), unet)
    vae_nhwc = channels_last_copy(AutoencoderKL(vae.config), vae)
    assert unet_nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_scale(unet_nhwc(*inputs), unet(*inputs), 1e-5)
    assert_close_to_scale(vae_nhwc.decode(latents), vae.decode(latents), 1e-5)


def test_channels_last_dcgan_step_gives_the_same_losses():
    from minigen.gan.config import GANConfig
    from minigen.gan.trainer import GANTrainer

    real = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    stats = [GANTrainer(GANConfig(size=(32, 32), nz=8, ngf=8, ndf=8, batch=4, channels_last=cl)).step(real)
             for cl in (False, True)]
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("choice", ["flash", "math"])  # the CPU's kernels; efficient and cudnn are CUDA's
@torch.no_grad()
def test_sdpa_choice_gives_the_same_unet_output(tiny_unet, choice):
    _, unet, inputs = tiny_unet
    want = unet(*inputs)
    with speed.switched(speed.Speed(sdpa=choice), "cpu"):
        assert_close_to_scale(unet(*inputs), want, 1e-5)


@pytest.mark.parametrize("choice, kernel", [("auto", "flash_attention_for_cpu"), ("flash", "flash_attention_for_cpu"),
                                            ("math", "attention_math")])
def test_sdpa_choice_is_the_kernel_that_runs(choice, kernel):
    q = torch.randn(1, 2, 4, 8)  # (B, heads, L, head dim)
    with speed.sdpa_context(choice), torch.profiler.profile() as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ran = {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}
    assert ran == {"aten::_scaled_dot_product_" + kernel}


def test_switched_sets_tf32_for_the_block_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with speed.switched(speed.Speed(tf32=True), "cpu") as s:
        assert s.tf32 and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with speed.switched(speed.Speed(), "cpu") as s:  # the CPU default: off (TF32 is CUDA's alone)
        assert s.tf32 is False and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert speed.Speed().resolved("cuda").tf32 is True  # seed 001's --allow_tf32


class FakeCudaParam:
    """Stands in for a parameter on a GPU: the chooser only asks where it lives and what it holds."""
    def __init__(self, is_cuda: bool = True, floating: bool = True):
        self.is_cuda, self.floating = is_cuda, floating

    def is_floating_point(self) -> bool:
        return self.floating


def test_fused_adamw_is_chosen_only_for_floating_cuda_parameters():
    default, off = speed.Speed(), speed.Speed(fused_optimizer=False)
    assert speed.optimizer_kernel([FakeCudaParam(), FakeCudaParam()], default) == {"fused": True}
    assert speed.optimizer_kernel([FakeCudaParam()], off) == {}
    assert speed.optimizer_kernel([FakeCudaParam(), FakeCudaParam(is_cuda=False)], default) == {}
    assert speed.optimizer_kernel([FakeCudaParam(floating=False)], default) == {}
    assert speed.optimizer_kernel([torch.nn.Parameter(torch.zeros(2))], default) == {}  # the CPU
    assert speed.optimizer_kernel([], default) == {}


def parse(argv: list[str], switches=speed.SWITCHES) -> speed.Speed:
    p = argparse.ArgumentParser(prog="x", argument_default=argparse.SUPPRESS)
    speed.add_speed_args(p, switches, "the UNet")
    return speed.speed_from_args(p.parse_args(argv))


def test_flags_fill_in_defaults_and_take_what_is_given():
    assert parse([]) == speed.Speed()
    assert parse(["--no-tf32", "--compile", "--channels-last", "--sdpa", "efficient", "--vae-tiling"]) == speed.Speed(
        tf32=False, compile=True, channels_last=True, sdpa="efficient", vae_tiling=True)


@pytest.mark.parametrize("main_name, argv", [
    ("sample", ["--model", "random:tiny", "--prompt", "x", "--sdpa", "fast"]),
    ("train_lora", ["--sdxl", "random:tiny", "--data", "x", "--sdpa", "fast"]),
])
def test_a_bad_sdpa_value_is_one_line_exit_2(main_name, argv, capsys):
    main = __import__(main_name).main
    assert_clean_error(main, argv, capsys, "--sdpa", "fast")


def test_a_cuda_only_kernel_on_the_cpu_is_one_line_exit_2(capsys, tmp_path):
    import sample

    assert_clean_error(sample.main, ["--model", "random:tiny", "--prompt", "x", "--device", "cpu", "--sdpa",
                                     "efficient", "--out", str(tmp_path)], capsys, "--sdpa efficient", "CUDA")


@pytest.mark.slow  # torch.compile on the CPU: 345 s of compiling measured on 2 busy cores
def test_compile_gives_the_eager_outputs(tiny_unet):
    config, unet, inputs = tiny_unet
    G = dcgan.Generator((32, 32), 8, 8).eval()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_g, want_unet = G(z), unet(*inputs)
        compiled = UNet2DConditionModel(config).eval()
        compiled.load_state_dict(unet.state_dict())
        for model in (G, compiled):
            speed.prepare_model(model, speed.Speed(compile=True))
        assert_close_to_scale(G(z), want_g, 1e-5)
        assert_close_to_scale(compiled(*inputs), want_unet, 1e-5)
    assert list(compiled.state_dict()) == list(unet.state_dict())  # names unchanged: checkpoints do not see it


def test_the_speed_line_names_the_fused_optimizer_only_where_something_is_fused():
    on_cuda = speed.Speed().resolved("cuda", "adafactor")
    assert on_cuda.fused_optimizer is False and speed.Speed().resolved("cuda", "adamw").fused_optimizer is True
    assert "fused optimizer on," in speed.Speed().describe("cuda", "adam")
    assert "fused optimizer off (adafactor has no fused kernel here)," in speed.Speed().describe("cuda", "adafactor")
    assert "fused optimizer off (rmsprop" in speed.Speed(fused_optimizer=True).describe("cuda", "rmsprop")
    assert "fused" not in speed.Speed().describe("cuda")  # sampling: no optimizer


@pytest.mark.parametrize("saved_fused, resumed_fused", [(True, False), (False, True)])
def test_a_resumed_optimizer_keeps_this_runs_fused_choice(saved_fused, resumed_fused):
    """--[no-]fused-optimizer on --resume: the saved optimizer's state loads, its kernel choice does not (the CPU has
    fused AdamW too, so both choices run here)."""
    from minigen.training import optimizer_from_tensors, optimizer_to_tensors

    weight = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([weight], lr=0.1, fused=saved_fused)
    weight.grad = torch.ones(3)
    saved.step()
    tensors, settings = optimizer_to_tensors(saved, "optimizer")
    resumed = torch.optim.AdamW([weight], lr=0.1, fused=resumed_fused)
    optimizer_from_tensors(resumed, {k.removeprefix("optimizer."): v for k, v in tensors.items()}, settings)
    assert bool(resumed.param_groups[0]["fused"]) is resumed_fused
    assert torch.equal(resumed.state[weight]["exp_avg"], saved.state[weight]["exp_avg"])  # the state did load


@pytest.mark.parametrize("choice", ["flash", "cudnn"])
def test_a_gpu_kernel_choice_falls_back_to_the_memory_efficient_kernel_before_math(choice):
    """Flash refuses fp32 and cuDNN older GPUs; math then holds the whole attention matrix (1 GiB per image in the
    VAE at 1024x1024): the memory-efficient kernel comes first. (Which kernel runs needs a GPU: here, the order.)"""
    from torch.nn.attention import SDPBackend

    with speed.sdpa_context(choice):
        enabled = {"flash": torch.backends.cuda.flash_sdp_enabled(), "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                   "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                   "math": torch.backends.cuda.math_sdp_enabled()}
        order = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
    assert {name for name, on in enabled.items() if on} == {choice, "efficient", "math"}
    assert order[:3] == [speed.SDPA_BACKENDS[choice], SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
