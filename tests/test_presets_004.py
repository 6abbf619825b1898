"""Seed 004's presets: the merge (configs/merge_004.conf) and the two LoRAs on the merged SD 1.x model
(configs/lora_004_sd15.conf, configs/dreambooth_004_sd15.conf) parse with their CLIs' own readers, and the merge
preset does what the seed did."""

from pathlib import Path

import torch
from safetensors.torch import load_file

import merge as merge_cli  # merge.py and train_lora.py at the repository root (pytest's pythonpath)
import train_lora
from cli_errors import assert_clean_error
from minigen.sd.model import random_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
UNET_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def test_merge_preset_parses_to_the_seeds_recipe():
    args = merge_cli.parse_args(["--config", str(CONFIGS / "merge_004.conf"), "a.safetensors", "b.safetensors",
                                 "-o", "out.safetensors"])
    assert (args.method, args.alpha, args.vae, args.skip_text_encoders) == ("weighted_sum", 0.7, "copy", False)
    assert (args.a, args.b, args.output) == ("a.safetensors", "b.safetensors", "out.safetensors")
    later = merge_cli.parse_args(["--config", str(CONFIGS / "merge_004.conf"), "a", "b", "-o", "o", "--alpha", "0.2"])
    assert later.alpha == 0.2  # the command line wins over the preset


def test_a_missing_merge_preset_is_one_clean_error(tmp_path, capsys):
    assert_clean_error(merge_cli.main, ["--config", str(tmp_path / "none.conf"), "a", "b", "-o", "o.safetensors"],
                       capsys, "none.conf")


def test_merge_preset_gives_b_70_percent_and_keeps_a_vae(tmp_path, capsys):
    a, b = tmp_path / "waifu.safetensors", tmp_path / "orangemix.safetensors"
    random_model("tiny-sd1", seed=0).save_single_file(a)
    random_model("tiny-sd1", seed=1).save_single_file(b)
    preset = str(CONFIGS / "merge_004.conf")
    for vae, out in ((None, tmp_path / "m.safetensors"), (b, tmp_path / "m_vae_b.safetensors")):
        assert merge_cli.main(["--config", preset, str(a), str(b), "-o", str(out)]
                              + (["--vae", str(vae)] if vae else [])) == 0
        got, ta, tb = load_file(str(out)), load_file(str(a)), load_file(str(b))
        for key in (UNET_KEY, TEXT_KEY):
            torch.testing.assert_close(got[key], 0.3 * ta[key] + 0.7 * tb[key], rtol=0, atol=1e-6)
        # the VAE is left out of the merge: A's, or that of the checkpoint --vae names
        assert torch.equal(got[VAE_KEY], (tb if vae else ta)[VAE_KEY])


def lora_parse(preset: str):
    """train_lora.py's own reading of a preset, with the checkpoint and data given on the command line."""
    return train_lora.parse(["--config", str(CONFIGS / preset), "--model", "merged_004.safetensors",
                             "--data", "asuka/", "--device", "cpu"])[1]


def test_text_to_image_lora_preset_parses():
    cfg = lora_parse("lora_004_sd15.conf")
    assert (cfg.epochs, cfg.batch, cfg.rank, cfg.lr, cfg.resolution) == (40, 4, 4, 1e-4, "512")
    assert cfg.model == "merged_004.safetensors" and cfg.instance_prompt == ""  # captions, not one prompt
    assert cfg.validation_prompts == ["1girl, image of girl eating apple, plugsuit 02"]


def test_dreambooth_lora_preset_parses():
    cfg = lora_parse("dreambooth_004_sd15.conf")
    assert (cfg.epochs, cfg.batch, cfg.rank, cfg.lr, cfg.resolution) == (40, 4, 4, 5e-4, "512")
    assert cfg.model == "merged_004.safetensors" and cfg.instance_prompt == "a picture of sks girl"
    assert cfg.validation_prompts == ["1girl, image of sks girl eating apple, plugsuit 02"]
