"""A Stable Diffusion trained from scratch by train_sd.py (minigen/finetune/from_scratch.py), the whole chain at a toy size in
seconds: the VAE stage, the UNet + text-encoder stage, the saved single file and diffusers folder; diffusers'
StableDiffusionPipeline draws the same image from the folder as minigen from the single file; sample.py (img2img
and --from-png too), train_lora.py, eval.py and merge.py take the model; a run stopped mid-stage and resumed ends
with the weights of an uninterrupted one; bad input ends with one line."""

import dataclasses
import functools
import shutil

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import eval as eval_cli
import merge as merge_cli
import sample as sample_cli
import train_lora as train_lora_cli
import train_sd
from cli_errors import assert_clean_error
from close import assert_close_to_scale
from minigen.io import save_safetensors
from minigen.sd.model import load_model
from minigen.sd.pipeline import Pipeline
from minigen.finetune.from_scratch import FromScratchTrainer, SDTrainConfig
from test_fid_parity import random_inception

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

SIZE = 32  # tiny-sd1: the VAE scales by 2, so 16x16 latents
COLOURS = {"red circle": (221, 46, 68), "blue circle": (85, 172, 238), "green square": (120, 177, 89),
           "yellow square": (253, 203, 88)}
# fp32 on both sides, operation order differs: see test_sd_pipeline.py's IMAGE_TOL (1/20 of 1/255).
IMAGE_TOL = 2e-4


def make_data(folder):
    """Four captioned emoji-like drawings: a circle or a square of a colour on white."""
    folder.mkdir()
    for k, (caption, colour) in enumerate(COLOURS.items()):
        img = Image.new("RGB", (40, 40), "white")
        draw = ImageDraw.Draw(img)
        (draw.ellipse if "circle" in caption else draw.rectangle)((6, 6, 34, 34), fill=colour)
        img.save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(caption)
    return folder


def toy_args(data, out, *extra):
    return ["--preset", "tiny-sd1", "--data", str(data), "--out", str(out), "--resolution", str(SIZE),
            "--bucket-step", "16", "--vae-epochs", "2", "--vae-batch", "2", "--epochs", "2", "--batch", "2",
            "--caption-dropout", "0.25", "--validation-prompts", "red circle", "blue circle", "--validation-steps",
            "2", "--grid-samples", "2", "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    data = make_data(root / "data")
    assert train_sd.main(toy_args(data, root / "run")) == 0
    return root / "run", data


def test_run_writes_every_output(run):
    out, _ = run
    for name in ("model.safetensors", "model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
                 "grid.png", "vae/model.safetensors", "vae/samples/progress.png", "vae/loss.png",
                 "unet/checkpoint.safetensors", "unet/samples/progress.png", "unet/loss.png", "unet/log.jsonl"):
        assert (out / name).exists(), name
    assert Image.open(out / "grid.png").height >= 2 * SIZE  # two prompts, two samples each


def test_vae_scaling_factor_is_set_from_the_latents(run):
    out, _ = run
    model = load_model(out / "model.safetensors")
    assert model.vae.scaling_factor != 0.18215  # the placeholder was replaced by 1 / std of the latents
    assert model.configs["vae"]["scaling_factor"] == model.vae.scaling_factor
    assert load_model(out / "model").vae.scaling_factor == pytest.approx(model.vae.scaling_factor)


@functools.lru_cache(maxsize=None)
def diffusers_pipeline(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def test_diffusers_draws_the_same_image(run):
    out, _ = run
    ref = diffusers_pipeline(str(out / "model"))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    want = ref("red circle", num_inference_steps=4, guidance_scale=4.0, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    ours = Pipeline.from_pretrained(out / "model.safetensors")
    got = ours("red circle", steps=4, guidance_scale=4.0, sampler="euler", height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(3), output="float")
    assert_close_to_scale(got.cpu(), want, IMAGE_TOL, min_scale=1.0)


def test_sample_py_img2img_and_from_png(run, tmp_path):
    out, data = run
    assert sample_cli.main(["--model", str(out / "model.safetensors"), "--prompt", "blue circle", "--steps", "3",
                            "--seed", "1", "--sampler", "DPM++ 2M Karras", "--out", str(tmp_path / "a")]) == 0
    drawn = next((tmp_path / "a").glob("*.png"))
    assert Image.open(drawn).size == (SIZE, SIZE)  # the model's own size, from its configs
    assert sample_cli.main(["--model", str(out / "model"), "--prompt", "red circle", "--steps", "4", "--seed", "1",
                            "--init-image", str(data / "0.png"), "--strength", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert sample_cli.main(["--from-png", str(drawn), "--model", str(out / "model.safetensors"),
                            "--out", str(tmp_path / "c")]) == 0
    redrawn = next((tmp_path / "c").glob("*.png"))
    diff = np.abs(np.asarray(Image.open(redrawn), np.int16) - np.asarray(Image.open(drawn), np.int16))
    assert diff.max() <= 1  # the same settings again, within rounding


def test_lora_eval_and_merge_take_the_model(run, tmp_path):
    out, data = run
    lora_run = tmp_path / "lora"
    assert train_lora_cli.main(["--model", str(out / "model.safetensors"), "--data", str(data), "--resolution",
                                str(SIZE), "--bucket-step", "16", "--rank", "2", "--epochs", "2", "--batch", "2",
                                "--out", str(lora_run), "--device", "cpu", "--quiet"]) == 0
    lora = lora_run / "lora.safetensors"
    weights = tmp_path / "inception.safetensors"
    save_safetensors(random_inception().state_dict(), weights)
    (tmp_path / "prompts.txt").write_text("red circle\nblue circle\n")
    assert eval_cli.main(["--model", str(out / "model"), "--lora", str(lora_run), "--prompts",
                          str(tmp_path / "prompts.txt"), "--ref", str(data), "--num", "1", "--steps", "2",
                          "--inception-weights", str(weights), "--dims", "64", "--is-splits", "1",
                          "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").is_file()
    baked = tmp_path / "baked.safetensors"
    assert merge_cli.main([str(out / "model.safetensors"), "--lora", f"{lora}:0.8", "-o", str(baked)]) == 0
    merged = tmp_path / "merged.safetensors"
    assert merge_cli.main([str(out / "model.safetensors"), str(baked), "--alpha", "0.7", "-o", str(merged)]) == 0
    assert load_model(merged).family == "sd1"


def test_resumed_run_ends_as_an_uninterrupted_one(run, tmp_path):
    """Stopped after one optimizer step of the UNet stage and resumed: the same weights as a run never stopped."""
    out, data = run
    cfg = SDTrainConfig(preset="tiny-sd1", data=str(data), resolution=str(SIZE), bucket_step=16, epochs=2, batch=2,
                        caption_dropout=0.25, stage="unet", out=str(tmp_path / "a"))
    for name in ("a", "b"):  # both start from the trained VAE of `run`
        (tmp_path / name / "vae").mkdir(parents=True)
        (tmp_path / name / "vae" / "model.safetensors").write_bytes((out / "vae" / "model.safetensors").read_bytes())
    whole = FromScratchTrainer(cfg, progress=False)
    whole.train()
    cfg_b = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    assert FromScratchTrainer(cfg_b, progress=False).train(stop_after_steps=1) == "stopped"
    resumed = FromScratchTrainer(cfg_b, progress=False)
    resumed.load_checkpoint(tmp_path / "b" / "unet" / "checkpoint.safetensors")
    resumed.train()
    for name, p in whole.trainable().items():
        torch.testing.assert_close(resumed.trainable()[name], p, rtol=0, atol=1e-6, msg=name)


def test_colour_captions_say_the_measured_colour(run, tmp_path):
    """--colour-captions: a caption without a colour gets its picture's; one that names a colour keeps its words."""
    out, _ = run
    data = make_data(tmp_path / "data")
    (data / "0.txt").write_text("circle")  # the red circle and the green square lose their colour word
    (data / "2.txt").write_text("square")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "model.safetensors").write_bytes((out / "vae" / "model.safetensors").read_bytes())
    cfg = SDTrainConfig(preset="tiny-sd1", data=str(data), resolution=str(SIZE), bucket_step=16, stage="unet",
                        out=str(tmp_path))
    for colour, expected in ((False, ["circle", "blue circle", "square"]),
                             (True, ["red circle", "blue circle", "green square"])):
        trainer = FromScratchTrainer(dataclasses.replace(cfg, colour_captions=colour), progress=False)
        assert [e.item.caption for e in trainer.data.examples][:3] == expected


def test_vae_mse_weight_adds_a_squared_error_term(tmp_path):
    """--vae-mse-weight w adds w * the mean squared reconstruction error to the VAE stage's loss: the loss grows
    by the same positive step from w = 0 to 1 as from 1 to 2 (same batch, same noise)."""
    cfg = SDTrainConfig(preset="tiny-sd1", data=str(make_data(tmp_path / "data")), resolution=str(SIZE),
                        bucket_step=16, out=str(tmp_path / "run"))
    trainer = FromScratchTrainer(cfg, progress=False)

    def loss(weight):
        trainer.cfg = dataclasses.replace(trainer.cfg, vae_mse_weight=weight)
        with torch.no_grad():
            return trainer.loss([0, 1], [torch.Generator().manual_seed(k) for k in (0, 1)], 2).item()

    l0, l1, l2 = loss(0.0), loss(1.0), loss(2.0)
    assert l1 - l0 > 0
    assert l2 - l1 == pytest.approx(l1 - l0, rel=1e-5)


def test_a_used_out_folder_is_refused_unless_overwrite(run, tmp_path, capsys):
    """A fresh run into a folder holding one: one line naming --resume and --overwrite, and nothing touched;
    --stage unet --overwrite retrains the UNet stage on the kept VAE, its old pictures gone."""
    out, data = run
    shutil.copytree(out, tmp_path / "run")
    out = tmp_path / "run"
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    checkpoint = out / "unet" / "checkpoint.safetensors"
    assert_clean_error(train_sd.main, toy_args(data, out), capsys, f"--resume {checkpoint} continues it",
                       "--overwrite replaces it")
    assert_clean_error(train_sd.main, ["--resume", str(checkpoint), "--overwrite"], capsys, "give one of them")
    assert files() == before
    assert train_sd.main(toy_args(data, out, "--stage", "unet", "--epochs", "1", "--overwrite")) == 0
    after = files()
    assert all(after[p] == before[p] for p in before if "vae" in p.relative_to(out).parts)  # the VAE is kept
    assert sorted(p.name for p in (out / "unet" / "samples").glob("epoch_*")) == ["epoch_0000.png", "epoch_0001.png"]  # no 0002
    assert after[out / "model.safetensors"] != before[out / "model.safetensors"]


@pytest.mark.parametrize("extra, mentions", [
    (["--stage", "unet"], ("--stage unet needs a trained VAE",)),
    (["--preset", "sd9"], ("--preset must be one of",)),
    (["--vae-batch", "0"], ("--vae-batch must be >= 1",)),
    (["--vae-mse-weight", "-1"], ("--vae-mse-weight must be >= 0",)),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, mentions):
    data = make_data(tmp_path / "data")
    assert_clean_error(train_sd.main, toy_args(data, tmp_path / "run", *extra), capsys, *mentions)


def test_every_flag_says_what_it_does():
    """`train_sd.py --help`: no entry is only its default, and no LoRA-only setting is offered."""
    actions = [a for a in train_sd.build_parser()._actions if a.option_strings]
    assert [a.option_strings[0] for a in actions if not (a.help or "").split("(default")[0].strip()] == []
    assert not {"--rank", "--model", "--targets", "--dora"} & {s for a in actions for s in a.option_strings}
