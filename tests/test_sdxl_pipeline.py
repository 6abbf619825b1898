"""minigen's SDXL pipeline against diffusers' StableDiffusionXLPipeline on the same tiny random model.

The proof of issue 5: for each sampler, with and without guidance, square and non-square, minigen's images equal
diffusers' for `generator=torch.Generator("cpu").manual_seed(seed)` and the same settings.
"""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from cli_errors import assert_clean_error
from sdxl_tiny import tiny_folder, tiny_pipeline

from close import assert_close_to_scale, reference_images
import sample as sample_cli
from minigen.io import CheckpointError, save_safetensors
from minigen.lora.layers import add_lora, lora_parameters, lora_weights
from minigen.sd.lora_files import save_lora
from minigen.sd.convert import unet_name_map
from minigen.sd.model import load_model
from minigen.sd.pipeline import Pipeline, check_settings, encode_prompt, load_init_image, time_ids

# fp32 on both sides; the models differ only in operation order (SDPA vs diffusers' attention processors, fused vs
# separate ops), ~1e-6 per forward. Images are in [0, 1]; a few steps compound this to ~1e-5, so 1e-4 is tight
# enough to catch any wrong constant, order or generator use (those change images by > 1e-2).
IMAGE_TOL = 1e-4
EMBED_TOL = 1e-5  # relative to the embeddings' scale: one text-encoder forward


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def reference():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def ours():
    return Pipeline.from_pretrained(tiny_folder())


def assert_close(a, b, tol):
    assert_close_to_scale(a, b, tol, min_scale=1.0)


@pytest.mark.parametrize("negative", [None, "", "blurry, low quality!!"])
def test_encode_prompt_matches_diffusers(ours, reference, negative):
    """Penultimate states of both encoders concatenated, pooled from encoder 2, negative zeros when not given, and a
    "!" in a prompt read as diffusers' tokenizer_2 reads it (id 0)."""
    prompt = "a photo of an astronaut riding a horse on mars! highly detailed"
    context, pooled = ours.conditioning(prompt, negative, num_images=2, guidance=True)
    ref = reference.encode_prompt(prompt, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True,
                                  negative_prompt=negative)
    ref_context, ref_pooled = torch.cat([ref[1], ref[0]]), torch.cat([ref[3], ref[2]])  # [negative, positive]
    assert context.shape == (4, 77, 32 + 64) and pooled.shape == (4, 32)
    assert_close(context, ref_context, EMBED_TOL)
    assert_close(pooled, ref_pooled, EMBED_TOL)
    assert (context[:2].abs().sum() == 0) == (negative is None)  # zeros only for a missing negative prompt


def test_long_prompt_is_truncated_with_a_warning(ours, reference):
    prompt = " ".join(f"word{i}" for i in range(80))
    with pytest.warns(UserWarning, match="truncated because CLIP can only handle sequences up to 77 tokens"):
        context, pooled = encode_prompt(ours.model, [prompt])
    ref_context, _, ref_pooled, _ = reference.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert_close(context, ref_context, EMBED_TOL)
    assert_close(pooled, ref_pooled, EMBED_TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompt(ours.model, ["a short prompt"])


def test_time_ids_are_original_crop_target():
    assert time_ids((1024, 768), (0, 16), (512, 384)).tolist() == [1024, 768, 0, 16, 512, 384]


# sampler, karras, diffusers scheduler and its extra settings
SAMPLERS = [
    ("ddpm", False, diffusers.DDPMScheduler, {}),
    ("ddim", False, diffusers.DDIMScheduler, {}),
    ("euler", False, diffusers.EulerDiscreteScheduler, {}),
    ("euler", True, diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("euler_a", False, diffusers.EulerAncestralDiscreteScheduler, {}),
    ("dpmpp_2m", False, diffusers.DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m", True, diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("sampler,karras,scheduler_class,scheduler_args", SAMPLERS,
                         ids=[s + ("-karras" if k else "") for s, k, _, _ in SAMPLERS])
@pytest.mark.parametrize("cfg,height,width", [(1.0, 16, 16), (4.0, 16, 16), (4.0, 24, 16)],
                         ids=["no-guidance-square", "guidance-square", "guidance-non-square"])
def test_images_equal_diffusers(ours, reference, sampler, karras, scheduler_class, scheduler_args, cfg, height,
                                width):
    settings = dict(height=height, width=width, guidance_scale=cfg)
    prompt, seed, steps = "a red cube on a table", 7, 3
    ref = reference_images(reference, scheduler_class, scheduler_args, prompt=prompt, num_inference_steps=steps,
                           generator=torch.Generator("cpu").manual_seed(seed), **settings)
    images = ours(prompt, steps=steps, sampler=sampler, karras=karras, output="float",
                  generator=torch.Generator("cpu").manual_seed(seed), **settings)
    assert images.shape == ref.shape == (1, 3, height, width)
    assert_close(images, ref, IMAGE_TOL)


def test_batch_negative_prompt_and_guidance_rescale_equal_diffusers(ours, reference):
    """Two images from one generator, a negative prompt, guidance rescale, an ancestral sampler (fresh noise each
    step), and micro-conditioning that differs from the generated size."""
    settings = dict(height=16, width=24, guidance_scale=6.0, guidance_rescale=0.7, original_size=(96, 64),
                    crop_top_left=(8, 0), target_size=(16, 24))
    ref = reference_images(reference, diffusers.EulerAncestralDiscreteScheduler, {}, prompt="a cat",
                           negative_prompt="a dog", num_inference_steps=4, num_images_per_prompt=2,
                           crops_coords_top_left=settings.pop("crop_top_left"),
                           generator=torch.Generator("cpu").manual_seed(3), **settings)
    images = ours("a cat", "a dog", steps=4, sampler="euler_a", num_images=2, crop_top_left=(8, 0), output="float",
                  generator=torch.Generator("cpu").manual_seed(3), **settings)
    assert images.shape == (2, 3, 16, 24)
    assert_close(images, ref, IMAGE_TOL)
    assert (images[0] - images[1]).abs().max() > 1e-2  # the batch's images differ: each has its own noise
    uint8 = ours("a cat", steps=1, height=16, width=16, generator=torch.Generator("cpu").manual_seed(0))
    assert uint8.dtype == torch.uint8 and uint8.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="plms"), "unknown sampler 'plms'"),
    (dict(steps=0), "steps must be a whole number >= 1, got 0"),
    (dict(height=500), "height must be a positive multiple of 8"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(num_images=0), "number of images must be >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    settings = dict(sampler="euler", steps=30, height=1024, width=1024, num_images=1) | kwargs
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)


def test_bad_model_paths_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "missing")
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "unet": []}))
    with pytest.raises(ValueError, match="KandinskyPipeline, not Stable Diffusion"):
        Pipeline.from_pretrained(other)
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": [],
                                                       "text_encoder": []}))
    with pytest.raises(FileNotFoundError, match="sd15: no unet/ folder"):  # an SD 1.x folder without its parts
        Pipeline.from_pretrained(sd15)
    not_a_model = tmp_path / "weights.safetensors"
    save_safetensors({"conv.weight": torch.zeros(2, 2)}, not_a_model)
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion single-file checkpoint \(an unknown model"):
        Pipeline.from_pretrained(not_a_model)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A kohya LoRA on the tiny UNet's attention and on text encoder 2, with random (non-zero) up and down."""
    sdxl = load_model(tiny_folder())
    add_lora(sdxl.unet, "attention", rank=2, alpha=1.0)
    add_lora(sdxl.text_encoder_2, "text", rank=2, alpha=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(sdxl.unet) + lora_parameters(sdxl.text_encoder_2):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(path, {"unet": lora_weights(sdxl.unet), "te2": lora_weights(sdxl.text_encoder_2)}, "kohya",
              unet_names=unet_name_map(sdxl.unet.config))
    return path


def run_cli(tmp_path, *extra):
    out = tmp_path / "out"
    args = ["--model", str(tiny_folder()), "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "24",
            "--num", "2", "--seed", "5", "--sampler", "dpmpp_2m", "--out", str(out), "--device", "cpu", *extra]
    assert sample_cli.main(args) == 0
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("5-*.png"))]


def test_cli_writes_the_pipelines_images_and_applies_loras(ours, tmp_path, lora_file):
    images = run_cli(tmp_path / "plain")
    expected = ours("a cat", steps=2, height=16, width=24, num_images=2, sampler="dpmpp_2m",
                    generator=torch.Generator("cpu").manual_seed(5))
    assert len(images) == 2 and all((i == e.numpy()).all() for i, e in zip(images, expected))
    with_lora = run_cli(tmp_path / "lora", "--lora", f"{lora_file}:0.9")
    assert np.abs(with_lora[0].astype(int) - images[0]).max() > 10  # the LoRA changes the image
    lora_pipe = Pipeline.from_pretrained(tiny_folder())
    lora_pipe.add_lora(lora_file, 0.9)
    expected = lora_pipe("a cat", steps=2, height=16, width=24, num_images=2, sampler="dpmpp_2m",
                         generator=torch.Generator("cpu").manual_seed(5))
    assert all((i == e.numpy()).all() for i, e in zip(with_lora, expected))
    # A multiplier of 0 leaves the image as it was without the LoRA.
    assert all((i == e).all() for i, e in zip(run_cli(tmp_path / "zero", "--lora", f"{lora_file}:0"), images))


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "heun"], "unknown sampler 'heun'"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--height", "20"], "height must be a positive multiple of 8"),
    (["--model", "/no/such/model"], "/no/such/model"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, extra, message):
    args = ["--model", str(tiny_folder()), "--prompt", "x", "--out", str(tmp_path), *extra]
    assert_clean_error(sample_cli.main, args, capsys, message)
    assert not list(tmp_path.glob("*.png"))


# img2img: sampler, karras, diffusers scheduler and its extra settings (a sample of SAMPLERS: one per noising rule)
IMG2IMG = [SAMPLERS[1], SAMPLERS[3], SAMPLERS[4], SAMPLERS[6]]


@pytest.mark.parametrize("sampler,karras,scheduler_class,scheduler_args", IMG2IMG,
                         ids=[s + ("-karras" if k else "") for s, k, _, _ in IMG2IMG])
def test_img2img_equals_diffusers(ours, reference, tmp_path, sampler, karras, scheduler_class, scheduler_args):
    """diffusers' StableDiffusionXLImg2ImgPipeline on the same model: the init image encoded and sampled from the
    generator before the starting noise, the run started at step steps - int(steps * strength), a batch of two."""
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "init.png")
    init = load_init_image(tmp_path / "init.png", vae_scale=ours.vae_scale)
    assert init.shape == (1, 3, 16, 24) and torch.equal((init[0].permute(1, 2, 0) * 255).round().byte(),
                                                        torch.from_numpy(rgb))
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**reference.components)
    img2img.scheduler = scheduler_class.from_config(reference.scheduler.config, **scheduler_args)
    ref = img2img("a cat", image=Image.open(tmp_path / "init.png"), strength=0.6, num_inference_steps=5,
                  guidance_scale=4.0, num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(2),
                  output_type="pt").images
    images = ours("a cat", steps=5, sampler=sampler, karras=karras, guidance_scale=4.0, num_images=2, height=16,
                  width=24, init_image=init, strength=0.6, output="float",
                  generator=torch.Generator("cpu").manual_seed(2))
    assert images.shape == ref.shape == (2, 3, 16, 24)
    assert_close(images, ref, IMAGE_TOL)
    # the image matters: a different init image changes the result
    other = ours("a cat", steps=5, sampler=sampler, karras=karras, guidance_scale=4.0, num_images=2, height=16,
                 width=24, init_image=1 - init, strength=0.6, output="float",
                 generator=torch.Generator("cpu").manual_seed(2))
    assert (other - images).abs().max() > 1e-2


def test_img2img_strength_that_leaves_no_step_is_refused():
    with pytest.raises(ValueError, match="leaves no step to run"):
        check_settings("euler", 3, 16, 16, strength=0.3)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        check_settings("euler", 3, 16, 16, strength=1.5)
