"""What a new user meets in the first hour, from the README down (issue 22): defaults that finish, Ctrl-C that
stops, the threads chosen for a busy machine, commands printed runnable, two different random models to merge,
messages that name the right flag, one-line warnings."""

import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval as eval_cli
import fid as fid_cli
import merge as merge_cli
import sample as sample_cli
from cli_errors import assert_clean_error
from minigen import cli, speed
from minigen.fid import inception
from minigen.finetune.memory_plan import model_configs
from minigen.sd.configs import default_size, get_config
from minigen.sd.model import parse_random, random_model
from minigen.sd.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def test_the_default_size_is_the_models_own_as_in_diffusers():
    """unet.sample_size x the VAE's scale: 1024 for SDXL used to be every model's default, so random:tiny drew 512
    times the pixels it was made for (798 s a step)."""
    assert {p: default_size(get_config(p)) for p in ("sdxl-base", "sd15", "sd21", "tiny", "tiny-sd1")} == \
        {"sdxl-base": 1024, "sd15": 512, "sd21": 768, "tiny": 32, "tiny-sd1": 32}
    pipe = Pipeline.from_pretrained("random:tiny")
    assert pipe.default_size == 32 and pipe("a cat", steps=1).shape == (1, 32, 32, 3)


def test_sample_cli_draws_at_the_models_size(tmp_path):
    out = tmp_path / "out"
    assert sample_cli.main(["--model", "random:tiny-sd1", "--prompt", "a cat", "--steps", "1", "--seed", "0",
                            "--out", str(out), "--device", "cpu", "--no-hash"]) == 0
    assert Image.open(out / "0-000.png").size == (32, 32)
    assert sample_cli.main(["--model", "random:tiny-sd1", "--prompt", "a cat", "--steps", "1", "--seed", "0",
                            "--width", "48", "--out", str(out), "--device", "cpu", "--no-hash"]) == 0
    assert Image.open(out / "0-001.png").size == (48, 32)  # one side given: the other is still the model's


def test_ctrl_c_stops_a_cli_with_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample_cli, "draw", interrupted)
    out = tmp_path / "out"
    assert sample_cli.main(["--model", "random:tiny", "--prompt", "a cat", "--steps", "1", "--out", str(out),
                            "--device", "cpu", "--no-hash"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "sample.py: interrupted"
    assert not out.exists() or not list(out.iterdir())


@pytest.fixture
def threads_kept(monkeypatch):
    """apply_threads sets torch's process-wide count: put it back. OMP_NUM_THREADS (which conftest sets) unset."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_threads_come_from_the_cores_other_work_leaves_free(threads_kept, monkeypatch):
    """The demo's epoch took 47 s with torch's 2 threads beside another job and 8.5 s with 1: with no --threads the
    busy cores (the load average) are left alone, and the speed line says how the count was chosen."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 0.8))
    speed.apply_threads(None)
    assert torch.get_num_threads() == 1
    assert "threads 1 (the free cores: 1 of 2; --threads N to choose)" in speed.Speed().describe("cpu")
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    speed.apply_threads(None)
    assert torch.get_num_threads() == 2  # an idle machine: torch's own count
    speed.apply_threads(1)
    assert torch.get_num_threads() == 1 and "threads 1 (--threads)" in speed.Speed().describe("cpu")


def test_fid_takes_threads_as_every_cli_does():
    assert fid_cli.parse_args(["a", "b", "--threads", "1"]).threads == 1


def test_printed_commands_name_the_interpreter_that_has_torch(monkeypatch, tmp_path):
    """A bare `python` may be the system's, without torch: the resume hint names the venv's, relative to here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    assert cli.resume_command("train_gan.py", "runs/my run/checkpoint.safetensors") == \
        ".venv/bin/python train_gan.py --resume 'runs/my run/checkpoint.safetensors'"
    monkeypatch.setattr(cli.distributed, "world_size", lambda: 2)  # under torchrun with 2 processes
    assert cli.resume_command("train_lora.py", "c.safetensors").startswith(".venv/bin/torchrun --nproc_per_node 2 ")


def test_random_models_with_a_seed_differ_and_merge(tmp_path, capsys):
    """`random:tiny@1` is another model than `random:tiny` (seed 0): two small checkpoints to try merge.py with."""
    assert parse_random("random:tiny@1") == ("tiny", 1) and parse_random("random:tiny-sd1") == ("tiny-sd1", 0)
    for bad, words in (("random:tiny@x", "whole number"), ("random:huge", "no preset 'huge'")):
        with pytest.raises(ValueError, match=words):
            model_configs(bad)
    a, b = (random_model("tiny", seed).single_file_tensors()[0] for seed in (0, 1))
    key = next(k for k in a if k.startswith("model.diffusion_model.") and a[k].ndim == 4)
    assert not torch.equal(a[key], b[key])
    out = tmp_path / "m.safetensors"
    assert merge_cli.main(["random:tiny", "random:tiny@1", "-o", str(out), "--alpha", "0.25"]) == 0
    torch.testing.assert_close(load_file(str(out))[key], torch.lerp(a[key], b[key], 0.25))
    assert sample_cli.main(["--model", str(out), "--prompt", "a cat", "--steps", "1", "--seed", "0",
                            "--out", str(tmp_path / "img"), "--device", "cpu", "--no-hash"]) == 0


def test_evals_missing_weights_message_names_its_own_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "weight_candidates", lambda: [tmp_path / "none.safetensors"])
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(ref / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images: the FID warns, as it should
        assert_clean_error(eval_cli.main, ["--model", "random:tiny", "--prompts", str(tmp_path / "prompts.txt"),
                                           "--ref", str(ref), "--out", str(tmp_path / "out"), "--device", "cpu"],
                           capsys, "--inception-weights PATH", "fid.py --fetch-weights")


def test_a_cli_prints_warnings_as_one_line():
    seen = []

    @cli.entry("tool.py")
    def main(argv=None):
        seen.append(warnings.formatwarning("a long\n   warning", UserWarning, "x.py", 3))
        return 0
    before = warnings.formatwarning
    assert main([]) == 0
    assert seen == ["tool.py: warning: a long warning\n"]
    assert warnings.formatwarning is before  # put back: the program around main keeps its own


def test_the_readmes_merge_commands_run_as_written(tmp_path):
    """The README's way to try merge.py without a checkpoint: its `random:` lines, run as printed (from a folder
    where `.venv/bin/python` is this interpreter), merge two different random models and draw from the merge."""
    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    lines = [line.split("  #")[0].strip() for line in readme.splitlines()
             if line.startswith(".venv/bin/python") and ("random:" in line or "--model m.safetensors" in line)]
    assert len(lines) == 2 and "merge.py" in lines[0] and "sample.py" in lines[1]
    (tmp_path / ".venv").symlink_to(sys.prefix)  # this environment, as `make` builds it beside the README
    for script in ("merge.py", "sample.py"):
        (tmp_path / script).symlink_to(repo / script)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for line in lines:
        job = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-2000:]
    assert Image.open(tmp_path / "outputs" / "0-000.png").size == (32, 32)
