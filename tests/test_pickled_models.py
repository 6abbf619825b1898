"""A pickled model (.ckpt) the user allows with --allow-pickle works wherever its safetensors twin does: in the memory
plan (which every CUDA run of train_lora.py and sample.py makes first, and --plan prints), in eval.py, and through
the conversion command the refusal names (issue 24, item 3)."""

from __future__ import annotations

import shlex

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import merge
import sample
import train_lora
from minigen.io import CheckpointError
from minigen.finetune.memory_plan import model_configs
from minigen.sd.model import load_model, random_model


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """random:tiny as a Lightning-style .ckpt (weights under "state_dict"), and its model."""
    root = tmp_path_factory.mktemp("pickled")
    model = random_model("tiny")
    model.save_single_file(root / "twin.safetensors")
    torch.save({"state_dict": load_file(root / "twin.safetensors")}, root / "model.ckpt")
    return root / "model.ckpt", model


def test_the_plan_reads_an_allowed_pickle_and_refuses_one_not_allowed(pickled):
    ckpt, _ = pickled
    assert model_configs(str(ckpt), allow_pickle=True) == load_model(ckpt, allow_pickle=True).configs  # what loads
    with pytest.raises(CheckpointError, match="is a pickle.*--allow-pickle"):
        model_configs(str(ckpt))


def test_plan_flags_of_train_lora_and_sample_take_an_allowed_pickle(pickled, tmp_path, capsys):
    ckpt, _ = pickled
    assert train_lora.main(["--model", str(ckpt), "--allow-pickle", "--data", str(tmp_path / "none"), "--plan",
                            "--resolution", "64", "--out", str(tmp_path / "run")]) == 0
    assert sample.main(["--model", str(ckpt), "--allow-pickle", "--prompt", "a fox", "--height", "64", "--width",
                        "64", "--plan", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "memory plan (64x64, batch 1" in out and "memory plan (1 image(s) of 64x64" in out
    assert "not a safetensors file" not in out


def test_the_refusal_names_a_conversion_command_that_runs(pickled, tmp_path):
    ckpt, model = pickled
    with pytest.raises(CheckpointError) as refused:
        model_configs(str(ckpt))
    command = shlex.split(str(refused.value).split("once with: ")[1])
    assert command[:2] == ["python", "merge.py"]
    assert merge.main(command[2:-1] + [str(tmp_path / "model.safetensors")]) == 0
    converted = load_file(tmp_path / "model.safetensors")
    twin = load_file(ckpt.parent / "twin.safetensors")
    assert converted.keys() == twin.keys()
    assert all(torch.equal(converted[k], twin[k]) for k in twin)  # copied, not computed: the same numbers


def test_eval_takes_allow_pickle(pickled, tmp_path, capsys):
    """Past the model's check: the run stops at the next thing checked, the Inception weights (a missing file)."""
    ckpt, _ = pickled
    from test_bad_fid import save_images

    save_images(tmp_path / "ref", 2)
    (tmp_path / "prompts.txt").write_text("a fox\n")
    argv = ["--model", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--ref", str(tmp_path / "ref"),
            "--inception-weights", str(tmp_path / "no-inception.safetensors"), "--out", str(tmp_path / "eval"),
            "--height", "64", "--width", "64", "--num", "2", "--dims", "64", "--device", "cpu"]
    assert eval_cli.main(argv) == 2
    assert "is a pickle" in capsys.readouterr().err
    assert eval_cli.main(argv + ["--allow-pickle"]) == 2
    err = capsys.readouterr().err
    assert "no such weights file" in err and "is a pickle" not in err
