"""Copy one group of the Twemoji set into a folder, each PNG with its caption beside it (a .txt, as train_lora.py and
eval.py read captions): the group is every emoji whose caption (minigen/emoji_names.py) contains WORD.

    python scripts/emoji_group.py "flag:" runs/sd-demo-lora/flags       # the 262 flags
    python scripts/emoji_group.py "clock face" runs/sd-demo-lora/clocks
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from minigen.captions import captioned_images
from minigen.datasets import CAPTIONS_FROM_NAMES, resolve_dataset


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    word, out = sys.argv[1], Path(sys.argv[2])
    items = [i for i in captioned_images(resolve_dataset("twemoji"), caption_of_name=CAPTIONS_FROM_NAMES["twemoji"])
             if word in i.caption]
    if not items:
        print(f"emoji_group.py: error: no emoji caption contains {word!r}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        shutil.copyfile(item.path, out / item.path.name)
        (out / item.path.name).with_suffix(".txt").write_text(item.caption + "\n")
    print(f"{len(items)} emoji with {word!r} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
