"""train_lora.py on bad input: a corpus of bad flags, bad data, bad model and checkpoint files and faults built here.
Each case must end with exit code 2 and one line naming the flag or file, leave its inputs byte-identical and write
no output (or keep the previous checkpoint). Runs use the random tiny SDXL of tests/test_lora_training.py."""

from __future__ import annotations

import codecs
import contextlib
import errno
import io as stdio
import json
import shutil

import numpy as np
import pytest
import torch
from cli_errors import assert_clean_error
from corpus import fails_cleanly, snapshot, temp_files
from PIL import Image

import train_lora
from minigen import io
from minigen.captions import captioned_images
from minigen.io import load_safetensors, save_safetensors
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from minigen.training import TrainingDiverged

LONG_NAME = "n" * 300  # longer than any file system's name limit (255 bytes)
TINY = ["--model", "random:tiny", "--resolution", "16x16", "--bucket-step", "16", "--batch", "2", "--quiet",
        "--validation-steps", "1", "--validation-size", "16x16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def image_folder(folder, n=4):
    folder.mkdir()
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 16 + 16 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square of colour {i}")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A captioned folder, a one-epoch run (its stdout kept), and bad files made from them."""
    root = tmp_path_factory.mktemp("corpus")
    data = image_folder(root / "data")
    stdout = stdio.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert train_lora.main(TINY + ["--data", str(data), "--out", str(root / "run")]) == 0
    (root / "run-stdout.txt").write_text(stdout.getvalue())
    tensors, metadata = load_safetensors(root / "run" / "checkpoint.safetensors")
    first = next(k for k in tensors if k.startswith("lora."))
    save_safetensors(tensors | {first: torch.full_like(tensors[first], float("nan"))}, root / "nan.safetensors",
                     metadata)
    saved = json.loads(metadata["config"])
    for name, config in {"config-not-json": "{rank: 4", "config-rank-0": json.dumps(saved | {"rank": 0}),
                         "config-unknown": json.dumps(saved | {"learning_speed": 3})}.items():
        save_safetensors(tensors, root / f"{name}.safetensors", metadata | {"config": config})
    bad_jsonl = image_folder(root / "bad-jsonl")
    (bad_jsonl / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "red"}\n{"text": "no name"}\n')
    bad_utf16 = image_folder(root / "bad-utf16")
    (bad_utf16 / "0.txt").write_bytes(codecs.BOM_UTF16_LE + b"a\x00b")  # an odd number of bytes
    (root / "empty").mkdir()
    (root / "file").write_text("a regular file")
    (root / "model.ckpt").write_bytes(b"not a pickle at all")
    (root / "latin1.conf").write_bytes("--epochs 2 # é".encode("latin-1"))
    return root


def base(corpus, out):
    return TINY + ["--data", str(corpus / "data"), "--out", str(out)]


# Bad numbers: refused while parsing, before the model loads. (flags, words the message must hold)
FLAG_CASES = {
    "rank-0": (["--rank", "0"], "--rank", ">= 1"),
    "lr-0": (["--lr", "0"], "--lr", "> 0"),
    "lr-negative": (["--lr=-1e-4"], "--lr", "> 0"),
    "lr-nan": (["--lr", "nan"], "--lr", "finite"),
    "batch-0": (["--batch", "0"], "--batch", ">= 1"),
    "grad-accum-0": (["--grad-accum", "0"], "--grad-accum", ">= 1"),
    "epochs-0": (["--epochs", "0"], "--epochs", ">= 1"),
    "epochs-negative": (["--epochs", "-1"], "--epochs"),
    "save-every-epochs-0": (["--save-every-epochs", "0"], "--save-every-epochs", ">= 1"),
    "save-every-steps-negative": (["--save-every-steps", "-1"], "--save-every-steps", ">= 0"),
    "bucket-step-4": (["--bucket-step", "4"], "--bucket-step", ">= 8"),
    "resolution-text": (["--resolution", "big"], "--resolution"),
    "validation-size-0": (["--validation-size", "0"], "--validation-size"),
    "seed-negative": (["--seed=-1"], "--seed", "between 0"),
    "seed-too-big": (["--seed", str(2**64)], "--seed"),
    "validation-seed-too-big": (["--validation-seed", str(2**64)], "--validation-seed"),
    "caption-dropout-1": (["--caption-dropout", "1"], "--caption-dropout"),
    "lora-dropout-nan": (["--lora-dropout", "nan"], "--lora-dropout", "finite"),
    "noise-offset-inf": (["--noise-offset", "inf"], "--noise-offset", "finite"),
    "min-snr-gamma-negative": (["--min-snr-gamma=-1"], "--min-snr-gamma", ">= 0"),
    "max-grad-norm-nan": (["--max-grad-norm", "nan"], "--max-grad-norm"),
    "warmup-steps-negative": (["--warmup-steps=-1"], "--warmup-steps"),
    "weight-decay-nan": (["--weight-decay", "nan"], "--weight-decay"),
    "guidance-scale-inf": (["--guidance-scale", "inf"], "--guidance-scale"),
    "validation-steps-0": (["--validation-steps", "0"], "--validation-steps"),
    "max-images-negative": (["--max-images=-1"], "--max-images"),
    "prior-loss-weight-nan": (["--prior-loss-weight", "nan"], "--prior-loss-weight"),
    "text-encoder-lr-negative": (["--text-encoder-lr=-1"], "--text-encoder-lr"),
    "alpha-nan": (["--alpha", "nan"], "--alpha"),
    "rank-not-a-number": (["--rank", "four"], "--rank"),
    "threads-0": (["--threads", "0"], "--threads"),
    "optimizer-unknown": (["--optimizer", "adam"], "--optimizer"),
}
if not torch.cuda.is_available():
    FLAG_CASES["device-cuda-without-cuda"] = (["--device", "cuda"], "--device cuda", "no CUDA")


@pytest.mark.parametrize("flags, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FLAG_CASES.items()])
def test_bad_numbers_and_flags(corpus, tmp_path, capsys, flags, mentions):
    out = tmp_path / "out"
    fails_cleanly(train_lora.main, base(corpus, out) + flags, capsys, mentions, corpus, out)


# Bad data, model, checkpoint and preset files. (argv from the corpus and a fresh output folder, words the message
# must hold)
FILE_CASES = {
    "bucket-step-not-a-model-multiple": (lambda c, o: base(c, o) + ["--bucket-step", "20", "--resolution", "40"],
                                         "--bucket-step", "multiple of 8"),
    "validation-size-not-a-model-multiple": (lambda c, o: base(c, o) + ["--validation-size", "12x12",
                                                                        "--validation-prompts", "a square"],
                                             "--validation-size", "multiple of 8"),
    "metadata-jsonl-bad-line": (lambda c, o: base(c, o) + ["--data", str(c / "bad-jsonl")],
                                "metadata.jsonl line 2"),
    "caption-broken-utf16": (lambda c, o: base(c, o) + ["--data", str(c / "bad-utf16")], "0.txt", "UTF-16"),
    "data-missing": (lambda c, o: base(c, o) + ["--data", str(c / "nothing-here")], "nothing-here"),
    "data-a-file": (lambda c, o: base(c, o) + ["--data", str(c / "file")], "--data"),
    "data-empty": (lambda c, o: base(c, o) + ["--data", str(c / "empty")], "empty"),
    "class-data-without-prompt": (lambda c, o: base(c, o) + ["--instance-prompt", "sks", "--class-data",
                                                             str(c / "data")], "class prompt"),
    "model-missing": (lambda c, o: base(c, o) + ["--model", str(c / "missing.safetensors")], "missing.safetensors"),
    "model-not-given": (lambda c, o: base(c, o) + ["--model", ""], "--model"),
    "model-a-text-file": (lambda c, o: base(c, o) + ["--model", str(c / "file")], "file"),
    "model-folder-without-configs": (lambda c, o: base(c, o) + ["--model", str(c / "empty")], "empty"),
    "model-pickle-refused": (lambda c, o: base(c, o) + ["--model", str(c / "model.ckpt")], "model.ckpt",
                            "--allow-pickle"),
    "model-pickle-allowed-but-broken": (lambda c, o: base(c, o) + ["--model", str(c / "model.ckpt"), "--allow-pickle"],
                                       "model.ckpt", "weights_only"),
    "out-under-a-file": (lambda c, o: base(c, c / "file" / "run"), "--out", "file"),
    "out-name-too-long": (lambda c, o: base(c, o / LONG_NAME), "--out", "longer than"),
    "resume-missing": (lambda c, o: ["--resume", str(c / "missing.safetensors")], "missing.safetensors"),
    "resume-a-folder": (lambda c, o: ["--resume", str(c / "empty")], "empty"),
    "resume-nan-weights": (lambda c, o: ["--resume", str(c / "nan.safetensors"), "--out", str(o)],
                           "nan.safetensors", "lora."),
    "resume-config-not-json": (lambda c, o: ["--resume", str(c / "config-not-json.safetensors")],
                               "config-not-json.safetensors"),
    "resume-config-rank-0": (lambda c, o: ["--resume", str(c / "config-rank-0.safetensors")],
                             "config-rank-0.safetensors", "--rank"),
    "resume-config-unknown-name": (lambda c, o: ["--resume", str(c / "config-unknown.safetensors")],
                                   "config-unknown.safetensors", "learning_speed"),
    "resume-with-other-rank": (lambda c, o: ["--resume", str(c / "run" / "checkpoint.safetensors"), "--rank", "2",
                                             "--out", str(o)], "checkpoint.safetensors"),
    "preset-missing": (lambda c, o: ["--config", str(c / "missing.conf")], "missing.conf"),
    "preset-latin-1": (lambda c, o: ["--config", str(c / "latin1.conf")], "latin1.conf", "not UTF-8"),
}


@pytest.mark.parametrize("argv, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FILE_CASES.items()])
def test_bad_files(corpus, tmp_path, capsys, argv, mentions):
    out = tmp_path / "out"
    fails_cleanly(train_lora.main, argv(corpus, out), capsys, mentions, corpus)
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_a_latin1_metadata_jsonl_is_read_with_a_warning_naming_it(tmp_path):
    data = image_folder(tmp_path / "data")
    (data / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "café"}\n'.encode("latin-1"))
    with pytest.warns(UserWarning, match="metadata.jsonl is not UTF-8"):
        items = captioned_images(data)
    assert items[0].caption == "café"


def test_only_written_outputs_are_printed(corpus):
    printed = (corpus / "run-stdout.txt").read_text()  # a run without --validation-prompts
    assert "lora.safetensors" in printed and "checkpoint.safetensors" in printed
    assert "progress.png" not in printed and not (corpus / "run" / "samples").exists()


def resumable_run(corpus, out):
    shutil.copytree(corpus / "run", out)
    cfg = LoRATrainConfig(model="random:tiny", data=str(corpus / "data"), resolution="16x16", bucket_step=16,
                          batch=2, epochs=2, out=str(out))
    trainer = LoRATrainer(cfg, progress=False)
    trainer.load_checkpoint(out / "checkpoint.safetensors")
    return trainer


def test_a_non_finite_optimizer_state_is_never_saved(corpus, tmp_path):
    """Issue 12, item 4: an infinite Adam moment leaves the loss and the weights finite, but a checkpoint holding it
    cannot resume. Nothing is saved; the previous checkpoint stays."""
    out = tmp_path / "run"
    trainer = resumable_run(corpus, out)
    previous = snapshot(out)
    for state in trainer.optimizer.state.values():
        state["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="optimizer.*NaN or infinite.*last good checkpoint"):
        trainer.train()
    assert {k: v for k, v in snapshot(out).items() if "log.jsonl" not in k} == \
        {k: v for k, v in previous.items() if "log.jsonl" not in k}
    assert temp_files(out) == []


def test_full_disk_while_saving_leaves_no_partial_file(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(corpus / "run", out)
    previous = (out / "checkpoint.safetensors").read_bytes()

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.SafetensorsWriter, "write", disk_full)
    argv = ["--resume", str(out / "checkpoint.safetensors"), "--out", str(out), "--epochs", "2", "--quiet"]
    assert_clean_error(train_lora.main, argv, capsys, "checkpoint.safetensors", "No space left")
    assert (out / "checkpoint.safetensors").read_bytes() == previous
    assert not (out / "lora-epoch-0002.safetensors").exists() and temp_files(out) == []
