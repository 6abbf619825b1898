"""Images that remember how they were made: A1111's `parameters` text and minigen's JSON in each PNG sample.py writes,
`--from-png` redrawing the same pixels, sampler names from A1111 and ComfyUI, --vae, img2img and micro-conditioning
flags on the command line. The model is `random:tiny` (no files needed), at 64x64 and 2 steps."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cli_errors import assert_clean_error

import sample as sample_cli
from minigen.diffusion.schedule import SAMPLERS
from minigen.io import save_safetensors
from minigen.lora.layers import add_lora, lora_parameters, lora_weights
from minigen.sd.lora_files import save_lora
from minigen.sd.png_info import a1111_name, file_hashes, infotext, lora_hash, parse_infotext, settings_from_infotext
from minigen.diffusion.names import a1111_names, resolve_sampler
from minigen.sd.configs import get_config
from minigen.sd.convert import unet_name_map
from minigen.sd.model import build_model, random_model
from minigen.sd.pipeline import Pipeline, load_init_image

BASE = ["--model", "random:tiny", "--prompt", "a red cube", "--steps", "2", "--height", "64", "--width", "64",
        "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A kohya LoRA for the tiny model, a VAE of other random weights, an init image."""
    root = tmp_path_factory.mktemp("files")
    sdxl = random_model("tiny")
    add_lora(sdxl.unet, "attention", rank=2, alpha=1.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(sdxl.unet):
            p.normal_(0, 0.3, generator=g)
    save_lora(root / "style.safetensors", {"unet": lora_weights(sdxl.unet)}, unet_names=unet_name_map(sdxl.unet.config))
    torch.manual_seed(1)
    save_safetensors(build_model("vae", get_config("tiny")["vae"]).state_dict(), root / "other_vae.safetensors")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "init.png")
    return root


def draw(out, *extra) -> list:
    assert sample_cli.main([*BASE, "--out", str(out), *extra]) == 0
    return sorted(out.glob("*.png"))


def redraw(out, png, *extra) -> list:
    """sample.py --from-png PNG, with only `extra` on the command line."""
    assert sample_cli.main(["--from-png", str(png), "--out", str(out), *extra]) == 0
    return sorted(out.glob("*.png"))


def pixels(path):
    return np.asarray(Image.open(path))


def chunks(path) -> dict:
    with Image.open(path) as img:
        img.load()
        return dict(img.text)


# --------------------------------------------------------------------------------------------------- sampler names
@pytest.mark.parametrize("name,expected", [
    ("Euler", ("euler", None)), ("Euler a", ("euler_a", None)), ("euler_ancestral", ("euler_a", None)),
    ("DPM++ 2M", ("dpmpp_2m", None)), ("DPM++ 2M Karras", ("dpmpp_2m", True)), ("dpmpp_2m karras", ("dpmpp_2m", True)),
    ("dpmpp_2m normal", ("dpmpp_2m", False)), ("DDIM", ("ddim", None)), ("ddpm", ("ddpm", None)),
    ("Euler  Karras", ("euler", True)), ("euler_a", ("euler_a", None)),
])
def test_sampler_aliases(name, expected):
    assert resolve_sampler(name) == expected


def test_sampler_schedules_and_unknown_names():
    assert resolve_sampler("DPM++ 2M", "Karras") == ("dpmpp_2m", True)
    assert resolve_sampler("Euler", "Uniform") == ("euler", False)
    for name in SAMPLERS:  # A1111's names written into the PNG read back as the sampler they came from
        assert resolve_sampler(*a1111_names(name, name == "euler")) == (name, name == "euler")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        resolve_sampler("heun")
    with pytest.raises(ValueError, match="unknown schedule 'Exponential'"):
        resolve_sampler("Euler", "Exponential")
    with pytest.raises(ValueError, match="disagree"):
        resolve_sampler("DPM++ 2M Karras", "Uniform")


# ------------------------------------------------------------------------------------------------------ A1111 text
SETTINGS = {"model": "/models/sd_xl_base_1.0.safetensors", "prompt": "a cat, sitting", "negative": "blurry",
            "steps": 30, "cfg": 5.0, "rescale": 0.0, "sampler": "dpmpp_2m", "karras": True, "eta": 0.0, "seed": 123,
            "height": 1024, "width": 768, "num": 1, "lora": ["/loras/style.safetensors:0.8", "/loras/b,c.pt:1.0"],
            "vae": None, "init_image": None, "strength": None, "original_size": None, "crop_top_left": None,
            "target_size": None, "dtype": "fp32"}


def test_infotext_has_a1111s_layout():
    hashes = {"model": "31e35c80fc", "vae": None, "lora": ["0123456789ab", "ba9876543210"]}
    assert infotext(SETTINGS, 0, hashes) == (
        "a cat, sitting <lora:style:0.8> <lora:bc:1>\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 123, Size: 768x1024, "
        'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "style: 0123456789ab, bc: ba9876543210", '
        "Version: minigen 0.1.0")
    img2img = SETTINGS | {"lora": [], "num": 4, "init_image": "/x.png", "strength": 0.35,
                          "vae": "/v/sdxl_vae.safetensors",
                          "sampler": "ddim", "karras": False, "eta": 0.5, "negative": None,
                          "original_size": [2048, 1536], "crop_top_left": [16, 0]}
    assert infotext(img2img, 2, {"vae": "abcdef0123"}).split("\n") == [
        "a cat, sitting",
        "Steps: 30, Sampler: DDIM, Schedule type: Uniform, CFG scale: 5, Seed: 123, Size: 768x1024, "
        "Model: sd_xl_base_1.0, Batch size: 4, Batch pos: 2, VAE hash: abcdef0123, VAE: sdxl_vae.safetensors, "
        "Denoising strength: 0.35, Eta DDIM: 0.5, Original size: 1536x2048, Crop top left: 16x0, "
        "Version: minigen 0.1.0"]


def test_names_are_a1111s():
    assert a1111_name("/m/sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0"
    assert a1111_name("/m/stable-diffusion-xl-base-1.0") == "stable-diffusion-xl-base-1.0"  # a diffusers folder
    assert a1111_name("/l/a:b,c.ckpt") == "abc" and a1111_name("random:tiny") == "randomtiny"


def test_parse_infotext_reads_a1111s_own_text():
    """A text as A1111 1.10 writes it (a multi-line prompt, a quoted value, an old combined sampler name)."""
    text = ("masterpiece, a cat\non a mat <lora:style:0.6>\nNegative prompt: ugly,\nbad hands\n"
            "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 832x1216, Model hash: 31e35c80fc, "
            'Model: sd_xl_base_1.0, Lora hashes: "style: 0123456789ab", Version: v1.10.1')
    params = parse_infotext(text)
    assert params["Prompt"] == "masterpiece, a cat\non a mat <lora:style:0.6>"
    assert params["Negative prompt"] == "ugly,\nbad hands"
    assert params["Lora hashes"] == "style: 0123456789ab" and params["Size-1"] == "832"
    settings, index, unlocated = settings_from_infotext(text)
    assert settings["prompt"] == "masterpiece, a cat\non a mat"
    assert (settings["height"], settings["width"]) == (1216, 832)
    assert (settings["sampler"], settings["karras"], settings["cfg"], settings["seed"]) == ("dpmpp_2m", True, 6.5, 42)
    assert index is None and set(unlocated) == {"--model", "--lora"} and "style:0.6" in unlocated["--lora"]


def test_infotext_round_trips_through_the_parser():
    settings = SETTINGS | {"lora": [], "num": 3, "rescale": 0.7, "original_size": [96, 64], "target_size": [64, 64],
                           "crop_top_left": [8, 0], "prompt": 'say "hi": now'}
    read, index, _ = settings_from_infotext(infotext(settings, 1))
    for key in ("prompt", "negative", "steps", "cfg", "sampler", "karras", "seed", "height", "width", "num", "rescale"):
        assert read[key] == settings[key], key
    assert (read["original_size"], read["target_size"], read["crop_top_left"]) == ([96, 64], [64, 64], [8, 0])
    assert index == 1


def test_hashes_are_a1111s(files, tmp_path):
    """Model: the first 10 hex digits of the file's SHA-256. LoRA (.safetensors): the first 12 of the SHA-256 of the
    bytes after the header (kohya's addnet hash), so it does not change with the metadata; other files: whole file."""
    lora = files / "style.safetensors"
    data = lora.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little"):]
    assert lora_hash(lora) == hashlib.sha256(after_header).hexdigest()[:12]
    assert lora_hash(lora) != hashlib.sha256(data).hexdigest()[:12]
    (tmp_path / "style.pt").write_bytes(data)
    assert lora_hash(tmp_path / "style.pt") == hashlib.sha256(data).hexdigest()[:12]
    hashes = file_hashes({"model": str(lora), "lora": [f"{lora}:0.5"]}, report=lambda line: None)
    assert hashes == {"model": hashlib.sha256(data).hexdigest()[:10], "vae": None, "lora": [lora_hash(lora)]}
    assert file_hashes({"model": "random:tiny", "lora": []}, report=print)["model"] is None


# ------------------------------------------------------------------------------------------- the PNG and --from-png
def test_png_holds_its_settings_and_redraws_byte_identically(tmp_path, files):
    """A batch of two with a LoRA and an A1111 sampler name; image 1 redrawn from its PNG alone."""
    lora = files / "style.safetensors"
    first, second = draw(tmp_path / "a", "--num", "2", "--seed", "7", "--sampler", "DPM++ 2M Karras",
                         "--negative", "a dog", "--lora", f"{lora}:0.7")
    saved = json.loads(chunks(second)["minigen"])
    assert saved["index"] == 1 and saved["settings"]["sampler"] == "dpmpp_2m" and saved["settings"]["karras"]
    assert saved["settings"]["lora"] == [f"{lora}:0.7"] and saved["settings"]["seed"] == 7
    text = chunks(second)["parameters"]
    assert text.startswith("a red cube <lora:style:0.7>\nNegative prompt: a dog\nSteps: 2, Sampler: DPM++ 2M, "
                           "Schedule type: Karras, CFG scale: 5, Seed: 7, Size: 64x64, Model: randomtiny, ")
    assert f'Lora hashes: "style: {lora_hash(lora)}"' in text and "Batch size: 2, Batch pos: 1" in text
    assert not (pixels(first) == pixels(second)).all()

    (redrawn,) = redraw(tmp_path / "b", second)
    assert redrawn.name == second.name and (pixels(redrawn) == pixels(second)).all()
    assert chunks(redrawn) == chunks(second)
    (changed,) = redraw(tmp_path / "c", second, "--steps", "3")  # a flag after it overrides
    assert json.loads(chunks(changed)["minigen"])["settings"]["steps"] == 3
    assert not (pixels(changed) == pixels(second)).all()
    assert len(redraw(tmp_path / "d", second, "--seed", "8")) == 2  # a new seed: the whole batch


def test_redraw_from_a1111_text_alone(tmp_path):
    """Without minigen's chunk, the A1111 text gives the settings; the model is named on the command line."""
    (original,) = draw(tmp_path / "a", "--seed", "3", "--sampler", "euler", "--cfg", "3.5", "--rescale", "0.5",
                       "--prompt", "a cube ☕ café", "--negative=-dark",  # text beyond Latin-1, a leading '-'
                       "--original-size", "96", "64", "--crop-top-left", "8", "0")
    info = PngInfo()
    info.add_text("parameters", chunks(original)["parameters"])
    Image.open(original).save(tmp_path / "a1111.png", pnginfo=info)
    (redrawn,) = redraw(tmp_path / "b", tmp_path / "a1111.png", "--model", "random:tiny")
    assert (pixels(redrawn) == pixels(original)).all()


def test_img2img_vae_and_micro_conditioning_flags_are_the_pipelines(tmp_path, files):
    flags = ["--seed", "4", "--sampler", "euler_a", "--init-image", str(files / "init.png"), "--strength", "0.5",
             "--steps", "4", "--vae", str(files / "other_vae.safetensors"), "--original-size", "128", "96",
             "--crop-top-left", "0", "8", "--target-size", "64", "64"]
    (image,) = draw(tmp_path / "a", *flags)
    pipe = Pipeline.from_pretrained("random:tiny", vae=files / "other_vae.safetensors")
    expected = pipe("a red cube", steps=4, sampler="euler_a", height=64, width=64, strength=0.5,
                    init_image=load_init_image(files / "init.png"), original_size=(128, 96), crop_top_left=(0, 8),
                    target_size=(64, 64), generator=torch.Generator("cpu").manual_seed(4))
    assert (pixels(image) == expected[0].numpy()).all()
    text = chunks(image)["parameters"]
    assert "Denoising strength: 0.5" in text and "VAE: other_vae.safetensors, " in text and "VAE hash: " in text
    assert "Original size: 96x128, Crop top left: 0x8, Target size: 64x64" in text
    (redrawn,) = redraw(tmp_path / "b", image)
    assert (pixels(redrawn) == pixels(image)).all()
    # each flag matters: without the VAE, or with the default micro-conditioning, the image differs
    (no_vae,) = draw(tmp_path / "c", *flags[:-11])
    (plain,) = draw(tmp_path / "d", *flags[:-9])
    assert not (pixels(no_vae) == pixels(plain)).all() and not (pixels(plain) == pixels(image)).all()


def test_no_hash_leaves_the_hashes_out(tmp_path, files, capsys):
    lora = files / "style.safetensors"
    (image,) = draw(tmp_path / "a", "--seed", "1", "--lora", str(lora), "--no-hash")
    assert "hashing" not in capsys.readouterr().err and "Lora hashes" not in chunks(image)["parameters"]
    draw(tmp_path / "b", "--seed", "1", "--lora", str(lora))
    assert f"hashing {lora}" in capsys.readouterr().err


def test_refusals_that_need_no_size_or_seed_on_the_command_line(tmp_path, capsys):
    """An init image smaller than one latent (at its own size); a PNG whose batch position is outside its batch (the
    position counts only when neither --seed nor --num is given)."""
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    assert_clean_error(sample_cli.main, ["--model", "random:tiny", "--prompt", "x", "--init-image",
                                         str(tmp_path / "tiny.png"), "--out", str(tmp_path / "out")],
                       capsys, "--init-image", "tiny.png", "smaller than 8 pixels")
    info = PngInfo()
    info.add_text("minigen", json.dumps({"format": 1, "index": 5, "settings": {"model": "random:tiny", "prompt": "x",
                                                                              "num": 2, "seed": 1}}))
    Image.new("RGB", (8, 8)).save(tmp_path / "five.png", pnginfo=info)
    assert_clean_error(sample_cli.main, ["--from-png", str(tmp_path / "five.png"), "--out", str(tmp_path / "out")],
                       capsys, "five.png", "batch position 5", "batch of 2")
    assert not (tmp_path / "out").exists()
