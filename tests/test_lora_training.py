"""LoRA training: captions, buckets and crop conditioning, a tiny run that learns, exact resume, and bad input.

Runs use a random tiny SDXL (`minigen.sd.configs.TINY`, VAE scale 2) on 16x16 images with 16 px bucket steps, so
each step is a few milliseconds of model time; the real settings differ only in sizes.
"""

import codecs
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import train_lora

from minigen.finetune.buckets import make_buckets, nearest_bucket, prepare_image
from minigen.captions import captioned_images, dreambooth_images, read_caption
from minigen.io import CheckpointError, load_safetensors
from minigen.sd.lora_files import LoRAFileError
from minigen.sd.lora_reading import load_lora
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from minigen.training import TrainingDiverged
from minigen.sd.configs import get_config
from minigen.sd.model import build_model, random_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# -- captions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    codecs.BOM_UTF8 + "Café au lait".encode(),
    codecs.BOM_UTF16_LE + "Café au lait".encode("utf-16-le"),
    codecs.BOM_UTF16_BE + "Café au lait".encode("utf-16-be"),
    "Café au lait\r\n".encode(),
    "Café au lait".encode("utf-16-le"),  # UTF-16 without a BOM: its zero bytes say which order
    "Café au lait".encode("utf-16-be"),
])
def test_caption_encodings(tmp_path, raw):
    (tmp_path / "a.txt").write_bytes(raw)
    assert read_caption(tmp_path / "a.txt") == "Café au lait"


@pytest.mark.parametrize("text, encoding, read_as", [
    ("“Café” au lait — fin", "cp1252", "Windows-1252"),  # Notepad's "ANSI": curly quotes and dashes kept
    ("Café au lait", "latin-1", "Windows-1252"),  # é is the same byte in both
])
def test_caption_in_a_windows_code_page_warns(tmp_path, text, encoding, read_as):
    (tmp_path / "a.txt").write_bytes(text.encode(encoding))
    with pytest.warns(UserWarning, match=f"not UTF-8; read as {read_as}"):
        assert read_caption(tmp_path / "a.txt") == text


def test_caption_bytes_outside_windows_1252_read_as_latin_1(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \x81")  # 0x81 has no Windows-1252 character
    with pytest.warns(UserWarning, match="not UTF-8; read as latin-1"):
        assert read_caption(tmp_path / "a.txt") == "café \x81"


def test_zero_bytes_that_are_not_utf16_are_refused(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a red\x00 fox\x00\x00x")
    with pytest.raises(ValueError, match="a.txt: not a text file"):
        read_caption(tmp_path / "a.txt")


def _image(path, size=(32, 32), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)


def test_captions_sidecar_jsonl_prefix_and_missing(tmp_path):
    for name in "abc":
        _image(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "a red tile"}) + "\n")
    with pytest.warns(UserWarning, match=r"1 of 3 images .* have no caption .*'c.png'"):
        items = captioned_images(tmp_path, prefix="Still from the Anime, ", fallback="a painting")
    assert [i.caption for i in items] == ["Still from the Anime, a red square", "Still from the Anime, a red tile",
                                          "Still from the Anime, a painting"]
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="metadata.jsonl line 1"):
        captioned_images(tmp_path)


def test_dreambooth_instance_and_class_images(tmp_path):
    (tmp_path / "dog").mkdir(), (tmp_path / "dogs").mkdir()
    _image(tmp_path / "dog" / "1.png"), _image(tmp_path / "dogs" / "1.png"), _image(tmp_path / "dogs" / "2.png")
    items = dreambooth_images(tmp_path / "dog", "a photo of sks dog", tmp_path / "dogs", "a photo of a dog")
    assert [(i.caption, i.is_class_image) for i in items] == [
        ("a photo of sks dog", False), ("a photo of a dog", True), ("a photo of a dog", True)]
    with pytest.raises(ValueError, match="class prompt"):
        dreambooth_images(tmp_path / "dog", "a photo of sks dog", tmp_path / "dogs")


# -- buckets and crop conditioning -------------------------------------------------------------------------------

def test_buckets_seed_000():
    buckets = make_buckets(400 * 600)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 400 * 600 for h, w in buckets)
    assert nearest_bucket(400, 600, buckets) == (384, 576)  # seed 000's 600x400 paintings keep their 3:2 shape
    assert nearest_bucket(600, 400, buckets) == (576, 384)
    assert nearest_bucket(1024, 1024, make_buckets(1024 * 1024)) == (1024, 1024)


def test_crop_conditioning_and_flip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)  # (H, W, 3): 100 wide, 60 high
    img = Image.fromarray(pixels)
    centre = prepare_image(img, (60, 64))  # same height: no resize, 36 spare columns
    assert centre.original_size == (60, 100) and centre.crop_top_left == (0, 18)
    expected = torch.from_numpy(pixels[:, 18:82].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(centre.pixels, expected)
    g = torch.Generator().manual_seed(3)
    crop = prepare_image(img, (60, 64), random_crop=True, generator=g)
    flipped = prepare_image(img, (60, 64), random_crop=True, flip=True, generator=torch.Generator().manual_seed(3))
    top, left = crop.crop_top_left
    assert flipped.crop_top_left == (top, 36 - left)  # the same crop, measured in the mirrored image
    torch.testing.assert_close(flipped.pixels, crop.pixels.flip(-1))
    small = prepare_image(Image.fromarray(pixels[:20, :30]), (64, 64))  # smaller than its bucket: scaled up
    assert small.pixels.shape == (3, 64, 64) and small.original_size == (20, 30)


# -- training ----------------------------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    colours = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 220, 40)]
    for i, colour in enumerate(colours):
        rng = np.random.default_rng(i)
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (24, 32 if i % 2 else 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square of colour {i}")
    return folder


def tiny_config(data, out, **kw) -> LoRATrainConfig:
    settings = dict(model="random:tiny", data=str(data), resolution="16x16", bucket_step=16, rank=4, lr=1e-2,
                    batch=2, epochs=1, out=str(out), validation_steps=2, validation_size="16x16")
    return LoRATrainConfig(**(settings | kw))


def test_training_lowers_loss_writes_files_and_the_lora_reloads(data, tmp_path):
    # kohya targets and a high rate: a random tiny UNet moves measurably in 8 steps (1.171 -> 1.103 when written)
    cfg = tiny_config(data, tmp_path / "run", epochs=8, batch=4, lr=0.05, targets="kohya",
                      validation_prompts=["a red square", "a blue square"])
    trainer = LoRATrainer(cfg, progress=False)
    assert {e.bucket for e in trainer.data.examples} == {(16, 16)}  # 16 px steps, 256 px area: only the square fits
    batch = [0, 1, 2, 3]
    before = trainer.fixed_batch_loss(batch)
    trainer.train()
    after = trainer.fixed_batch_loss(batch)
    assert after < 0.97 * before, (before, after)
    run = tmp_path / "run"
    for name in ("lora.safetensors", "lora-epoch-0001.safetensors", "checkpoint.safetensors", "loss.png",
                 "log.jsonl", "samples/epoch_0000.png", "samples/epoch_0008.png", "samples/progress.png"):
        assert (run / name).is_file(), name
    assert len((run / "log.jsonl").read_text().splitlines()) == 8  # 1 batch x 8 epochs
    assert Image.open(run / "samples/progress.png").size[1] == 9 * Image.open(run / "samples/epoch_0000.png").size[1]
    # the file reloads into a fresh copy of the base model and reproduces the trained model's output
    fresh = random_model("tiny")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context, pooled, ids = torch.randn(1, 77, 96), torch.randn(1, 32), torch.tensor([[16., 16, 0, 0, 16, 16]])
    with torch.no_grad():
        base = fresh.unet(x, t, context, pooled, ids)
        metadata, _ = load_lora(run / "lora.safetensors", {"unet": fresh.unet})
        loaded = fresh.unet(x, t, context, pooled, ids)
        trained = trainer.model.unet.eval()(x, t, context, pooled, ids)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "8"
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the output...
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)  # ...exactly as training left it


def final_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.trainable().items()}


def test_resume_equals_uninterrupted(data, tmp_path):
    # every random part on: crops, flips, caption dropout, noise offset, min-SNR, LoRA dropout, warm-up + cosine,
    # gradient accumulation, a text-encoder LoRA with its own rate, LoCon on the 3x3 convolutions, DoRA
    kw = dict(epochs=2, batch=1, grad_accum=2, conv_rank=2, conv_alpha=1.0, dora=True, random_crop=True, flip=True, cache_latents="off", caption_dropout=0.3,
              noise_offset=0.1, min_snr_gamma=5.0, lora_dropout=0.1, warmup_steps=2, lr_scheduler="cosine",
              train_text_encoder=True, text_encoder_lr=5e-3, prediction_type="v_prediction")
    whole = LoRATrainer(tiny_config(data, tmp_path / "whole", **kw), progress=False)
    whole.train()
    first = LoRATrainer(tiny_config(data, tmp_path / "parts", **kw), progress=False)
    assert first.train(stop_after_steps=3) == "stopped"  # mid-way through epoch 2
    second = LoRATrainer(tiny_config(data, tmp_path / "parts", **kw), progress=False)
    second.load_checkpoint(tmp_path / "parts" / "checkpoint.safetensors")
    assert second.step == 3 and second.epoch == 1
    second.train()
    a, b = final_weights(whole), final_weights(second)
    assert a.keys() == b.keys() and any(k.startswith("te2.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="LoRA tensors"):  # a run with other settings refuses it
        LoRATrainer(tiny_config(data, tmp_path / "x"), progress=False).load_checkpoint(
            tmp_path / "parts" / "checkpoint.safetensors")


def test_ctrl_c_saves_at_the_next_step_and_says_how_to_resume(data, tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN in a job started with `&`
    trainer = LoRATrainer(tiny_config(data, tmp_path / "run", epochs=2, batch=1), progress=False)
    loss = trainer.loss

    def interrupted_loss(*args):  # Ctrl-C while the second step's loss is computed
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*args)
    trainer.loss = interrupted_loss
    assert trainer.train() == "interrupted"
    assert trainer.step == 2  # that step finished: nothing half-done is lost
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    assert load_safetensors(checkpoint)[1]["step"] == "2"
    assert f"python train_lora.py --resume {checkpoint}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_resuming_a_finished_run_without_more_epochs_is_refused(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "run")
    LoRATrainer(cfg, progress=False).train()
    with pytest.raises(ValueError, match=r"--epochs 1: the run in .* has trained 1 epochs.*\(--epochs 11 trains 10 more\)"):
        LoRATrainer(cfg, progress=False).load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")


def test_train_lora_exits_130_when_interrupted_and_prints_no_summary(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C ends train_lora.py as it ends train_gan.py: exit 130 (the trainer has printed how to resume), not 0
    with the outputs of a finished run."""
    class Interrupted(LoRATrainer):
        def train(self, stop_after_steps=None):
            return "interrupted"

    monkeypatch.setattr(train_lora, "LoRATrainer", Interrupted)
    cfg = tiny_config(data, tmp_path / "run")
    argv = ["--model", cfg.model, "--data", cfg.data, "--resolution", cfg.resolution, "--bucket-step", "16",
            "--out", cfg.out, "--device", "cpu", "--quiet"]
    assert train_lora.main(argv) == 130
    assert "lora:" not in capsys.readouterr().out


def test_every_flag_says_what_it_does():
    """`train_lora.py --help`: no entry is only its default."""
    empty = [a.option_strings[0] for a in train_lora.build_parser()._actions
             if a.option_strings and not (a.help or "").split("(default")[0].strip()]
    assert empty == []


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_keeps_lora_weights_fp32(data, tmp_path, precision, dtype):
    trainer = LoRATrainer(tiny_config(data, tmp_path / precision, mixed_precision=precision), progress=False)
    trainer.train()
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # fp16 needs loss scaling; bf16's range does not
    assert trainer.model.unet.conv_in.weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in trainer.trainable().values())
    assert trainer.step == 2 and torch.isfinite(torch.tensor(trainer.records[-1]["loss"]))


def test_nan_loss_stops_and_keeps_the_checkpoint(data, tmp_path):
    trainer = LoRATrainer(tiny_config(data, tmp_path / "nan", epochs=2), progress=False)
    trainer.train(stop_after_steps=1)
    checkpoint = (tmp_path / "nan" / "checkpoint.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(trainer.trainable().values())).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1"):
        trainer.train()
    assert (tmp_path / "nan" / "checkpoint.safetensors").read_bytes() == checkpoint


def test_bad_input(data, tmp_path):
    with pytest.raises(ValueError, match="--random-crop .* --cache-latents off"):
        tiny_config(data, tmp_path, random_crop=True)
    with pytest.raises(ValueError, match="--optimizer must be one of"):
        tiny_config(data, tmp_path, optimizer="adam")
    _image(data / "tiny.png", size=(8, 8))
    with pytest.raises(ValueError, match=r"tiny.png is 8x8, smaller than one 16 px bucket step"):
        LoRATrainer(tiny_config(data, tmp_path / "small"), progress=False)


def test_lora_for_another_model_names_the_mismatch(data, tmp_path):
    trainer = LoRATrainer(tiny_config(data, tmp_path / "run"), progress=False)
    trainer.save_lora(tmp_path / "lora.safetensors")
    config = get_config("tiny", "unet") | {"block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8]}
    other = build_model("unet", config)
    with pytest.raises(LoRAFileError, match=r"has weight \(128, 128\).*a LoRA for another model"):
        load_lora(tmp_path / "lora.safetensors", {"unet": other})


def test_the_refiner_is_refused_before_any_step(data, tmp_path, capsys):
    """The refiner's UNet wants 5 time ids with an aesthetic score; training used to fail deep in the UNet."""
    with pytest.raises(ValueError, match="random:tiny-refiner is the SDXL refiner: LoRA training takes SD 1.x"):
        LoRATrainer(tiny_config(data, tmp_path / "run", model="random:tiny-refiner"), progress=False)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_presets_reproduce_the_seeds_and_the_cli_reports_errors(tmp_path, capsys):
    import train_lora

    _, c000 = train_lora.parse(["--config", "configs/lora_000.conf"])
    assert (c000.optimizer, c000.lr, c000.rank, c000.batch, c000.epochs, c000.resolution) == \
        ("adafactor", 1e-3, 128, 20, 12, "400x600")
    _, c001 = train_lora.parse(["--config", "configs/lora_001.conf", "--epochs", "2"])  # the command line wins
    assert (c001.rank, c001.lr, c001.mixed_precision, c001.batch, c001.grad_accum, c001.warmup_steps,
            c001.train_text_encoder, c001.resolution, c001.epochs, c001.save_every_steps, c001.caption_prefix) == \
        (16, 1e-5, "bf16", 1, 8, 500, True, "1024", 2, 1000, "Still from the Anime, ")
    _, c004 = train_lora.parse(["--config", "configs/lora_004.conf"])
    assert c004.instance_prompt and c004.epochs == 40
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert train_lora.main(["--resume", str(tmp_path / "other.safetensors")]) == 2
    assert "not a minigen LoRA training checkpoint" in capsys.readouterr().err


def test_disk_latent_cache_is_reused(data, tmp_path):
    first = LoRATrainer(tiny_config(data, tmp_path / "run", cache_latents="disk"), progress=False)
    cache = tmp_path / "run" / "cache" / "latents.safetensors"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = LoRATrainer(tiny_config(data, tmp_path / "run", cache_latents="disk", seed=0), progress=False)
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    for a, b in zip(first.data.examples, second.data.examples):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.time_ids, b.time_ids)


def test_dreambooth_prior_preservation_weights_class_images(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "db", instance_prompt="a photo of sks square", class_data=str(data),
                      class_prompt="a photo of a square", prior_loss_weight=0.0, batch=1)
    trainer = LoRATrainer(cfg, progress=False)
    flags = [e.item.is_class_image for e in trainer.data.examples]
    assert flags == [False] * 4 + [True] * 4
    assert {e.item.caption for e in trainer.data.examples} == {"a photo of sks square", "a photo of a square"}
    assert trainer.fixed_batch_loss([5]) == 0.0  # a class image with weight 0 adds nothing
    assert trainer.fixed_batch_loss([1]) > 0


def test_cli_trains_and_resumes_with_the_saved_settings(data, tmp_path, capsys):
    import train_lora

    out = tmp_path / "cli"
    flags = ["--model", "random:tiny", "--data", str(data), "--resolution", "16x16", "--bucket-step", "16",
             "--batch", "2", "--out", str(out), "--quiet", "--validation-prompts", "a red square",
             "--validation-steps", "1", "--validation-size", "16x16"]
    assert train_lora.main(flags) == 0
    assert "lora.safetensors" in capsys.readouterr().out
    # --resume takes every setting from the checkpoint; only --epochs changes: one more epoch of 2 steps
    assert train_lora.main(["--resume", str(out / "checkpoint.safetensors"), "--epochs", "2", "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in log] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert (out / "samples" / "epoch_0002.png").is_file() and (out / "lora-epoch-0002.safetensors").is_file()
