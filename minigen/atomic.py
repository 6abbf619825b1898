"""Writes that never leave a broken file: every file is written to a hidden temporary beside its target, flushed to
disk, then renamed over it; a folder is built beside its target and swapped in (`replace_folder`). Temporary names
carry the writer's PID, so the next writer removes the leftovers of a killed one. Outputs that can never be made are
refused before any work (`check_can_create`), and an OS error says which file it is about (`naming`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


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


def temp_file_beside(path: Path) -> tuple[int, str]:
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
    fd, tmp = temp_file_beside(path)
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
