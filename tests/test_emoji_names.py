"""Captions from emoji file names (minigen/emoji_names.py): the tricky kinds of Twemoji names, each by example."""

import pytest

from minigen.emoji_names import emoji_caption


@pytest.mark.parametrize("stem, caption", [
    ("1f004", "mahjong tile red dragon"),                     # one code point: its Unicode name, lower case
    ("2764", "red heart"),                                    # HEAVY BLACK HEART is drawn red: renamed as CLDR does
    ("1f5a4", "black heart"),
    ("1f534", "red circle"),                                  # LARGE RED CIRCLE: "large" dropped, as CLDR
    ("2b1b", "black square"),
    ("a9", "copyright sign"),
    ("1f1ef-1f1f5", "flag: JP"),                              # regional-indicator pair: the ISO code
    ("1f3f4-e0067-e0062-e0073-e0063-e0074-e007f", "flag: Scotland"),  # black flag + tag letters gbsct + cancel tag
    ("23-20e3", "keycap: #"),                                 # a character + COMBINING ENCLOSING KEYCAP
    ("31-20e3", "keycap: 1"),
    ("1f44d-1f3fd", "thumbs up sign: medium skin tone"),      # a skin-tone modifier goes last, CLDR's way
    ("1f469-1f3fd-200d-1f4bb", "woman personal computer: medium skin tone"),  # ZWJ sequence: names joined
    ("1f3c3-200d-2640-fe0f", "woman runner"),                 # a gender sign after a person says who
    ("1f935-200d-2642-fe0f", "man in tuxedo"),                # ... and is not said twice
    ("1f468-200d-1f469-200d-1f467", "man woman girl"),        # a family
    ("1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fb", "adult handshake adult: light skin tone"),  # one tone, said once
    ("1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff", "adult handshake adult: light skin tone, dark skin tone"),
    ("2764-fe0f-200d-1f525", "red heart fire"),               # variation selectors dropped
    ("1f9b0", "red hair"),                                    # EMOJI COMPONENT RED HAIR
    ("f0000", "u+f0000"),                                     # no name (newer than this Python's Unicode): the code point
])
def test_caption(stem, caption):
    assert emoji_caption(stem) == caption


def test_not_an_emoji_name():
    with pytest.raises(ValueError, match="'cat' is not an emoji file name"):
        emoji_caption("cat")


def test_dataset_captions_from_names(tmp_path):
    """--data twemoji trains on these captions; a sidecar caption still wins."""
    from PIL import Image

    from minigen.captions import captioned_images
    from minigen.datasets import CAPTIONS_FROM_NAMES

    for stem in ("2764", "1f1ef-1f1f5"):
        Image.new("RGB", (8, 8), "white").save(tmp_path / f"{stem}.png")
    (tmp_path / "2764.txt").write_text("a heart")
    items = captioned_images(tmp_path, prefix="emoji, ", caption_of_name=CAPTIONS_FROM_NAMES["twemoji"])
    assert {i.path.name: i.caption for i in items} == {"2764.png": "emoji, a heart", "1f1ef-1f1f5.png": "emoji, flag: JP"}


def test_eval_prompts_from_twemoji_are_the_names(tmp_path, monkeypatch):
    """eval.py --prompts twemoji: the names, as training reads them (a stand-in twemoji folder: no download)."""
    from PIL import Image

    from minigen.evaluate.inputs import read_prompts

    folder = tmp_path / "twemoji"
    folder.mkdir()
    for stem in ("2764", "1f1ef-1f1f5"):
        Image.new("RGB", (8, 8), "white").save(folder / f"{stem}.png")
    (folder / "CREDITS.txt").write_text("stand-in")  # a finished build, as datasets.resolve_dataset checks
    monkeypatch.setenv("MINIGEN_CACHE", str(tmp_path))
    assert read_prompts("twemoji") == ["flag: JP", "red heart"]
