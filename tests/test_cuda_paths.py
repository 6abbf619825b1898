"""Every CLI's CUDA branch, run on the CPU with the suite's virtual CUDA device (tests/vcuda.py): the device rules a
GPU enforces (no CPU tensor meets a CUDA one, no CPU generator draws a CUDA tensor, no .numpy() of one), the CUDA
defaults (TF32, fused Adam, the memory plan before training or sampling, NCCL under torchrun), and the CUDA
generator's state across a resume. Where a CUDA run computes what a CPU run computes, the two are compared.

What these tests cannot show (they need a GPU: `make bench-gpu`): CUDA's kernels (fused Adam's layout checks, flash
and memory-efficient attention's limits, cuDNN, TF32's rounding, CUDA autocast's op lists: the CPU's run here),
speed, memory (the free memory is what VirtualCuda says), NCCL itself (gloo carries the ranks), and CUDA's own random
numbers (the virtual CUDA generator is a CPU generator: its state is kept and restored as CUDA's is, its numbers
are not CUDA's).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import fid
import sample
import train_gan
import train_lora
from close import assert_close_to_scale
from minigen.finetune.trainer import LoRATrainer
from minigen.sd.model import random_model
from test_distributed import torchrun
from test_lora_training import data, final_weights, tiny_config  # noqa: F401 (data: a fixture)
from test_train_gan import TINY, folder  # noqa: F401 (folder: a fixture)
from vcuda import VirtualCuda

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py
# A CUDA run and a CPU run of the same settings: the same CPU kernels underneath, but fused AdamW against the plain
# loop (and bf16/fp16 casts placed alike): summation order only.
ROUNDING = 1e-5


@pytest.fixture
def vcuda():
    with VirtualCuda() as vc:
        yield vc


def test_the_virtual_device_enforces_what_cuda_enforces():
    with VirtualCuda() as vc:
        x = torch.ones(2, 3, device="cuda")
        assert x.is_cuda and (x * 2).device == torch.device("cuda", 0) and (x + torch.tensor(1.0)).is_cuda
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.ones(2, 3)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(2, generator=torch.Generator(), device="cuda")
        assert not x.cpu().is_cuda and x.to("cuda") is x
        torch.manual_seed(3)  # seeds the CUDA generator too, as on a GPU
        state = torch.cuda.get_rng_state()
        masks = [torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5) for _ in range(2)]
        torch.cuda.set_rng_state(state)
        assert torch.equal(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5), masks[0])
        assert not torch.equal(masks[0], masks[1])
        torch.cuda.set_device(1)
        assert x.device == torch.device("cuda", 1) and vc.events == ["set_device(1)"]
    assert not torch.cuda.is_available() and not x.is_cuda and torch.ones(1).numpy().shape == (1,)  # all undone


def test_the_vae_takes_a_cpu_generator_on_cuda(vcuda):
    """img2img and LoRA training encode with a CPU generator (the same latents on any device)."""
    vae = random_model("tiny").vae
    images = torch.rand(1, 3, 32, 32) * 2 - 1  # (B, 3, H, W)
    want = vae.encode(images).sample(torch.Generator().manual_seed(0))
    got = vae.to("cuda").encode(images.to("cuda")).sample(torch.Generator().manual_seed(0))
    assert got.is_cuda
    assert_close_to_scale(got.cpu(), want, ROUNDING)


def test_train_lora_cli_on_cuda_plans_then_trains_the_preset_of_make_lora(data, tmp_path, capsys):  # noqa: F811
    """configs/lora_000.conf (Adafactor) at a tiny size: the plan every CUDA run makes first crashed on Adafactor.
    On a GPU without bf16 arithmetic (T4, V100) --mixed-precision bf16 trains in fp16, with a warning."""
    with VirtualCuda(bf16=False), pytest.warns(UserWarning, match="no bf16 arithmetic"):
        assert train_lora.main(["--config", "configs/lora_000.conf", "--model", "random:tiny", "--data", str(data),
                                "--resolution", "16x16", "--bucket-step", "16", "--rank", "4", "--batch", "2",
                                "--epochs", "1", "--validation-size", "16x16", "--validation-steps", "1",
                                "--mixed-precision", "bf16", "--out", str(tmp_path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "memory plan (16x16, batch 2, rank 4, fp16, adafactor)" in out
    assert "tf32 on" in err and "fused optimizer off (adafactor has no fused kernel here)" in err
    assert (tmp_path / "lora.safetensors").is_file() and (tmp_path / "samples" / "progress.png").is_file()


@pytest.mark.parametrize("settings", [
    pytest.param(dict(optimizer="adamw", mixed_precision="fp16", gradient_checkpointing=True), id="adamw-fp16-scaler"),
    pytest.param(dict(optimizer="sgd", mixed_precision="bf16", train_text_encoder=True, cache_latents="off"),
                 id="sgd-bf16-text-encoder"),
])
def test_lora_training_on_cuda_equals_the_cpu(data, tmp_path, settings):  # noqa: F811
    cpu = LoRATrainer(tiny_config(data, tmp_path / "cpu", **settings), progress=False, device="cpu")
    cpu.train()
    with VirtualCuda():
        cuda = LoRATrainer(tiny_config(data, tmp_path / "cuda", **settings), progress=False, device="cuda")
        assert cuda.model.unet.conv_in.weight.is_cuda
        assert settings["optimizer"] != "adamw" or cuda.optimizer.param_groups[0]["fused"]
        cuda.train()
        got = {k: v.cpu() for k, v in final_weights(cuda).items()}
    want = final_weights(cpu)
    assert got.keys() == want.keys()
    for k in want:
        assert_close_to_scale(got[k], want[k], ROUNDING)


def test_resume_with_lora_dropout_on_cuda_is_exact(data, tmp_path):  # noqa: F811
    """Dropout's masks come from the CUDA generator on a GPU: the checkpoint keeps its state (cuda_rng), the resume
    puts it back. Without that the resumed run redraws its first masks (it reseeds), here as on a GPU."""
    kw = dict(epochs=2, batch=1, grad_accum=1, lora_dropout=0.5, optimizer="adafactor", mixed_precision="bf16")
    with VirtualCuda():
        whole = LoRATrainer(tiny_config(data, tmp_path / "whole", **kw), progress=False, device="cuda")
        whole.train()
        first = LoRATrainer(tiny_config(data, tmp_path / "parts", **kw), progress=False, device="cuda")
        assert first.train(stop_after_steps=3) == "stopped"
        second = LoRATrainer(tiny_config(data, tmp_path / "parts", **kw), progress=False, device="cuda")
        second.load_checkpoint(tmp_path / "parts" / "checkpoint.safetensors")
        second.train()
        a, b = final_weights(whole), final_weights(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same computations in the same order: bit for bit
    assert "cuda_rng" in load_file(tmp_path / "parts" / "checkpoint.safetensors")


SAMPLE = ["--model", "random:tiny", "--prompt", "a fox", "--height", "64", "--width", "64", "--steps", "2", "--seed", "1",
          "--dtype", "fp32"]  # a GPU defaults to bf16, a CPU to fp32: one dtype for both (a flag after wins)


@pytest.mark.parametrize("flags", [
    pytest.param(["--sampler", "euler_a", "--vae-tiling", "--dtype", "bf16"], id="euler_a-bf16-tiling"),
    pytest.param(["--sampler", "ddim", "--init-image", "IMAGE", "--strength", "0.5"], id="ddim-img2img"),
    pytest.param(["--sampler", "dpmpp_2m", "--karras", "--num", "2"], id="dpmpp_2m"),
    pytest.param(["--sampler", "ddpm", "--cfg", "1"], id="ddpm-no-guidance"),
    pytest.param(["--model", "random:tiny-sd1", "--sampler", "euler", "--clip-skip", "2"], id="sd1-euler"),
    pytest.param(["--model", "random:tiny-sd2", "--sampler", "dpmpp_2m"], id="sd2-dpmpp_2m"),
])
def test_sample_on_cuda_draws_the_cpus_images(data, tmp_path, capsys, flags):  # noqa: F811
    """The seed's noise is drawn by a CPU generator on every device: the same pictures, to 8-bit rounding."""
    import numpy as np
    from PIL import Image

    flags = [str(data / "0.png") if f == "IMAGE" else f for f in flags]
    assert sample.main(SAMPLE + flags + ["--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    with VirtualCuda():
        assert sample.main(SAMPLE + flags + ["--device", "cuda", "--out", str(tmp_path / "cuda")]) == 0
    assert "memory plan (" in capsys.readouterr().out  # made before every CUDA run
    pictures = {d: [np.asarray(Image.open(p), dtype=int) for p in sorted((tmp_path / d).glob("*.png"))]
                for d in ("cpu", "cuda")}
    assert len(pictures["cuda"]) == len(pictures["cpu"]) >= 1
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(pictures["cpu"], pictures["cuda"]))


def test_sample_on_cuda_with_a_lora_and_an_allowed_pickle(tmp_path, capsys):
    model = random_model("tiny")
    model.save_single_file(tmp_path / "model.safetensors")
    torch.save({"state_dict": load_file(tmp_path / "model.safetensors")}, tmp_path / "model.ckpt")
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # tiny's first attention block
    width = dict(model.unet.named_modules())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].in_features
    torch.manual_seed(0)
    from minigen.io import save_safetensors
    save_safetensors({f"{key}.lora_down.weight": torch.randn(2, width), f"{key}.lora_up.weight": torch.randn(width, 2),
                      f"{key}.alpha": torch.tensor(2.0)}, tmp_path / "lora.safetensors")
    flags = ["--model", str(tmp_path / "model.ckpt"), "--allow-pickle", "--lora", f"{tmp_path / 'lora.safetensors'}:0.8",
             "--prompt", "a fox", "--height", "64", "--width", "64", "--steps", "2", "--device", "cuda",
             "--out", str(tmp_path / "out")]
    with VirtualCuda():
        assert sample.main(flags) == 0
    assert "memory plan (1 image(s) of 64x64" in capsys.readouterr().out and list((tmp_path / "out").glob("*.png"))


def test_train_gan_on_cuda_trains_what_the_cpu_trains(folder, tmp_path, capsys):  # noqa: F811
    """The demo's switches (channels-last, --hflip) with DiffAugment and fused Adam on CUDA."""
    flags = TINY + ["--data", str(folder), "--epochs", "2", "--channels-last", "--hflip",
                    "--diffaugment", "color,translation,cutout"]
    assert train_gan.main(flags + ["--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    with VirtualCuda():
        assert train_gan.main(flags + ["--device", "cuda", "--out", str(tmp_path / "cuda")]) == 0
    assert "fused optimizer on" in capsys.readouterr().err
    cpu, cuda = (load_file(tmp_path / d / "checkpoint.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for k in cpu:
        if cpu[k].is_floating_point():
            assert_close_to_scale(cuda[k], cpu[k], ROUNDING)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from minigen.io import save_safetensors
    from test_fid_parity import random_inception

    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_safetensors({k: v for k, v in random_inception().state_dict().items()
                      if not k.endswith("num_batches_tracked")}, path)
    return path


def test_fid_on_cuda_equals_the_cpu(folder, data, inception, capsys):  # noqa: F811
    import json

    flags = [str(folder), str(data), "--weights", str(inception), "--dims", "64", "--kid"]
    assert fid.main(flags + ["--device", "cpu"]) == 0
    with VirtualCuda():
        assert fid.main(flags + ["--device", "cuda"]) == 0
    cpu, cuda = (json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert cuda["fid"] == pytest.approx(cpu["fid"], rel=1e-4) and cuda["kid"] == pytest.approx(cpu["kid"], rel=1e-3)


def test_eval_on_cuda(folder, inception, tmp_path, capsys):  # noqa: F811
    (tmp_path / "prompts.txt").write_text("a red fox\na blue bird\n")
    with VirtualCuda():
        assert eval_cli.main(["--model", "random:tiny", "--prompts", str(tmp_path / "prompts.txt"), "--ref", str(folder),
                              "--inception-weights", str(inception), "--dims", "64", "--num", "2", "--steps", "2",
                              "--height", "64", "--width", "64", "--out", str(tmp_path / "eval"),
                              "--device", "cuda"]) == 0
    assert "| base |" in capsys.readouterr().out and (tmp_path / "eval" / "results.json").is_file()


def test_two_virtual_gpus_train_the_gan_one_trains_with_twice_the_batch(folder, tmp_path):  # noqa: F811
    """torchrun, 2 ranks on cuda:0 and cuda:1 (NCCL asked, gloo carrying it), --sync-bn, channels-last, fused Adam:
    the gradients keep their layout through the all-reduce (issue 24 item 2)."""
    flags = ["--size", "32x32", "--ngf", "4", "--ndf", "4", "--nz", "8", "--grid", "4", "--data", str(folder),
             "--epochs", "1", "--channels-last", "--hflip", "--sync-bn", "--device", "cuda"]
    job = torchrun("train_gan", flags + ["--batch", "2", "--quiet", "--out", str(tmp_path / "two")],
                   {"vcuda": True})
    assert job.returncode == 0, job.stderr[-3000:]
    assert "vcuda events of rank 1: ['set_device(1)', 'init_process_group(nccl)']" in job.stderr
    with VirtualCuda():
        assert train_gan.main(flags + ["--batch", "4", "--quiet", "--out", str(tmp_path / "one")]) == 0
    two, one = (load_file(tmp_path / d / "checkpoint.safetensors") for d in ("two", "one"))
    for k in one:
        if one[k].is_floating_point() and k.startswith(("G.", "D.")):
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)  # as test_gan_distributed


@pytest.mark.slow  # 24 s on 2 cores: two ranks each plan, then train
def test_two_virtual_gpus_train_the_lora_one_trains_with_twice_the_batch(data, tmp_path):  # noqa: F811
    """torchrun, 2 ranks of batch 2 on cuda:0 and cuda:1 (each plans its step first) against one CUDA process of batch
    4: test_distributed's settings (every random part that can be equal across rank counts), fused AdamW."""
    from minigen.finetune.config import LoRATrainConfig
    from test_distributed import FP32_ROUNDING, TRAINING, flags, lora_of

    settings = TRAINING | dict(optimizer="adamw", lr=1e-2, epochs=1, device="cuda")
    job = torchrun("train_lora", flags(settings | dict(data=data, batch=2, out=tmp_path / "two", quiet=True)),
                   {"vcuda": True})
    assert job.returncode == 0, job.stderr[-3000:]
    assert "memory plan (16x16, batch 2" in job.stdout and "fused optimizer on" in job.stderr
    with VirtualCuda():
        one = LoRATrainer(LoRATrainConfig(**settings, data=str(data), batch=4, out=str(tmp_path / "one")),
                          progress=False, device="cuda")
        one.train()
    two, one = lora_of(tmp_path / "two" / "checkpoint.safetensors"), lora_of(tmp_path / "one" / "checkpoint.safetensors")
    assert two.keys() == one.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, **FP32_ROUNDING, msg=name)


def test_device_cuda_n_makes_that_gpu_the_current_one(tmp_path, capsys):
    flags = SAMPLE + ["--out", str(tmp_path), "--plan"]
    with VirtualCuda(gpus=2) as vc:
        assert sample.main(flags + ["--device", "cuda:1"]) == 0
        assert vc.events == ["set_device(1)"]  # CUDA's generator, cuBLAS's workspace, mem_get_info: on GPU 1
        assert sample.main(flags + ["--device", "cuda:2"]) == 2
    assert "--device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1" in capsys.readouterr().err


def test_a_gpu_without_bf16_samples_in_fp16(tmp_path, capsys):
    """T4 and V100 (the free notebooks' GPUs) emulate bf16, slowly: the default half precision there is fp16 (the VAE
    stays fp32)."""
    from minigen import cli

    with VirtualCuda(bf16=False):
        assert cli.gpu_half_precision() == "fp16"
        assert sample.main(SAMPLE[:-2] + ["--device", "cuda", "--out", str(tmp_path)]) == 0  # no --dtype
    with VirtualCuda():
        assert cli.gpu_half_precision() == "bf16"
    assert "memory plan (1 image(s) of 64x64, float16," in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_cpu_offload_draws_the_same_images_with_one_model_on_the_gpu_at_a_time():
    from minigen.finetune.memory_plan import plan_sampling
    from minigen.sd.configs import get_config
    from minigen.sd.pipeline import Pipeline

    draw = dict(steps=2, height=64, width=64, output="float")
    pipe = Pipeline.from_pretrained("random:tiny")
    want = pipe("a fox", generator=torch.Generator().manual_seed(0), **draw)
    models = [pipe.model.text_encoder, pipe.model.text_encoder_2, pipe.model.unet, pipe.model.vae]
    on_gpu = []

    def count(module, args):  # after offload's hook: the models on the GPU while one runs
        on_gpu.append(sum(next(m.parameters()).is_cuda for m in models))
    with VirtualCuda():
        pipe.enable_cpu_offload("cuda")
        for model in models[:3] + [pipe.model.vae.decoder]:
            model.register_forward_pre_hook(count)
        got = pipe("a fox", generator=torch.Generator().manual_seed(0), **draw)
        assert next(pipe.model.vae.parameters()).is_cuda and not next(pipe.model.unet.parameters()).is_cuda
    assert len(on_gpu) == 2 + 2 + 1 and set(on_gpu) == {1}  # 2 encoders, 2 steps (one batch each), the VAE
    assert_close_to_scale(got, want, ROUNDING, min_scale=1.0)  # the same computations, moved: images in [0, 1]
    plain, offloaded = (plan_sampling(get_config("tiny"), torch.float32, 64, 64, cpu_offload=c) for c in (False, True))
    assert offloaded.parts["weights"] < plain.parts["weights"] and "CPU offload" in offloaded.setting
    assert "--cpu-offload" in plain.advice[-2]
