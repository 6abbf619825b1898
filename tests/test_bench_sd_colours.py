"""The colour test's judge (bench/bench_sd_colours.py): the dominant non-background colour of an image."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_sd_colours  # noqa: E402


def drawing(fill, outline=None) -> np.ndarray:
    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).ellipse((4, 4, 28, 28), fill=fill, outline=outline, width=2)
    return np.asarray(img)


def test_each_palette_colour_is_found_on_white():
    for name, rgb in bench_sd_colours.PALETTE.items():
        assert bench_sd_colours.dominant_colour(drawing(rgb, outline=(0, 0, 0))) == name  # a thin outline is outvoted


def test_a_blank_image_has_no_colour():
    assert bench_sd_colours.dominant_colour(np.full((32, 32, 3), 250, np.uint8)) is None


def test_every_colour_and_shape_once():
    cases = bench_sd_colours.prompts()
    assert len(cases) == 24 and len({c[0] for c in cases}) == 24
    assert ("red heart", "red", "2764") in cases and ("black square", "black", "2b1b") in cases
