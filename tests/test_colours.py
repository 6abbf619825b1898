"""The colour judge shared by `train_sd.py --colour-captions` and the colour test (minigen/colours.py): the dominant
non-background colour of an image, and the caption that says it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from minigen.colours import PALETTE, colour_caption, dominant_colour

LIGHT_SKIN = (247, 222, 206)  # Twemoji's light skin tone: nearest to purple, but far from every palette colour


def drawing(fill, outline=None, size=32) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((4, 4, size - 4, size - 4), fill=fill, outline=outline, width=2)
    return img


def test_each_palette_colour_is_found_on_white():
    for name, rgb in PALETTE.items():
        image = np.asarray(drawing(rgb, outline=(0, 0, 0)))
        assert dominant_colour(image) == name  # a thin outline is outvoted
        assert dominant_colour(image, radius=40) == name


def test_a_blank_image_has_no_colour():
    assert dominant_colour(np.full((32, 32, 3), 250, np.uint8)) is None


def test_strict_mode_leaves_colours_far_from_the_palette_out():
    face = np.asarray(drawing(LIGHT_SKIN))
    assert dominant_colour(face) == "purple"  # the test's judge must call every sample something
    assert dominant_colour(face, radius=40) is None  # a caption must not call a face purple


def test_colour_caption():
    assert colour_caption("apple", drawing(PALETTE["green"])) == "green apple"
    assert colour_caption("blue book", drawing(PALETTE["red"])) == "blue book"  # the name already says a colour
    assert colour_caption("white heart", drawing(PALETTE["black"])) == "white heart"
    assert colour_caption("mahjong tile red dragon", drawing(PALETTE["green"])) == "mahjong tile red dragon"
    assert colour_caption("redwood", drawing(PALETTE["blue"])) == "blue redwood"  # words, not letters
    assert colour_caption("face", drawing(LIGHT_SKIN)) == "face"  # no clear colour: the name as it is
    assert colour_caption("", drawing(PALETTE["red"])) == ""  # unconditional stays unconditional
    assert colour_caption("apple", None) == "apple"  # an unreadable image
