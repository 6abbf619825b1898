"""Captions for training images: sidecar `.txt` files (kohya), `metadata.jsonl` (Hugging Face imagefolder), or one
fixed instance prompt for every image (DreamBooth), plus a trigger prefix and caption dropout.

    items = captioned_images("data/", prefix="Still from the Anime, ")          # [CaptionedImage(path, caption)]
    items = dreambooth_images("dog/", "a photo of sks dog", class_root="dogs/", class_prompt="a photo of a dog")

Caption and prompt files written on Windows come in odd encodings: UTF-8 with a BOM (Notepad), UTF-16 with or
without a BOM, or the legacy code page (Windows-1252: its curly quotes and dashes). `read_caption` decodes each; an image with no caption gets the fallback caption
and one warning counts them all.
"""

from __future__ import annotations

import codecs
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .images import list_images


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    caption: str
    is_class_image: bool = False  # DreamBooth prior-preservation image: its loss is weighted by prior_loss_weight


def utf16_without_bom(raw: bytes) -> str | None:
    """"utf-16-le" or "-be" when `raw` looks like UTF-16 with no byte-order mark (text made mostly of ASCII leaves a
    zero byte in every other position: after each character for little-endian, before it for big-endian), else None."""
    if len(raw) < 2 or len(raw) % 2:
        return None
    half = len(raw) // 2
    zeros_odd, zeros_even = raw[1::2].count(0), raw[0::2].count(0)
    if zeros_odd >= half / 2 and zeros_even == 0:
        return "utf-16-le"
    if zeros_even >= half / 2 and zeros_odd == 0:
        return "utf-16-be"
    return None


def read_text(path: str | os.PathLike) -> str:
    """A text file written anywhere (a caption, a prompt file, metadata.jsonl). UTF-16 (with a byte-order mark, or
    without one when its zero bytes show it) and UTF-8 with or without a BOM; other bytes that are not UTF-8 are read
    as Windows-1252 (Notepad's "ANSI" in the West), or latin-1 where a byte is not Windows-1252 (every byte is a latin-1
    character, so this never fails), with a warning naming the file. Other zero bytes: not text, a ValueError."""
    raw = Path(path).read_bytes()
    utf16 = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else utf16_without_bom(raw)
    if utf16:
        try:
            return raw.decode(utf16).removeprefix("\ufeff")  # with a BOM, the BOM says which byte order
        except UnicodeDecodeError as e:  # an odd number of bytes, a lone surrogate
            raise ValueError(f"{path}: broken UTF-16 text ({e.reason} at byte {e.start})") from None
    if 0 in raw:
        raise ValueError(f"{path}: not a text file (it holds zero bytes, and is not UTF-16)")
    try:
        return raw.decode("utf-8-sig")  # plain UTF-8, with or without Notepad's BOM
    except UnicodeDecodeError:
        pass
    try:
        text, encoding = raw.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are not Windows-1252
        text, encoding = raw.decode("latin-1"), "latin-1"
    warnings.warn(f"{path} is not UTF-8; read as {encoding}", stacklevel=3)
    return text


def read_caption(path: str | os.PathLike) -> str:
    """A caption file's text (see read_text), stripped."""
    return " ".join(read_text(path).split())  # newlines and runs of spaces -> one space, as one prompt


def read_metadata_jsonl(root: Path) -> dict[str, str]:
    """{file name relative to root: caption} from Hugging Face imagefolder's `metadata.jsonl` (`file_name` plus a
    `text` or `caption` column); a malformed line is an error naming its number."""
    captions = {}
    path = root / "metadata.jsonl"
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name = record["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {number}: expected a JSON object with 'file_name' ({e})") from None
        text = record.get("text", record.get("caption"))
        if isinstance(text, str):
            captions[name] = text.strip()
    return captions


def captioned_images(root: str | os.PathLike, prefix: str = "", fallback: str = "",
                     caption_extension: str = ".txt",
                     caption_of_name: Callable[[str], str] | None = None) -> list[CaptionedImage]:
    """Every image below `root` with its caption: `metadata.jsonl` first, then a sidecar file of the same stem, then
    `caption_of_name(file stem)` when given (a built-in dataset whose names say what each image is: Twemoji).
    `prefix` (a trigger word or seed 001's "Still from the Anime, ") goes in front of every caption. Images without
    a caption get `fallback` (empty by default: unconditional), with one warning giving the count."""
    root = Path(root)
    jsonl = read_metadata_jsonl(root) if (root / "metadata.jsonl").is_file() else {}
    items, missing = [], []
    for path in list_images(root):
        caption = jsonl.get(path.relative_to(root).as_posix())
        sidecar = path.with_suffix(caption_extension)
        if caption is None and sidecar.is_file():
            caption = read_caption(sidecar)
        if caption is None and caption_of_name is not None:
            caption = caption_of_name(path.stem)
        if not caption:
            missing.append(path.name)
            caption = fallback
        items.append(CaptionedImage(path, prefix + caption))
    if missing:
        warnings.warn(f"{len(missing)} of {len(items)} images in {root} have no caption (e.g. {missing[:3]}); "
                      f"they train with the fallback caption {prefix + fallback!r}", stacklevel=2)
    return items


def dreambooth_images(root: str | os.PathLike, instance_prompt: str, class_root: str | os.PathLike | None = None,
                      class_prompt: str = "") -> list[CaptionedImage]:
    """DreamBooth (Ruiz et al. 2022): every instance image gets `instance_prompt`; optional class images (the
    prior-preservation set) get `class_prompt` and are marked so their loss takes prior_loss_weight."""
    if not instance_prompt:
        raise ValueError("DreamBooth needs an instance prompt (e.g. 'a photo of sks dog')")
    items = [CaptionedImage(p, instance_prompt) for p in list_images(root)]
    if class_root is not None:
        if not class_prompt:
            raise ValueError("class images need a class prompt (e.g. 'a photo of a dog')")
        items += [CaptionedImage(p, class_prompt, is_class_image=True) for p in list_images(class_root)]
    return items


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with `probability` (caption dropout: the model also learns the unconditional
    prediction that classifier-free guidance needs)."""
    if probability <= 0:
        return captions
    drop = torch.rand(len(captions), generator=generator) < probability
    return ["" if d else c for c, d in zip(captions, drop.tolist())]
