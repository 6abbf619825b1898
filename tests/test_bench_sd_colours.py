"""The colour test (bench/bench_sd_colours.py): its prompts, and its judge is the library's (tests/test_colours.py),
the one the colour captions use."""

from __future__ import annotations

import sys
from pathlib import Path

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
