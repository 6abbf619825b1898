"""The memory plan (minigen/finetune/memory_plan.py) against memory measured from outside: the resident-set high-water mark of
a separate process running the same two training steps on real tensors.

The measurement: glibc's malloc keeps freed memory for reuse once its mmap threshold has grown, which makes the
high-water mark depend on the order of frees; MALLOC_MMAP_THRESHOLD_=65536 pins the threshold, so every large
tensor is its own mapping, returned on free, and the high-water mark is the peak of live tensors plus kernels'
scratch space. A warm-up run first loads the kernels and thread pools; the high-water mark is then reset
(/proc/self/clear_refs) and the run measured from the resident size at that point. Tolerance: 15% (the issue's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import train_lora
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.memory_plan import GB, check_fits, model_configs, plan_lora_step, plan_sampling
from minigen.sd.configs import get_config

MEASURE = textwrap.dedent("""
    import json, sys, torch
    from minigen.finetune.config import LoRATrainConfig
    from minigen.finetune.memory_plan import _two_steps, model_configs
    torch.set_num_threads(1)

    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    settings, h, w = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cfg = LoRATrainConfig(**settings)
    configs = model_configs(cfg.model)
    _two_steps(LoRATrainConfig(**{**settings, "resolution": "64"}), configs, 64, 64)  # warm-up
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    base = status("VmRSS")
    _two_steps(cfg, configs, h, w)
    print(status("VmHWM") - base)
""")


def measured_peak(settings: dict, h: int, w: int) -> int:
    import json

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(settings), str(h), str(w)], env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return int(out.stdout.split()[-1])


CASES = {
    "plain": dict(resolution="192", batch=2),
}
SLOW_CASES = {
    "gradient-checkpointing": dict(resolution="192", batch=2, gradient_checkpointing=True),
    "text-encoders-trained-bf16": dict(resolution="128", batch=2, train_text_encoder=True, mixed_precision="bf16"),
    "latents-encoded-each-step": dict(resolution="256", batch=1, cache_latents="off"),
    "adafactor-rank-16": dict(resolution="256", batch=2, optimizer="adafactor", rank=16, targets="kohya"),
}


@pytest.mark.parametrize("settings", [pytest.param(v, id=k) for k, v in CASES.items()]
                         + [pytest.param(v, id=k, marks=pytest.mark.slow) for k, v in SLOW_CASES.items()])
def test_plan_is_within_15_percent_of_the_measured_peak(settings):
    cfg = LoRATrainConfig(model="random:tiny", **settings)
    plan = plan_lora_step(cfg)
    side = int(settings["resolution"])
    measured = measured_peak({"model": "random:tiny", **settings}, side, side)
    assert measured > 50e6, "too little memory to measure against the resident set's noise"
    assert abs(plan.peak - measured) <= 0.15 * measured, f"plan {plan.peak / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB"
    assert sum(plan.parts.values()) == plan.peak and plan.parts["activations"] > 0


def test_the_plan_grows_with_what_costs_memory():
    base = dict(model="random:tiny", resolution="64", batch=1)
    plain = plan_lora_step(LoRATrainConfig(**base))
    assert plan_lora_step(LoRATrainConfig(**base, gradient_checkpointing=True)).parts["activations"] \
        < plain.parts["activations"]
    bigger = plan_lora_step(LoRATrainConfig(**{**base, "batch": 2}))
    assert bigger.parts["activations"] > 1.5 * plain.parts["activations"]
    assert plan_lora_step(LoRATrainConfig(**base, rank=32)).parts["lora + optim"] > 4 * plain.parts["lora + optim"]


@pytest.mark.slow
def test_full_size_sdxl_plan_matches_the_measured_peak():
    """The real SDXL base architecture (random weights, bf16) at a small resolution: ~9 GB resident."""
    settings = dict(model="random:sdxl-base", resolution="256", batch=1, mixed_precision="bf16",
                    gradient_checkpointing=True, rank=16)
    plan = plan_lora_step(LoRATrainConfig(**settings))
    measured = measured_peak(settings, 256, 256)
    assert abs(plan.peak - measured) <= 0.15 * measured, f"plan {plan.peak / GB:.2f} GB, measured {measured / GB:.2f} GB"


def test_train_lora_plan_flag_prints_the_plan_and_loads_nothing(tmp_path, capsys):
    assert train_lora.main(["--model", "random:tiny", "--data", str(tmp_path / "no-such-folder"), "--plan",
                            "--resolution", "64", "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "memory plan (64x64, batch 1, rank 4" in out and "GB of tensors" in out
    assert err.startswith("planning one training step's memory")  # it can take a minute: it says so first
    assert not (tmp_path / "run").exists()


def test_sample_plan_flag_prints_the_plan_and_draws_nothing(tmp_path, capsys):
    import sample

    assert sample.main(["--model", "random:tiny", "--prompt", "a fox", "--height", "64", "--width", "64", "--num", "2",
                        "--plan", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "memory plan (2 image(s) of 64x64, float32, classifier-free guidance)" in out and "GB of tensors" in out
    assert not (tmp_path / "out").exists()
    guided = plan_sampling(get_config("tiny"), torch.float32, 64, 64, 2)
    assert plan_sampling(get_config("tiny"), torch.float32, 64, 64, 2, guidance=False).parts["activations"] \
        < guided.parts["activations"]  # guidance doubles the UNet's batch


def test_sample_plan_knows_vae_slicing_and_tiling():
    """With a VAE wider than the UNet the decode is the peak: one image at a time, then tiles (sample_size 32 at 256
    pixels) each lower the planned peak, and the plan names the switch it was not given."""
    configs = get_config("tiny")
    configs["vae"]["block_out_channels"] = [128, 128]
    plain = plan_sampling(configs, torch.float32, 256, 256, 4, guidance=False)
    sliced = plan_sampling(configs, torch.float32, 256, 256, 4, guidance=False, vae_slicing=True)
    tiled = plan_sampling(configs, torch.float32, 256, 256, 4, guidance=False, vae_slicing=True, vae_tiling=True)
    assert tiled.peak < sliced.peak < plain.peak
    assert "--vae-slicing" in plain.advice and "--vae-tiling" in sliced.advice and "VAE tiling" in tiled.setting


def test_a_run_that_does_not_fit_is_refused_with_the_switches_that_help(monkeypatch):
    cfg = LoRATrainConfig(model="random:tiny", resolution="64", batch=2)
    plan = plan_lora_step(cfg)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(plan.peak / 2), 80 * 10**9))
    with pytest.raises(ValueError, match="--gradient-checkpointing.*--mixed-precision bf16.*--force"):
        check_fits(plan, torch.device("cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_fits(plan, torch.device("cuda"), force=True)
    assert "--force" in str(caught[0].message)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    check_fits(plan, torch.device("cuda"))  # fits: no error


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet-and-text-encoder"])
def test_sd1_and_sd2_plans_equal_the_same_steps_on_real_tensors(preset, train_text_encoder):
    """SD 1/2 have one text encoder, no pooled prompt and no time ids: the plan traces their real step. Fake and
    real tensors hold the same bytes, so the plan is the traced peak of the real step to within 1%."""
    cfg = LoRATrainConfig(model=f"random:{preset}", resolution="64", batch=2, train_text_encoder=train_text_encoder)
    plan, real = plan_lora_step(cfg), plan_lora_step(cfg, fake=False)
    assert abs(plan.peak - real.peak) <= 0.01 * real.peak and plan.parts["activations"] > 0
    assert ("text encoders trained" in plan.setting) == train_text_encoder


def test_plan_of_an_sd1_single_file_reads_its_architecture_from_the_header(tmp_path, capsys):
    from minigen.sd.model import random_model

    model = random_model("tiny-sd1")
    model.save_single_file(tmp_path / "sd1.safetensors")
    assert model_configs(str(tmp_path / "sd1.safetensors")) == model.configs
    assert train_lora.main(["--model", str(tmp_path / "sd1.safetensors"), "--data", str(tmp_path / "none"),
                            "--plan", "--resolution", "64", "--out", str(tmp_path / "run")]) == 0
    assert "memory plan (64x64, batch 1" in capsys.readouterr().out


def test_from_scratch_plan_counts_every_weight_trained_and_equals_the_real_step(tmp_path, capsys):
    """train_sd.py's UNet stage trains the UNet and the text encoder whole, in fp32: at the peak AdamW's two moments
    of those weights (about twice their bytes) are alive beside the gradients; the plan is the traced peak of the
    same step on real tensors to within 1%. `train_sd.py --plan` prints it and writes nothing."""
    import train_sd
    from minigen.sd.model import build_model

    configs = get_config("tiny-sd1")
    cfg = LoRATrainConfig(model="random:tiny-sd1", resolution="64", batch=2, train_text_encoder=True)
    plan = plan_lora_step(cfg, configs, from_scratch=True)
    real = plan_lora_step(cfg, configs, fake=False, from_scratch=True)
    assert abs(plan.peak - real.peak) <= 0.01 * real.peak
    trained_bytes = 4 * sum(p.numel() for part in ("unet", "text_encoder")
                            for p in build_model(part, configs[part]).parameters())
    assert plan.parts["lora + optim"] >= 1.9 * trained_bytes > 10 * plan_lora_step(cfg, configs).parts["lora + optim"]
    assert train_sd.main(["--preset", "tiny-sd1", "--data", str(tmp_path / "none"), "--resolution", "64",
                          "--batch", "2", "--plan", "--out", str(tmp_path / "run")]) == 0
    assert "memory plan (64x64, batch 2, every UNet and text-encoder weight trained" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_plans_of_every_optimizer_equal_the_same_steps_on_real_tensors(optimizer):
    """Adafactor reads scalars (its step count, norms) with .item(), which a fake tensor cannot answer: the plan reads
    1 there (configs/lora_000.conf, `make lora`, planned before every CUDA run, crashed on it). Fake and real tensors
    hold the same bytes, so the plan is the traced peak of the real step to within 1%."""
    cfg = LoRATrainConfig(model="random:tiny", resolution="64", batch=2, optimizer=optimizer)
    plan, real = plan_lora_step(cfg), plan_lora_step(cfg, fake=False)
    assert abs(plan.peak - real.peak) <= 0.01 * real.peak and plan.parts["lora + optim"] > 0
    assert optimizer in plan.setting


def test_the_plan_runs_norms_and_softmax_in_fp32_under_autocast_as_cuda_does(monkeypatch):
    """CUDA autocast runs group/layer norm and softmax in fp32; the CPU's keeps them in bf16. The plan traces on the
    CPU with CUDA's policy, so a bf16 step's norm outputs count at 4 bytes an element, as on a GPU."""
    import torch.nn.functional as F

    from minigen.finetune.memory_plan import cuda_autocast_policy

    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        assert F.group_norm(x, 4).dtype == torch.bfloat16  # the CPU's own policy
        with cuda_autocast_policy():
            assert {F.group_norm(x, 4).dtype, F.layer_norm(x, (4,)).dtype, F.softmax(x, -1).dtype} == {torch.float32}
            assert torch.nn.GroupNorm(4, 8)(x).dtype == torch.float32  # the modules the models use
    with cuda_autocast_policy():
        assert F.group_norm(x, 4).dtype == torch.bfloat16  # no autocast: no change
    dtypes = []
    group_norm = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda x, *a, **k: dtypes.append(x.dtype) or group_norm(x, *a, **k))
    plan_lora_step(LoRATrainConfig(model="random:tiny", resolution="64", mixed_precision="bf16",
                                   gradient_checkpointing=True), fake=False)
    assert dtypes and set(dtypes) == {torch.float32}  # every group norm, the backward's recomputed ones too, in fp32
