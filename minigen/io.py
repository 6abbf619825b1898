"""Reading and writing weights and other files safely.

- Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
  so an interrupted save never leaves a broken file. Folders are swapped in atomically (`replace_folder`).
  Temporary names carry the writer's PID; the leftovers of killed writers are removed by the next writer.
- Every safetensors reader goes through one header validator (`validate_header`): a corrupt or hostile header is a
  CheckpointError naming the file and the tensor, never a KeyError or a silently wrong tensor.
- safetensors is the only format read by default; pickles (.ckpt/.pt/.pth/.bin) can run code when loaded, so they
  are refused unless the caller allows them, and then loaded with `weights_only=True`.
- `SafetensorsWriter` streams: it writes the header from known shapes and dtypes first, then each tensor's bytes,
  so a merged 7 GB checkpoint never has to sit in memory whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

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
SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
# The names users give float dtypes (`--dtype fp16`), as diffusers and A1111 say them.
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A weights file that cannot be used: truncated, corrupt, pickled without permission, or of the wrong model."""


def _temp_prefix(path: Path) -> str:
    """Hidden temporary names beside `path` carry the writer's PID: `.{name}.{pid}.{random}.tmp`, so a later writer
    can tell the leftovers of a killed one (`remove_stale_temps`)."""
    return f".{path.name}.{os.getpid()}."


def _stale_temp_pattern(path: Path) -> re.Pattern:
    return re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[a-z0-9_]{8}\.tmp")  # mkstemp/mkdtemp's 8 characters


def remove_stale_temps(path: Path) -> None:
    """Delete minigen's temporary files and folders beside `path` whose writing process no longer exists (a save
    killed before its rename). Other files, and temporaries of live processes, are left alone."""
    pattern = _stale_temp_pattern(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m and not _process_alive(int(m[1])):
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # no such process; a number no PID can be
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder (so the final rename is atomic), with the permissions a plain
    open() would give: mkstemp makes it owner-only, which would leave every saved file unreadable to others."""
    with naming(path, replace=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return umask


def temp_folder_beside(path: Path) -> Path:
    """A new empty folder in `path`'s parent, to be renamed to `path` with `replace_folder` once complete; with the
    permissions a plain mkdir would give (mkdtemp makes it owner-only)."""
    with naming(path, replace=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _exchange_paths(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable
    (another OS, an old kernel or C library, a filesystem without it)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b), None, str(a))


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def replace_folder(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`. At every instant `path` holds either the old complete folder or
    the new one: a folder already there is swapped with `tmp` atomically (Linux's RENAME_EXCHANGE), then deleted
    from `tmp`'s hidden name (if this process dies first, the next writer beside `path` removes it).

    Fallback where no atomic swap exists: the old folder is renamed aside, then the new one in (a folder cannot be
    renamed over a non-empty one); a crash between those two renames leaves `path` empty, the old folder aside."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange_paths(tmp, path):
        shutil.rmtree(tmp)  # now the old folder
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
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
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on error delete it.
    An OS error without a file name (a full disk) is given `path`'s."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with naming(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def naming(path: str | os.PathLike, replace: bool = False) -> Iterator[None]:
    """Give an OSError raised inside the name of `path` when it has none (a full disk during write or fsync), or
    always with `replace` (making a hidden temporary beside `path`: the user knows `path`, not the temporary)."""
    try:
        yield
    except OSError as e:
        if replace:
            raise OSError(e.errno, f"cannot write here ({e.strerror})", str(path)) from None
        if e.filename is None:
            e.filename = str(path)
        raise


def check_can_create(path: str | os.PathLike, folder: bool = False, what: str = "") -> None:
    """Refuse an output that could never be made, before any work: an existing file above it (or at it, for a
    `folder`), or a name longer than the file system allows. Creates nothing. `what` (a flag) starts the message."""
    path = Path(path)
    lead = f"{what} " if what else ""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if (existing != path or folder) and not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"{lead}{path} cannot be made: this is not a folder", str(existing))
    longest = os.pathconf(existing if os.path.isdir(existing) else existing.parent, "PC_NAME_MAX")
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > longest:
            raise OSError(errno.ENAMETOOLONG, f"{lead}name too long: longer than {longest} bytes", part[:40] + "...")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically. Metadata values are stored as strings (the format's rule)."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Return ({name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, reading only its header,
    which `validate_header` checks; every problem is a CheckpointError naming the file (and the tensor)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                  f"(header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_refuse_duplicate_names)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return validate_header(path, header, size - 8 - n)


def _refuse_duplicate_names(pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"a name appears twice: {next(n for n in names if names.count(n) > 1)!r}")
    return dict(pairs)


def validate_header(path: Path, header: object, data_bytes: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Check a parsed safetensors header against the format: a JSON object of tensors, each with a known dtype, a
    shape of non-negative integers and `data_offsets` [begin, end] inside the `data_bytes` after the header, holding
    exactly shape x dtype size bytes, no two tensors overlapping; `__metadata__` an object of strings.
    Returns (tensors, metadata)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    tensors = dict(header)
    metadata = tensors.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    for name, entry in tensors.items():
        problem = _entry_problem(entry, data_bytes)
        if problem:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {problem}")
    spans = sorted((entry["data_offsets"], name) for name, entry in tensors.items())
    for ((_, end), first), ((begin, _), second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {first!r} and {second!r} "
                                  f"overlap (bytes {begin} to {end})")
    return tensors, metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: object, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        return f"has dtype {dtype!r}, not one of {sorted(SAFETENSORS_DTYPES)}"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"has shape {shape!r}, not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
    if offsets[1] > data_bytes:
        return f"ends at byte {offsets[1]} of the data, but the file holds {data_bytes} (truncated?)"
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return f"of shape {shape} and dtype {dtype} needs {nbytes} bytes, its offsets span {offsets[1] - offsets[0]}"
    return None


def check_finite(tensor: torch.Tensor, path: str | os.PathLike, name: str) -> None:
    """Refuse a float tensor holding NaN or infinity: merged, baked in or sampled from, it would poison the result
    silently (NaN weights give black images)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values")


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`check_finite` for every tensor of a file read from `path`."""
    for name, tensor in tensors.items():
        check_finite(tensor, path, name)


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None if all are finite."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


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
            with naming(self.path):
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
        self.header_length = len(raw)
        fd, self.tmp = _temp_beside(self.path)
        self.file = os.fdopen(fd, "wb")
        self.file.write(raw)
        self.next = 0

    def _header_bytes(self, length: int | None = None) -> bytes:
        """The length field and the JSON header, padded with spaces (the format's rule) to a multiple of 8 bytes, or
        to `length` bytes in all."""
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        pad = -len(raw) % 8 if length is None else length - 8 - len(raw)
        raw += b" " * max(pad, 0)
        return struct.pack("<Q", len(raw)) + raw

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the metadata of the header already written, before `close()`. The new header may not be longer
        (e.g. digests filled in over placeholders of their size), because the tensors' bytes follow it; a shorter
        one is padded with spaces to the written length."""
        old = self.header.get("__metadata__")
        self.header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = self._header_bytes(self.header_length)
        if len(raw) != self.header_length:
            self.header.pop("__metadata__")
            if old is not None:
                self.header["__metadata__"] = old
            raise ValueError(f"SafetensorsWriter: new metadata changes the header length ({self.header_length} -> "
                             f"{len(raw)} bytes; it may only shrink)")
        end = self.file.tell()
        self.file.seek(0)
        self.file.write(raw)
        self.file.seek(end)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with naming(self.path):
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
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
