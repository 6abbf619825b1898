"""Loading and saving whole SDXL checkpoints, both formats, against diffusers on the tiny random pipeline.

The strongest check is used where it applies: the weights that come out are *equal* (torch.equal) to the weights
that went in, so every output of the models is identical too. Forward parity of the models themselves is in
test_sdxl_models.py.
"""

import json
import shutil

import pytest
import torch
import diffusers
from safetensors.torch import save_file

from minigen.io import CheckpointError, load_weights
from minigen.sd import convert
from minigen.sd.clip import normalize_clip_keys
from minigen.sd.model import PARTS, load_model
from sdxl_tiny import tiny_folder, tiny_pipeline, tiny_single_file


def _assert_equal_weights(ours, ref_model, part, dtype=torch.float32):
    """`ours` holds exactly `ref_model`'s weights, cast to `dtype`."""
    a = normalize_clip_keys(ours.state_dict()) if part.startswith("text") else ours.state_dict()
    b = normalize_clip_keys(ref_model.state_dict()) if part.startswith("text") else ref_model.state_dict()
    b = {k: v.to(dtype) for k, v in b.items() if not k.endswith("position_ids")}
    assert sorted(a) == sorted(b), part
    for k in a:
        assert torch.equal(a[k], b[k]), f"{part}: {k}"


@pytest.fixture(scope="module")
def from_folder():
    return load_model(tiny_folder())


def test_diffusers_folder_loads_with_the_same_weights(from_folder):
    for part in PARTS:
        _assert_equal_weights(getattr(from_folder, part), getattr(tiny_pipeline(), part), part)
    assert from_folder.scheduler_config["timestep_spacing"] == "leading"
    assert from_folder.vae.scaling_factor == 0.13025
    # tokenizers from the folder, with SDXL's two paddings (<|endoftext|> for CLIP-L, "!" for bigG)
    assert from_folder.tokenizer("a cat").input_ids[0, -1].item() == 49407
    assert from_folder.tokenizer_2("a cat").input_ids[0, -1].item() == 0


def test_text_encoders_give_diffusers_outputs(from_folder):
    # the loaded modules compute what transformers computes (weights equal; tolerance as in test_sdxl_models)
    ids = from_folder.tokenizer(["a photo of an astronaut riding a horse on mars", ""]).input_ids
    ref = tiny_pipeline()
    with torch.no_grad():
        ours, theirs = from_folder.text_encoder_2(ids), ref.text_encoder_2(ids, output_hidden_states=True)
    assert (ours.hidden_states[-2] - theirs.hidden_states[-2]).abs().max() <= 1e-5 * theirs.hidden_states[-2].abs().max()
    assert (ours.text_embeds - theirs.text_embeds).abs().max() <= 1e-5 * theirs.text_embeds.abs().max()


def test_single_file_loads_in_diffusers_from_single_file():
    # ours -> single file -> diffusers' own single-file loader (local config, offline) -> the same weights
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(tiny_single_file()), config=str(tiny_folder()),
                                                                 local_files_only=True)
    for part in PARTS:
        _assert_equal_weights(getattr(pipe, part), getattr(tiny_pipeline(), part), part)


def test_single_file_round_trip_and_dtypes():
    sdxl = load_model(tiny_single_file(), dtype=torch.bfloat16)
    assert sdxl.unet.conv_in.weight.dtype == torch.bfloat16
    assert sdxl.text_encoder_2.text_projection.weight.dtype == torch.bfloat16
    assert sdxl.vae.decoder.conv_out.weight.dtype == torch.float32  # SDXL's VAE overflows in fp16/bf16
    ref = tiny_pipeline()
    for part in PARTS:
        _assert_equal_weights(getattr(sdxl, part), getattr(ref, part), part,
                              torch.float32 if part == "vae" else torch.bfloat16)


def test_saved_diffusers_folder_loads_in_diffusers(from_folder, tmp_path):
    from_folder.save_diffusers(tmp_path / "out")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    for part in PARTS:
        _assert_equal_weights(getattr(pipe, part), getattr(tiny_pipeline(), part), part)
    assert pipe.tokenizer_2.pad_token == "!"
    assert load_model(tmp_path / "out").tokenizer_2("a").input_ids.tolist() == \
        from_folder.tokenizer_2("a").input_ids.tolist()


def test_separate_vae_replaces_the_checkpoints(tmp_path):
    # a VAE file in LDM names with the single-file prefix, as people cut them out of checkpoints
    vae = diffusers.AutoencoderKL(**{k: v for k, v in json.loads((tiny_folder() / "vae" / "config.json").read_text())
                                     .items() if not k.startswith("_")})
    ldm = convert.vae_to_single_file(vae.state_dict(), vae.config)
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "vae.safetensors")
    sdxl = load_model(tiny_single_file(), vae=tmp_path / "vae.safetensors")
    _assert_equal_weights(sdxl.vae, vae, "vae")


def _write_variant(tmp_path, change):
    tensors, _ = load_weights(tiny_single_file())
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_errors_name_what_is_wrong(tmp_path):
    key = "model.diffusion_model.out.2.weight"
    missing = _write_variant(tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"an unknown SDXL layout \(no tensor model.diffusion_model.out.2.weight\)"):
        load_model(missing)
    reshaped = _write_variant(tmp_path, lambda t: t.update({"model.diffusion_model.out.2.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: 1 \(first: conv_out.bias \(5,\) \(expected \(4,\)\)\)"):
        load_model(reshaped)
    foreign = _write_variant(tmp_path, lambda t: t.update({"denoiser.sigmas": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"1 keys belong to no part of sdxl, e.g. \['denoiser.sigmas'\]"):
        load_model(foreign)

    sd1 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768)}, sd1)
    with pytest.raises(CheckpointError, match=r"an unknown SD 1.x layout \(no tensor model.diffusion_model.input_blocks"):
        load_model(sd1)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_single_file().read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(truncated)

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ckpt)
    with pytest.raises(CheckpointError, match="pickle.*--allow-pickle"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion single-file checkpoint \(an unknown model; 1 tensors"):
        load_model(ckpt, allow_pickle=True)  # allowed: read with weights_only=True, then judged like any file


def test_folder_without_weights_is_named(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder(), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unet: no weights file"):
        load_model(folder)
