"""The bad-input contract every CLI keeps, as one assertion: exit code 2, one `prog: error: ...` line naming the
problem, no traceback (see minigen/cli.py)."""

from __future__ import annotations

import pytest


def assert_clean_error(main, argv: list[str], capsys, *mentions: str) -> str:
    """Run `main(argv)` in this process; assert it ended with exit code 2 and a last stderr line `prog: error: ...`
    that contains each of `mentions` (case-insensitive). Return that line. An exception escaping `main` fails the
    test with its traceback: that is a bug."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (bad flags) exit 2 the same way
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code!r}, stderr: {err!r}"
    assert lines and ": error: " in lines[-1], f"no error line in stderr: {err!r}"
    assert "Traceback" not in err, err
    for text in mentions:
        assert text.lower() in lines[-1].lower(), f"{text!r} not in {lines[-1]!r}"
    return lines[-1]


def clean_error_params(cases: dict[str, tuple]) -> list:
    """pytest parameters named by the keys of `cases`."""
    return [pytest.param(*case, id=name) for name, case in cases.items()]
