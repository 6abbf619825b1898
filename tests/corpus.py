"""Helpers of the bad-input corpora (tests/test_bad_*.py): what a failed run must leave as it found it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(*paths: Path) -> dict[str, str | None]:
    """{file: sha256} of every file at or below `paths` (None for a path that does not exist): compare before and
    after a run to check it changed nothing."""
    digests: dict[str, str | None] = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return digests


def temp_files(folder: Path) -> list[Path]:
    """Hidden temporary files of interrupted saves (atomic.atomic_write's `.<name>.*.tmp`) left in `folder`."""
    return sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []
