"""What `eval.py` judges and with what, checked before a model loads: the rows (the base model, LoRA files, a
training run's folder of epochs), the prompts, the generation settings, and whether the numbers of images can give a
score (every problem found is reported in one go where that is cheap)."""

from __future__ import annotations

import errno
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..fid import inception as fid_inception
from ..captions import read_caption, read_text
from ..cli import check_number
from ..datasets import BUILTIN_DATASETS, CAPTIONS_FROM_NAMES, resolve_dataset
from ..images import list_images
from ..io import read_header
from ..sd.lora_files import LoRAFileError, parse_lora_spec
from ..sd.lora_reading import check_lora_family, read_lora
from ..sd.pipeline import check_settings


KID_SUBSET = 1000  # torch-fidelity's default subset size


@dataclass
class Candidate:
    """One row of the table: the base model (no `lora`) or a LoRA file at a multiplier."""
    name: str
    lora: Path | None = None
    multiplier: float = 1.0
    epoch: int | None = None


@dataclass
class Settings:
    """How every model generates: the same for all, so only the weights differ."""
    steps: int = 30
    guidance_scale: float = 5.0
    sampler: str = "euler"
    karras: bool = False
    height: int | None = None  # None: the model's own size (1024 for SDXL, 512 for SD 1.5), as diffusers
    width: int | None = None
    negative_prompt: str | None = None


def read_prompts(source: str | os.PathLike, limit: int | None = None) -> list[str]:
    """A text file (one prompt a line, blank lines skipped), or a dataset folder / built-in name ('met') whose images
    have sidecar `.txt` captions (kohya's layout; 'twemoji': the emoji's names). At most `limit` prompts."""
    path = Path(source)
    if path.is_file():
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]  # as captions are read
    else:
        folder = existing_folder(source, "prompts")
        captions = [p.with_suffix(".txt") for p in list_images(folder)]
        prompts = [read_caption(c) for c in captions if c.is_file()]  # as training reads them: any encoding
        prompts = [p for p in prompts if p]
        if not prompts and str(source) in CAPTIONS_FROM_NAMES:  # twemoji: the emoji's names, as training reads them
            prompts = [CAPTIONS_FROM_NAMES[str(source)](p.stem) for p in list_images(folder)]
    if not prompts:
        raise ValueError(f"no prompts in {source}: a prompt file needs one prompt per line, a dataset folder "
                         f"a .txt caption beside its images")
    return prompts[:limit]


def existing_folder(name: str | os.PathLike, role: str) -> Path:
    """resolve_dataset (a folder, or a built-in dataset name), its error naming what the folder is for."""
    if Path(name).is_file():
        raise NotADirectoryError(errno.ENOTDIR, f"a file; the {role} must be a folder of images", str(name))
    try:
        return resolve_dataset(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{role} {str(name)!r}: no such file, folder or built-in dataset "
                                f"({', '.join(BUILTIN_DATASETS)})") from None


EPOCH_IN_NAME = (re.compile(r"epoch\D*(\d+)", re.IGNORECASE), re.compile(r"-(\d+)$"))


def epoch_of(path: Path) -> int | None:
    """kohya's `ss_epoch` metadata, else a number in the name (`...epoch3...`, `name-000003`); None if neither."""
    epoch = read_header(path)[1].get("ss_epoch", "")
    if epoch.isdigit():
        return int(epoch)
    for pattern in EPOCH_IN_NAME:
        match = pattern.search(path.stem)
        if match:
            return int(match.group(1))
    return None


def lora_files(folder: Path) -> list[Path]:
    """The LoRA files of a run folder, told by their contents (read_lora parses them), not their names: a training
    run also holds the trainer's checkpoint.safetensors (LoRA weights beside optimizer state). Other files are
    skipped with a warning naming them."""
    files, skipped = [], {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            read_lora(f)
        except LoRAFileError as e:
            skipped[f.name] = str(e)
            continue
        files.append(f)
    if skipped:
        warnings.warn(f"run folder {folder}: skipping {len(skipped)} file(s) that are not LoRA files: "
                      + "; ".join(f"{name} ({reason[:120]})" for name, reason in skipped.items()), stacklevel=3)
    if not files:
        raise FileNotFoundError(f"run folder {folder} has no LoRA files (*.safetensors"
                                + (f"; {', '.join(skipped)} are not LoRA files)" if skipped else ")"))
    return files


def run_checkpoints(folder: Path, multiplier: float = 1.0) -> list[Candidate]:
    """A training run's LoRA checkpoints, ordered by epoch (files with no known epoch last, by name)."""
    found: dict[int | None, list[Candidate]] = {}
    for f in lora_files(folder):
        epoch = epoch_of(f)
        if epoch is not None and epoch in found:  # e.g. kohya's final file beside its last per-epoch one
            warnings.warn(f"{f.name} and {found[epoch][0].lora.name} both hold epoch {epoch}; evaluating "
                          f"{found[epoch][0].lora.name} only", stacklevel=2)
            continue
        found.setdefault(epoch, []).append(Candidate(f.stem, f, multiplier, epoch))
    return [c for epoch in sorted(found, key=lambda e: (e is None, e or 0)) for c in found[epoch]]


def candidates(lora_specs: Sequence[str]) -> list[Candidate]:
    """The base model, then each `FILE[:MULTIPLIER]` or run folder (`FOLDER[:MULTIPLIER]`), names made unique."""
    rows = [Candidate("base")]
    for spec in lora_specs:
        path, multiplier = parse_lora_spec(spec)
        path = Path(path)
        if path.is_dir():
            rows += run_checkpoints(path, multiplier)
        elif path.is_file():
            read_lora(path)  # a file that is not a LoRA is refused now, before any model loads
            rows.append(Candidate(path.stem, path, multiplier, epoch_of(path)))
        else:
            raise FileNotFoundError(f"LoRA file or run folder not found: {path}")
    seen: dict[str, int] = {}
    for row in rows:
        if row.multiplier != 1:
            row.name += f"@{row.multiplier:g}"
        seen[row.name] = seen.get(row.name, 0) + 1
        if seen[row.name] > 1:
            row.name += f"-{seen[row.name]}"
    return rows


def lora_family_problem(lora: Path, family: str) -> str | None:
    """What `check_lora_family` says of a LoRA made for another family than the model's (None when it fits)."""
    parsed, _, metadata = read_lora(lora)
    try:
        check_lora_family(parsed, metadata, family, str(lora))
    except LoRAFileError as e:
        return str(e)
    return None


def check_numbers(settings: Settings, num_images: int, batch_size: int, max_prompts: int | None,
                  grid_prompts: int, dims: int, is_splits: int) -> None:
    """Refuse settings and counts that cannot work, naming the allowed range, before anything is read."""
    check_settings(settings.sampler, settings.steps, settings.height, settings.width, num_images)
    check_number("guidance scale", settings.guidance_scale)
    if dims not in fid_inception.FEATURE_DIMS:
        raise ValueError(f"dims must be one of {fid_inception.FEATURE_DIMS}, got {dims!r}")
    for name, value in (("batch size", batch_size), ("grid prompts", grid_prompts), ("IS splits", is_splits),
                        ("max prompts", max_prompts)):
        if value is not None:
            check_number(name, value, 1)


def check_counts(reference: Path, n_reference: int, n_generated: int, dims: int) -> None:
    """Refuse counts FID and KID cannot use and warn, naming the number needed, when they will be unreliable."""
    smallest = min(n_reference, n_generated)
    if smallest < 2:
        raise ValueError(f"FID and KID need at least 2 images in each set; got {n_reference} reference (in "
                         f"{reference}) and {n_generated} generated per model (prompts x --num)")
    needed = dims + 1
    if smallest < needed:
        warnings.warn(f"FID from {n_reference} reference and {n_generated} generated images per model: it needs at "
                      f"least {needed} of each for a non-singular {dims}x{dims} covariance (and thousands to "
                      f"compare with published values); compare these FIDs only with each other", stacklevel=3)
    if smallest < KID_SUBSET:
        warnings.warn(f"KID subsets of {smallest} images instead of {KID_SUBSET}: fewer than {KID_SUBSET} "
                      f"reference or generated images", stacklevel=3)
