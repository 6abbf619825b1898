"""Preset files (`configs/*.conf`): the same flags a CLI takes, one or more per line; `#` starts a comment.

Every trainer reads its preset first and lets the command line override it, so a preset is just saved typing.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def read_preset(path: str) -> list[str]:
    """The flags in a preset file, split as a shell would split them."""
    try:
        return shlex.split(Path(path).read_text(), comments=True)
    except OSError as e:
        raise SystemExit(f"cannot read preset {path}: {e}") from None
