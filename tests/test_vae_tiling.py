"""VAE slicing and tiling (minigen/sd/vae.py, minigen/sd/tiles.py) on a tiny random VAE: slicing gives the batch's
images, tiling gives what diffusers' AutoencoderKL gives with enable_tiling() on the same weights."""

from __future__ import annotations

import contextlib

import diffusers
import pytest
import torch

from close import assert_close_to_scale
from minigen.sd import get_config
from minigen.sd.tiles import tiled
from minigen.sd.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vaes():
    """minigen's tiny VAE and diffusers' with the same random weights (sample_size 32: tiles of 32 pixels, 16
    latents)."""
    config = get_config("tiny", "vae")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@contextlib.contextmanager
def vae_switches(vae: AutoencoderKL, slicing: bool = False, tiling: bool = False):
    vae.slicing, vae.tiling = slicing, tiling
    try:
        yield vae
    finally:
        vae.slicing = vae.tiling = False


@torch.no_grad()
def test_vae_slicing_decodes_and_encodes_as_the_whole_batch(tiny_vaes):
    vae, _ = tiny_vaes
    latents = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole, whole_moments = vae.decode(latents), vae.encode(images).mean
    with vae_switches(vae, slicing=True):
        # not bitwise: oneDNN convolutions block a batch of 3 otherwise than one image (1.4e-6 of the scale here)
        assert_close_to_scale(vae.decode(latents), whole, 1e-5)
        assert_close_to_scale(vae.encode(images).mean, whole_moments, 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("h, w", [(40, 20), (16, 34), (29, 29)])  # latents: 2x1, 1x3 and 3x3 tiles, cut last tiles
def test_vae_tiled_decode_is_diffusers_enable_tiling(tiny_vaes, h, w):
    vae, ref = tiny_vaes
    latents = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(3))
    ref.enable_tiling()
    try:
        want = ref.decode(latents).sample
    finally:
        ref.disable_tiling()
    with vae_switches(vae, tiling=True):
        got = vae.decode(latents)
    assert_close_to_scale(got, want, 1e-5)  # fp32, same weights, as the untiled VAE test
    assert (got - vae.decode(latents)).abs().max() > 1e-3  # tiling did happen: the seams differ from untiled


@torch.no_grad()
def test_vae_tiled_encode_is_diffusers_enable_tiling(tiny_vaes):
    vae, ref = tiny_vaes
    images = torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref.enable_tiling()
    try:
        want = ref.encode(images).latent_dist
    finally:
        ref.disable_tiling()
    with vae_switches(vae, tiling=True, slicing=True):
        got = vae.encode(images)
    assert_close_to_scale(got.mean, want.mean, 1e-5)
    assert_close_to_scale(got.logvar, want.logvar, 1e-5)


def test_tiles_of_a_pointwise_coder_blend_back_to_the_image():
    """A coder that sees one pixel at a time gives the same pixel in every tile, so blending changes nothing."""
    x = torch.randn(1, 2, 50, 37)
    assert torch.allclose(tiled(lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3) * 3, x, 16, 32),
                          x.repeat_interleave(2, 2).repeat_interleave(2, 3) * 3, atol=1e-6)
