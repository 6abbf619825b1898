"""eval.py against bad input (issue 12): a corpus of bad numbers, prompt files, reference folders, LoRA files, models,
weights and output paths, built here.

Each case ends with exit code 2 and one `eval.py: error: ...` line naming the file or flag, no traceback; every file
of the corpus is byte-identical afterwards and nothing new is written (no --out folder). All but a few cases fail
before any model loads; those few fail while loading a model, so the module stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_errors import clean_error_params
from corpus import fails_cleanly
from test_bad_fid import LONG, save_images
from test_fid_parity import random_inception

import eval as eval_cli
from minigen.io import save_safetensors


def write_lora(path, module="lora_unet_input_blocks_4_1_proj_in") -> None:
    """A well-formed rank-2 kohya LoRA file (for no model in particular: its cases fail before any model loads)."""
    save_safetensors({f"{module}.lora_down.weight": torch.zeros(2, 8), f"{module}.lora_up.weight": torch.zeros(8, 2),
                      f"{module}.alpha": torch.tensor(2.0)}, path)


def build_corpus(root: Path) -> None:
    (root / "prompts.txt").write_text("a red fox\na lighthouse\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n   \n\t\n")
    (root / "latin1.txt").write_bytes("a red fox\nun café au lait\n".encode("latin-1"))
    save_images(root / "ref", 3)
    save_images(root / "one_ref", 1)
    (root / "empty_folder").mkdir()
    save_images(root / "uncaptioned", 2)  # a dataset folder as --prompts, without .txt captions
    (root / "regular_file").write_text("a file, not a folder")
    (root / "other_pipeline").mkdir()
    (root / "other_pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline",
                                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # empty safetensors
    write_lora(root / "lora.safetensors")
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # takes 768-wide text: SD 1.x's
    save_safetensors({f"{module}.lora_down.weight": torch.zeros(2, 768), f"{module}.lora_up.weight": torch.zeros(64, 2)},
                     root / "sd1_lora.safetensors")
    save_safetensors({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, root / "not_a_lora.safetensors")
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 40)
    (root / "run_notes").mkdir()
    (root / "run_notes" / "notes.txt").write_text("training crashed")
    (root / "run_checkpoint_only").mkdir()
    save_safetensors({"lora.unet.down": torch.zeros(2), "optimizer.state.0.exp_avg": torch.zeros(2)},
                     root / "run_checkpoint_only" / "checkpoint.safetensors", {"format": "a trainer checkpoint"})
    state = {k: v for k, v in random_inception().state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors(state, root / "inception.safetensors")
    save_safetensors({"x": torch.zeros(1)}, root / "not_inception.safetensors")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_eval")
    build_corpus(root)
    return root


DEFAULTS = {"--model": "random:tiny", "--prompts": "{root}/prompts.txt", "--ref": "{root}/ref",
            "--inception-weights": "{root}/inception.safetensors", "--out": "{root}/out",
            "--dims": "64", "--steps": "1", "--height": "16", "--width": "16"}

# Each case: (flags, overriding DEFAULTS; what the error line must name). A flag given as None is left out.
CASES = {
    # numbers and choices
    "num-0": (["--num", "0"], ["--num", ">= 1"]),
    "num-not-a-number": (["--num", "two"], ["--num", "integer"]),
    "steps-0": (["--steps", "0"], ["--steps", ">= 1"]),
    "cfg-nan": (["--cfg", "nan"], ["--cfg", "finite"]),
    "cfg-inf": (["--cfg", "inf"], ["--cfg", "finite"]),
    "cfg-minus-inf": (["--cfg", "-inf"], ["--cfg", "finite"]),
    "seed-negative": (["--seed", "-1"], ["--seed", "between 0 and"]),
    "seed-past-2-64": (["--seed", str(2**64)], ["--seed", "between 0 and"]),
    "seed-plus-num-past-2-64": (["--seed", str(2**64 - 1), "--num", "2"], ["--seed", "--num"]),
    "height-not-multiple-of-8": (["--height", "100"], ["--height", "multiple of 8"]),
    "width-below-8": (["--width", "4"], ["--width", ">= 8"]),
    "batch-size-0": (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    "is-splits-0": (["--is-splits", "0"], ["--is-splits", ">= 1"]),
    "max-prompts-0": (["--max-prompts", "0"], ["--max-prompts", ">= 1"]),
    "grid-prompts-0": (["--grid-prompts", "0"], ["--grid-prompts", ">= 1"]),
    "dims-not-an-inception-block": (["--dims", "100"], ["--dims"]),
    "sampler-unknown": (["--sampler", "dpm++"], ["--sampler"]),
    "dtype-unknown": (["--dtype", "fp8"], ["--dtype"]),
    "threads-0": (["--threads", "0"], ["--threads"]),
    "device-without-cuda": (["--device", "cuda"], ["--device"]),
    "model-not-given": (["--model", None], ["--model"]),
    # prompts
    "prompts-empty-file": (["--prompts", "{root}/empty.txt"], ["empty.txt", "no prompts"]),
    "prompts-blank-lines": (["--prompts", "{root}/blank.txt"], ["blank.txt", "no prompts"]),
    "prompts-missing": (["--prompts", "{root}/nowhere.txt"], ["nowhere.txt"]),
    "prompts-folder-without-captions": (["--prompts", "{root}/uncaptioned"], ["uncaptioned", "no prompts"]),
    "prompts-empty-folder": (["--prompts", "{root}/empty_folder"], ["empty_folder", "no images"]),
    "prompts-name-too-long": (["--prompts", f"{{root}}/{LONG}"], ["name too long"]),
    # reference images
    "ref-missing": (["--ref", "{root}/nowhere"], ["nowhere", "reference"]),
    "ref-a-file": (["--ref", "{root}/regular_file"], ["regular_file", "reference must be a folder"]),
    "ref-empty-folder": (["--ref", "{root}/empty_folder"], ["empty_folder", "no images"]),
    "ref-one-image": (["--ref", "{root}/one_ref"], ["one_ref", "at least 2 images", "1 reference"]),
    "one-image-per-model": (["--max-prompts", "1"], ["at least 2 images", "1 generated per model"]),
    # LoRA files and run folders
    "lora-missing": (["--lora", "{root}/nowhere.safetensors"], ["nowhere.safetensors"]),
    "lora-not-a-lora": (["--lora", "{root}/not_a_lora.safetensors"], ["not_a_lora.safetensors", "not LoRA"]),
    "lora-corrupt": (["--lora", "{root}/corrupt.safetensors"], ["corrupt.safetensors"]),
    "lora-multiplier-not-a-number": (["--lora", "{root}/lora.safetensors:abc"], ["lora.safetensors:abc"]),
    "lora-multiplier-nan": (["--lora", "{root}/lora.safetensors:nan"], ["lora.safetensors:nan", "finite"]),
    "lora-run-folder-without-files": (["--lora", "{root}/run_notes"], ["run_notes", "no LoRA files"]),
    "lora-of-another-family": (["--lora", "{root}/sd1_lora.safetensors"],
                               ["sd1_lora.safetensors", "a LoRA for SD 1.x", "the model is SDXL"]),
    # every input is checked before the report: the LoRA's family and the image count, both in one line
    "lora-of-another-family-and-too-few-images": (["--lora", "{root}/sd1_lora.safetensors", "--ref", "{root}/one_ref"],
                                                  ["sd1_lora.safetensors", "a LoRA for SD 1.x", "1 reference"]),
    "lora-run-folder-checkpoint-only": (["--lora", "{root}/run_checkpoint_only"],
                                        ["run_checkpoint_only", "checkpoint.safetensors are not LoRA files"]),
    # models and weights (a model is checked from its configs or header before the Inception loads; its weights
    # load last)
    "model-missing": (["--model", "{root}/nowhere"], ["nowhere", "no such model"]),
    "model-of-another-pipeline": (["--model", "{root}/other_pipeline"],
                                  ["other_pipeline", "KandinskyV22Pipeline, not Stable Diffusion"]),
    "model-empty-safetensors": (["--model", "{root}/model.safetensors"], ["model.safetensors"]),
    "model-unrecognised-before-the-inception": (["--model", "{root}/not_a_lora.safetensors",
                                                 "--inception-weights", "{root}/nowhere.safetensors"],
                                                ["not_a_lora.safetensors"]),
    "inception-weights-missing": (["--inception-weights", "{root}/nowhere.safetensors"], ["nowhere.safetensors"]),
    "inception-weights-of-another-model": (["--inception-weights", "{root}/not_inception.safetensors"],
                                           ["not_inception.safetensors", "not an FID Inception checkpoint"]),
    "inception-weights-a-folder": (["--inception-weights", "{root}/empty_folder"], ["empty_folder", "a folder"]),
    # output folder
    "out-is-a-file": (["--out", "{root}/regular_file"], ["regular_file", "not a folder"]),
    "out-below-a-file": (["--out", "{root}/regular_file/eval"], ["regular_file", "not a folder"]),
    "out-name-too-long": (["--out", f"{{root}}/{LONG}"], ["name too long"]),
}


def command_line(flags: list, root) -> list[str]:
    settings = dict(DEFAULTS)
    pairs = [(flags[i], flags[i + 1]) for i in range(0, len(flags), 2)]
    lora = [value for flag, value in pairs if flag == "--lora"]
    settings.update((flag, value) for flag, value in pairs if flag != "--lora")
    argv = [f"{flag}={value}" for flag, value in settings.items() if value is not None]  # = keeps "-inf" a value
    argv += [f"--lora={value}" for value in lora]
    return [part.format(root=root) for part in argv]


@pytest.mark.parametrize("flags, mentions", clean_error_params(CASES))
def test_bad_input_is_a_clean_error(corpus, capsys, flags, mentions):
    fails_cleanly(eval_cli.main, command_line(flags, corpus), capsys, mentions, corpus)


def test_a_latin_1_prompt_file_is_read_as_captions_are(corpus):
    """Prompt files are read as training reads captions (captions.read_text): not UTF-8 means latin-1, with a warning
    naming the file, so the prompts match the captions a LoRA was trained on."""
    from minigen.evaluate.inputs import read_prompts

    with pytest.warns(UserWarning, match="latin1.txt is not UTF-8"):
        assert read_prompts(corpus / "latin1.txt") == ["a red fox", "un café au lait"]
