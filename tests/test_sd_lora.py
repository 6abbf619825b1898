"""LoRA on SD 1.x and 2.x (issue 14): trained by minigen, loaded by diffusers, named as sd-scripts names them.

A LoRA (UNet and text encoder) is trained for a few steps on the tiny SD 1 and SD 2 (v-prediction) models whose
diffusers pipelines tests/test_sd_pipeline.py builds, so minigen and diffusers hold the same random weights. The kohya
file minigen writes is loaded by diffusers' `StableDiffusionPipeline.load_lora_weights` (its own kohya converter and
peft) and draws the image minigen's pipeline draws with the same file.

Tolerances: guided images as tests/test_sd_pipeline.py (IMAGE_TOL, 2e-4 of the [0, 1] scale: fp32 both sides,
operation order differs, and guidance 4 multiplies the UNet's ~2e-5 differences each step: 1.1e-4 measured for the
SD 2 v-prediction LoRA); unguided images 1e-5 (7e-7 measured). Prompt embeddings: 1e-5 absolute on values of scale
~1 (one fp32 text-encoder forward, ~1e-6 apart). A LoRA that failed to load, or loaded at a wrong scale, moves the
images by > 1e-2 (asserted; 0.09-0.3 measured), 50 times the tolerance.
"""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from close import assert_close_to_scale
from test_fid_parity import random_inception
from test_sd_pipeline import FAMILIES, IMAGE_TOL, reference_folder

import eval as eval_cli
import merge as merge_cli
from minigen.io import load_weights, save_safetensors
from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from minigen.sd.convert import unet_name_map
from minigen.sd.lora_files import LoRAFileError, kohya_state_dict, save_lora
from minigen.sd.model import load_model, random_model
from minigen.sd.pipeline import Pipeline, encode_prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

EMBEDDING_TOL = dict(atol=1e-5, rtol=0)
DRAW = dict(height=16, width=16, guidance_scale=4.0)  # guidance on: the negative prompt goes through the LoRA too
PROMPT, NEGATIVE = "a square of colour 1", "blurry"


def write_data(folder):
    """Four 16 px colour squares with captions: the tiny models' smallest bucket (their sides are multiples of 16)."""
    folder.mkdir()
    for i, colour in enumerate([(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 220, 40)]):
        pixels = np.clip(np.array(colour) + np.random.default_rng(i).normal(0, 20, (16, 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square of colour {i}")
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """(preset, trainer, run folder): 2 epochs x 2 steps of UNet (kohya targets) and text-encoder LoRA, written in
    kohya's layout. A high rate, so a few steps move the images well past the tolerance."""
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    cfg = LoRATrainConfig(model=str(reference_folder(preset)), data=str(write_data(root / "data")),
                          resolution="16x16", bucket_step=16, rank=4, alpha=2.0, lr=0.02, targets="kohya",
                          train_text_encoder=True, clip_skip=2, batch=2, epochs=2, out=str(root / "run"))
    trainer = LoRATrainer(cfg, progress=False)
    trainer.train()
    return preset, trainer, root / "run"


def minigen_images(preset, lora=None, **kwargs):
    pipe = Pipeline.from_pretrained(reference_folder(preset))
    if lora is not None:
        pipe.add_lora(lora)
    return pipe(PROMPT, NEGATIVE, steps=3, output="float", generator=torch.Generator().manual_seed(5),
                **(DRAW | kwargs))


def diffusers_pipeline(preset, lora):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(reference_folder(preset), local_files_only=True)
    pipe.load_lora_weights(str(lora))
    return pipe


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0])
def test_a_trained_lora_draws_diffusers_image(trained, guidance_scale):
    preset, _, run = trained
    draw = {**DRAW, "guidance_scale": guidance_scale}
    pipe = diffusers_pipeline(preset, run / "lora.safetensors")
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(5), **draw).images
    ours = minigen_images(preset, run / "lora.safetensors", **draw)
    assert (ours - minigen_images(preset, **draw)).abs().max() > 1e-2  # the LoRA changes the image
    assert_close_to_scale(ours, ref, IMAGE_TOL if guidance_scale > 1 else 1e-5, min_scale=1.0)


def test_the_text_encoder_lora_gives_diffusers_prompt_embeddings(trained):
    """The file's text-encoder layers, read by diffusers into its CLIP model, give the embeddings minigen's give."""
    preset, _, run = trained
    pipe = diffusers_pipeline(preset, run / "lora.safetensors")
    theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)  # (1, 77, D)
    model = Pipeline.from_pretrained(reference_folder(preset)).model
    base, _ = encode_prompt(model, [PROMPT])
    Pipeline(model).add_lora(run / "lora.safetensors")
    ours, pooled = encode_prompt(model, [PROMPT])
    assert pooled is None  # SD 1/2: no pooled prompt
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, **EMBEDDING_TOL)


def test_kohya_names_and_metadata_are_sd_scripts(trained):
    """sd-scripts trains SD 1/2 on the diffusers UNet, so its layer names are diffusers module paths (not SGM paths
    as for SDXL), and the one text encoder is `lora_te_`; its metadata says the version and v-prediction."""
    preset, _, run = trained
    tensors, meta = load_weights(run / "lora.safetensors")
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                 "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                 "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha"):
        assert name in tensors, name
    assert not [k for k in tensors if k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks"))]
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    v = preset == "tiny-sd2"
    assert meta["ss_base_model_version"] == ("sd_v2_v" if v else "sd_v1")
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v1/lora")
    assert (meta["ss_v2"], meta["ss_v_parameterization"]) == ((str(v),) * 2)
    assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert meta["ss_clip_skip"] == meta["modelspec.encoder_layer"] == "2"


def test_training_follows_the_model_prediction_and_clip_skip(trained):
    preset, trainer, _ = trained
    assert trainer.schedule.prediction_type == ("v_prediction" if preset == "tiny-sd2" else "epsilon")
    model = load_model(reference_folder(preset))
    cfg = dataclasses.replace(trainer.cfg, train_text_encoder=False, out=str(trainer.out.parent / "cache"))
    cached = LoRATrainer(cfg, progress=False)  # text encoders frozen: captions encoded once, here
    context, _ = cached.data.text_cache["a square of colour 2"]  # (77, D), encoded at clip skip 2
    torch.testing.assert_close(context, encode_prompt(model, ["a square of colour 2"], clip_skip=2)[0][0])
    assert (context - encode_prompt(model, ["a square of colour 2"])[0][0]).abs().max() > 1e-3


def test_diffusers_and_sgm_named_files_load_to_the_same_image(trained, tmp_path):
    """The same LoRA as a diffusers/peft file (`unet.` / `text_encoder.`) and as a kohya file with SGM UNet names
    (what ComfyUI and some converters write for SD 1.x) draws what the sd-scripts-named file draws."""
    preset, trainer, run = trained
    lora = trainer.lora_file_contents()
    with pytest.warns(UserWarning, match="diffusers/peft-layout"):
        save_lora(tmp_path / "peft.safetensors", lora, "diffusers")
    unet_names = unet_name_map(trainer.model.unet.config)
    save_file({k: v.contiguous() for k, v in kohya_state_dict(lora, unet_names, "sdxl").items()},
              tmp_path / "sgm.safetensors")
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in load_weights(tmp_path / "sgm.safetensors")[0]
    want = minigen_images(preset, run / "lora.safetensors")
    for name in ("peft.safetensors", "sgm.safetensors"):
        torch.testing.assert_close(minigen_images(preset, tmp_path / name), want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- another architecture

def sdxl_layers_file(path):
    """A kohya file with SDXL's two text encoders' layers and no metadata, as some converters write them."""
    save_file({f"lora_te{i}_text_model_encoder_layers_0_self_attn_q_proj.{part}": torch.zeros(shape)
               for i in (1, 2) for part, shape in (("lora_down.weight", (2, 32)), ("lora_up.weight", (32, 2)))}, path)
    return path


def test_a_lora_for_another_architecture_is_refused_naming_both(trained, tmp_path, capsys):
    preset, _, run = trained
    family = "SD 2.x" if preset == "tiny-sd2" else "SD 1.x"
    with pytest.raises(LoRAFileError, match=rf"lora.safetensors is a LoRA for {family} \(its metadata has "
                                            r"ss_base_model_version sd_v.*\), the model is SDXL"):
        Pipeline(random_model("tiny")).add_lora(run / "lora.safetensors")
    with pytest.raises(LoRAFileError, match=r"xl.safetensors is a LoRA for SDXL \(its layers include SDXL's second "
                                            rf"text encoder's, .*\), the model is {family}"):
        Pipeline.from_pretrained(reference_folder(preset)).add_lora(sdxl_layers_file(tmp_path / "xl.safetensors"))
    checkpoint = tmp_path / "model.safetensors"  # merge.py A --lora: baking refuses it before writing anything
    load_model(reference_folder(preset)).save_single_file(checkpoint)
    assert merge_cli.main([str(checkpoint), "--lora", str(tmp_path / "xl.safetensors"),
                           "-o", str(tmp_path / "baked.safetensors")]) == 2
    assert "is a LoRA for SDXL" in capsys.readouterr().err and not (tmp_path / "baked.safetensors").exists()


# ------------------------------------------------------------------------------------------------ eval.py

def test_eval_of_an_sd1_or_sd2_run_folder(trained, tmp_path):
    """eval.py --model <SD 1/2 folder> --lora <its run folder>: a row per epoch; the LoRA rows are not the base."""
    preset, _, run = trained
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a square of colour 1\n")
    save_safetensors(random_inception().state_dict(), tmp_path / "inception.safetensors")
    with pytest.warns(UserWarning, match="not LoRA files: checkpoint.safetensors"):
        code = eval_cli.main(["--model", str(reference_folder(preset)), "--lora", str(run), "--prompts",
                              str(tmp_path / "prompts.txt"), "--ref", str(ref), "--num", "2", "--steps", "2",
                              "--height", "16", "--width", "16", "--inception-weights",
                              str(tmp_path / "inception.safetensors"), "--dims", "64", "--is-splits", "2",
                              "--out", str(tmp_path / "out")])
    assert code == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["model"], r["epoch"], r["text_encoder_lora"]) for r in rows] == [
        ("base", None, False), ("lora-epoch-0001", 1, True), ("lora-epoch-0002", 2, True)]
    base, last = (np.asarray(Image.open(p)) for p in sorted((tmp_path / "out" / "images").glob("*/000-0.png"))[::2])
    assert np.abs(base.astype(int) - last).max() > 2
