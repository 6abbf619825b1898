"""minigen.merge.checkpoints: each method equals its formula tensor by tensor; components, recipe metadata and bad input."""

import hashlib
import json
import re
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

import merge as merge_cli  # merge.py at the repository root (pytest's pythonpath)
from cli_errors import assert_clean_error
from minigen.sd import checkpoint_files
from minigen.merge import checkpoints
from minigen.io import CheckpointError, read_header, save_safetensors
from minigen.merge.checkpoints import MergeRecipe, MergeWarning, merge_checkpoints
from minigen.sd.detect import CONFIGS_METADATA
from minigen.sd.model import load_model, random_model

# A small single-file checkpoint: every component, a UNet key in each block group, an integer buffer, an "other" key.
SHAPES = {
    "model.diffusion_model.time_embed.0.weight": (8, 4),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 4, 3, 3),
    "model.diffusion_model.middle_block.1.proj_in.weight": (8, 8),
    "model.diffusion_model.output_blocks.2.1.norm.bias": (8,),
    "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 6),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 5),
    "conditioner.embedders.1.model.ln_final.weight": (6,),
    "model_ema.decay": (),
}
UNET_IN, UNET_MID, UNET_OUT = (f"model.diffusion_model.{k}" for k in (
    "input_blocks.1.0.in_layers.2.weight", "middle_block.1.proj_in.weight", "output_blocks.2.1.norm.bias"))
TIME = "model.diffusion_model.time_embed.0.weight"
VAE = "first_stage_model.decoder.conv_in.weight"
TEXT = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
POS_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


def make_checkpoint(path, seed, dtype=torch.float16, drop=(), reshape=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in SHAPES.items():
        if key in drop:
            continue
        shape = (reshape or {}).get(key, shape)
        if key == POS_IDS:
            tensors[key] = torch.arange(5).reshape(1, 5)
        else:
            tensors[key] = torch.randn(shape, generator=g).to(dtype)
    save_safetensors(tensors, path, metadata={"modelspec.architecture": "test"})
    return tensors


@pytest.fixture
def abc(tmp_path):
    paths = [tmp_path / f"{n}.safetensors" for n in "abc"]
    return [make_checkpoint(p, seed) for seed, p in enumerate(paths)], paths


def merge(*args, **kw):
    return merge_checkpoints(*args, progress=False, **kw)


def test_weighted_sum_equals_formula_vae_and_others_copied(abc, tmp_path):
    (a, b, _), (pa, pb, _) = abc
    out = tmp_path / "out.safetensors"
    report = merge(pa, pb, out, MergeRecipe(alpha=0.3))
    got = load_file(str(out))  # the reference reader opens the streamed file
    assert list(got) == list(a)  # A's keys, in A's order
    for key in (TIME, UNET_IN, UNET_MID, UNET_OUT, TEXT, "conditioner.embedders.1.model.ln_final.weight"):
        want = (0.7 * a[key].float() + 0.3 * b[key].float()).half()
        # computed in fp32 then rounded once to fp16: equal up to one fp16 rounding step
        torch.testing.assert_close(got[key], want, rtol=1e-3, atol=1e-3)
        assert got[key].dtype == torch.float16
        # the fp16 fast path (lerp straight on fp16) rounds once, exactly as fp32 arithmetic then a cast does
        assert torch.equal(got[key], torch.lerp(a[key].float(), b[key].float(), 0.3).half())
    assert torch.equal(got[VAE], a[VAE])  # seed 004: the VAE is left out of the merge
    assert torch.equal(got[POS_IDS], a[POS_IDS]) and got[POS_IDS].dtype == torch.int64
    assert torch.equal(got["model_ema.decay"], a["model_ema.decay"])
    assert report.merged == 6 and report.copied == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                         "out.safetensors"]


def test_add_difference_block_alphas_and_dtype(abc, tmp_path):
    (a, b, c), (pa, pb, pc) = abc
    out = tmp_path / "out.safetensors"
    recipe = MergeRecipe(method="add_difference", alpha=0.5, block_alphas=(0.1, 0.6, 0.9), vae="merge",
                         dtype="fp32")
    merge(pa, pb, out, recipe, c=pc)
    got = load_file(str(out))
    for key, alpha in ((UNET_IN, 0.1), (UNET_MID, 0.6), (UNET_OUT, 0.9), (TIME, 0.5), (TEXT, 0.5), (VAE, 0.5)):
        want = a[key].float() + alpha * (b[key].float() - c[key].float())
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)  # fp32 throughout: only fp32 rounding
        assert got[key].dtype == torch.float32
    assert got[POS_IDS].dtype == torch.int64  # integer buffers keep their dtype


def test_skip_text_encoders_and_vae_from_file(abc, tmp_path):
    (a, b, _), (pa, pb, _) = abc
    vae_path = tmp_path / "vae.safetensors"
    new_vae = torch.randn(4, 4, 3, 3).half()
    save_safetensors({"decoder.conv_in.weight": new_vae}, vae_path)  # a standalone VAE file has no prefix
    out = tmp_path / "out.safetensors"
    merge(pa, pb, out, MergeRecipe(vae=str(vae_path), merge_text_encoders=False))
    got = load_file(str(out))
    assert torch.equal(got[VAE], new_vae)
    assert torch.equal(got[TEXT], a[TEXT])
    assert not torch.equal(got[TIME], a[TIME])
    wrong = tmp_path / "diffusers_vae.safetensors"
    save_safetensors({"decoder.conv_in.conv.weight": new_vae}, wrong)  # names of no single-file VAE tensor
    with pytest.raises(CheckpointError, match="holds none of the VAE's single-file tensors"):
        merge(pa, pb, tmp_path / "wrong.safetensors", MergeRecipe(vae=str(wrong)))


def test_recipe_metadata_records_inputs_and_sha256(abc, tmp_path):
    _, (pa, pb, _) = abc
    out = tmp_path / "out.safetensors"
    merge(pa, pb, out, MergeRecipe(alpha=0.25))
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["method"] == "weighted_sum" and recipe["alpha"] == 0.25 and recipe["vae"] == "copy"
    models = json.loads(meta["sd_merge_models"])
    for path, role in ((pa, "A"), (pb, "B")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert models[digest] == {"name": path.name, "role": role}
    assert meta["modelspec.architecture"] == "test"  # A's own metadata is kept


def test_missing_keys_in_b_copied_from_a_with_warning(tmp_path):
    a = make_checkpoint(tmp_path / "a.safetensors", 0)
    make_checkpoint(tmp_path / "b.safetensors", 1, drop=(UNET_MID, TEXT))
    out = tmp_path / "out.safetensors"
    with pytest.warns(MergeWarning, match="2 tensors of A are missing"):
        report = merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out)
    assert sorted(report.missing[str(tmp_path / "b.safetensors")]) == sorted([UNET_MID, TEXT])
    got = load_file(str(out))
    assert torch.equal(got[UNET_MID], a[UNET_MID]) and torch.equal(got[TEXT], a[TEXT])


def test_shape_mismatch_skipped_or_strict_error(tmp_path):
    a = make_checkpoint(tmp_path / "a.safetensors", 0)
    make_checkpoint(tmp_path / "b.safetensors", 1, reshape={TIME: (8, 5)})
    out = tmp_path / "out.safetensors"
    with pytest.warns(MergeWarning, match="1 tensors differ in shape"):
        report = merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out)
    assert report.shape_mismatches == [(TIME, (8, 4), (8, 5))]
    assert torch.equal(load_file(str(out))[TIME], a[TIME])
    out.unlink()
    with pytest.raises(CheckpointError, match=r"strict.*\n.*time_embed.0.weight: \(8, 4\) vs \(8, 5\)"):
        merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # nothing partial


def test_sdxl_and_sd1_refused_with_a_clear_error(abc, tmp_path):
    _, (pa, _, _) = abc
    sd1 = tmp_path / "sd1.safetensors"
    save_safetensors({"model.diffusion_model.time_embed.0.weight": torch.zeros(8, 4),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(6)}, sd1)
    with pytest.raises(CheckpointError, match=r"different architectures: .*a.safetensors is Stable Diffusion XL "
                                              r"\(base\), .*sd1.safetensors is Stable Diffusion 1.x"):
        merge(pa, sd1, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_alpha_outside_unit_interval_warns_but_merges(abc, tmp_path):
    (a, b, _), (pa, pb, _) = abc
    with pytest.warns(MergeWarning, match="alpha 1.5 is outside"):
        merge(pa, pb, tmp_path / "out.safetensors", MergeRecipe(alpha=1.5, dtype="fp32"))
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got[TIME], -0.5 * a[TIME].float() + 1.5 * b[TIME].float(), rtol=0, atol=1e-6)


def test_output_equal_to_input_refused(abc):
    _, (pa, pb, _) = abc
    before = pa.read_bytes()
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge(pa, pb, pa)
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge(pa, pb, pa.parent / "." / pb.name)
    assert pa.read_bytes() == before


def test_truncated_input_refused_before_writing(abc, tmp_path):
    _, (pa, pb, _) = abc
    data = pb.read_bytes()
    pb.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        merge(pa, pb, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob(".out*"))


def test_too_little_disk_checked_before_writing(abc, tmp_path, monkeypatch):
    _, (pa, pb, _) = abc
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_files.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match="not enough free disk"):
        merge(pa, pb, tmp_path / "sub" / "out.safetensors")
    assert not (tmp_path / "sub").exists() or not list((tmp_path / "sub").iterdir())


def test_interrupted_merge_leaves_no_partial_file(abc, tmp_path, monkeypatch):
    _, (pa, pb, _) = abc
    calls = []

    def failing(a, b, alpha, out=None):  # fails on the third merged tensor, after the header and two were written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return checkpoints.weighted_sum(a, b, alpha, out)

    monkeypatch.setitem(checkpoints.METHODS, "weighted_sum", checkpoints.Method(failing, 2, True))
    with pytest.raises(KeyboardInterrupt):
        merge(pa, pb, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_large_tensor_is_computed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHUNK", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(3)
    a = {UNET_IN: torch.randn(5, 9, generator=g)}
    b = {UNET_IN: torch.randn(5, 9, generator=g)}
    save_safetensors(a, tmp_path / "a.safetensors")
    save_safetensors(b, tmp_path / "b.safetensors")
    merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors", MergeRecipe(alpha=0.4))
    torch.testing.assert_close(load_file(str(tmp_path / "o.safetensors"))[UNET_IN], 0.6 * a[UNET_IN] + 0.4 * b[UNET_IN],
                               rtol=0, atol=1e-6)


def test_cli(abc, tmp_path, capsys):
    (a, b, _), (pa, pb, _) = abc
    out = tmp_path / "cli.safetensors"
    assert merge_cli.main([str(pa), str(pb), "-o", str(out), "--alpha", "0.3", "--block-alphas", "0,0,1",
                           "--dtype", "fp32"]) == 0
    assert "6 tensors merged, 3 copied" in capsys.readouterr().out
    got = load_file(str(out))
    assert torch.equal(got[UNET_IN], a[UNET_IN].float()) and torch.equal(got[UNET_OUT], b[UNET_OUT].float())
    assert_clean_error(merge_cli.main, [str(pa), str(pb), "-o", str(pa)], capsys, "is one of the inputs")
    # B and --lora together: which job is meant is unclear
    assert_clean_error(merge_cli.main, [str(pa), str(pb), "--lora", str(pb), "-o", str(out)], capsys, "give A B")


def test_writer_rewrites_metadata_only_at_the_same_length(tmp_path):
    # merging fills the inputs' digests in over placeholders this way, after the tensors are written
    from minigen.io import SafetensorsWriter, load_safetensors
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, {"x": ((2,), torch.float32)}, {"digest": "0" * 8}) as w:
        w.write("x", torch.ones(2))
        with pytest.raises(ValueError, match="changes the header length"):
            w.rewrite_metadata({"digest": "0" * 20})
        w.rewrite_metadata({"digest": "abcdef12"})
    tensors, meta = load_safetensors(path)
    assert meta == {"digest": "abcdef12"} and torch.equal(tensors["x"], torch.ones(2))


# ------------------------------------------------------------------------------------------------- LoRA baking

LORA_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
TE1_Q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE2_QKV = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def kohya_lora(path, seed, names_shapes, alpha):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in names_shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_safetensors(tensors, path)
    return tensors


def test_baked_loras_equal_runtime_loras(tmp_path):
    from torch import nn
    from minigen.lora.layers import LoRAAdapter, LoRALayer, LoRATensors
    from minigen.merge.bake import bake_loras

    g = torch.Generator().manual_seed(0)
    ckpt = {LORA_Q: torch.randn(8, 8, generator=g), TE1_Q: torch.randn(6, 6, generator=g),
            TE2_QKV: torch.randn(12, 4, generator=g), VAE: torch.randn(4, 4, 3, 3, generator=g)}
    save_safetensors(ckpt, tmp_path / "base.safetensors")
    unet_name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    l1 = kohya_lora(tmp_path / "l1.safetensors", 1, {unet_name: (8, 8),
                                                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (6, 6),
                                                     "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (4, 4)}, 1.0)
    l2 = kohya_lora(tmp_path / "l2.safetensors", 2, {unet_name: (8, 8)}, 4.0)
    out = tmp_path / "baked.safetensors"
    report = bake_loras(tmp_path / "base.safetensors", [(tmp_path / "l1.safetensors", 0.8),
                                                        (tmp_path / "l2.safetensors", -0.5)], out, progress=False)
    got = load_file(str(out))
    assert report.merged == 3 and report.copied == 1 and torch.equal(got[VAE], ckpt[VAE])

    # The UNet layer: the same outputs as minigen's run-time LoRA layer with both adapters at their ratios.
    layer = LoRALayer(nn.Linear(8, 8, bias=False))
    layer.base.weight.data.copy_(ckpt[LORA_Q])
    for name, lora, ratio, alpha in (("l1", l1, 0.8, 1.0), ("l2", l2, -0.5, 4.0)):
        adapter = LoRAAdapter(layer.base, rank=2, alpha=alpha)
        adapter.set_tensors(LoRATensors(lora[f"{unet_name}.lora_down.weight"], lora[f"{unet_name}.lora_up.weight"],
                                        alpha))
        layer.add(name, adapter, multiplier=ratio)
    x = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(x @ got[LORA_Q].T, layer(x), rtol=1e-5, atol=1e-5)  # fp32: rounding only

    # bigG's fused q/k/v: the k LoRA changes only the middle third of the rows (scale alpha / rank = 0.5).
    k = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    delta = 0.8 * 0.5 * l1[f"{k}.lora_up.weight"] @ l1[f"{k}.lora_down.weight"]
    torch.testing.assert_close(got[TE2_QKV][4:8], ckpt[TE2_QKV][4:8] + delta, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[TE2_QKV][:4], ckpt[TE2_QKV][:4]) and torch.equal(got[TE2_QKV][8:], ckpt[TE2_QKV][8:])
    q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    torch.testing.assert_close(got[TE1_Q], ckpt[TE1_Q] + 0.4 * l1[f"{q}.lora_up.weight"] @ l1[f"{q}.lora_down.weight"],
                               rtol=1e-6, atol=1e-6)

    cli = tmp_path / "cli.safetensors"  # the CLI bakes the same
    assert merge_cli.main([str(tmp_path / "base.safetensors"), "-o", str(cli), "--lora",
                           f"{tmp_path / 'l1.safetensors'}:0.8", "--lora", f"{tmp_path / 'l2.safetensors'}:-0.5"]) == 0
    assert all(torch.equal(v, got[k]) for k, v in load_file(str(cli)).items())


def test_bake_refuses_a_lora_for_another_model(tmp_path):
    from minigen.sd.lora_files import LoRAFileError
    from minigen.merge.bake import bake_loras

    save_safetensors({LORA_Q: torch.zeros(8, 8)}, tmp_path / "base.safetensors")
    kohya_lora(tmp_path / "other.safetensors", 0, {"lora_unet_middle_block_1_proj_in": (8, 8)}, 1.0)
    kohya_lora(tmp_path / "wide.safetensors", 0, {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (16, 8)},
               1.0)
    with pytest.raises(LoRAFileError, match="1 layers match no tensor.*middle_block_1_proj_in"):
        bake_loras(tmp_path / "base.safetensors", [(tmp_path / "other.safetensors", 1)], tmp_path / "o.safetensors")
    with pytest.raises(LoRAFileError, match=r"LoRA changes \(16, 8\).*is \(8, 8\)"):
        bake_loras(tmp_path / "base.safetensors", [(tmp_path / "wide.safetensors", 1)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------ LoRA extraction and merging

CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def svd_tail(delta, rank):
    """Frobenius norm of the best rank-`rank` approximation's error (Eckart-Young): the floor any extraction meets."""
    s = torch.linalg.svdvals(delta.flatten(1))
    return s[rank:].square().sum().sqrt().item()


def test_extract_then_bake_reproduces_the_difference_to_the_svd_error(tmp_path):
    from minigen.merge.extract import extract_lora
    from minigen.merge.bake import bake_loras

    g = torch.Generator().manual_seed(0)
    base = {LORA_Q: torch.randn(8, 8, generator=g), TE2_QKV: torch.randn(12, 4, generator=g),
            CONV: torch.randn(4, 4, 3, 3, generator=g), VAE: torch.randn(4, 4, 3, 3, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_safetensors(base, tmp_path / "base.safetensors")
    save_safetensors(tuned, tmp_path / "tuned.safetensors")
    assert merge_cli.main([str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--rank", "3",
                           "--clamp-quantile", "1", "-o", str(tmp_path / "cli.safetensors")]) == 0
    n = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                     rank=3, clamp_quantile=1.0, progress=False)
    assert n == 4  # to_q and bigG's q, k, v; the 3x3 convolution and the VAE are no LoRA layers
    cli = load_file(str(tmp_path / "cli.safetensors"))
    assert all(torch.equal(v, cli[k]) for k, v in load_file(str(tmp_path / "x.safetensors")).items())
    bake_loras(tmp_path / "base.safetensors", [(tmp_path / "x.safetensors", 1.0)], tmp_path / "b.safetensors",
               progress=False)
    baked = load_file(str(tmp_path / "b.safetensors"))
    err = (baked[LORA_Q] - tuned[LORA_Q]).norm().item()
    assert err == pytest.approx(svd_tail(tuned[LORA_Q] - base[LORA_Q], 3), rel=1e-4)
    for i in range(3):  # each third of bigG's fused q/k/v is its own layer
        rows = slice(4 * i, 4 * i + 4)
        err = (baked[TE2_QKV][rows] - tuned[TE2_QKV][rows]).norm().item()
        assert err == pytest.approx(svd_tail(tuned[TE2_QKV][rows] - base[TE2_QKV][rows], 3), rel=1e-4, abs=1e-6)
    assert torch.equal(baked[CONV], base[CONV]) and torch.equal(baked[VAE], base[VAE])


def test_low_rank_clamps_at_the_quantile():
    from minigen.merge.extract import low_rank

    delta = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    delta[0, 0] = 100.0  # an outlier
    up, down = low_rank(delta, 4, clamp_quantile=0.9)
    plain_up, plain_down = low_rank(delta, 4, clamp_quantile=1.0)
    hi = torch.quantile(torch.cat([plain_up.flatten(), plain_down.flatten()]).abs(), 0.9)
    assert up.abs().max() <= hi + 1e-6 and down.abs().max() <= hi + 1e-6
    assert plain_up.abs().max() > hi  # the clamp did something
    conv_up, conv_down = low_rank(torch.randn(8, 4, 1, 1), 2)
    assert conv_up.shape == (8, 2, 1, 1) and conv_down.shape == (2, 4, 1, 1)  # kohya's conv layout


def test_merge_loras_refactorises_their_sum(tmp_path):
    from minigen.sd.lora_reading import read_lora

    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    l1 = kohya_lora(tmp_path / "l1.safetensors", 1, {name: (8, 8)}, 1.0)
    l2 = kohya_lora(tmp_path / "l2.safetensors", 2, {name: (8, 8)}, 4.0)
    want = (0.7 * 0.5 * l1[f"{name}.lora_up.weight"] @ l1[f"{name}.lora_down.weight"]
            - 0.3 * 2.0 * l2[f"{name}.lora_up.weight"] @ l2[f"{name}.lora_down.weight"])  # ratio * alpha / rank
    for rank in (4, 3):  # rank 4 holds the sum of two rank-2 deltas exactly; rank 3 meets the SVD floor
        out = tmp_path / f"m{rank}.safetensors"
        assert merge_cli.main(["--lora", f"{tmp_path / 'l1.safetensors'}:0.7", "--lora",
                               f"{tmp_path / 'l2.safetensors'}:-0.3", "--rank", str(rank), "--clamp-quantile", "1",
                               "-o", str(out)]) == 0
        e = read_lora(out)[0]["unet"][name.removeprefix("lora_unet_")]
        got = e.raw()
        assert (got - want).norm().item() == pytest.approx(svd_tail(want, rank), abs=1e-5)


# ------------------------------------------------------------------------------------ diffusers folders as inputs

@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """Two tiny random SDXL models (minigen's, seeds 0 and 1, fp16) as single files a and b, and b as a diffusers
    folder holding weights and configs (no tokenizers, no scheduler: a reader must manage without). Read-only."""
    tmp_path = tmp_path_factory.mktemp("tiny-sdxl")
    from minigen.sd import get_config
    from minigen.sd.convert import to_single_file
    from minigen.sd.model import PARTS, build_model

    config = get_config("tiny")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({part: {k: v.half() for k, v in build_model(part, config[part]).state_dict().items()}
                       for part in PARTS})
    single = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for path, sd in zip(single, states):
        save_safetensors(to_single_file(sd, config, "sdxl"), path)
    folder = tmp_path / "b_diffusers"
    for part, rel in checkpoint_files.diffusers_files("sdxl").items():
        save_safetensors(states[1][part], folder / rel)
        (folder / part / "config.json").write_text(json.dumps(config[part]))
    return single, folder


def test_diffusers_folder_input_merges_like_its_single_file(tiny_sdxl, tmp_path):
    single, folder = tiny_sdxl
    recipe = MergeRecipe(alpha=0.3, vae="merge")
    merge(single[0], single[1], tmp_path / "from_file.safetensors", recipe)
    merge(single[0], folder, tmp_path / "from_folder.safetensors", recipe)  # mixed: a file and a folder
    want, got = load_file(str(tmp_path / "from_file.safetensors")), load_file(str(tmp_path / "from_folder.safetensors"))
    assert list(got) == list(want)
    for k in want:  # bigG's fused q/k/v, its transposed projection and the VAE's 1x1 attention included
        assert torch.equal(got[k], want[k]), k


ATTENTION = re.compile(r"\.(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj|attn\.out_proj)\.weight$")
BIGG_QKV = re.compile(r"\.attn\.in_proj_weight$")


def test_extracted_lora_baked_into_a_reproduces_b_attention_to_the_svd_error(tiny_sdxl, tmp_path):
    """`merge.py A B --rank R` on SDXL's real layout (norms and biases inside the attention blocks, bigG's fused
    q/k/v), baked back with `merge.py A --lora`: every attention weight is B's up to the rank-R SVD's own error."""
    (pa, pb), _ = tiny_sdxl
    rank = 3
    lora, baked = tmp_path / "lora.safetensors", tmp_path / "baked.safetensors"
    assert merge_cli.main([str(pa), str(pb), "--rank", str(rank), "--clamp-quantile", "1", "-o", str(lora)]) == 0
    assert merge_cli.main([str(pa), "--lora", str(lora), "--dtype", "fp32", "-o", str(baked)]) == 0
    a, b, got = load_file(str(pa)), load_file(str(pb)), load_file(str(baked))
    assert all(t.dim() in (0, 2) for t in load_file(str(lora)).values())  # no norm or bias was factored
    attention = [k for k in a if ATTENTION.search(k)]
    fused = [k for k in a if BIGG_QKV.search(k)]
    assert len(attention) > 20 and len(fused) > 0
    for key in attention:
        delta = b[key].float() - a[key].float()
        err = (got[key] - b[key].float()).norm().item()
        assert err == pytest.approx(svd_tail(delta, rank), rel=1e-3, abs=1e-5), key
    for key in fused:  # q, k and v are three layers of the LoRA, each with its own SVD error
        for rows_a, rows_b, rows_got in zip(*(t.float().chunk(3) for t in (a[key], b[key], got[key]))):
            err = (rows_got - rows_b).norm().item()
            assert err == pytest.approx(svd_tail(rows_b - rows_a, rank), rel=1e-3, abs=1e-5), key
    for key in a:  # norms, biases, embeddings, the VAE: no LoRA holds them, they stay A's
        if key.endswith(".bias") or "norm" in key or key.startswith("first_stage_model."):
            assert torch.equal(got[key], a[key].float()), key


# ------------------------------------------------------------------------------------- diffusers folders as output

def test_merge_to_diffusers_folder_equals_the_single_file_merge(tiny_sdxl, tmp_path):
    import diffusers

    from minigen.io import read_header
    from minigen.sd import load_model
    from minigen.sd.clip import normalize_clip_keys

    (pa, pb), _ = tiny_sdxl
    recipe = MergeRecipe(alpha=0.3, vae="merge", dtype="fp16")  # VAE merged: its attention's reshape is exercised
    merge(pa, pb, tmp_path / "merged.safetensors", recipe)
    # the CLI: -o without .safetensors is a folder; its configs are read from the tensors (detect.py)
    assert merge_cli.main([str(pa), str(pb), "-o", str(tmp_path / "merged"), "--alpha", "0.3", "--vae", "merge",
                           "--dtype", "fp16"]) == 0
    folder = tmp_path / "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.safetensors"]  # no temporary folder
    header, metadata = read_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"F16"}  # streamed at the output dtype
    assert metadata["format"] == "pt" and json.loads(metadata["sd_merge_recipe"])["alpha"] == 0.3
    assert len(json.loads(metadata["sd_merge_models"])) == 2  # both inputs' digests filled in

    from_file, from_folder = load_model(tmp_path / "merged.safetensors"), load_model(folder)
    for part, model in from_file.models().items():
        want, got = model.state_dict(), from_folder.models()[part].state_dict()
        assert list(got) == list(want)
        for k in want:  # bigG's split q/k/v and transposed projection, the VAE's linear attention included
            assert torch.equal(got[k], want[k]), (part, k)
    assert from_folder.configs == from_file.configs

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for part, model in from_folder.models().items():
        theirs = getattr(pipe, part).state_dict()
        theirs = normalize_clip_keys(theirs) if part.startswith("text_encoder") else theirs
        for k, v in model.state_dict().items():
            assert torch.equal(theirs[k].float(), v), (part, k)


def test_folder_output_from_a_folder_keeps_its_configs_and_tokenizers(tiny_sdxl, tmp_path):
    from minigen.sd.tokenizer import model_tokenizers

    (pa, _), shared = tiny_sdxl
    folder = tmp_path / "a_diffusers"
    shutil.copytree(shared, folder)
    scheduler = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 999}  # not SDXL's: copied, not made
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    first, second = tuple(model_tokenizers("sdxl").values())
    first.save(folder / "tokenizer")
    second.with_pad_token("<|startoftext|>").save(folder / "tokenizer_2")  # not SDXL's "!" either
    out = tmp_path / "out.safetensors"  # a .safetensors name, but a folder is asked for
    merge(folder, pa, out, MergeRecipe(alpha=0.5), output_format="diffusers")
    assert out.is_dir()
    for rel in ("unet/config.json", "text_encoder_2/config.json", "scheduler/scheduler_config.json"):
        assert json.loads((out / rel).read_text()) == json.loads((folder / rel).read_text()), rel
    assert model_tokenizers("sdxl", out)["tokenizer_2"].pad_token == "<|startoftext|>"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_folder_output_failures_leave_nothing(tiny_sdxl, tmp_path, monkeypatch):
    (pa, pb), _ = tiny_sdxl
    out = tmp_path / "out"
    calls = []

    def failing(a, b, alpha, out=None):  # interrupted on the third merged tensor, with all four files half-written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return checkpoints.weighted_sum(a, b, alpha, out)

    with monkeypatch.context() as m:
        m.setitem(checkpoints.METHODS, "weighted_sum", checkpoints.Method(failing, 2, True))
        with pytest.raises(KeyboardInterrupt):
            merge(pa, pb, out)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a diffusers folder"):
        merge(pa, pb, out)
    (out / "b.safetensors").write_bytes(pb.read_bytes())
    with pytest.raises(ValueError, match="inside the output folder"):
        merge(pa, out / "b.safetensors", out)
    assert sorted(p.name for p in out.iterdir()) == ["b.safetensors", "notes.txt"]

    # an existing diffusers folder is replaced
    old = tmp_path / "old"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    merge(pa, pb, old, MergeRecipe(alpha=1.0))
    key = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(load_file(str(old / "text_encoder" / "model.safetensors"))[key],
                       load_file(str(pb))["conditioner.embedders.0.transformer." + key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "out"]  # nothing left aside


def make_folders(tmp_path):
    old, new = tmp_path / "model", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "model_index.json").write_text(text)
    return old, new


def test_replace_folder_swaps_atomically(tmp_path, monkeypatch):
    from minigen import atomic

    old, new = make_folders(tmp_path)

    def no_replace(src, dst):  # the swap never renames the old folder away (that leaves the path empty)
        raise AssertionError(f"os.replace({src}, {dst})")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    atomic.replace_folder(new, old)
    assert (old / "model_index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_folder_fallback_keeps_the_old_folder_if_the_rename_fails(tmp_path, monkeypatch):
    from minigen import atomic

    old, new = make_folders(tmp_path)
    monkeypatch.setattr(atomic, "_exchange_paths", lambda a, b: False)  # a system without an atomic swap
    real_replace, calls = atomic.os.replace, []

    def replace(src, dst):  # moving the old folder aside works; renaming the new one into place fails
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", replace)
        with pytest.raises(OSError, match="disk gone"):
            atomic.replace_folder(new, old)
    assert (old / "model_index.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]  # the aside folder removed
    atomic.replace_folder(new, old)
    assert (old / "model_index.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_folder_output_refused_for_an_unknown_layout(tmp_path):
    sd1 = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4),
           "model.diffusion_model.out.2.weight": torch.ones(4)}
    save_safetensors(sd1, tmp_path / "a.safetensors")
    save_safetensors(sd1, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot write .*out as a diffusers folder: .*an unknown SD 1.x layout"):
        merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_a_single_file_merged_from_two_diffusers_folders_loads_back(tmp_path):
    """Every model file minigen writes carries its configs (metadata minigen.configs): a tiny SDXL-layout model is no
    layout the shapes settle, so without them sample.py could not read minigen's own merge."""
    for seed in (0, 1):
        random_model("tiny", seed).save_diffusers(tmp_path / f"m{seed}")
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(tmp_path / "m0", tmp_path / "m1", out, MergeRecipe(alpha=0.5), progress=False)
    assert CONFIGS_METADATA in read_header(out)[1]
    assert load_model(out).configs == random_model("tiny").configs
