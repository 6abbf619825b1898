"""Stable Diffusion checkpoints as tensor stores that never hold a model whole: read one tensor (or a chunk of one)
at a time, write tensor by tensor, and every output put in place only once it is complete.

- `open_checkpoint`: a single .safetensors file (`TensorFile`), a diffusers folder seen through single-file
  names (`DiffusersFolder`), a pickle loaded whole when allowed or a `random:<preset>[@seed]` model
  (`LoadedCheckpoint`): one interface, `keys`,
  `shape`, `dtype`, `get`, `get_flat`, `close`. Every value read is checked to be finite.
- Writers: `io.SafetensorsWriter` for a single file, `DiffusersFolderWriter` for a folder (`open_output`).
- `check_output`: an output is never an input, and the disk has room for it, before a byte is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch

from ..atomic import AtomicWriter, replace_folder, temp_folder_beside
from ..io import (DTYPE_NAMES, PICKLE_SUFFIXES, SAFETENSORS_DTYPES, CheckpointError, SafetensorsWriter, check_finite,
                  load_weights, read_header)
from . import convert
from .detect import CONFIGS_METADATA, MODEL_NAMES, detect, detect_family, family_of_configs
from .model import (PARTS, RANDOM, WEIGHTS_NAME, check_weights, parse_random, random_model, read_diffusers_configs,
                    save_diffusers_files)
from .tokenizer import CLIPTokenizer, model_tokenizers


class TensorFile:
    """A safetensors file read one tensor at a time with plain file reads.

    Not `safe_open`: it memory-maps the file, and every page of a mapping once touched counts as resident memory of
    this process until the kernel needs it back, so a merge would appear to hold both inputs whole.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self.metadata = read_header(self.path)  # raises CheckpointError on a truncated file
        self.file = open(self.path, "rb", buffering=0)
        (header_len,) = struct.unpack("<Q", self.file.read(8))
        self.data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.header[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        return self.get_flat(key).reshape(self.shape(key))

    def get_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a 1-D tensor, reading only their bytes."""
        dtype = self.dtype(key)
        first, end = self.header[key]["data_offsets"]
        size = dtype.itemsize
        stop = (end - first) // size if stop is None else stop
        out = torch.empty(stop - start, dtype=dtype)
        if out.numel() == 0:
            return out
        self.file.seek(self.data_start + first + start * size)
        if self.file.readinto(out.view(torch.uint8).numpy()) != out.numel() * size:
            raise CheckpointError(f"{self.path}: truncated while reading {key}")
        check_finite(out, self.path, key)
        return out

    def close(self) -> None:
        self.file.close()


def diffusers_files(family: str) -> dict[str, str]:
    """{part: weights file inside a diffusers folder} of a family's parts, in PARTS order."""
    return {part: f"{part}/{WEIGHTS_NAME[part]}.safetensors" for part in PARTS if part in convert.FAMILY_PREFIXES[family]}


class TensorsByName:
    """`keys`, `shape` and `dtype` of a reader whose `header` maps each name to a tensor (real, or meta for shapes)."""
    header: dict[str, torch.Tensor]

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.header[key].dtype


class DiffusersFolder(TensorsByName):
    """A diffusers folder (SD 1.x, 2.x or SDXL) read as if it were a single file: single-file names, tensors
    converted on read.

    Each single-file tensor comes from a group of the folder's tensors through `minigen.sd.convert` (a rename; the
    VAE attention's reshape; an OpenCLIP encoder's q, k, v fused and its projection transposed). Names and shapes are found by
    converting meta tensors. Renamed and reshaped tensors keep their bytes, so chunks are read straight from the file;
    the few converted ones are built whole (the last one is kept for the next chunk).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        try:
            self.configs = read_diffusers_configs(self.path)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        self.family = family_of_configs(self.configs)
        missing = [rel for rel in diffusers_files(self.family).values() if not (self.path / rel).is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: not a complete diffusers folder, it lacks {missing}")
        self.files = {part: TensorFile(self.path / rel) for part, rel in diffusers_files(self.family).items()}
        converters = {part: to_file for part, (to_file, _) in convert.part_converters(self.family, self.configs).items()}
        self.sources: dict[str, tuple] = {}  # single-file key -> (converter, file, [its keys], renamed bytes as-is)
        self.header: dict[str, torch.Tensor] = {}  # single-file key -> meta tensor (its shape and dtype)
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)  # the last tensor converted
        for part, f in self.files.items():
            for group in self._groups(f.keys()):
                meta = {k: torch.empty(f.shape(k), dtype=f.dtype(k), device="meta") for k in group}
                for key, t in converters[part](meta).items():
                    plain = len(group) == 1 and t.numel() == meta[group[0]].numel() and not key.endswith("projection")
                    self.sources[key] = (converters[part], f, group, plain)
                    self.header[key] = t

    @staticmethod
    def _groups(keys: list[str]) -> list[list[str]]:
        """One key per group, except bigG's q/k/v projections of a layer, which fuse into one tensor."""
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(re.sub(r"\.[qkv]_proj\.", ".qkv_proj.", k), []).append(k)
        return list(groups.values())

    def get(self, key: str) -> torch.Tensor:
        convert_fn, f, group, _ = self.sources[key]
        if self._last[0] != key:
            self._last = (key, convert_fn({k: f.get(k) for k in group})[key].contiguous())
        return self._last[1]

    def get_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        _, f, group, plain = self.sources[key]
        if plain:
            return f.get_flat(group[0], start, stop)
        return self.get(key).reshape(-1)[start:stop]

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class LoadedCheckpoint(TensorsByName):
    """Tensors held whole behind TensorFile's interface: a pickled checkpoint (.ckpt, .pt, ...), which cannot be read
    tensor by tensor (`io.load_weights` loads it with weights_only=True, so it takes its size in memory), or a random
    model's single-file tensors (`random:tiny@1`: two small, different checkpoints to try merging with)."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path = Path(path)
        self.header, self.metadata = tensors, metadata  # name -> tensor
        for key, tensor in self.header.items():
            if tensor.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {tensor.dtype}, which safetensors "
                                      f"cannot hold")
            check_finite(tensor, self.path, key)

    def get(self, key: str) -> torch.Tensor:
        return self.header[key]

    def get_flat(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.header[key].reshape(-1)[start:stop]

    def close(self) -> None:
        pass


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False
                    ) -> TensorFile | DiffusersFolder | LoadedCheckpoint:
    """A single .safetensors file, a diffusers folder seen through single-file names, or a pickle (refused
    unless `allow_pickle`), or a `random:<preset>[@seed]` model."""
    if str(path).startswith(RANDOM):
        return LoadedCheckpoint(path, *random_model(*parse_random(str(path))).single_file_tensors())
    path = Path(path)
    if path.is_dir():
        return DiffusersFolder(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return LoadedCheckpoint(path, *load_weights(path, allow_pickle))
    return TensorFile(path)


class DiffusersFolderWriter(AtomicWriter):
    """`SafetensorsWriter`'s interface (tensors written by single-file name, in the order of `specs`) writing a
    diffusers folder instead: each tensor goes through `convert.to_diffusers` (renamed; an OpenCLIP encoder's fused
    q/k/v split in three, its projection transposed; the VAE attention's 1x1 convolutions made linear) into its part's
    file, which one `SafetensorsWriter` per part streams. Keys no diffusers model holds (`convert.ignored_key`) are
    left out.

    The folder's configs, scheduler and tokenizers are `source`'s (the merge's A) when it is a diffusers folder; from
    a single file, the configs its tensors (or minigen's metadata) give (`detect.detect`) and the bundled tokenizers.
    Names, shapes and the configs' agreement with them are settled from meta tensors before anything is written. The
    folder is built in a temporary folder beside `path`, renamed to `path` by `close()`; an older diffusers folder
    there is replaced then (any other existing path is refused first), and `abort()` deletes everything."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str], source: TensorFile | DiffusersFolder):
        self.path = Path(path)
        if self.path.exists() and not (self.path.is_dir() and (not any(self.path.iterdir())
                                                               or (self.path / "model_index.json").is_file())):
            raise FileExistsError(f"{self.path} exists and is not a diffusers folder; refusing to replace it")
        self.configs, tokenizers = self.settings_of(source)
        self.family = detect_family(specs)
        if self.family not in convert.FAMILY_PREFIXES or self.family != family_of_configs(self.configs):
            raise CheckpointError(f"cannot write {self.path} as a diffusers folder: the checkpoint is "
                                  f"{MODEL_NAMES.get(self.family, self.family)}, the configs are "
                                  f"{MODEL_NAMES[family_of_configs(self.configs)]}")
        files = diffusers_files(self.family)
        part_specs: dict[str, dict] = {part: {} for part in files}  # part -> {diffusers key: (shape, dtype)}
        for key, (shape, dtype) in specs.items():
            for part, tensors in self._to_diffusers(key, torch.empty(shape, dtype=dtype, device="meta")).items():
                part_specs[part] |= {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        for part in files:
            check_weights(part, self.configs[part], {k: torch.empty(shape, device="meta")
                                                     for k, (shape, _) in part_specs[part].items()}, str(self.path))
        metadata = {**metadata, "format": "pt"}  # transformers refuses a safetensors file whose metadata lacks it
        self.tmp = temp_folder_beside(self.path)
        self.writers: dict[str, SafetensorsWriter] = {}
        try:
            save_diffusers_files(self.tmp, self.configs, self.family, tokenizers)
            for part, rel in files.items():
                self.writers[part] = SafetensorsWriter(self.tmp / rel, part_specs[part], metadata)
        except BaseException:
            self.abort()
            raise

    def settings_of(self, source: TensorFile | DiffusersFolder) -> tuple[dict[str, dict], dict[str, CLIPTokenizer]]:
        """(part configs, tokenizers) for the folder (see the class's doc)."""
        if isinstance(source, DiffusersFolder):
            return source.configs, model_tokenizers(source.family, source.path)
        try:
            configs = configs_of(source)
        except ValueError as e:
            raise CheckpointError(f"cannot write {self.path} as a diffusers folder: {e}") from None
        return configs, model_tokenizers(family_of_configs(configs))

    def _to_diffusers(self, key: str, tensor: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """{part: {diffusers key: tensor}} of one single-file tensor (empty for an ignored key)."""
        try:
            parts = convert.to_diffusers({key: tensor}, self.configs, self.family)
        except KeyError as e:
            raise CheckpointError(f"cannot write {self.path} as a diffusers folder: {e.args[0]}") from None
        return {part: tensors for part, tensors in parts.items() if tensors}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        for part, tensors in self._to_diffusers(name, tensor).items():
            for key, t in tensors.items():
                self.writers[part].write(key, t)

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        for writer in self.writers.values():
            writer.rewrite_metadata({**metadata, "format": "pt"})

    def close(self) -> None:
        try:
            for writer in self.writers.values():
                writer.close()
            replace_folder(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


OUTPUT_FORMATS = ("single_file", "diffusers")


def output_format_of(out: str | os.PathLike, output_format: str | None = None) -> str:
    """The format asked for; by default a diffusers folder for an existing folder or a name not ending in
    .safetensors, else a single file."""
    out = Path(out)
    if output_format is None:
        return "diffusers" if out.is_dir() or out.suffix.lower() != ".safetensors" else "single_file"
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose from {list(OUTPUT_FORMATS)}")
    return output_format


def configs_of(source: TensorFile | DiffusersFolder | LoadedCheckpoint) -> dict[str, dict]:
    """The part configs of a checkpoint being read: a folder's own, else those its tensors' names and shapes (and
    metadata) show (`detect.detect`); ValueError when they settle none."""
    if isinstance(source, DiffusersFolder):
        return source.configs
    return detect({k: source.shape(k) for k in source.keys()}, source.metadata, str(source.path)).configs


def output_metadata(a: TensorFile | DiffusersFolder | LoadedCheckpoint) -> dict[str, str]:
    """A's metadata for a model written from it, with A's configs (`minigen.configs`, as every model file minigen
    writes carries), so a layout the shapes alone do not settle (a diffusers folder's, say) loads back."""
    try:
        return {CONFIGS_METADATA: json.dumps(configs_of(a), sort_keys=True), **a.metadata}
    except ValueError:  # tensors no layout explains (a partial file): its metadata as it came
        return dict(a.metadata)


def open_output(out: Path, output_format: str | None, a: TensorFile | DiffusersFolder) -> Callable:
    """open(specs, metadata) -> the writer of `out`: a single file, or a diffusers folder made from A's configs
    (`DiffusersFolderWriter`)."""
    if output_format_of(out, output_format) == "single_file":
        return lambda specs, metadata: SafetensorsWriter(out, specs, metadata)
    return lambda specs, metadata: DiffusersFolderWriter(out, specs, metadata, a)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """SHA-256 of a whole file, read in 16 MB pieces (the hash A1111 and civitai show for a model). For a diffusers
    folder, of its weight files' bytes one after the other (in PARTS order); for `random:<preset>[@seed]`, of that
    name, which makes the same tensors every time."""
    if str(path).startswith(RANDOM):
        return hashlib.sha256(str(path).encode()).hexdigest()
    path = Path(path)
    h = hashlib.sha256()
    buf = memoryview(bytearray(chunk_bytes))
    if path.is_dir():
        files = [path / rel for rel in diffusers_files(family_of_configs(read_diffusers_configs(path))).values()]
    else:
        files = [path]
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(buf[:n])
    return h.hexdigest()


def check_output(out: Path, inputs: list[Path], nbytes: int) -> None:
    """Refuse an output that is an input (same path, other spelling, symlink or hard link) or holds one, or that the
    disk has no room for."""
    for p in inputs:
        if out.resolve() == p.resolve() or (out.exists() and os.path.samefile(out, p)):
            raise ValueError(f"output {out} is one of the inputs; refusing to overwrite it")
        if p.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"input {p} is inside the output folder {out}; refusing to replace that folder")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise OSError(f"not enough free disk for {out}: needs {nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


