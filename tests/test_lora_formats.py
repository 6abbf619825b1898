"""Every LoRA-family format, written by its own tool, applied by minigen as that tool's forward applies it (issue 23).

LyCORIS (lycoris-lora, pinned in requirements/test.txt) trains LoCon (k x k convolutions included), its Tucker
variant, LoHa, LoKr (whole and factored sides, Tucker), full, GLoRA and DoRA (`dora_wd`, on the output or the input
axis) on the diffusers modules of the tiny SD 1.5 and SDXL models; its weights are set at random and it writes the
file with its own `save_weights`. The reference is LyCORIS' own module forward (not its `get_merged_weight`, which
squares alpha/rank for LoHa and LoKr in 4.1.3). minigen then applies the same file:
- as `sample.py --lora` does (`load_lora`, fused into copies of the same diffusers modules): the UNet's and the
  text encoders' outputs equal the reference's;
- as `merge.py --lora` bakes it into the model's single file: every tensor equals the fused model's, and the
  printed line counts the file's layers by kind;
- and `sample.py --lora` on the base model draws the image `sample.py` draws with the baked model.
peft's DoRA (`use_dora`, on linear and 3x3 convolution layers), written by diffusers' `save_lora_weights` with its
adapter metadata, is applied as diffusers' `fuse_lora(lora_scale=s)` computes it (s scales B·A before the rows
are renormalised): the fused and the baked weights equal diffusers' fused ones, at s = 1 and s = 0.6.

Tolerances: outputs 1e-4 of their scale (fp32 both sides; the reference adds ΔW's output to the base's where
minigen adds ΔW to W, 1e-6..1e-5 measured); baked tensors 1e-6 of their scale (the same fp32 arithmetic on both
paths); images 1/255 (PNG rounding of images equal to ~1e-6). Each file moves the outputs by more than 100 times the
output tolerance (asserted): a layer dropped or applied at a wrong scale cannot pass.
"""

from __future__ import annotations

import copy

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from close import assert_close_to_scale
from sdxl_tiny import tiny_folder, tiny_pipeline, tiny_single_file
from test_sd_pipeline import reference_folder

import merge as merge_cli
import sample as sample_cli
from minigen.lora import layers as lora_layers
from minigen.lora.layers import lora_names, merge_lora
from minigen.sd.model import load_model
from minigen.sd.lora_reading import load_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

OUTPUT_TOL, WEIGHT_TOL = 1e-4, 1e-6
# LyCORIS' "full" preset also lists TimestepEmbedding and its linear layers by name (a duplicate it refuses on a
# diffusers UNet): this is that preset without the duplicate, every layer kind of the UNet and the text encoders.
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# id: (LyCORIS network arguments, the kind minigen's summary line must count)
FORMATS = {
    "locon": (dict(algo="locon"), "LoCon"),
    "locon-tucker": (dict(algo="locon", use_tucker=True), "LoCon"),
    "loha": (dict(algo="loha"), "LoHa"),
    "loha-tucker": (dict(algo="loha", use_tucker=True), "LoHa"),
    "lokr": (dict(algo="lokr"), "LoKr"),
    "lokr-tucker": (dict(algo="lokr", use_tucker=True, factor=4), "LoKr"),
    "lokr-both-factored": (dict(algo="lokr", decompose_both=True, factor=2), "LoKr"),
    "full": (dict(algo="full"), "full"),
    "glora": (dict(algo="glora"), "GLoRA"),
    "dora": (dict(algo="locon", dora_wd=True), "DoRA"),
    "dora-input-axis-loha": (dict(algo="loha", dora_wd=True, wd_on_output=False), "DoRA"),
    "dora-lokr": (dict(algo="lokr", dora_wd=True), "DoRA"),
}
SD1_FORMATS = ("locon", "loha", "lokr-tucker", "full", "glora", "dora")  # SD 1.5's names and single encoder
PROMPT_IDS = torch.tensor([[49406, 320, 1125, 539, 49407]])


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(family, the diffusers components {"unet", "te1"[, "te2"]} (not to be changed), its single file)."""
    if request.param == "sdxl":
        pipe = tiny_pipeline()
        return "sdxl", {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}, tiny_single_file()
    folder = reference_folder("tiny-sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    single = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    load_model(folder).save_single_file(single)
    return "sd1", {"unet": pipe.unet, "te1": pipe.text_encoder}, single


def outputs(components: dict) -> list[torch.Tensor]:
    """The UNet's noise prediction and each text encoder's output, for fixed inputs."""
    unet = components["unet"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if "te2" in components:  # SDXL's pooled text and size conditioning
        extra["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, 32, generator=g),
                                          time_ids=torch.tensor([[16., 16, 0, 0, 16, 16]]))
    with torch.no_grad():
        out = [unet(x, t, encoder_hidden_states=context, **extra).sample,
               components["te1"](PROMPT_IDS).last_hidden_state]
        if "te2" in components:
            out.append(components["te2"](PROMPT_IDS).text_embeds)
    return out


def lycoris_file(components: dict, path, tmp_path, **network_args) -> list[torch.Tensor]:
    """Train-time state of a LyCORIS network with random weights on copies of `components`, written by LyCORIS to
    `path`; returns the outputs its own forward gives."""
    from lycoris.kohya import create_network

    (tmp_path / "preset.toml").write_text(PRESET)
    copies = copy.deepcopy(components)
    encoders = [copies[c] for c in ("te1", "te2") if c in copies]
    encoders = encoders if len(encoders) > 1 else encoders[0]  # one encoder: SD 1.x's `lora_te_` names
    network = create_network(1.0, 4, 2.0, None, encoders, copies["unet"], preset=str(tmp_path / "preset.toml"),
                             conv_dim=4, conv_alpha=1.0, **network_args)
    network.apply_to(encoders, copies["unet"], True, True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():  # up-projections start at zero: every part random, so each one counts
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    reference = outputs(copies)
    network.save_weights(str(path), None, {})
    return reference


def comparable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with minigen's adapter wrapping (`.base.`, plain LoRA layers' on-the-fly adapters) and
    transformers' optional `text_model.` taken out."""
    return {k.replace(".base.", ".").removeprefix("text_model."): v for k, v in module.state_dict().items()
            if ".adapters." not in k}


CASES = [pytest.param(family, fmt, id=f"{family}-{fmt}") for family in ("sd1", "sdxl") for fmt in FORMATS
         if family == "sdxl" or fmt in SD1_FORMATS]


@pytest.mark.parametrize("family,fmt", CASES, indirect=["family"])
def test_lycoris_file_applies_as_lycoris_forward(family, fmt, tmp_path, capsys, monkeypatch):
    _, components, single = family
    network_args, kind = FORMATS[fmt]
    lora = tmp_path / f"{fmt}.safetensors"
    reference = lycoris_file(components, lora, tmp_path, **network_args)
    base = outputs(components)

    # sample.py's way: every layer's change added into its weight for good, a few rows at a time (blocks of at most
    # 64 values here, so that a tiny model's weights are fused in many blocks as a full-size one's are)
    monkeypatch.setattr(lora_layers, "BLOCK_VALUES", 64)
    for_good = copy.deepcopy(components)
    load_lora(lora, for_good, removable=False)
    assert not lora_names(for_good["unet"])  # nothing wrapped, nothing kept aside
    # eval.py's way (removable): plain LoRA/LoCon layers on the fly, the other kinds merged with W kept aside
    ours = copy.deepcopy(components)
    _, summary = load_lora(lora, ours)
    assert f"{kind} 0," not in summary and f"{kind} 0;" not in summary, summary
    for got, got_for_good, want, before in zip(outputs(ours), outputs(for_good), reference, base):
        assert_close_to_scale(got, want, OUTPUT_TOL)
        assert_close_to_scale(got_for_good, want, OUTPUT_TOL)
        assert (want - before).abs().max() > 100 * OUTPUT_TOL * want.abs().max()  # the file changes the output

    # merge.py's way: baked into the single file, tensor by tensor
    baked = tmp_path / "baked.safetensors"
    assert merge_cli.main([str(single), "--lora", str(lora), "-o", str(baked)]) == 0
    assert summary in capsys.readouterr().out
    baked_model = load_model(baked).lora_components()
    for module in ours.values():
        merge_lora(module)  # the on-the-fly layers folded in too: every weight comparable with the baked file's
    for component, module in ours.items():
        want, got = comparable(module), comparable(baked_model[component])
        assert set(want) <= set(got), sorted(set(want) - set(got))[:3]
        for key, w in want.items():
            if w.is_floating_point():
                assert_close_to_scale(got[key], w, WEIGHT_TOL)


@pytest.mark.parametrize("family,strength", [("sd1", 1.0), ("sd1", 0.6), ("sdxl", 0.6)], indirect=["family"])
def test_peft_dora_file_fuses_as_diffusers_does(family, strength, tmp_path, capsys):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    name, components, single = family
    folder, pipeline_class = ((reference_folder("tiny-sd1"), diffusers.StableDiffusionPipeline) if name == "sd1"
                              else (tiny_folder(), diffusers.StableDiffusionXLPipeline))
    unet = copy.deepcopy(components["unet"])
    config = LoraConfig(r=4, lora_alpha=2.0, use_dora=True, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in unet.named_parameters():
            if "lora_magnitude" in key:  # the trained magnitudes: off the weights' own norms
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in key:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    pipeline_class.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                     unet_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "pytorch_lora_weights.safetensors"

    reference = pipeline_class.from_pretrained(folder, local_files_only=True)
    reference.load_lora_weights(tmp_path)
    reference.fuse_lora(lora_scale=strength)
    reference.unload_lora_weights()  # the fused weights stay
    want = reference.unet.state_dict()

    ours = {"unet": copy.deepcopy(components["unet"])}
    _, summary = load_lora(lora, ours, multiplier=strength)
    assert "DoRA 0;" not in summary and "LoCon 0," not in summary, summary  # the 3x3 conv1 layers are DoRA too
    baked = tmp_path / "baked.safetensors"
    assert merge_cli.main([str(single), "--lora", f"{lora}:{strength}", "-o", str(baked)]) == 0
    assert summary in capsys.readouterr().out
    fused, baked_unet = comparable(ours["unet"]), comparable(load_model(baked).unet)
    base = components["unet"].state_dict()
    assert max((want[k] - base[k]).abs().max() for k in want) > 0.1  # the file changes the weights
    for key, w in want.items():
        assert_close_to_scale(fused[key], w, WEIGHT_TOL)
        assert_close_to_scale(baked_unet[key], w, WEIGHT_TOL)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_simpletuner_lycoris_names(family, tmp_path):
    """SimpleTuner trains LyCORIS through its wrapper on diffusers' UNet: keys `lycoris_<diffusers path>`."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    _, components, _ = family
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"], "target_name": []})
    unet = copy.deepcopy(components["unet"])
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="lokr", factor=4)
    network.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    want = outputs({**components, "unet": unet})[0]
    network.save_weights(str(tmp_path / "st.safetensors"), None, {})
    assert all(key.startswith("lycoris_down_blocks_") or key.startswith(("lycoris_mid_", "lycoris_up_"))
               for key in load_file(str(tmp_path / "st.safetensors")))
    ours = copy.deepcopy(components)
    _, summary = load_lora(tmp_path / "st.safetensors", ours)
    assert "LoKr 0," not in summary
    got, base = outputs(ours)[0], outputs(components)[0]
    assert_close_to_scale(got, want, OUTPUT_TOL)
    assert (want - base).abs().max() > 100 * OUTPUT_TOL * want.abs().max()


def test_dora_strength_semantics():
    """kohya/LyCORIS DoRA at strength s: W + s·(W' − W) (ComfyUI's interpolation), W' with the magnitudes as its
    row norms (input-axis: column norms); peft DoRA: rows of norm m at every s, the direction of W + s·c·B·A."""
    from minigen.lora.formats import LayerDelta

    g = torch.Generator().manual_seed(0)
    w, down, up = torch.randn(8, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)
    lora = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0)}  # c = 0.5
    rows, columns = torch.rand(8, 1, generator=g) + 1, torch.rand(1, 6, generator=g) + 1
    for m, dim in ((rows, 1), (columns, 0)):
        layer = LayerDelta.from_tensors(lora | {"dora_scale": m})
        full = w + layer.delta(w, 1.0)
        torch.testing.assert_close(full.norm(dim=dim, keepdim=True), m)
        torch.testing.assert_close(layer.delta(w, 0.4), 0.4 * layer.delta(w, 1.0))
    magnitude = rows.flatten()
    peft = LayerDelta.from_tensors({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0),
                                    "magnitude": magnitude})
    for s in (1.0, 0.4, 0.0):
        fused = w + peft.delta(w, s)
        torch.testing.assert_close(fused.norm(dim=1), magnitude)
        direction = w + s * 0.5 * up @ down
        torch.testing.assert_close(fused / fused.norm(dim=1, keepdim=True),
                                   direction / direction.norm(dim=1, keepdim=True))


def block_cases() -> dict[str, dict[str, torch.Tensor]]:
    """One layer of each kind for a 3x3 convolution W (8, 6, 3, 3), random values."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    lora = {"lora_down.weight": r(2, 6, 3, 3), "lora_up.weight": r(8, 2, 1, 1), "alpha": torch.tensor(1.0)}
    return {
        "LoCon": lora,
        "LoCon Tucker": {"lora_down.weight": r(2, 6, 1, 1), "lora_mid.weight": r(2, 2, 3, 3),
                         "lora_up.weight": r(8, 2, 1, 1)},
        "LoHa": {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 54), "hada_w2_a": r(8, 3), "hada_w2_b": r(3, 54)},
        "LoHa Tucker": {"hada_t1": r(2, 2, 3, 3), "hada_w1_a": r(2, 8), "hada_w1_b": r(2, 6),
                        "hada_t2": r(2, 2, 3, 3), "hada_w2_a": r(2, 8), "hada_w2_b": r(2, 6)},
        "LoKr": {"lokr_w1": r(2, 3), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 2, 3, 3), "alpha": torch.tensor(3.0)},
        "LoKr Tucker": {"lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 3), "lokr_t2": r(2, 2, 3, 3), "lokr_w2_a": r(2, 4),
                        "lokr_w2_b": r(2, 2)},
        "full": {"diff": r(8, 6, 3, 3), "diff_b": r(8)},
        "GLoRA": {"a1.weight": r(6, 2), "a2.weight": r(2, 6), "b1.weight": r(8, 2), "b2.weight": r(2, 6, 3, 3)},
        "DoRA rows": lora | {"dora_scale": torch.rand(8, 1, 1, 1, generator=g) + 1},
        "DoRA columns": lora | {"dora_scale": torch.rand(1, 6, 1, 1, generator=g) + 1},
        "peft DoRA": lora | {"magnitude": torch.rand(8, generator=g) + 1},
    }


@pytest.mark.parametrize("case", list(block_cases()))
def test_change_of_a_block_of_rows_is_those_rows_of_the_change(case):
    """`LayerDelta.rows` (what fusing a block of rows at a time computes) gives exactly the rows of the whole change,
    for every kind; the kinds whose rows need the whole weight say so (row_step None)."""
    from minigen.lora.formats import LayerDelta

    layer = LayerDelta.from_tensors(block_cases()[case])
    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    whole = layer.delta(w, 0.7)
    if case == "DoRA columns":
        assert layer.row_step is None
        return
    step = layer.row_step
    assert step == (4 if case.startswith("LoKr") else 1)
    blocks = [layer.rows(slice(a, a + step)).delta(w[a:a + step], 0.7) for a in range(0, 8, step)]
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changes_added_in_place_are_each_computed_on_the_original_weight(dtype, monkeypatch):
    """`add_changes` into the weight itself, a few rows at a time, with several changes that depend on W (GLoRA,
    DoRA) or go through the fused forms (LoRA's addmm, LoHa's addcmul): W + the sum of each change computed on the
    original W, in fp32 and rounded once (bf16 weights too)."""
    from minigen.lora.applying import DeltaAdapter
    from minigen.lora.formats import LayerDelta
    from minigen.lora.layers import add_changes

    g = torch.Generator().manual_seed(2)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    lora = {"lora_down.weight": r(2, 6), "lora_up.weight": r(8, 2), "alpha": torch.tensor(1.0)}
    layers = [LayerDelta.from_tensors(t) for t in (
        lora, {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 6), "hada_w2_a": r(8, 3), "hada_w2_b": r(3, 6)},
        {"a1.weight": r(6, 2), "a2.weight": r(2, 6), "b1.weight": r(8, 2), "b2.weight": r(2, 6)},
        lora | {"dora_scale": torch.rand(8, 1, generator=g) + 1}, lora | {"magnitude": torch.rand(8, generator=g) + 1})]
    strengths = (0.7, -0.4, 1.0, 0.5, 0.8)
    w = r(8, 6).to(dtype)
    want = (w.float() + sum(layer.delta(w.float(), s) for layer, s in zip(layers, strengths))).to(dtype)
    monkeypatch.setattr(lora_layers, "BLOCK_VALUES", 12)  # blocks of two rows
    got = add_changes(w, [(DeltaAdapter(layer), s) for layer, s in zip(layers, strengths)], out=w)
    assert got is w
    if dtype == torch.float32:
        torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:  # the same sum, rounded to bf16 once: at most one bf16 step apart
        assert ((w.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()


@pytest.mark.parametrize("kind", ["LoRA", "LoHa"])
def test_factors_stored_in_bf16_give_the_fp32_products(kind, monkeypatch):
    """Factors a file stores in bf16 are multiplied on the CPU's bf16 arithmetic (oneDNN: bf16 inputs, exact
    products, fp32 sums), which for bf16 values is the fp32 product itself: the weight equals the one fused from the
    same values marked as plain fp32, to fp32 rounding (an fp32 result rounded through bf16 would be ~1e-3 off)."""
    from minigen.lora.applying import DeltaAdapter
    from minigen.lora.formats import LayerDelta
    from minigen.lora.layers import add_changes

    g = torch.Generator().manual_seed(3)
    parts = {"LoRA": {"lora_down.weight": (16, 96), "lora_up.weight": (64, 16)},
             "LoHa": {"hada_w1_a": (64, 16), "hada_w1_b": (16, 96), "hada_w2_a": (64, 16), "hada_w2_b": (16, 96)}}[kind]
    stored = {name: torch.randn(*shape, generator=g).bfloat16() for name, shape in parts.items()}
    layer = LayerDelta.from_tensors(stored | {"alpha": torch.tensor(8.0)}).float()
    assert layer.bf16_values
    as_fp32 = LayerDelta(layer.kind, layer.tensors)  # the same values, not known to be bf16: MKL's fp32 products
    w = torch.randn(64, 96, generator=g)
    monkeypatch.setattr(lora_layers, "BLOCK_VALUES", 32 * 96)
    fused, want = (add_changes(w.clone(), [(DeltaAdapter(d), 0.7)], out=torch.empty_like(w)) for d in (layer, as_fp32))
    torch.testing.assert_close(fused, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the switch is put back


def test_fusing_keeps_no_copy_and_for_good_keeps_nothing():
    """Removable, a merged layer keeps its original weight tensor itself aside (no copy of it is made) and gets a new
    one; for good (sample.py), the change goes into the weight in place and the layer stays a plain one."""
    from torch import nn
    from minigen.lora.applying import add_lora_deltas
    from minigen.lora.layers import LoRALayer, remove_lora
    from minigen.lora.formats import LayerDelta

    layer = LayerDelta.from_tensors(block_cases()["LoHa"])
    removable, for_good = nn.Sequential(nn.Conv2d(6, 8, 3)), nn.Sequential(nn.Conv2d(6, 8, 3))
    for_good.load_state_dict(removable.state_dict())
    original = removable[0].weight.data_ptr()
    add_lora_deltas(removable, {"0": layer})
    assert isinstance(removable[0], LoRALayer) and removable[0].original_weight.data_ptr() == original
    assert removable[0].weight.data_ptr() != original
    storage = for_good[0].weight.data_ptr()
    add_lora_deltas(for_good, {"0": layer}, removable=False)
    assert isinstance(for_good[0], nn.Conv2d) and for_good[0].weight.data_ptr() == storage
    torch.testing.assert_close(for_good[0].weight, removable[0].weight, rtol=0, atol=0)
    remove_lora(removable)
    assert isinstance(removable[0], nn.Conv2d) and removable[0].weight.data_ptr() == original


def test_file_layers_fused_unmerged_and_removed():
    """A file's layers fuse into the weights (and a full layer's diff_b into the bias); unmerged they give the same
    outputs through their own forward (1e-5: fp32, another order of sums); removed, the weights are W again, bit for
    bit (the originals were kept aside)."""
    from torch import nn
    from minigen.lora.applying import add_lora_deltas
    from minigen.lora.layers import remove_lora, unmerge_lora
    from minigen.lora.formats import LayerDelta

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"0": LayerDelta.from_tensors({"hada_w1_a": torch.randn(6, 2, generator=g),
                                            "hada_w1_b": torch.randn(2, 36, generator=g),
                                            "hada_w2_a": torch.randn(6, 2, generator=g),
                                            "hada_w2_b": torch.randn(2, 36, generator=g),
                                            "dora_scale": torch.rand(6, 1, 1, 1, generator=g) + 1}),
              "1": LayerDelta.from_tensors({"diff": torch.randn(6, 6, 3, 3, generator=g),
                                            "diff_b": torch.randn(6, generator=g)})}
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        base = model(x)
        add_lora_deltas(model, layers, "file", multiplier=0.7)
        fused = model(x)
        unmerge_lora(model)
        unmerged = model(x)
    assert (fused - base).abs().max() > 0.1
    assert_close_to_scale(unmerged, fused, 1e-5)
    remove_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def png(folder) -> np.ndarray:
    (image,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(image), dtype=np.int16)


@pytest.mark.parametrize("family,fmt", [("sd1", "loha"), ("sdxl", "lokr-tucker"), ("sdxl", "dora")],
                         indirect=["family"])
def test_sample_with_lora_draws_the_baked_models_image(family, fmt, tmp_path):
    _, components, single = family
    lora = tmp_path / "lora.safetensors"
    lycoris_file(components, lora, tmp_path, **FORMATS[fmt][0])
    baked = tmp_path / "baked.safetensors"
    assert merge_cli.main([str(single), "--lora", str(lora), "-o", str(baked)]) == 0
    draw = ["--prompt", "a red cube", "--steps", "2", "--height", "16", "--width", "16", "--seed", "3", "--no-hash",
            "--device", "cpu"]
    assert sample_cli.main(["--model", str(single), "--lora", str(lora), *draw, "--out", str(tmp_path / "a")]) == 0
    assert sample_cli.main(["--model", str(baked), *draw, "--out", str(tmp_path / "b")]) == 0
    assert sample_cli.main(["--model", str(single), *draw, "--out", str(tmp_path / "c")]) == 0
    with_lora, with_baked, without = png(tmp_path / "a"), png(tmp_path / "b"), png(tmp_path / "c")
    assert np.abs(with_lora - with_baked).max() <= 1
    assert np.abs(with_lora - without).max() > 10  # the LoRA changes the picture
