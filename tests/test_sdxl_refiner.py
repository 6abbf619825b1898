"""Sampling with the SDXL refiner: minigen's Pipeline against diffusers' StableDiffusionXLImg2ImgPipeline with
requires_aesthetics_score=True on a tiny random refiner (configs.py "tiny-refiner": bigG alone, four levels, five
time ids).

The proof: for the same seed and settings, img2img (strength 0.3 and 0.8, two samplers) and text-to-image give
diffusers' images; the prompt is encoded by bigG alone with "" as the default negative; the time ids carry the
aesthetic scores; the single file minigen writes loads back with no config (family sdxl-refiner, from its metadata
and from its tensors alone) and in diffusers' `from_single_file`, and draws the same image; sample.py draws the
refiner from a single file and keeps the aesthetic scores in the PNG.
"""

import functools
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from cli_errors import assert_clean_error
from PIL import Image
from safetensors.torch import save_file

from close import assert_close_to_scale, reference_images
import sample as sample_cli
from minigen.io import load_weights
from minigen.sd.png_info import read_png_settings
from minigen.sd.configs import get_config
from minigen.sd.detect import detect
from minigen.sd.pipeline import Pipeline, load_init_image
from minigen.sd.tokenizer import model_tokenizers
from sdxl_tiny import tiny_folder

# fp32 on both sides, as in test_sdxl_pipeline.py: the models differ only in operation order (~1e-6 per forward), a
# few steps compound it to ~1e-5 of the [0, 1] image scale; a wrong time id, embedding or generator use changes
# images by > 1e-2.
IMAGE_TOL = 1e-4
EMBED_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def reference_folder() -> Path:
    """diffusers' refiner pipeline of the tiny-refiner preset (seed 0), saved by `save_pretrained`: no text_encoder
    or tokenizer, requires_aesthetics_score on and force_zeros_for_empty_prompt off, as stabilityai's refiner says."""
    configs = get_config("tiny-refiner")
    folder = Path(tempfile.mkdtemp(prefix="minigen-tiny-refiner-"))
    model_tokenizers("sdxl-refiner")["tokenizer_2"].save(folder / "tok")
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=diffusers.AutoencoderKL(**_plain(configs["vae"])),
        text_encoder=None, tokenizer=None,
        text_encoder_2=transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**configs["text_encoder_2"])),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tok"),
        unet=diffusers.UNet2DConditionModel(**_plain(configs["unet"])),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def reference():
    return diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(reference_folder(), local_files_only=True)


@pytest.fixture(scope="module")
def ours():
    return Pipeline.from_pretrained(reference_folder())


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    """A random 16x24 RGB image as a PNG: what the base model would have drawn."""
    path = tmp_path_factory.mktemp("init") / "base.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path)
    return path


def assert_close(a, b, tol):
    assert_close_to_scale(a, b, tol, min_scale=1.0)


def test_the_preset_has_the_refiners_structure(ours):
    unet = ours.model.unet.config
    assert ours.model.family == "sdxl-refiner" and ours.model.text_encoder is None
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    bigg = ours.model.text_encoder_2.config
    assert unet["cross_attention_dim"] == bigg.hidden_size
    assert unet["projection_class_embeddings_input_dim"] == bigg.projection_dim + 5 * unet["addition_time_embed_dim"]


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_conditioning_matches_diffusers(ours, reference, negative):
    """bigG's penultimate state alone (64 wide here), pooled from its projection; no negative prompt encodes ""."""
    assert ours.force_zeros_for_empty_prompt is False  # read from model_index.json
    context, pooled = ours.conditioning("a photo of a cat", negative, num_images=2, guidance=True)
    ref = reference.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=2,
                                  do_classifier_free_guidance=True, negative_prompt=negative)
    assert context.shape == (4, 77, 64) and pooled.shape == (4, 32)
    assert_close(context, torch.cat([ref[1], ref[0]]), EMBED_TOL)  # [negative, positive]
    assert_close(pooled, torch.cat([ref[3], ref[2]]), EMBED_TOL)
    assert context[:2].abs().sum() > 0  # the encoding of "", not zeros


def test_time_ids_match_diffusers(ours, reference):
    """(original size, crop, aesthetic score) for the prompt, (original size, no crop, negative score) for the
    negative prompt: diffusers leaves negative_crops_coords_top_left at (0, 0)."""
    ids = ours.added_time_ids(2, True, (16, 24), (96, 64), (8, 4), None, 7.0, 1.5)
    positive, negative = reference._get_add_time_ids((96, 64), (8, 4), (16, 24), 7.0, 1.5, (96, 64), (0, 0),
                                                     (16, 24), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(ids, torch.cat([negative.repeat(2, 1), positive.repeat(2, 1)]))
    assert ours.added_time_ids(1, False, (16, 24), None, (0, 0), None, None, None).tolist() == [[16, 24, 0, 0, 6.0]]


SAMPLERS = [("euler", False, diffusers.EulerDiscreteScheduler, {}),
            ("dpmpp_2m", True, diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True})]


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("sampler,karras,scheduler_class,scheduler_args", SAMPLERS,
                         ids=[s + ("-karras" if k else "") for s, k, _, _ in SAMPLERS])
def test_img2img_equals_diffusers(ours, reference, init_png, sampler, karras, scheduler_class, scheduler_args,
                                  strength):
    """The refiner's use: a base model's image redrawn from step steps - int(steps * strength), two images."""
    ref = reference_images(reference, scheduler_class, scheduler_args, prompt="a cat", image=Image.open(init_png),
                           strength=strength, num_inference_steps=7, guidance_scale=5.0, num_images_per_prompt=2,
                           generator=torch.Generator("cpu").manual_seed(2))
    init = load_init_image(init_png, vae_scale=ours.vae_scale)
    images = ours("a cat", steps=7, sampler=sampler, karras=karras, guidance_scale=5.0, num_images=2, height=16,
                  width=24, init_image=init, strength=strength, output="float",
                  generator=torch.Generator("cpu").manual_seed(2))
    assert images.shape == ref.shape == (2, 3, 16, 24)
    assert_close(images, ref, IMAGE_TOL)


def test_aesthetic_scores_and_micro_conditioning_equal_diffusers(ours, reference, init_png):
    """Scores and sizes other than the defaults, a negative prompt and an ancestral sampler (noise every step)."""
    settings = dict(guidance_scale=6.0, original_size=(96, 64), aesthetic_score=8.0, negative_aesthetic_score=1.0)
    ref = reference_images(reference, diffusers.EulerAncestralDiscreteScheduler, {}, prompt="a cat",
                           negative_prompt="a dog", image=Image.open(init_png), strength=0.6, num_inference_steps=5,
                           crops_coords_top_left=(8, 0), generator=torch.Generator("cpu").manual_seed(3), **settings)
    init = load_init_image(init_png, vae_scale=ours.vae_scale)
    images = ours("a cat", "a dog", steps=5, sampler="euler_a", height=16, width=24, init_image=init, strength=0.6,
                  crop_top_left=(8, 0), output="float", generator=torch.Generator("cpu").manual_seed(3), **settings)
    assert_close(images, ref, IMAGE_TOL)
    default = ours("a cat", "a dog", steps=5, sampler="euler_a", height=16, width=24, init_image=init, strength=0.6,
                   output="float", generator=torch.Generator("cpu").manual_seed(3), guidance_scale=6.0)
    assert (default - images).abs().max() > 1e-2  # the scores and sizes reach the UNet


def test_text_to_image_equals_diffusers_from_the_same_noise(ours, reference):
    """With no init image the refiner draws from noise: diffusers' img2img given that noise (scaled by the
    scheduler's initial sigma) as its latents, at strength 1, runs the same steps."""
    generator = torch.Generator("cpu").manual_seed(4)
    scale = ours.vae_scale
    noise = torch.randn((1, 4, 16 // scale, 24 // scale), generator=generator)  # minigen's first draw from the seed
    scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    scheduler.set_timesteps(4)
    ref = reference_images(reference, diffusers.EulerDiscreteScheduler, {}, prompt="a cat",
                           image=Image.new("RGB", (24, 16)), latents=noise * scheduler.init_noise_sigma, strength=1.0,
                           num_inference_steps=4, guidance_scale=5.0, generator=generator)
    images = ours("a cat", steps=4, guidance_scale=5.0, height=16, width=24, output="float",
                  generator=torch.Generator("cpu").manual_seed(4))
    assert_close(images, ref, IMAGE_TOL)


def test_single_file_loads_with_no_config_and_in_diffusers(ours, reference, init_png, tmp_path):
    """minigen writes the refiner's single-file layout (bigG at conditioner.embedders.0); it loads back as the
    refiner from its metadata and from its tensors alone, and draws the same image; diffusers' from_single_file
    (the folder as its config) reads it to the same weights."""
    path = tmp_path / "refiner.safetensors"
    ours.model.save_single_file(path)
    tensors, metadata = load_weights(path)
    assert any(k.startswith("conditioner.embedders.0.model.") for k in tensors)
    bare = tmp_path / "bare.safetensors"  # no metadata: the layout from the shapes, the head counts from the preset
    save_file({k: v.contiguous() for k, v in tensors.items()}, bare)
    assert detect({k: tuple(t.shape) for k, t in tensors.items()}, {}, "bare").family == "sdxl-refiner"
    init = load_init_image(init_png, vae_scale=ours.vae_scale)
    settings = dict(steps=4, height=16, width=24, init_image=init, strength=0.5, output="float")
    want = ours("a cat", generator=torch.Generator("cpu").manual_seed(1), **settings)
    for file in (path, bare):
        loaded = Pipeline.from_pretrained(file)
        assert loaded.model.family == "sdxl-refiner" and loaded.force_zeros_for_empty_prompt is False
        got = loaded("a cat", generator=torch.Generator("cpu").manual_seed(1), **settings)
        # Same weights, heads and schedule: the same computation, but not bit for bit on every CPU (oneDNN's kernels
        # depend on memory alignment and the instruction set; a random model's rounding grows through the steps and
        # the decoder: up to 4e-5 seen on an AMD EPYC at 1 thread), so 1e-4 of the image scale, 1/40 of a uint8 level.
        assert_close_to_scale(got, want, 1e-4, min_scale=1.0)
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(reference_folder()),
                                                                          local_files_only=True)
    assert theirs.config.requires_aesthetics_score and not theirs.config.force_zeros_for_empty_prompt
    for part in ("unet", "vae", "text_encoder_2"):
        got, want = getattr(theirs, part).state_dict(), getattr(reference, part).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items()), part


def test_folder_minigen_saves_is_a_refiner_to_diffusers(ours, tmp_path):
    ours.model.save_diffusers(tmp_path / "refiner")
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner", local_files_only=True)
    assert theirs.text_encoder is None
    assert theirs.config.requires_aesthetics_score and not theirs.config.force_zeros_for_empty_prompt


def run_cli(tmp_path, model, *extra):
    args = ["--model", str(model), "--prompt", "a cat", "--steps", "4", "--seed", "6", "--out", str(tmp_path),
            "--device", "cpu", *extra]
    assert sample_cli.main(args) == 0
    return sorted(tmp_path.glob("6-*.png"))


def test_cli_refines_an_image_and_keeps_the_scores(ours, init_png, tmp_path):
    """`sample.py --model refiner.safetensors --init-image base.png --strength 0.5` with aesthetic scores: the
    pipeline's image, the scores in the PNG's settings, and --from-png draws it again."""
    path = tmp_path / "refiner.safetensors"
    ours.model.save_single_file(path)
    scores = ["--aesthetic-score", "7", "--negative-aesthetic-score", "2"]
    [png] = run_cli(tmp_path / "out", path, "--init-image", str(init_png), "--strength", "0.5", *scores)
    expected = ours("a cat", steps=4, height=16, width=24, init_image=load_init_image(init_png), strength=0.5,
                    aesthetic_score=7.0, negative_aesthetic_score=2.0, generator=torch.Generator("cpu").manual_seed(6))
    image = np.asarray(Image.open(png))
    assert (image == expected[0].numpy()).all()
    settings, _, _ = read_png_settings(png)
    assert (settings["aesthetic_score"], settings["negative_aesthetic_score"]) == (7.0, 2.0)
    assert "Aesthetic score: 7, Negative aesthetic score: 2" in Image.open(png).text["parameters"]
    [again] = run_cli(tmp_path / "again", path, "--from-png", str(png))
    assert (np.asarray(Image.open(again)) == image).all()


@pytest.mark.parametrize("model,extra,message", [
    ("refiner", ["--target-size", "16", "16"], "target_size: the SDXL refiner is conditioned on an aesthetic score"),
    ("sdxl", ["--aesthetic-score", "6"], "aesthetic scores condition the SDXL refiner only, not SDXL"),
    ("refiner", ["--negative-aesthetic-score", "x"], "argument --negative-aesthetic-score: expected a number"),
])
def test_cli_refuses_conditioning_the_model_does_not_take(tmp_path, capsys, model, extra, message):
    model = reference_folder() if model == "refiner" else tiny_folder()
    args = ["--model", str(model), "--prompt", "x", "--steps", "1", "--height", "16", "--width", "16",
            "--out", str(tmp_path), "--device", "cpu", *extra]
    assert_clean_error(sample_cli.main, args, capsys, message)
    assert not list(tmp_path.glob("*.png"))


def test_sample_plan_of_a_refiner_folder(capsys):
    """The plan a CUDA run makes first: the refiner's one text encoder and five time ids."""
    assert sample_cli.main(["--model", str(reference_folder()), "--prompt", "x", "--height", "16", "--width", "16",
                            "--plan", "--device", "cpu"]) == 0
    assert "memory plan (1 image(s) of 16x16" in capsys.readouterr().out
