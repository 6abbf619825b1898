"""SD 1.x and 2.x in minigen against diffusers' StableDiffusionPipeline, on tiny random models that keep each family's
structure (configs.py: "tiny-sd1", 1x1-conv projections and one head count; "tiny-sd2", linear projections, OpenCLIP
layout, v-prediction).

The proof of issue 14: the same images for the same seed with every sampler, with and without CLIP skip; the folder
diffusers saves loads in minigen and the single file minigen writes loads in diffusers' `from_single_file`; the
architecture is read from a single file's tensors alone. A file marked `ztsnr` samples with zero terminal SNR, as
diffusers does with rescale_betas_zero_snr.
"""

import functools
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from close import assert_close_to_scale, reference_images
import sample as sample_cli
from minigen.io import load_weights
from minigen.sd.configs import get_config
from minigen.sd.detect import detect
from minigen.sd.model import load_model
from minigen.sd.pipeline import Pipeline
from minigen.sd.tokenizer import model_tokenizers

# fp32 on both sides, operation order differs (~1e-6 per forward); a few guided steps compound to ~1e-5 of the
# [0, 1] image scale, up to 1.5e-4 measured for the v-prediction model at guidance 5, while a wrong constant, layer
# or generator use changes images by > 1e-2. 2e-4 is 1/20 of 1/255.
IMAGE_TOL = 2e-4
FAMILIES = {"tiny-sd1": "sd1", "tiny-sd2": "sd2"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def reference_folder(preset: str) -> Path:
    """diffusers' StableDiffusionPipeline of a tiny preset (seed 0), saved by `save_pretrained`."""
    configs = get_config(preset)
    folder = Path(tempfile.mkdtemp(prefix=f"minigen-{preset}-"))
    model_tokenizers(FAMILIES[preset])["tokenizer"].save(folder / "tok")
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**_plain(configs["vae"])),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tok"),
        unet=diffusers.UNet2DConditionModel(**_plain(configs["unet"])),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


@functools.lru_cache(maxsize=None)
def reference(preset: str):
    return diffusers.StableDiffusionPipeline.from_pretrained(reference_folder(preset), local_files_only=True)


@functools.lru_cache(maxsize=None)
def ours(preset: str) -> Pipeline:
    return Pipeline.from_pretrained(reference_folder(preset))


SAMPLERS = [
    ("ddpm", False, diffusers.DDPMScheduler, {}),
    ("ddim", False, diffusers.DDIMScheduler, {}),
    ("euler", False, diffusers.EulerDiscreteScheduler, {}),
    ("euler_a", False, diffusers.EulerAncestralDiscreteScheduler, {}),
    ("dpmpp_2m", False, diffusers.DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m", True, diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("sampler,karras,scheduler_class,scheduler_args", SAMPLERS,
                         ids=[s + ("-karras" if k else "") for s, k, _, _ in SAMPLERS])
def test_images_equal_diffusers(preset, sampler, karras, scheduler_class, scheduler_args):
    settings = dict(height=16, width=24, guidance_scale=4.0)
    ref = reference_images(reference(preset), scheduler_class, scheduler_args, prompt="a red cube",
                           negative_prompt="blurry", num_inference_steps=3,
                           generator=torch.Generator("cpu").manual_seed(5), **settings)
    images = ours(preset)("a red cube", "blurry", steps=3, sampler=sampler, karras=karras, output="float",
                          generator=torch.Generator("cpu").manual_seed(5), **settings)
    assert images.shape == ref.shape == (1, 3, 16, 24)
    assert_close_to_scale(images, ref, IMAGE_TOL, min_scale=1.0)


ZTSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}  # what detect sets for a `ztsnr` marker


@functools.lru_cache(maxsize=None)
def ztsnr_pipeline() -> Pipeline:
    """tiny-sd2 written as a zero-terminal-SNR v-prediction file is distributed (NoobAI-XL v-pred): the empty
    `v_pred` and `ztsnr` marker tensors of sd-scripts and ComfyUI, no metadata; loaded back with no flags."""
    folder = Path(tempfile.mkdtemp(prefix="minigen-ztsnr-"))
    ours("tiny-sd2").model.save_single_file(folder / "sd2.safetensors")
    tensors, _ = load_weights(folder / "sd2.safetensors")
    markers = {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}
    save_file({**{k: v.contiguous() for k, v in tensors.items()}, **markers}, folder / "ztsnr.safetensors")
    return Pipeline(load_model(folder / "ztsnr.safetensors"))


def test_ztsnr_marker_loads_the_rescaled_schedule():
    pipe = ztsnr_pipeline()
    assert pipe.model.family == "sd2"
    assert {k: pipe.model.scheduler_config[k] for k in ZTSNR} == ZTSNR
    assert pipe.schedule.prediction_type == "v_prediction"  # from the `v_pred` marker
    assert pipe.schedule.alphas_cumprod[-1] == 0  # Lin et al. 2023, Algorithm 1
    assert pipe.schedule.alphas_cumprod[0] == ours("tiny-sd2").schedule.alphas_cumprod[0]


@pytest.mark.parametrize("sampler,karras,scheduler_class,scheduler_args", SAMPLERS,
                         ids=[s + ("-karras" if k else "") for s, k, _, _ in SAMPLERS])
def test_ztsnr_images_equal_diffusers(sampler, karras, scheduler_class, scheduler_args):
    """The ztsnr file's images are diffusers' with rescale_betas_zero_snr and trailing spacing, every sampler from
    SNR 0; with guidance rescale 0.7, which Lin et al. 2023 (section 3.4) pair with zero terminal SNR."""
    settings = dict(height=16, width=24, guidance_scale=4.0, guidance_rescale=0.7)
    ref = reference_images(reference("tiny-sd2"), scheduler_class, {**scheduler_args, **ZTSNR}, prompt="a red cube",
                           negative_prompt="blurry", num_inference_steps=3,
                           generator=torch.Generator("cpu").manual_seed(5), **settings)
    images = ztsnr_pipeline()("a red cube", "blurry", steps=3, sampler=sampler, karras=karras, output="float",
                              generator=torch.Generator("cpu").manual_seed(5), **settings)
    assert_close_to_scale(images, ref, IMAGE_TOL, min_scale=1.0)


def penultimate_embeddings(pipe, prompt: str) -> torch.Tensor:
    """diffusers' clip_skip=1 encoding: the penultimate hidden state through the final layer norm, (1, 77, D).
    Computed here because diffusers 0.42.1's own clip_skip path reaches `text_encoder.text_model`, which
    transformers 5's CLIPTextModel no longer has."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        return pipe.text_encoder.final_layer_norm(out.hidden_states[-2])


@pytest.mark.parametrize("preset", FAMILIES)
def test_clip_skip_and_empty_negative_equal_diffusers(preset):
    """A1111's CLIP skip 2 is diffusers' clip_skip=1 (the penultimate layer, final-normed); with no negative prompt,
    SD 1/2 encode "" (no zero embeddings); two images from one generator."""
    pipe = reference(preset)
    kwargs = dict(height=16, width=16, guidance_scale=5.0, num_inference_steps=2)
    ref = reference_images(pipe, diffusers.EulerDiscreteScheduler, {}, prompt_embeds=penultimate_embeddings(pipe, "a cat"),
                           negative_prompt_embeds=penultimate_embeddings(pipe, ""), num_images_per_prompt=2,
                           generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    images = ours(preset)("a cat", steps=2, num_images=2, clip_skip=2, output="float", height=16, width=16,
                          guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1))
    assert_close_to_scale(images, ref, IMAGE_TOL, min_scale=1.0)
    plain = ours(preset)("a cat", steps=2, num_images=2, output="float", height=16, width=16, guidance_scale=5.0,
                         generator=torch.Generator("cpu").manual_seed(1))
    unskipped = reference_images(pipe, diffusers.EulerDiscreteScheduler, {}, prompt="a cat", num_images_per_prompt=2,
                                 generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    assert_close_to_scale(plain, unskipped, IMAGE_TOL, min_scale=1.0)
    assert (plain - images).abs().max() > 1e-3  # CLIP skip changes the image


def test_v_prediction_is_read_from_the_scheduler_config():
    assert ours("tiny-sd2").schedule.prediction_type == "v_prediction"
    assert ours("tiny-sd1").schedule.prediction_type == "epsilon"


@pytest.mark.parametrize("preset", FAMILIES)
def test_single_file_round_trip_through_diffusers(preset, tmp_path):
    """minigen writes the family's single-file layout; diffusers' from_single_file reads it to the same weights, and
    minigen reads it back with no config: from minigen's metadata, and from the tensors alone."""
    model = ours(preset).model
    path = tmp_path / "model.safetensors"
    model.save_single_file(path)
    tensors, metadata = load_weights(path)
    prefix = "cond_stage_model.transformer." if preset == "tiny-sd1" else "cond_stage_model.model."
    assert any(k.startswith(prefix) for k in tensors)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        path, config=str(reference_folder(preset)), local_files_only=True, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        want = getattr(model, part).state_dict()
        got = getattr(theirs, part).state_dict()
        for k, v in want.items():
            key = k if k in got else k.removeprefix("text_model.")
            assert torch.equal(got[key], v), (part, k)
    bare = tmp_path / "bare.safetensors"  # no metadata: the layout comes from the shapes and the presets
    save_file({k: v.contiguous() for k, v in tensors.items()}, bare)
    assert detect({k: tuple(t.shape) for k, t in tensors.items()}, metadata, str(path)).configs == model.configs
    settings = dict(steps=2, height=16, width=16, output="float")
    want = ours(preset)("a cat", generator=torch.Generator("cpu").manual_seed(2), **settings)
    prediction = "v" if preset == "tiny-sd2" else None  # a bare SD 2 file does not say it predicts v
    for file in (path, bare):
        loaded = load_model(file, prediction=prediction)
        assert loaded.family == FAMILIES[preset]
        got = Pipeline(loaded)("a cat", generator=torch.Generator("cpu").manual_seed(2), **settings)
        # Same weights, heads and schedule: the same computation, but not bit for bit on every CPU (oneDNN's kernels
        # depend on memory alignment and the instruction set; a random model's rounding grows through the steps and
        # the decoder: up to 4e-5 seen on an AMD EPYC at 1 thread), so 1e-4 of the image scale, 1/40 of a uint8 level.
        assert_close_to_scale(got, want, 1e-4, min_scale=1.0)


def test_sample_cli_draws_diffusers_image_from_a_single_file(tmp_path, capsys):
    """`sample.py --model file.safetensors` with no config flag: the architecture is found and printed, and the
    image is diffusers' for the same seed (v-prediction given by --prediction: a bare SD 2 file does not say)."""
    model = ours("tiny-sd2").model
    path = tmp_path / "sd2.safetensors"
    model.save_single_file(path)
    assert sample_cli.main(["--model", str(path), "--prompt", "a red cube", "--steps", "3", "--height", "16",
                            "--width", "16", "--seed", "4", "--sampler", "euler", "--cfg", "4",
                            "--prediction", "v", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "SD 2.x UNet" in capsys.readouterr().out
    png = sorted((tmp_path / "out").glob("*.png"))[0]
    ref = reference_images(reference("tiny-sd2"), diffusers.EulerDiscreteScheduler, {}, prompt="a red cube",
                           num_inference_steps=3, height=16, width=16, guidance_scale=4.0,
                           generator=torch.Generator("cpu").manual_seed(4))
    ref = (ref[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    got = torch.from_numpy(np.array(Image.open(png).convert("RGB")))
    assert (got.int() - ref.int()).abs().max() <= 1  # <= 1/255: rounding of equal-to-1e-4 floats
