"""train_gan.py on bad input: a corpus of bad flags, bad checkpoints and file-system faults built here. Each case must
end with exit code 2 and one line naming the flag or file, leave its inputs byte-identical and write no output (or
keep the previous checkpoint). Plus item 4 of issue 12: a run that diverges keeps its last finite checkpoint."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import torch
from cli_errors import assert_clean_error
from corpus import fails_cleanly, temp_files
from PIL import Image

import train_gan
from minigen import io
from minigen.io import load_safetensors, save_safetensors

TINY = ["--size", "32x32", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch", "4", "--grid", "4", "--quiet"]
LONG_NAME = "n" * 300  # longer than any file system's name limit (255 bytes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 small pictures, a good one-epoch checkpoint, and bad files made from it."""
    root = tmp_path_factory.mktemp("corpus")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    run = root / "run"
    assert train_gan.main(["--data", str(images), "--out", str(run), *TINY, "--epochs", "1"]) == 0
    good = run / "checkpoint.safetensors"
    tensors, metadata = load_safetensors(good)

    def variant(name, tensors=tensors, **meta):
        save_safetensors(tensors, root / name, metadata | meta)

    variant("nan.safetensors", tensors | {"G.net.0.weight": torch.full_like(tensors["G.net.0.weight"], float("nan"))})
    variant("inf-bn.safetensors", tensors | {"D.net.3.running_var": torch.full_like(tensors["D.net.3.running_var"],
                                                                                    float("inf"))})
    variant("config-not-json.safetensors", config="{batch: 4")
    variant("config-list.safetensors", config="[1, 2]")
    saved = json.loads(metadata["config"])
    variant("config-batch-0.safetensors", config=json.dumps(saved | {"batch": 0}))
    variant("config-unknown.safetensors", config=json.dumps(saved | {"learning_speed": 3}))
    variant("config-size-text.safetensors", config=json.dumps(saved | {"size": "big"}))
    variant("no-iteration.safetensors", **{"iteration": "many"})
    data = good.read_bytes()
    (root / "cut.safetensors").write_bytes(data[:-100])
    (root / "a-folder.safetensors").mkdir()
    (root / "file").write_text("a regular file")
    (root / "latin1.conf").write_bytes("--epochs 2 # é".encode("latin-1"))
    return root


def data_flags(corpus, out):
    return ["--data", str(corpus / "images"), "--out", str(out), *TINY]


# Bad numbers: refused while parsing, before any image is read. (flags, words the message must hold)
FLAG_CASES = {
    "batch-0": (["--batch", "0"], "--batch", ">= 1"),
    "save-every-0": (["--save-every", "0"], "--save-every", ">= 1"),
    "n-critic-0": (["--n-critic", "0"], "--n-critic", ">= 1"),
    "nz-0": (["--nz", "0"], "--nz", ">= 1"),
    "ngf-negative": (["--ngf", "-4"], "--ngf", ">= 1"),
    "ndf-0": (["--ndf", "0"], "--ndf"),
    "epochs-negative": (["--epochs", "-1"], "--epochs", ">= 1"),
    "epochs-0": (["--epochs", "0"], "--epochs"),
    "lr-nan": (["--lr", "nan"], "--lr", "finite"),
    "lr-inf": (["--lr", "inf"], "--lr", "finite"),
    "lr-0": (["--lr", "0"], "--lr", "> 0"),
    "lr-negative": (["--lr=-1e-4"], "--lr", "> 0"),
    "lr-d-nan": (["--lr-d", "nan"], "--lr-d", "finite"),
    "grid-0": (["--grid", "0"], "--grid", ">= 1"),
    "fid-every-negative": (["--fid-every", "-1"], "--fid-every", ">= 0"),
    "fid-samples-1": (["--fid-samples", "1"], "--fid-samples", ">= 2"),
    "seed-negative": (["--seed=-1"], "--seed", "between 0"),
    "seed-too-big": (["--seed", str(2**64)], "--seed", str(2**64 - 1)),
    "label-flip-above-1": (["--label-flip", "1.5"], "--label-flip", "between 0 and 1"),
    "gp-lambda-nan": (["--gp-lambda", "nan"], "--gp-lambda"),
    "decay-rate-0": (["--decay-rate", "0"], "--decay-rate", "> 0"),
    "decay-steps-negative": (["--decay-steps", "-1"], "--decay-steps", ">= 0"),
    "betas-nan": (["--betas", "0.5", "nan"], "--betas", "finite"),
    "eps-negative": (["--eps", "-1"], "--eps", ">= 0"),
    "ema-halflife-negative": (["--ema-halflife=-1"], "--ema-halflife", ">= 0"),
    "ema-halflife-inf": (["--ema-halflife", "inf"], "--ema-halflife", "finite"),
    "alpha-2": (["--alpha", "2"], "--alpha", "between 0 and 1"),
    "real-label-inverted": (["--real-label", "1", "0.7"], "--real-label"),
    "size-0": (["--size", "0"], "--size"),
    "size-unsupported": (["--size", "100x100"], "not supported"),
    "batch-not-a-number": (["--batch", "many"], "--batch"),
    "threads-0": (["--threads", "0"], "--threads", ">= 1"),
    "sample-0": (["--sample", "0"], "--sample", ">= 1"),
    "sample-negative": (["--sample", "-1"], "--sample", ">= 1"),
    "sample-without-checkpoint": (["--sample", "3"], "--checkpoint"),
    "batch-larger-than-data": (["--batch", "64"], "--batch 64", "larger than the dataset"),
}
if not torch.cuda.is_available():
    FLAG_CASES["device-cuda-without-cuda"] = (["--device", "cuda"], "--device cuda", "no CUDA")


@pytest.mark.parametrize("flags, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FLAG_CASES.items()])
def test_bad_numbers_and_flags(corpus, tmp_path, capsys, flags, mentions):
    out = tmp_path / "out"
    fails_cleanly(train_gan.main, data_flags(corpus, out) + flags, capsys, mentions, corpus, out)


# Bad files given to --resume, --checkpoint (for --sample), --config and --data. (argv from the corpus and a fresh
# output folder, words the message must hold: the file's name, and what is wrong where it matters)
FILE_CASES = {
    "resume-missing": (lambda c, o: ["--resume", str(c / "missing.safetensors")], "missing.safetensors"),
    "resume-a-folder": (lambda c, o: ["--resume", str(c / "a-folder.safetensors")], "a-folder.safetensors"),
    "resume-truncated": (lambda c, o: ["--resume", str(c / "cut.safetensors")], "cut.safetensors", "truncated"),
    "resume-not-safetensors": (lambda c, o: ["--resume", str(c / "file")], "file"),
    "resume-nan-weights": (lambda c, o: ["--resume", str(c / "nan.safetensors"), "--out", str(o)],
                           "nan.safetensors", "G.net.0.weight"),
    "resume-inf-batchnorm": (lambda c, o: ["--resume", str(c / "inf-bn.safetensors"), "--out", str(o)],
                             "inf-bn.safetensors", "D.net.3.running_var"),
    "resume-config-not-json": (lambda c, o: ["--resume", str(c / "config-not-json.safetensors")],
                               "config-not-json.safetensors"),
    "resume-config-a-list": (lambda c, o: ["--resume", str(c / "config-list.safetensors")],
                             "config-list.safetensors", "not a JSON object"),
    "resume-config-batch-0": (lambda c, o: ["--resume", str(c / "config-batch-0.safetensors")],
                              "config-batch-0.safetensors", "--batch"),
    "resume-config-unknown-name": (lambda c, o: ["--resume", str(c / "config-unknown.safetensors")],
                                   "config-unknown.safetensors", "learning_speed"),
    "resume-config-size-text": (lambda c, o: ["--resume", str(c / "config-size-text.safetensors")],
                                "config-size-text.safetensors"),
    "resume-bad-iteration": (lambda c, o: ["--resume", str(c / "no-iteration.safetensors"), "--out", str(o)],
                             "no-iteration.safetensors"),
    "resume-other-architecture": (lambda c, o: ["--resume", str(c / "run" / "checkpoint.safetensors"), "--nz", "16",
                                                "--out", str(o)], "checkpoint.safetensors", "nz=8"),
    "sample-nan-weights": (lambda c, o: ["--sample", "2", "--checkpoint", str(c / "nan.safetensors"), "--out", str(o)],
                           "nan.safetensors", "G.net.0.weight"),
    "sample-config-not-json": (lambda c, o: ["--sample", "2", "--checkpoint", str(c / "config-not-json.safetensors"),
                                             "--out", str(o)], "config-not-json.safetensors"),
    "sample-config-unknown-name": (lambda c, o: ["--sample", "2", "--checkpoint",
                                                 str(c / "config-unknown.safetensors"), "--out", str(o)],
                                   "config-unknown.safetensors"),
    "sample-a-folder": (lambda c, o: ["--sample", "2", "--checkpoint", str(c / "a-folder.safetensors"),
                                      "--out", str(o)], "a-folder.safetensors"),
    "sample-out-under-a-file": (lambda c, o: ["--sample", "2", "--checkpoint", str(c / "run" / "checkpoint.safetensors"),
                                              "--out", str(c / "file" / "fake")], "file"),
    "sample-out-name-too-long": (lambda c, o: ["--sample", "2", "--checkpoint",
                                               str(c / "run" / "checkpoint.safetensors"), "--out", str(o / LONG_NAME)],
                                 "--out", "longer than"),
    "sample-seed-too-big": (lambda c, o: ["--sample", "2", "--checkpoint", str(c / "run" / "checkpoint.safetensors"),
                                          "--out", str(o), "--seed", str(2**64)], "--seed"),
    "preset-missing": (lambda c, o: ["--config", str(c / "missing.conf")], "missing.conf"),
    "preset-a-folder": (lambda c, o: ["--config", str(c / "a-folder.safetensors")], "a-folder.safetensors"),
    "preset-latin-1": (lambda c, o: ["--config", str(c / "latin1.conf")], "latin1.conf", "not UTF-8"),
    "data-a-file": (lambda c, o: ["--data", str(c / "file"), "--out", str(o), *TINY], "--data", "file"),
    "data-missing": (lambda c, o: ["--data", str(c / "nothing-here"), "--out", str(o), *TINY], "nothing-here"),
    "out-under-a-file": (lambda c, o: data_flags(c, c / "file" / "run"), "--out", "file"),
    "out-name-too-long": (lambda c, o: data_flags(c, o / LONG_NAME), "--out", "longer than"),
}


@pytest.mark.parametrize("argv, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FILE_CASES.items()])
def test_bad_files(corpus, tmp_path, capsys, argv, mentions):
    out = tmp_path / "out"
    fails_cleanly(train_gan.main, argv(corpus, out), capsys, mentions, corpus)
    assert not out.exists()  # nothing written: not even an empty folder


def test_full_disk_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(corpus / "run", out)
    checkpoint = out / "checkpoint.safetensors"
    previous = checkpoint.read_bytes()

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.SafetensorsWriter, "write", disk_full)
    assert_clean_error(train_gan.main, ["--resume", str(checkpoint), "--out", str(out), "--epochs", "2", "--quiet"], capsys,
                       str(checkpoint), "No space left")
    assert checkpoint.read_bytes() == previous
    assert temp_files(out) == []


def test_a_diverging_run_keeps_its_last_finite_checkpoint(corpus, tmp_path, capsys):
    """Issue 12, item 4: with the learning rate growing thirtyfold every step, BatchNorm running variances become
    infinite while the losses still look finite; the checkpoint of the epoch that made them must not be written."""
    out = tmp_path / "run"
    argv = data_flags(corpus, out) + ["--epochs", "20", "--decay-steps", "1", "--decay-rate", "30"]
    assert_clean_error(train_gan.main, argv, capsys, "NaN or infinite", str(out / "checkpoint.safetensors"))
    tensors, metadata = load_safetensors(out / "checkpoint.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last_epoch_end = max(r["iteration"] for r in log if r["iteration"] % 3 == 0 and r["iteration"] < log[-1]["iteration"])
    assert int(metadata["iteration"]) == last_epoch_end  # the previous epoch's checkpoint, left as it was
    assert temp_files(out) == []
