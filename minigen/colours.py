"""The colour of an emoji, measured from its pixels: one judge shared by the from-scratch demo's captions
(`train_sd.py --colour-captions`: each caption says its image's colour) and by its prompt-following test
(`bench/bench_sd_colours.py`: does "red heart" draw a red heart?).

The judge: every pixel that is not background (near white: Twemoji is composited on white) goes to the nearest of
the eight colours of Twemoji's own palette (RGB distance); the colour with most pixels is the dominant one. The
captions use it in a strict mode (only pixels close to a palette colour vote, and the winner must cover a quarter
of the picture), so that about half the emoji get a colour word and the rest keep their names as they are.

This is what caption enrichment does for real text-to-image training (a captioner writes what each picture shows),
with a captioner of one skill: the test's colour words are taught by some 2,000 captions, not only by the 26 emoji
whose names say a colour. Because the captions and the test share the palette, the test measures whether the model
follows the colour words it was taught, not whether it agrees with an independent judge.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

# Twemoji's palette (the fills of its hearts, circles and squares).
PALETTE = {"red": (221, 46, 68), "orange": (244, 144, 12), "yellow": (253, 203, 88), "green": (120, 177, 89),
           "blue": (85, 172, 238), "purple": (170, 142, 214), "brown": (193, 105, 79), "black": (49, 55, 61)}
BACKGROUND = 40  # a pixel within this of white on every channel is background
CAPTION_RADIUS, CLEAR_SHARE = 40, 0.25  # the captions' colour: a clear palette colour over a quarter of the picture
# A caption that already says one of these keeps its words ("blue book", "white heart", "mahjong tile red dragon").
COLOUR_WORD = re.compile(r"\b(" + "|".join([*PALETTE, "white"]) + r")\b")


def dominant_colour(image: np.ndarray, radius: float | None = None) -> str | None:
    """image (H, W, 3) uint8 -> the palette colour most of its non-background pixels are nearest to (None: blank).
    With `radius` (the captions' strict mode), only pixels within that RGB distance of a palette colour vote, and the
    winner must hold CLEAR_SHARE of the non-background pixels, else None: a light skin tone, nearest to purple but
    far from it, or Twemoji's greys do not make a "purple" caption."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    pixels = pixels[(255 - pixels).max(axis=1) > BACKGROUND]  # (n, 3)
    if not len(pixels):
        return None
    palette = np.array(list(PALETTE.values()), np.float32)  # (8, 3)
    distances = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1)  # (n, 8) squared
    nearest = distances.argmin(1)  # (n,)
    if radius is not None:
        nearest = nearest[distances.min(1) <= radius ** 2]
    votes = np.bincount(nearest, minlength=len(PALETTE))  # (8,)
    if radius is not None and votes.max() < CLEAR_SHARE * len(pixels):
        return None
    return list(PALETTE)[votes.argmax()]


def colour_caption(caption: str, image: Image.Image | None) -> str:
    """The caption with its image's dominant colour in front, the way the test's prompts say it
    ("grinning face" -> "yellow grinning face"); unchanged when it already names a colour, is empty (an image meant
    to train unconditionally), or the image has no clear palette colour or is unreadable (None)."""
    if not caption or image is None or COLOUR_WORD.search(caption):
        return caption
    colour = dominant_colour(np.asarray(image.convert("RGB")), radius=CAPTION_RADIUS)
    return f"{colour} {caption}" if colour else caption
