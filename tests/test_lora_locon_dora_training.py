"""LoCon and DoRA training (issue 23): `--conv-rank/--conv-alpha` (sd-scripts' conv_dim/conv_alpha) adds adapters to
the 3x3 convolutions of the resnets and samplers, `--dora` makes every adapter DoRA (as peft's use_dora), and the
files load with the same deltas in the other programs.

A few steps (LoCon, and LoCon with DoRA) on the tiny SD 1.5 model (whose diffusers folder tests/test_sd_pipeline.py builds, so diffusers holds the
same weights); then the kohya file is loaded by LyCORIS' own loader (what A1111's and ComfyUI's LoCon support reads)
and the diffusers/peft file by diffusers' `load_lora_weights`, each on diffusers' modules, and their UNet predictions
are compared with the trained model's (unmerged: its own training forward). Tolerance: 1e-5 of the output's scale
(fp32; minigen's and diffusers' UNets agree to ~1e-6, the adapters' sums differ in order only); the LoRA moves the
output by more than 100 times that.
"""

import copy

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from close import assert_close_to_scale
from test_lora_formats import PRESET
from test_sd_lora import write_data
from test_sd_pipeline import reference_folder

from minigen.finetune.config import LoRATrainConfig
from minigen.finetune.trainer import LoRATrainer
from minigen.sd.lora_files import save_lora
from minigen.sd.lora_reading import load_lora, read_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["locon", "locon-dora"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("locon")
    cfg = LoRATrainConfig(model=str(reference_folder("tiny-sd1")), data=str(write_data(root / "data")),
                          resolution="16x16", bucket_step=16, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                          dora=request.param, lr=0.05, batch=2, epochs=1, out=str(root / "run"))
    trainer = LoRATrainer(cfg, progress=False)
    trainer.train()
    return trainer, root


def unet_output(unet, diffusers_unet: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    context = torch.randn(1, 7, dict(unet.config)["cross_attention_dim"], generator=g)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=context)
    return out.sample if diffusers_unet else out


def test_conv_rank_trains_the_3x3_convolutions(trained):
    trainer, root = trained
    parsed, _, metadata = read_lora(root / "run" / "lora.safetensors")
    convs = {name: layer for name, layer in parsed["unet"].items() if layer.summary_kind == "LoCon"}
    # sd-scripts' names for SD 1.x: diffusers paths; every resnet's conv1 and conv2 and every sampler's conv
    unet = trainer.model.unet
    want = {path.removesuffix(".base").replace(".", "_") for path, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and ".adapters." not in path
            and ("resnets" in path or "samplers" in path)}
    assert set(convs) == want
    layer = convs["down_blocks_0_resnets_0_conv1"]
    assert layer.tensors["lora_down.weight"].shape[:2] == (2, unet.down_blocks[0].resnets[0].conv1.base.in_channels)
    assert float(layer.tensors["alpha"]) == 1.0 and layer.scale == 0.5  # conv_alpha / conv_rank
    dora = trainer.cfg.dora
    assert all(layer.dora == dora for layers in parsed.values() for layer in layers.values())
    assert metadata["ss_network_args"] == ('{"conv_dim": "2", "conv_alpha": "1.0"' + (', "dora_wd": "True"}' if dora
                                                                                      else "}"))
    if dora:  # LyCORIS' layout: the output axis, (out, 1, 1, 1) on a convolution
        assert layer.tensors["dora_scale"].shape == (unet.down_blocks[0].resnets[0].conv1.base.out_channels, 1, 1, 1)


def test_locon_files_load_the_same_in_lycoris_and_diffusers(trained, tmp_path):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.utils.preset import read_preset

    trainer, root = trained
    want = unet_output(trainer.model.unet.eval(), diffusers_unet=False)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(reference_folder("tiny-sd1"), local_files_only=True)
    base = unet_output(reference.unet, diffusers_unet=True)
    assert (want - base).abs().max() > 100 * TOL * want.abs().max()  # the LoRA (and its convolutions) changed it

    # the kohya file in LyCORIS (A1111's and ComfyUI's reading of LoCon), with test_lora_formats' preset (LyCORIS'
    # default one lists the time embedding twice on a diffusers UNet)
    (tmp_path / "preset.toml").write_text(PRESET)
    LycorisNetworkKohya.apply_preset(read_preset(tmp_path / "preset.toml"))
    unet, encoder = copy.deepcopy(reference.unet), copy.deepcopy(reference.text_encoder)
    network, weights = create_network_from_weights(1.0, str(root / "run" / "lora.safetensors"), None, encoder, unet)
    network.apply_to(encoder, unet, True, True)
    network.load_state_dict(weights)
    assert_close_to_scale(unet_output(unet, diffusers_unet=True), want, TOL)
    if trainer.cfg.dora:  # the magnitudes matter: without them the file gives another output
        tensors = {k: v for k, v in load_file(root / "run" / "lora.safetensors").items() if "dora_scale" not in k}
        save_file(tensors, tmp_path / "no_magnitudes.safetensors")
        plain = {"unet": copy.deepcopy(reference.unet), "te1": copy.deepcopy(reference.text_encoder)}
        load_lora(tmp_path / "no_magnitudes.safetensors", plain)
        assert (unet_output(plain["unet"], diffusers_unet=True) - want).abs().max() > 100 * TOL * want.abs().max()

    # the diffusers/peft file in diffusers
    with pytest.warns(UserWarning, match="diffusers/peft-layout"):
        save_lora(tmp_path / "pytorch_lora_weights.safetensors", trainer.lora_file_contents(), "diffusers",
                  family="sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(reference_folder("tiny-sd1"), local_files_only=True)
    pipe.load_lora_weights(tmp_path)
    assert_close_to_scale(unet_output(pipe.unet, diffusers_unet=True), want, TOL)
