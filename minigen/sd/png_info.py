"""How an image was made, written into its PNG and read back: A1111's `parameters` text and minigen's exact settings.

Each PNG `sample.py` writes carries two text chunks:

- `parameters`: A1111's infotext, the text A1111 writes and its "PNG Info" tab, civitai and most image browsers read:

      a cat <lora:style:0.8>
      Negative prompt: blurry
      Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 123, Size: 1024x1024, Model hash: \
      31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "style: 0123456789ab", Version: minigen 0.1.0

  (one line of settings; wrapped here). A value holding ',', ':' or a newline is written as a JSON string.
- `minigen`: JSON `{"format": 1, "settings": {...}, "index": i}`: every sample.py flag that changes the pixels, named
  as the flag (`"steps": 30`, `"lora": ["/abs/style.safetensors:0.8"]`), and the image's position in its batch.
  `sample.py --from-png` redraws from it; from the `parameters` text alone when only that is there.

The settings dict (`sample.py`'s flags by name) is what both chunks are made from and what reading gives back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .. import __version__
from .checkpoint_files import sha256_file
from ..diffusion.names import a1111_names, resolve_sampler

JSON_KEY = "minigen"  # the PNG text chunk holding the exact settings
TEXT_KEY = "parameters"  # A1111's
FORMAT = 1  # of the JSON chunk; bumped if its meaning changes

# A1111's parse_generation_parameters: `Key: value` pairs, a value either a JSON string or text up to the next comma.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^:>]*))?[^>]*>")  # A1111's prompt syntax <lora:name:multiplier>


# ------------------------------------------------------------------------------------------------------------ hashes
def model_hash(path: str | os.PathLike) -> str:
    """A1111's "Model hash" (and "VAE hash"): the first 10 hex digits of the whole file's SHA-256."""
    return sha256_file(path)[:10]


def lora_hash(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """A1111's LoRA "shorthash", its "Lora hashes" value: the first 12 hex digits of a SHA-256. For a .safetensors file
    it is kohya's "addnet hash" (sd-scripts' model hash): the SHA-256 of the tensor bytes only, from after the 8-byte
    header length and the JSON header to the end, so that editing the metadata keeps the hash. For any other file
    A1111 hashes the whole file, and so does this."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256_file(path)[:12]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()[:12]


def file_hashes(settings: dict, report=print) -> dict:
    """{"model", "vae", "lora": [...]}: the hashes A1111 shows for the settings' files, each computed once; a diffusers
    folder or a random model has none (A1111 hashes single files only). `report` is told before each file, as hashing
    a 7 GB checkpoint takes a while."""
    def hashed(path, fn):
        if path is None or not Path(path).is_file():
            return None
        report(f"hashing {path} ({Path(path).stat().st_size / 1e9:.2f} GB) for the PNG's settings (--no-hash skips it)")
        return fn(path)

    return {"model": hashed(settings["model"], model_hash), "vae": hashed(settings.get("vae"), model_hash),
            "lora": [hashed(spec.rpartition(":")[0], lora_hash) for spec in settings.get("lora", [])]}


# ------------------------------------------------------------------------------------------------------- A1111 text
def quote(value) -> str:
    """A1111's infotext quoting: a value with ',', ':' or a newline becomes a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def number(x: float) -> str:
    """5.0 -> "5", 0.75 -> "0.75": numbers as A1111's infotexts show them."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def a1111_name(path: str) -> str:
    """A model or LoRA's name as A1111 shows it: the weight file's stem, or a folder's whole name ("sdxl-1.0"),
    without ',' and ':'."""
    path = Path(path)
    name = path.stem if path.suffix.lower() in WEIGHT_SUFFIXES else path.name
    return name.replace(",", "").replace(":", "")


def lora_split(spec: str) -> tuple[str, float]:
    path, _, multiplier = spec.rpartition(":")
    return path, float(multiplier)


def infotext(settings: dict, index: int, hashes: dict | None = None) -> str:
    """A1111's infotext for image `index` of the batch: the prompt (LoRAs as A1111's `<lora:name:multiplier>` tags),
    `Negative prompt: ...` when there is one, and one line of `Key: value` pairs in A1111's order."""
    hashes = hashes or {}
    loras = [lora_split(spec) for spec in settings.get("lora", [])]
    prompt = settings["prompt"] + "".join(f" <lora:{a1111_name(p)}:{number(m)}>" for p, m in loras)
    sampler, schedule = a1111_names(settings["sampler"], settings["karras"])
    lora_hashes = [f"{a1111_name(p)}: {h}" for (p, _), h in zip(loras, hashes.get("lora", [])) if h]
    init = settings.get("init_image") is not None
    h, w = settings["height"], settings["width"]
    params = {
        "Steps": settings["steps"], "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": number(settings["cfg"]), "Seed": settings["seed"], "Size": f"{w}x{h}",
        "Model hash": hashes.get("model"), "Model": a1111_name(settings["model"]),
        # Patch: A1111 gives each image of a batch its own seed and no longer writes these; minigen draws a batch from
        # one generator as diffusers does, so an image is found by its position (A1111's older keys say it).
        "Batch size": settings["num"] if settings["num"] > 1 else None,
        "Batch pos": index if settings["num"] > 1 else None,
        "VAE hash": hashes.get("vae"), "VAE": Path(settings["vae"]).name if settings.get("vae") else None,
        "Denoising strength": number(settings["strength"]) if init else None,
        "Lora hashes": ", ".join(lora_hashes) or None,
        "Eta DDIM": number(settings["eta"]) if settings.get("eta") else None,
        # Patch: A1111 has no keys for these; named after diffusers' arguments, sizes as A1111's WxH.
        "Guidance rescale": number(settings["rescale"]) if settings.get("rescale") else None,
        "Original size": "x".join(map(str, settings["original_size"][::-1])) if settings.get("original_size") else None,
        "Crop top left": "x".join(map(str, settings["crop_top_left"])) if settings.get("crop_top_left") else None,
        "Target size": "x".join(map(str, settings["target_size"][::-1])) if settings.get("target_size") else None,
        "Aesthetic score": number(settings["aesthetic_score"]) if settings.get("aesthetic_score") is not None else None,
        "Negative aesthetic score": number(settings["negative_aesthetic_score"])
        if settings.get("negative_aesthetic_score") is not None else None,
        "Version": f"minigen {__version__}",
    }
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {settings['negative']}" if settings.get("negative") else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters, the part that reads: {"Prompt", "Negative prompt", key: value, ...}; a
    `WxH` value also gives `key-1` (W) and `key-2` (H)."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # no settings line: all of it is prompt
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        value = unquote(value)
        if size := SIZE.match(value):
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        result[key] = value
    return result


def settings_from_infotext(text: str) -> tuple[dict, int | None, dict[str, str]]:
    """(settings, batch position, unlocated) from A1111's text. A1111 names the model, VAE, LoRAs by name only and
    does not keep the init image: `unlocated` maps each flag that must then be given to what the text names."""
    params = parse_infotext(text)
    if "Steps" not in params or "Seed" not in params:
        raise ValueError("no Steps or Seed in its A1111 parameters")
    loras = LORA_TAG.findall(params["Prompt"])
    sampler, karras = resolve_sampler(params.get("Sampler", "Euler"), params.get("Schedule type"))

    def pair(key):  # A1111's WxH -> [H, W], as the JSON chunk holds it
        return [int(params[f"{key}-2"]), int(params[f"{key}-1"])] if f"{key}-1" in params else None

    def numeric(key, kind=float, default=None):
        try:
            return kind(params[key]) if key in params else default
        except ValueError:
            raise ValueError(f"its A1111 parameters have {key}: {params[key]!r}, not a number") from None

    crop = params.get("Crop top left", "0x0").split("x")
    size = pair("Size") or [1024, 1024]
    settings = {
        "prompt": LORA_TAG.sub("", params["Prompt"]), "negative": params["Negative prompt"] or None,
        "steps": numeric("Steps", int), "sampler": sampler, "karras": bool(karras),
        "cfg": numeric("CFG scale", float, 7.0), "seed": numeric("Seed", int), "height": size[0], "width": size[1],
        "num": numeric("Batch size", int, 1), "eta": numeric("Eta DDIM", float, 0.0),
        "rescale": numeric("Guidance rescale", float, 0.0), "original_size": pair("Original size"),
        "crop_top_left": [int(c) for c in crop] if len(crop) == 2 and all(c.isdigit() for c in crop) else None,
        "target_size": pair("Target size"), "strength": numeric("Denoising strength"),
        "aesthetic_score": numeric("Aesthetic score"), "negative_aesthetic_score": numeric("Negative aesthetic score"),
    }
    unlocated = {"--model": f"the model {params.get('Model', '(unnamed)')!r}"}
    if loras:
        unlocated["--lora"] = "the LoRAs " + ", ".join(f"{name}:{m or 1}" for name, m in loras)
    if "VAE" in params:
        unlocated["--vae"] = f"the VAE {params['VAE']!r}"
    if settings["strength"] is not None:
        unlocated["--init-image"] = f"an init image (Denoising strength {params['Denoising strength']})"
    return settings, numeric("Batch pos", int), unlocated


# ---------------------------------------------------------------------------------------------------------- the PNG
def png_text(settings: dict, index: int, hashes: dict | None = None):
    """The PNG text chunks of image `index` of the batch, as a PIL `PngInfo` for `Image.save(pnginfo=...)`. PIL writes
    a tEXt chunk, or iTXt (UTF-8) when the text is not Latin-1, as A1111 does."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, infotext(settings, index, hashes))
    info.add_text(JSON_KEY, json.dumps({"format": FORMAT, "settings": settings, "index": index}))
    return info


def read_png_settings(path: str | os.PathLike) -> tuple[dict, int | None, dict[str, str]]:
    """(settings, batch position, unlocated) from a PNG's `minigen` chunk, else from its A1111 `parameters` (see
    `settings_from_infotext`). ValueError names the file when it holds neither or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            chunks = dict(getattr(img, "text", {}))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError and truncation are OSErrors
        raise ValueError(f"--from-png {path}: not a readable image ({e})") from None
    try:
        if JSON_KEY in chunks:
            saved = json.loads(chunks[JSON_KEY])
            if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("settings"),
                                                                                               dict):
                raise ValueError(f"its {JSON_KEY!r} chunk is not minigen's settings format {FORMAT}")
            return saved["settings"], saved.get("index"), {}
        if TEXT_KEY in chunks:
            return settings_from_infotext(chunks[TEXT_KEY])
    except ValueError as e:
        raise ValueError(f"--from-png {path}: {e}") from None
    raise ValueError(f"--from-png {path}: the image holds no minigen or A1111 settings "
                     f"(no {JSON_KEY!r} or {TEXT_KEY!r} text chunk)")
