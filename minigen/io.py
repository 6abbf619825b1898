"""Reading and writing weights and other files safely.

- Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
  so an interrupted save never leaves a broken file.
- safetensors is the only format read by default; pickles (.ckpt/.pt/.pth/.bin) can run code when loaded, so they
  are refused unless the caller allows them, and then loaded with `weights_only=True`.
- `SafetensorsWriter` streams: it writes the header from known shapes and dtypes first, then each tensor's bytes,
  so a merged 7 GB checkpoint never has to sit in memory whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}

# safetensors dtype names (the format's spec) <-> torch dtypes.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class CheckpointError(ValueError):
    """A weights file that cannot be used: truncated, corrupt, pickled without permission, or of the wrong model."""


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder (so the final rename is atomic), with the permissions a plain
    open() would give: mkstemp makes it owner-only, which would leave every saved file unreadable to others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return umask


def temp_folder_beside(path: Path) -> Path:
    """A new empty folder in `path`'s parent, to be renamed to `path` with `replace_folder` once complete; with the
    permissions a plain mkdir would give (mkdtemp makes it owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_folder(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`. A folder already at `path` is moved aside first and deleted only
    once the new one is in place (a folder cannot be renamed over a non-empty one)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    try:
        os.replace(path, aside / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside / path.name, path)
            raise
    finally:
        shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on error delete it."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically. Metadata values are stored as strings (the format's rule)."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Return ({name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, reading only its header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                  f"(header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                              f"file has {size}")
    return header, metadata


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file, with its metadata; a truncated or corrupt file is a CheckpointError."""
    _, metadata = read_header(path)  # checks the size before any tensor is read
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
    return tensors, metadata


def load_weights(path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file, or a pickled checkpoint only when `allow_pickle` (then with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle, which can run arbitrary code when loaded; convert it to .safetensors, or pass "
                f"--allow-pickle if you trust its source (it is then loaded with weights_only=True)")
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles
            raise CheckpointError(f"{path}: cannot load pickle with weights_only=True ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # .ckpt files from Lightning-based trainers nest the weights
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    return load_safetensors(path, device)


class AtomicWriter:
    """The context-manager protocol of the streaming writers: `close()` (finish and put in place) on success,
    `abort()` (delete what was written) on an exception."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(AtomicWriter):
    """Write a safetensors file tensor by tensor, in the order of the `specs` given up front.

    specs: {name: (shape, dtype)}. The header is written first; then `write(name, tensor)` must be called for every
    name in that order. The file appears at `path` only when `close()` succeeds (write then rename).
    Use as a context manager; on an exception the partial file is deleted.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.order = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self.nbytes = {}
        for name, (shape, dtype) in specs.items():
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.nbytes[name] = n
            offset += n
        self.total_bytes = offset
        self.header = header
        raw = self._header_bytes()
        fd, self.tmp = _temp_beside(self.path)
        self.file = os.fdopen(fd, "wb")
        self.file.write(raw)
        self.next = 0

    def _header_bytes(self) -> bytes:
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        return struct.pack("<Q", len(raw)) + raw

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the metadata of the header already written, before `close()`. The new header must have the same
        length (e.g. digests filled in over placeholders of their size), because the tensors' bytes follow it."""
        old = self._header_bytes()
        self.header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = self._header_bytes()
        if len(raw) != len(old):
            self.header = json.loads(old[8:])
            raise ValueError(f"SafetensorsWriter: new metadata changes the header length ({len(old)} -> {len(raw)})")
        end = self.file.tell()
        self.file.seek(0)
        self.file.write(raw)
        self.file.seek(end)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise ValueError(f"SafetensorsWriter: expected tensor {expected!r}, got {name!r}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self.nbytes[name]:
            raise ValueError(f"SafetensorsWriter: {name} has {data.nbytes} bytes, header promised {self.nbytes[name]}")
        self.file.write(data)  # the array's own buffer: no copy of the tensor
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise ValueError(f"SafetensorsWriter: {len(self.order) - self.next} tensors never written "
                             f"(next: {self.order[self.next]!r})")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def open_safetensors(path: str | os.PathLike):
    """Lazy reader (safetensors' `safe_open`): `.keys()`, `.get_tensor(name)`, `.metadata()`; checks truncation first."""
    read_header(path)
    return safe_open(str(path), framework="pt", device="cpu")


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """An optimizer's state (for a safetensors checkpoint) as tensors `prefix.<param index>.<name>`, and its settings and scalars as JSON."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], settings: str) -> None:
    meta = json.loads(settings)
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
