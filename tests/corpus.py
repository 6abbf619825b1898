"""The bad-input corpora's one shape (tests/test_bad_*.py): build a folder of bad inputs, run each case, and check
that a failed run ended with one clean error and left everything as it found it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

from cli_errors import assert_clean_error


def fingerprint(path: Path) -> str:
    """A file's content hash; for files over 1 MiB (model weights: hashing them for every case would take most of a
    module's time) their size, modification time and inode: writing changes the time, replacing the inode.
    Folders are 'dir', links their target."""
    if path.is_symlink():
        return "-> " + os.readlink(path)
    if path.is_dir():
        return "dir"
    stat = path.stat()
    if stat.st_size > 1 << 20:
        return f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ino}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*paths: Path) -> dict[str, str | None]:
    """Every path at or below `paths` -> its fingerprint (None for a path that does not exist): compare before and
    after a run; anything written, changed or left behind (a temporary file, an empty folder) shows."""
    state: dict[str, str | None] = {}
    for path in map(Path, paths):
        for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            state[str(p)] = fingerprint(p) if p.exists() or p.is_symlink() else None
    return state


def temp_files(folder: Path) -> list[Path]:
    """Hidden temporary files of interrupted saves (atomic.atomic_write's `.<name>.*.tmp`) left in `folder`."""
    return sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []


def fails_cleanly(main: Callable, argv: Sequence[str], capsys, mentions: Sequence[str], inputs: Path,
                  out: Path | None = None) -> str:
    """The contract of every bad-input case: `main(argv)` ends with exit code 2 and one `prog: error:` line naming
    each of `mentions` (`cli_errors.assert_clean_error`), every path under `inputs` is as it was, and `out` (the
    run's --out, when given) was never created. Returns the error line."""
    before = snapshot(inputs)
    line = assert_clean_error(main, list(argv), capsys, *mentions)
    assert snapshot(inputs) == before  # inputs untouched, no output or temporary file left among them
    assert out is None or not Path(out).exists(), f"{out} was created"
    return line
