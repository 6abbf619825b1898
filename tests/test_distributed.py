"""Several processes under torchrun (CPU, gloo): two ranks of batch b train the LoRA one process of batch 2b trains,
step for step; a run that died resumes exactly, on the same number of ranks or (batch x ranks kept) on one; FID from
two ranks is one process's number; a rank that fails ends the whole job with its message, without a hang.

Each torchrun launch costs ~10 s of start-up on 2 cores (two interpreters importing torch), so there are four.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fid as fid_cli
from minigen import distributed
from minigen.io import load_safetensors, save_safetensors
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from test_fid_parity import random_inception

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 150  # a hang fails the test instead of CI
# Every random part that can be equal across rank counts: crops and flips of uncached images, caption dropout,
# noise offset, min-SNR, a text-encoder LoRA with its own rate, gradient checkpointing, warm-up and cosine. SGD: its
# step is linear in the gradient, so the comparison sees the gradients' rounding; Adam divides by sqrt(v) and turns
# the rounding of near-zero gradients into ~1e-4 of a step (AdamW runs agree to ~2e-5 after 4 steps).
TRAINING = dict(model="random:tiny", resolution="16x16", bucket_step=16, rank=4, optimizer="sgd", lr=50.0, epochs=2,
                random_crop=True, flip=True, cache_latents="off", caption_dropout=0.3, noise_offset=0.1, min_snr_gamma=5.0,
                train_text_encoder=True, text_encoder_lr=5e-3, gradient_checkpointing=True, warmup_steps=1,
                lr_scheduler="cosine", validation_prompts=["a red square", "a blue square", "a green square"],
                validation_steps=1, validation_size="16x16")
FP32_ROUNDING = dict(rtol=1e-5, atol=1e-6)  # the ranks' sum of half-batch gradients vs one batch's: summation order


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(program: str, args: list[str], hooks: dict | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node ranks tests/torchrun_worker.py HOOKS program ARGS` from the repository root."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "torchrun_worker.py"),
               json.dumps(hooks or {}), program, *args]
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        distributed.TIMEOUT_ENV: "60"}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as job:
        try:
            out, err = job.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # torchrun and its workers
            out, err = job.communicate()
            pytest.fail(f"torchrun {program} hung for {LAUNCH_TIMEOUT_S} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, job.returncode, out, err)


def flags(settings: dict) -> list[str]:
    args = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *value]
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images in one bucket: global batches of 4 then 2, so in the second rank 1 trains on nothing."""
    folder = tmp_path_factory.mktemp("data")
    for i in range(6):
        rng = np.random.default_rng(i)
        pixels = np.clip(np.array([40 * i, 200 - 30 * i, 90]) + rng.normal(0, 20, (24, 20, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square of colour {i}")
    return folder


def steps_of(recorded: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    steps: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in recorded.items():
        step, name = key.split("/", 1)
        steps.setdefault(int(step), {})[name] = value
    return steps


def lora_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_safetensors(checkpoint)[0].items() if k.startswith("lora.")}


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """An uninterrupted two-rank run, batch 2 per rank, its weights after every step."""
    root = tmp_path_factory.mktemp("two")
    job = torchrun("train_lora", flags(TRAINING | dict(data=data, batch=2, out=root / "run", quiet=True)),
                   {"record": str(root / "steps.safetensors")})
    assert job.returncode == 0, job.stderr[-3000:]
    return root, job


def test_two_ranks_of_batch_b_train_what_one_process_of_batch_2b_trains(two_ranks, data, tmp_path):
    root, job = two_ranks
    assert "lora: global batch 4 = batch 2 x 2 rank(s) x accumulation 1; 2 steps per epoch" in job.stdout
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["global_batch"], r["ranks"]) for r in log] == \
        [(1, 1, 4, 2), (2, 1, 4, 2), (3, 2, 4, 2), (4, 2, 4, 2)]  # an epoch is one pass: 6 images, 2 steps
    for name in ("lora.safetensors", "checkpoint.safetensors", "samples/progress.png", "loss.png"):
        assert (root / "run" / name).is_file(), name
    assert len(list((root / "run").glob("*.tmp*"))) == 0

    one = LoRATrainer(LoRATrainConfig(**TRAINING, data=str(data), batch=4, out=str(tmp_path / "one")), progress=False)
    snapshots, step = [], one.optimizer_step

    def recording_step():
        step()
        snapshots.append({k: v.detach().clone() for k, v in one.trainable().items()})
    one.optimizer_step = recording_step
    one.train()
    two = steps_of(load_file(root / "steps.safetensors"))
    assert sorted(two) == [1, 2, 3, 4] and len(snapshots) == 4
    for k, weights in enumerate(snapshots, start=1):
        assert weights.keys() == two[k].keys() and any(name.startswith("te2.") for name in weights)
        for name, value in weights.items():
            torch.testing.assert_close(two[k][name], value, **FP32_ROUNDING, msg=f"step {k}: {name}")
    moved = torch.tensor([(snapshots[3][name] - snapshots[0][name]).abs().max() for name in snapshots[0]])
    assert moved.median() > 1e-4  # far above the tolerance (te1's last layer, unused by SDXL, stays put)
    one_log = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in one_log] == pytest.approx([r["loss"] for r in log], rel=1e-5)


def test_a_failing_rank_ends_the_job_with_its_message_and_the_run_resumes_exactly(two_ranks, data, tmp_path):
    root, _ = two_ranks
    out = tmp_path / "died"
    # rank 1 raises while computing step 4 (mid-way through epoch 2); a checkpoint is saved after every step
    job = torchrun("train_lora", flags(TRAINING | dict(data=data, batch=2, out=out, quiet=True, save_every_steps=1)),
                   {"fail": [1, 3]})
    assert job.returncode != 0
    assert "train_lora.py (rank 1 of 2): error: rank 1 broke at step 3" in job.stderr
    checkpoint = out / "checkpoint.safetensors"
    died_at = int(load_safetensors(checkpoint)[1]["step"])
    assert died_at in (2, 3)  # step 3's save may be cut short by the job's end: the file is then step 2's, whole
    saved = tmp_path / "died.safetensors"
    saved.write_bytes(checkpoint.read_bytes())

    resumed = torchrun("train_lora", ["--resume", str(checkpoint), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, parts = lora_of(root / "run" / "checkpoint.safetensors"), lora_of(checkpoint)
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name  # the same ranks: bit for bit
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]

    # one process resumes it too: with batch 4 (batch x ranks kept) it continues as the two ranks did, to rounding
    cfg = LoRATrainConfig(**TRAINING, data=str(data), batch=4, out=str(tmp_path / "one"))
    one = LoRATrainer(cfg, progress=False)
    one.load_checkpoint(saved)
    one.train()
    for name, value in one.trainable().items():
        torch.testing.assert_close(value.detach(), whole["lora." + name], **FP32_ROUNDING, msg=name)
    # with batch 2 the global batches change: it continues as far through the epoch, with a warning
    other = LoRATrainer(LoRATrainConfig(**TRAINING, data=str(data), batch=2, out=str(tmp_path / "b2")),
                        progress=False)
    if died_at == 3:
        with pytest.warns(UserWarning, match="not an exact resume"):
            other.load_checkpoint(saved)
    else:
        other.load_checkpoint(saved)  # at an epoch's end nothing needs converting
    assert other.step == died_at
    other.train()
    assert other.epoch == 2 and other.step > died_at


def test_sigterm_on_one_rank_stops_all_at_one_step_and_the_run_resumes_exactly(two_ranks, data, tmp_path):
    root, _ = two_ranks
    out = tmp_path / "stopped"
    # rank 1 alone gets SIGTERM while computing step 2's loss (its share of epoch 1's second batch): both ranks
    # finish step 2, rank 0 saves, all exit
    job = torchrun("train_lora", flags(TRAINING | dict(data=data, batch=2, out=out, quiet=True)), {"sigterm": [1, 1]})
    assert job.returncode != 0  # the ranks exit with 130 (interrupted), as train_gan.py's do
    assert job.stdout.count("interrupted at step 2; saved") == 1  # one save, by rank 0
    checkpoint = out / "checkpoint.safetensors"
    assert load_safetensors(checkpoint)[1]["step"] == "2"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    resumed = torchrun("train_lora", ["--resume", str(checkpoint), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, parts = lora_of(root / "run" / "checkpoint.safetensors"), lora_of(checkpoint)
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name  # as if never stopped, bit for bit


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    for folder, count in (("a", 7), ("b", 5)):  # 7 in batches of 2: 4 images on rank 0, 3 on rank 1
        (root / folder).mkdir()
        for i in range(count):
            size = (40, 48) if i % 2 else (32, 32)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    save_safetensors(random_inception().state_dict(), root / "inception.safetensors")
    return root


def test_fid_from_two_ranks_equals_one_process(image_folders):
    root = image_folders
    args = [str(root / "a"), str(root / "b"), "--kid", "--dims", "64", "--batch-size", "2", "--workers", "1",
            "--weights", str(root / "inception.safetensors"), "--device", "cpu"]
    job = torchrun("fid", args)
    assert job.returncode == 0, job.stderr[-3000:]
    lines = [line for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    two = json.loads(lines[0])
    one = fid_cli.compute(args)
    assert two["images"] == [7, 5]
    # KID draws random subsets by position: equal KIDs mean the same features in the same order
    assert (two["fid"], two["kid"], two["kid_std"]) == (one["fid"], one["kid"], one["kid_std"])


def test_summed_gradients_keep_their_memory_layout(tmp_path):
    """A channels-last weight's gradient stays channels-last, and in its own tensor, after the all-reduce: fused Adam
    (the CUDA default) pairs a parameter's and its gradient's elements by memory order. One gloo rank in this process:
    the sum over one rank is the gradient itself, so the values must come back unchanged, element for element."""
    import torch.distributed as dist

    from minigen import distributed

    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).square().sum().backward()
    grad, want = conv.weight.grad, conv.weight.grad.clone()
    assert not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.sum_gradients([conv.weight, conv.bias])
    finally:
        dist.destroy_process_group()
    assert conv.weight.grad is grad and grad.stride() == want.stride()
    assert torch.equal(grad, want)  # one rank: the same numbers copied back, no arithmetic


def test_checkpointed_random_states_include_the_cuda_generator(monkeypatch):
    """On a GPU, LoRA dropout draws its masks from the CUDA generator: a checkpoint keeps its state and a resume puts
    it back (else a resumed run's masks differ from the uninterrupted run's). No GPU here: torch.cuda's state
    functions are stand-ins holding one state, which is what this checks goes through, not CUDA's generator."""
    cuda = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": cuda.update(state=state.clone()))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: cuda.update(state=None))
    from minigen import distributed

    saved = distributed.rank_rng_states("cuda")
    assert torch.equal(saved["cuda_rng"], torch.arange(16, dtype=torch.uint8))
    cuda["state"] = torch.zeros(16, dtype=torch.uint8)  # the run goes on, a new process starts...
    assert distributed.restore_rank_rng(saved, (0, "dropout", 3), "cuda")
    assert torch.equal(cuda["state"], torch.arange(16, dtype=torch.uint8))
    assert not distributed.restore_rank_rng({"torch_rng": saved["torch_rng"]}, (0, "dropout", 3), "cuda")
    assert cuda["state"] is None  # a checkpoint written on a CPU: the CUDA generator is seeded instead
    assert "cuda_rng" not in distributed.rank_rng_states("cpu")
