"""sample.py on bad input: a corpus of bad flags, bad model and LoRA files and faults built here. Each case must end
with exit code 2 and one line naming the flag or file, leave its inputs byte-identical and write no image. The model
is minigen's random tiny SDXL saved as a diffusers folder (no diffusers import needed)."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from cli_errors import assert_clean_error
from corpus import fails_cleanly, temp_files

import sample as sample_cli
from minigen.io import load_safetensors, save_safetensors
from minigen.lora.layers import add_lora, lora_parameters, lora_weights
from minigen.sd.lora_files import save_lora
from minigen.sd.model import random_model
from minigen.sd.convert import unet_name_map

LONG_NAME = "n" * 300  # longer than any file system's name limit (255 bytes)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny model, a LoRA for it (safetensors and pickled), and bad files."""
    root = tmp_path_factory.mktemp("corpus")
    sdxl = random_model("tiny")
    sdxl.save_diffusers(root / "model")
    add_lora(sdxl.unet, "attention", rank=2, alpha=1.0)
    with torch.no_grad():
        for p in lora_parameters(sdxl.unet):
            p.normal_(0, 0.3)
    save_lora(root / "lora.safetensors", {"unet": lora_weights(sdxl.unet)}, unet_names=unet_name_map(sdxl.unet.config))
    tensors, _ = load_safetensors(root / "lora.safetensors")
    torch.save(tensors, root / "lora.pt")
    first = next(k for k in tensors if k.endswith("lora_up.weight"))
    save_safetensors(tensors | {first: torch.full_like(tensors[first], float("nan"))}, root / "nan-lora.safetensors")
    # LyCORIS formats gone wrong: a LoHa without one of its parts; a LoCon whose kernel is not the layer's (3x3)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"
    save_safetensors({f"{conv}.hada_w1_a": torch.ones(8, 2), f"{conv}.hada_w1_b": torch.ones(2, 72),
                      f"{conv}.hada_w2_a": torch.ones(8, 2)}, root / "loha-part-missing.safetensors")
    save_safetensors({f"{conv}.lora_down.weight": torch.ones(2, 8, 5, 5), f"{conv}.lora_up.weight": torch.ones(8, 2, 1, 1)},
                     root / "locon-5x5.safetensors")
    (root / "bad-index").mkdir()
    (root / "bad-index" / "model_index.json").write_bytes(b"{\"unet\": [\xe9")
    (root / "index-only").mkdir()
    (root / "index-only" / "model_index.json").write_text('{"unet": [], "text_encoder_2": []}')
    (root / "empty.safetensors").write_bytes(b"")
    (root / "a-folder.safetensors").mkdir()
    (root / "file").write_text("a regular file")
    (root / "model.ckpt").write_bytes(b"not a pickle at all")
    # images for --init-image and --from-png
    pixels = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    pixels.save(root / "init.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    noise.save(root / "noise.png")
    (root / "truncated.png").write_bytes((root / "noise.png").read_bytes()[:400])
    pixels.save(root / "plain.png")  # no settings in it
    good = {"format": 1, "index": 0, "settings": {"prompt": "a cat", "steps": 1, "sampler": "euler"}}
    for name, text in {"bad-json": "{", "cfg-negative": json.dumps(good | {"settings": {"cfg": -1}}),
                       "sampler-unknown": json.dumps(good | {"settings": {"sampler": "heun"}}),
                       "unknown-setting": json.dumps(good | {"settings": {"colour": "red"}}),
                       "format-2": json.dumps(good | {"format": 2})}.items():
        png_with(root / f"{name}.png", pixels, minigen=text)
    png_with(root / "a1111-lora.png", pixels, parameters="a cat <lora:style:0.8>\nSteps: 1, Sampler: Euler, Seed: 1")
    png_with(root / "a1111-img2img.png", pixels,
             parameters="a cat\nSteps: 1, Sampler: Euler, Seed: 1, Denoising strength: 0.5")
    png_with(root / "a1111-bad-steps.png", pixels, parameters="a cat\nSteps: many, Sampler: Euler, Seed: 1")
    png_with(root / "1-000.png", pixels, minigen=json.dumps(good))  # what a redraw with --seed 1 would write
    return root


def png_with(path, image, **text):
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    image.save(path, pnginfo=info)


def argv(corpus, out, *extra):
    return ["--model", str(corpus / "model"), "--prompt", "a cat", "--steps", "1", "--height", "16", "--width", "16",
            "--seed", "1", "--out", str(out), "--device", "cpu", *extra]


# Refused while parsing, before the model loads. (flags, words the message must hold)
FLAG_CASES = {
    "cfg-nan": (["--cfg", "nan"], "--cfg", "finite"),
    "cfg-inf": (["--cfg", "inf"], "--cfg", "finite"),
    "cfg-negative": (["--cfg=-2"], "--cfg", ">= 0"),
    "eta-nan": (["--eta", "nan"], "--eta", "finite"),
    "eta-2": (["--eta", "2"], "--eta", "between 0 and 1"),
    "rescale-above-1": (["--rescale", "1.5"], "--rescale", "between 0 and 1"),
    "rescale-nan": (["--rescale", "nan"], "--rescale"),
    "steps-0": (["--steps", "0"], "--steps", ">= 1"),
    "steps-negative": (["--steps=-3"], "--steps"),
    "num-0": (["--num", "0"], "--num", ">= 1"),
    "seed-negative": (["--seed=-1"], "--seed", "between 0"),
    "seed-too-big": (["--seed", str(2**64)], "--seed", str(2**64 - 1)),
    "seed-text": (["--seed", "lucky"], "--seed", "integer"),
    "height-not-a-multiple-of-8": (["--height", "20"], "height", "multiple of 8"),
    "width-0": (["--width", "0"], "--width", ">= 8"),
    "height-text": (["--height", "tall"], "--height"),
    "threads-0": (["--threads", "0"], "--threads"),
    "sampler-unknown": (["--sampler", "heun"], "unknown sampler"),
    "lora-multiplier-nan": (["--lora", "x.safetensors:nan"], "x.safetensors", "finite"),
    "lora-multiplier-text": (["--lora", "x.safetensors:abc"], "x.safetensors", "number"),
    "strength-0": (["--strength", "0"], "--strength", "(0, 1]"),
    "strength-above-1": (["--strength", "1.5"], "--strength", "between 0 and 1"),
    "strength-nan": (["--strength", "nan"], "--strength", "finite"),
    "strength-without-init-image": (["--strength", "0.5"], "--strength", "--init-image"),
    "sampler-unknown-schedule": (["--sampler", "euler exponential"], "--sampler", "unknown sampler"),
    "sampler-schedule-against-karras": (["--sampler", "dpmpp_2m normal", "--karras"], "--sampler", "--karras"),
    "karras-with-ddim": (["--sampler", "DDIM", "--karras"], "Karras", "'ddim'"),
    "original-size-one-number": (["--original-size", "64"], "--original-size"),
    "original-size-0": (["--original-size", "0", "64"], "--original-size", ">= 1"),
    "crop-negative": (["--crop-top-left", "-8", "0"], "--crop-top-left", ">= 0"),
    "target-size-text": (["--target-size", "big", "64"], "--target-size", "integer"),
}
if not torch.cuda.is_available():
    FLAG_CASES["device-cuda-without-cuda"] = (["--device", "cuda"], "--device cuda", "no CUDA")


@pytest.mark.parametrize("flags, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FLAG_CASES.items()])
def test_bad_numbers_and_flags(corpus, tmp_path, capsys, flags, mentions):
    out = tmp_path / "out"
    fails_cleanly(sample_cli.main, argv(corpus, out, *flags), capsys, mentions, corpus, out)


# Bad model and LoRA files and output paths. (extra flags from the corpus, words the message must hold)
FILE_CASES = {
    "model-missing": (lambda c: ["--model", str(c / "missing")], "missing"),
    "model-a-text-file": (lambda c: ["--model", str(c / "file")], "file"),
    "model-empty-file": (lambda c: ["--model", str(c / "empty.safetensors")], "empty.safetensors"),
    "model-pickle-refused": (lambda c: ["--model", str(c / "model.ckpt")], "model.ckpt", "--allow-pickle"),
    "model-pickle-allowed-but-broken": (lambda c: ["--model", str(c / "model.ckpt"), "--allow-pickle"], "model.ckpt",
                                        "weights_only"),
    "model-index-not-json": (lambda c: ["--model", str(c / "bad-index")], "model_index.json"),
    "model-folder-without-parts": (lambda c: ["--model", str(c / "index-only")], "index-only"),
    "out-under-a-file": (lambda c: ["--out", str(c / "file" / "images")], "--out", "file"),
    "out-name-too-long": (lambda c: ["--out", str(c / LONG_NAME)], "--out", "longer than"),
    "init-image-missing": (lambda c: ["--init-image", str(c / "missing.png")], "missing.png"),
    "init-image-not-an-image": (lambda c: ["--init-image", str(c / "file")], "--init-image", "not a readable image"),
    "init-image-truncated": (lambda c: ["--init-image", str(c / "truncated.png")], "--init-image", "truncated.png"),
    "strength-leaves-no-step": (lambda c: ["--init-image", str(c / "init.png"), "--strength", "0.5"],
                                "strength 0.5 with 1 steps", "no step"),
    "vae-missing": (lambda c: ["--vae", str(c / "missing-vae.safetensors")], "--vae", "missing-vae.safetensors"),
    "from-png-missing": (lambda c: ["--from-png", str(c / "missing.png")], "missing.png"),
    "from-png-not-an-image": (lambda c: ["--from-png", str(c / "file")], "--from-png", "not a readable image"),
    "from-png-without-settings": (lambda c: ["--from-png", str(c / "plain.png")], "plain.png", "no minigen or A1111"),
    "from-png-bad-json": (lambda c: ["--from-png", str(c / "bad-json.png")], "bad-json.png"),
    "from-png-other-format": (lambda c: ["--from-png", str(c / "format-2.png")], "format-2.png", "format 1"),
    "from-png-saved-cfg-negative": (lambda c: ["--from-png", str(c / "cfg-negative.png")], "cfg-negative.png",
                                    "--cfg", ">= 0"),
    "from-png-saved-sampler-unknown": (lambda c: ["--from-png", str(c / "sampler-unknown.png")],
                                       "sampler-unknown.png", "unknown sampler 'heun'"),
    "from-png-unknown-setting": (lambda c: ["--from-png", str(c / "unknown-setting.png")], "unknown setting 'colour'"),
    "from-png-a1111-lora-not-given": (lambda c: ["--from-png", str(c / "a1111-lora.png")], "a1111-lora.png",
                                      "style:0.8", "--lora"),
    "from-png-a1111-init-image-not-given": (lambda c: ["--from-png", str(c / "a1111-img2img.png")], "--init-image"),
    "from-png-a1111-steps-not-a-number": (lambda c: ["--from-png", str(c / "a1111-bad-steps.png")],
                                          "a1111-bad-steps.png", "Steps", "not a number"),
    # these load the model first
    "lora-nan": (lambda c: ["--lora", str(c / "nan-lora.safetensors")], "nan-lora.safetensors", "lora_up.weight"),
    "lora-missing": (lambda c: ["--lora", str(c / "missing.safetensors")], "missing.safetensors"),
    "lora-a-folder": (lambda c: ["--lora", str(c / "a-folder.safetensors")], "a-folder.safetensors"),
    "lora-empty-file": (lambda c: ["--lora", str(c / "empty.safetensors")], "empty.safetensors"),
    "lora-pickle-refused": (lambda c: ["--lora", str(c / "lora.pt")], "lora.pt", "--allow-pickle"),
    "loha-part-missing": (lambda c: ["--lora", str(c / "loha-part-missing.safetensors")], "loha-part-missing",
                          "input_blocks_1_0_in_layers_2", "hada_w2_b"),
    "locon-another-kernel": (lambda c: ["--lora", str(c / "locon-5x5.safetensors")], "locon-5x5",
                             "input_blocks_1_0_in_layers_2", "(8, 8, 5, 5)"),
}


@pytest.mark.parametrize("extra, mentions", [pytest.param(c[0], c[1:], id=k) for k, c in FILE_CASES.items()])
def test_bad_files(corpus, tmp_path, capsys, extra, mentions):
    out = tmp_path / "out"
    fails_cleanly(sample_cli.main, argv(corpus, out, *extra(corpus)), capsys, mentions, corpus, out)


def test_a_file_that_is_not_a_vae(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert_clean_error(sample_cli.main, argv(corpus, out, "--vae", str(corpus / "lora.safetensors")), capsys,
                       "lora.safetensors")
    assert not out.exists()


def test_allow_pickle_loads_a_pickled_lora(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample_cli.main(argv(corpus, out, "--lora", str(corpus / "lora.pt"), "--allow-pickle")) == 0
    assert [p.name for p in out.iterdir()] == ["1-000.png"]


def test_a_second_run_numbers_on_and_replaces_nothing(corpus, tmp_path):
    """As A1111 and ComfyUI: the same seed into the same folder writes 1-001.png beside 1-000.png, which stays."""
    out = tmp_path / "out"
    assert sample_cli.main(argv(corpus, out)) == 0
    first = (out / "1-000.png").read_bytes()
    assert sample_cli.main(argv(corpus, out, "--steps", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1-000.png", "1-001.png"]
    assert (out / "1-000.png").read_bytes() == first


def test_full_disk_while_writing_an_image(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert_clean_error(sample_cli.main, argv(corpus, out), capsys, "1-000.png", "No space left")
    assert not list(out.glob("*.png")) and temp_files(out) == []
