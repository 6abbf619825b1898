"""Block-weighted merging on the real per-block layouts (A1111's Merge Block Weighted / supermerger: 25 UNet blocks
in SD 1.x/2.x, 19 in SDXL, BASE optionally first), and architectures that must not be merged, on tiny random models
that keep each family's block structure."""

from dataclasses import replace

import diffusers
import pytest
import torch
from safetensors.torch import load_file

import merge as merge_cli  # merge.py at the repository root (pytest's pythonpath)
from cli_errors import assert_clean_error
from minigen.io import CheckpointError
from minigen.merge.checkpoints import MergeRecipe, block_weights, merge_checkpoints
from minigen.sd.model import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

U = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SDXL_TEXT = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight")
VAE = "first_stage_model.decoder.conv_in.weight"

SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL_BLOCKS = [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
# A key of each kind of place, and the block whose weight it takes (time_embed before the blocks goes with IN00,
# out after them with the last OUT block, as bbc-mc's Merge Block Weighted does).
SD1_KEYS = {
    U + "input_blocks.0.0.weight": "IN00",
    U + "input_blocks.4.1.proj_in.weight": "IN04",  # a transformer of the second level
    U + "input_blocks.9.0.op.weight": "IN09",  # the last downsampler
    U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": "M00",
    U + "middle_block.2.out_layers.3.weight": "M00",
    U + "output_blocks.0.0.skip_connection.weight": "OUT00",
    U + "output_blocks.7.1.proj_out.weight": "OUT07",
    U + "output_blocks.11.0.in_layers.2.weight": "OUT11",
    U + "time_embed.0.weight": "IN00",
    U + "out.2.weight": "OUT11",
    SD1_TEXT: "BASE",
}
SDXL_KEYS = {
    U + "input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight": "IN08",
    U + "middle_block.0.in_layers.2.weight": "M00",
    U + "output_blocks.8.0.out_layers.3.weight": "OUT08",
    U + "label_emb.0.0.weight": "IN00",
    U + "out.2.weight": "OUT08",
    SDXL_TEXT[0]: "BASE", SDXL_TEXT[1]: "BASE",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Single files of tiny random models, by name: sd1_a, sd1_b, sd2, sdxl_a, sdxl_b. Read-only."""
    folder = tmp_path_factory.mktemp("blocks")
    paths = {}
    for name, preset, seed in (("sd1_a", "tiny-sd1", 0), ("sd1_b", "tiny-sd1", 1), ("sd2", "tiny-sd2", 2),
                               ("sdxl_a", "tiny", 0), ("sdxl_b", "tiny", 1)):
        paths[name] = folder / f"{name}.safetensors"
        random_model(preset, seed=seed).save_single_file(paths[name])
    return paths


def weights_for(blocks, base=None):
    """Distinct weights, none 0 or 1: block i gets 0.03 * (i + 1); BASE, when given, goes first."""
    alphas = {name: round(0.03 * (i + 1), 2) for i, name in enumerate(blocks)}
    return ({"BASE": base} if base is not None else {}) | alphas


def by_block(keys, weights, alpha):
    """{key: its block's weight, or `alpha` for a block `weights` lacks} of {key: block}."""
    return {key: weights.get(block, alpha) for key, block in keys.items()}


def assert_merged(out, a_path, b_path, expected, vae_weight=None):
    """Each key of `expected` ({key: w}) is (1 - w) A + w B in `out`; the VAE is A's, or merged at `vae_weight`."""
    got, a, b = load_file(str(out)), load_file(str(a_path)), load_file(str(b_path))
    for key, w in expected.items():
        torch.testing.assert_close(got[key], (1 - w) * a[key] + w * b[key], rtol=0, atol=1e-6, msg=key)
        assert not torch.equal(a[key], b[key])  # the check can tell A from B
    if vae_weight is None:
        assert torch.equal(got[VAE], a[VAE])  # weights copied, not computed: bitwise
    else:
        w = vae_weight
        torch.testing.assert_close(got[VAE], (1 - w) * a[VAE] + w * b[VAE], rtol=0, atol=1e-6)


def test_sd1_26_weights_each_key_takes_its_blocks_weight(models, tmp_path):
    weights = weights_for(SD1_BLOCKS, base=0.9)
    out = tmp_path / "out.safetensors"
    recipe = MergeRecipe(alpha=0.5, block_alphas=tuple(weights.values()))
    merge_checkpoints(models["sd1_a"], models["sd1_b"], out, recipe, progress=False)
    # BASE covers the VAE too, as Merge Block Weighted's base_alpha, supermerger and sd-mecha merge it
    assert_merged(out, models["sd1_a"], models["sd1_b"], by_block(SD1_KEYS, weights, alpha=0.5), vae_weight=0.9)
    kept = tmp_path / "kept.safetensors"  # seed 004's preset names the VAE's source: A's stays A's
    merge_checkpoints(models["sd1_a"], models["sd1_b"], kept, replace(recipe, vae="copy"), progress=False)
    assert_merged(kept, models["sd1_a"], models["sd1_b"], by_block(SD1_KEYS, weights, alpha=0.5))


def test_sd1_25_weights_from_the_cli_leave_the_text_encoder_at_alpha(models, tmp_path, capsys):
    weights = weights_for(SD1_BLOCKS)
    out = tmp_path / "out.safetensors"
    assert merge_cli.main([str(models["sd1_a"]), str(models["sd1_b"]), "-o", str(out), "--alpha", "0.25",
                           "--block-alphas", ",".join(map(str, weights.values()))]) == 0
    assert_merged(out, models["sd1_a"], models["sd1_b"], by_block(SD1_KEYS, weights, alpha=0.25))


def test_three_block_alphas_still_weight_the_groups(models, tmp_path):
    out = tmp_path / "out.safetensors"
    merge_checkpoints(models["sd1_a"], models["sd1_b"], out, MergeRecipe(alpha=0.5, block_alphas=(0.1, 0.6, 0.9)),
                      progress=False)
    expected = {U + "input_blocks.4.1.proj_in.weight": 0.1, U + "middle_block.2.out_layers.3.weight": 0.6,
              U + "output_blocks.11.0.in_layers.2.weight": 0.9,
              U + "time_embed.0.weight": 0.5, U + "out.2.weight": 0.5, SD1_TEXT: 0.5}  # outside the blocks: alpha
    assert_merged(out, models["sd1_a"], models["sd1_b"], expected)


def test_sdxl_19_and_20_weights(models, tmp_path):
    for base in (None, 0.9):
        weights = weights_for(SDXL_BLOCKS, base)
        out = tmp_path / f"out_{base}.safetensors"
        merge_checkpoints(models["sdxl_a"], models["sdxl_b"], out,
                          MergeRecipe(alpha=0.4, block_alphas=tuple(weights.values())), progress=False)
        assert_merged(out, models["sdxl_a"], models["sdxl_b"], by_block(SDXL_KEYS, weights, alpha=0.4),
                      vae_weight=base)


@pytest.mark.parametrize("model, count, expected", [
    ("sd1", 19, r"3 numbers \(IN, MID, OUT\), 25 \(one per UNet block of Stable Diffusion 1.x: IN00..OUT11\) or 26 "
                r"\(BASE, for the text encoders and the VAE, first\); got 19"),
    ("sdxl", 25, r"19 \(one per UNet block of Stable Diffusion XL \(base\): IN00..OUT08\) or 20 .*; got 25"),
])
def test_a_count_that_does_not_fit_the_architecture_is_refused(models, tmp_path, capsys, model, count, expected):
    a, b, out = models[f"{model}_a"], models[f"{model}_b"], tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=expected):
        merge_checkpoints(a, b, out, MergeRecipe(block_alphas=(0.5,) * count), progress=False)
    assert_clean_error(merge_cli.main, [str(a), str(b), "-o", str(out), "--block-alphas", ",".join(["0.5"] * count)],
                       capsys, "--block-alphas", f"got {count}")
    assert not out.exists()


@pytest.mark.parametrize("other, name", [("sdxl_a", "Stable Diffusion XL"), ("sd2", "Stable Diffusion 2.x")])
def test_other_architectures_refused_naming_both(models, tmp_path, capsys, other, name):
    a, out = models["sd1_a"], tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=f"different architectures: .*sd1_a.safetensors is Stable Diffusion "
                                              f"1.x, .*{other}.safetensors is {name}"):
        merge_checkpoints(a, models[other], out, progress=False)
    assert_clean_error(merge_cli.main, [str(a), str(models[other]), "-o", str(out)], capsys,
                       "different architectures", "1.x", name)
    assert not out.exists()


def test_add_difference_checks_c_too(models, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=r"1.x, .*sd2.safetensors is Stable Diffusion 2.x"):
        merge_checkpoints(models["sd1_a"], models["sd1_b"], out, MergeRecipe(method="add_difference"),
                          c=models["sd2"], progress=False)
    assert not out.exists()


def test_sd1_merge_as_a_diffusers_folder_loads_in_diffusers_with_the_merged_weights(models, tmp_path):
    recipe = MergeRecipe(alpha=0.3)
    merge_checkpoints(models["sd1_a"], models["sd1_b"], tmp_path / "merged", recipe, progress=False)
    merge_checkpoints(models["sd1_a"], models["sd1_b"], tmp_path / "merged.safetensors", recipe, progress=False)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    from minigen.sd.model import load_model
    want = load_model(tmp_path / "merged.safetensors")  # the single-file merge, read by minigen
    for part in ("unet", "vae", "text_encoder"):
        theirs = {k.removeprefix("text_model."): v for k, v in getattr(pipe, part).state_dict().items()}
        ours = {k.removeprefix("text_model."): v for k, v in getattr(want, part).state_dict().items()}
        assert theirs.keys() == ours.keys(), part
        for key, tensor in ours.items():
            assert torch.equal(theirs[key], tensor), f"{part}.{key}"


def test_block_weights_of_a_checkpoint_without_unet_blocks_is_an_error():
    with pytest.raises(ValueError, match="--block-alphas weights the UNet's blocks, and the checkpoint has none"):
        block_weights((0.5,), [SD1_TEXT, VAE])
