"""The colour test (bench/bench_sd_colours.py): its prompts, its judge is the library's (tests/test_colours.py), the
one the colour captions use, and the VAE round trip it reports."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from minigen import colours

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_sd_colours  # noqa: E402


def test_the_judge_is_the_captions_judge():
    assert bench_sd_colours.dominant_colour is colours.dominant_colour
    assert bench_sd_colours.PALETTE is colours.PALETTE


def test_every_colour_and_shape_once():
    cases = bench_sd_colours.prompts()
    assert len(cases) == 24 and len({c[0] for c in cases}) == 24
    assert ("red heart", "red", "2764") in cases and ("black square", "black", "2b1b") in cases


class IdentityVAE(torch.nn.Module):
    """Gives back what it is given: the round trip's plumbing (scaling, layout, rounding) alone is tested."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(mean=x)

    def decode(self, z):
        return z


def test_vae_round_trip_judges_what_the_vae_gives_back():
    reals = [Image.new("RGB", (72, 72), rgb) for rgb in colours.PALETTE.values()]
    pipe = SimpleNamespace(model=SimpleNamespace(vae=IdentityVAE()))
    assert bench_sd_colours.vae_round_trip(pipe, reals, (32, 32)) == list(colours.PALETTE)
