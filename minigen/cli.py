"""What every command-line program shares: one error convention, checked numbers, device flags, presets.

The convention is argparse's own, kept for every failure a user can cause: a bad flag, a bad or missing file, a full
disk, a non-finite number end the program with one line `prog: error: <what, which file>` on stderr and exit code 2.
A traceback is only ever a bug in minigen. The library raises ordinary exceptions (ValueError and its subclasses
such as CheckpointError, OSError, TrainingDiverged); only `entry` below turns them into that line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .distributed import rank_label
from .io import FLOAT_DTYPES
from .training import TrainingDiverged

# Failures of input or environment, reported in one line. Everything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, TrainingDiverged, MemoryError)

SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def describe(error: BaseException) -> str:
    """One line naming the problem (and the file, for OS errors)."""
    if isinstance(error, OSError) and error.filename is not None:
        text = f"{error.filename}: {error.strerror or error}"
        if error.filename2 is not None:
            text += f" (-> {error.filename2})"
    elif isinstance(error, MemoryError):
        text = f"out of memory {error}".strip()
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def entry(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a CLI's `main(argv)`: expected failures print `prog: error: ...` and return 2; Ctrl-C prints
    `prog: interrupted` and returns 130, as a shell reports a program stopped by SIGINT (writes are atomic: nothing
    half-written is left). The trainers catch Ctrl-C themselves, to save a checkpoint first. Warnings print as one
    line each too, `prog: warning: ...`, without Python's file, line and source."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            warnings.formatwarning = lambda message, *_, **__: \
                f"{prog}{rank_label()}: warning: {' '.join(str(message).split())}\n"
            try:
                return main(argv)
            except EXPECTED_ERRORS as e:
                return fail(prog + rank_label(), describe(e))  # under torchrun: which rank failed
            except KeyboardInterrupt:
                print(f"{prog}{rank_label()}: interrupted", file=sys.stderr)
                return 130
        return run
    return wrap


def python_command(program: str = "python") -> str:
    """How to run `program` ("python", "torchrun") from the environment running now, as a user types it: the one
    beside this interpreter, relative to the working folder when inside it (`.venv/bin/python`): a bare `python` may
    be another one, with no torch."""
    path = Path(sys.executable).with_name(program) if program != "python" else Path(sys.executable)
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return shlex.quote(str(path))


def resume_command(script: str, checkpoint: str | Path) -> str:
    """The command that continues a run, runnable as printed: this interpreter, or torchrun for several processes."""
    world = distributed.world_size()
    launcher = f"{python_command('torchrun')} --nproc_per_node {world}" if world > 1 else python_command()
    return f"{launcher} {script} --resume {shlex.quote(str(checkpoint))}"


# ---- numbers: argparse `type=` functions that refuse what cannot work, naming the allowed range ----

def check_number(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError unless `value` is a finite number within [lo, hi] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = (f"between {lo} and {hi}" if lo is not None and hi is not None
                   else f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_positive(name: str, value: float) -> None:
    """Raise ValueError unless `value` is a finite number above 0 (a learning rate, say)."""
    check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


# A config field's allowed values, for `check_fields`: (lo, hi) inclusive (either may be None), or POSITIVE.
POSITIVE = "positive"


def check_fields(config, ranges: dict[str, tuple[float | None, float | None] | str]) -> None:
    """Check the numeric fields of a config dataclass, each named as its flag (`batch_size` -> --batch-size): an
    int field must hold an integer, every field a finite number in its range. Saved settings and presets pass here
    too, not only the command line."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, allowed in ranges.items():
        flag, value = "--" + name.replace("_", "-"), getattr(config, name)
        if isinstance(defaults[name], int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{flag} must be an integer, got {value!r}")
        if allowed == POSITIVE:
            check_positive(flag, value)
        else:
            check_number(flag, value, *allowed)


def number(kind: type = float, lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float), finite, within [lo, hi]."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            check_number("it", value, lo, hi)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("it ")) from None
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


seed_number = number(int, *SEED_RANGE)


def parsed_by(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    """An argparse type from a function that raises ValueError: its message becomes argparse's one-line error."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    checked.__name__ = name  # argparse names the type in its messages
    return checked


# ---- device, dtype and threads ----

def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads; `chosen_dtype(args)` resolves the dtype's default, `speed.apply_threads` the
    threads."""
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1, cpu, ... (default: cuda when torch sees a GPU, else the CPU, with a warning)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default=None,
                   help="UNet and text encoders' dtype (default bf16 on GPU, fp32 on CPU); the VAE stays fp32")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=number(int, 1),  # no default: the trainers' parsers leave unset flags out
                   help="CPU threads for torch (default: the cores other work leaves free, by the load average; the "
                        "speed line says how many)")


def chosen_dtype_name(args: argparse.Namespace) -> str:
    """--dtype, or its default for the device: fp32 on the CPU, on a GPU `gpu_half_precision()`."""
    return args.dtype or ("fp32" if args.device == "cpu" else gpu_half_precision())


def gpu_half_precision() -> str:
    """bf16 on a GPU that computes in it (Ampere and later), else fp16 (T4, V100, the free notebooks' GPUs, emulate
    bf16 slowly; fp16 there, with the VAE kept in fp32, which SD's VAEs need in fp16)."""
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    return FLOAT_DTYPES[chosen_dtype_name(args)]


def resolve_device(device: str | None, cost: str) -> str:
    """The device to run on: `device` when given (checked), else cuda when torch sees a GPU, else the CPU, with one
    line on stderr saying what that costs (`cost`, e.g. "minutes per 1024x1024 image")."""
    if device:
        check_device(device)
        return device
    if torch.cuda.is_available():
        return "cuda"
    print(f"warning: no CUDA device, running on the CPU: {cost}", file=sys.stderr)
    return "cpu"


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use, before any work (torch's own message is a traceback later). A GPU
    named by number (cuda:N) becomes the current one (torch.cuda.set_device): what is made on plain "cuda" (the CUDA
    generator's draws, cuBLAS's workspace, the free memory the plan reads) is then on GPU N too, not on GPU 0."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None:
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(dev)


# ---- presets and saved settings under the command line ----

def read_preset(path: str) -> list[str]:
    """The flags in a preset file (`configs/*.conf`: flags, one or more a line, `#` comments), split as a shell does."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"preset {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return shlex.split(text, comments=True)
    except ValueError as e:
        raise ValueError(f"preset {path}: {e}") from None


def preset_then(argv: list[str]) -> list[str]:
    """`argv` with the flags of the preset its `--config` names put first, so the command line's own flags win (for a
    parser with ordinary defaults, which has no saved settings to layer under them)."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # `--c` (merge's C) is not `--config`
    finder.add_argument("--config")
    config = finder.parse_known_args(argv)[0].config
    return read_preset(config) + argv if config else argv


def layered_settings(parser: argparse.ArgumentParser, argv: list[str], fields: set[str],
                     saved: Callable[[str], dict]) -> tuple[argparse.Namespace, dict]:
    """Parse `argv` with a parser built with `argument_default=SUPPRESS`; return (the flags given, the settings).

    Settings are layered, later wins: a resumed run's saved settings (`saved(resume_path)`), the preset
    (`--config`), the command line. Only names in `fields` are settings. The preset's other flags (speed switches,
    `--threads`, ...) join the flags given, under the command line's; which run to continue (`--resume`) and another
    preset (`--config`) come from the command line only."""
    given = vars(parser.parse_args(argv))
    preset = vars(parser.parse_args(read_preset(given["config"]))) if "config" in given else {}
    for flag in ("config", "resume"):
        if flag in preset:
            raise ValueError(f"preset {given['config']}: --{flag} belongs on the command line, not in a preset")
    settings = saved(given["resume"]) if "resume" in given else {}
    settings |= {k: v for source in (preset, given) for k, v in source.items() if k in fields}
    flags = {k: v for k, v in preset.items() if k not in fields} | given
    return argparse.Namespace(**flags), settings
