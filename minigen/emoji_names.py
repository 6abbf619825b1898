"""A caption for each emoji from its file name (Twemoji names each PNG by its code points: `1f004.png`,
`1f1ef-1f1f5.png`, `1f469-1f3fd-200d-1f4bb.png`), made from the Unicode character names that Python's own
`unicodedata` holds, written the way CLDR's short names are (lower case, skin tones last):

    emoji_caption("2764")                   -> "red heart"
    emoji_caption("1f1ef-1f1f5")            -> "flag: JP"
    emoji_caption("1f469-1f3fd-200d-1f4bb") -> "woman personal computer: medium skin tone"
    emoji_caption("31-20e3")                -> "keycap: 1"

CLDR's own names (e.g. "woman technologist", "flag: Japan") need a table the standard library does not ship;
the Unicode names are close enough to teach a small model which picture goes with which words, and the few whose
Unicode name says something else than the picture shows (U+2764 HEAVY BLACK HEART is drawn red) are renamed.
"""

from __future__ import annotations

import unicodedata

ZWJ, KEYCAP, VARIATION_SELECTORS = 0x200D, 0x20E3, (0xFE0E, 0xFE0F)
SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
REGIONAL_INDICATOR_A, TAG_A, TAG_CANCEL, BLACK_FLAG = 0x1F1E6, 0xE0061, 0xE007F, 0x1F3F4
GENDER_SIGNS = {0x2640: "woman", 0x2642: "man"}  # "runner + female sign" is CLDR's "woman running"
SUBDIVISIONS = {"gbeng": "England", "gbsct": "Scotland", "gbwls": "Wales"}  # every subdivision flag Twemoji draws

# Unicode names that describe another picture than the emoji's (CLDR's short name instead); the colour prompts
# of the demo's test (hearts, circles, squares) depend on these.
RENAMED = {
    0x2764: "red heart", 0x1F5A4: "black heart", 0x26AB: "black circle", 0x26AA: "white circle",
    0x2B1B: "black square", 0x2B1C: "white square", 0x1F600: "grinning face", 0x1F642: "slightly smiling face",
}
DROPPED_PREFIXES = ("large ", "emoji component ", "emoji modifier ")  # "large red circle" -> "red circle"


def char_name(cp: int) -> str:
    """One code point's name, lower case, CLDR-like ("large blue circle" -> "blue circle")."""
    if cp in RENAMED:
        return RENAMED[cp]
    name = unicodedata.name(chr(cp), f"u+{cp:04x}").lower()
    for prefix in DROPPED_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def parse_code_points(stem: str) -> list[int]:
    """"1f469-1f3fd" -> [0x1F469, 0x1F3FD]; ValueError naming the stem when it is not hex code points."""
    try:
        return [int(part, 16) for part in stem.lower().split("-")]
    except ValueError:
        raise ValueError(f"{stem!r} is not an emoji file name (hex code points joined by '-')") from None


def emoji_caption(stem: str) -> str:
    """The caption of one emoji from its code points (see the module docstring)."""
    cps = [cp for cp in parse_code_points(stem) if cp not in VARIATION_SELECTORS]
    if len(cps) == 2 and all(REGIONAL_INDICATOR_A <= cp < REGIONAL_INDICATOR_A + 26 for cp in cps):
        return "flag: " + "".join(chr(ord("A") + cp - REGIONAL_INDICATOR_A) for cp in cps)
    if cps[0] == BLACK_FLAG and len(cps) > 2 and cps[-1] == TAG_CANCEL:  # a subdivision flag: tag letters
        code = "".join(chr(ord("a") + cp - TAG_A) for cp in cps[1:-1])
        return "flag: " + SUBDIVISIONS.get(code, code.upper())
    if len(cps) == 2 and cps[1] == KEYCAP:
        return "keycap: " + chr(cps[0])
    tones = [SKIN_TONES[cp] for cp in cps if cp in SKIN_TONES]
    words, gender = [], ""
    for cp in cps:
        if cp in SKIN_TONES or cp == ZWJ:
            continue
        if cp in GENDER_SIGNS and words:  # a sign after a person: "woman runner", not "runner female sign"
            gender = GENDER_SIGNS[cp]
            continue
        words.append(char_name(cp))
    if gender and not words[0].startswith(gender + " "):  # "man in tuxedo" + male sign stays as it is
        words.insert(0, gender)
    caption = " ".join(words)
    unique_tones = list(dict.fromkeys(tones))  # a couple of one tone says it once
    return caption + (": " + ", ".join(unique_tones) if unique_tones else "")
