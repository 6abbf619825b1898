"""What the trainers (gan/trainer.py, finetune/trainer.py and its from-scratch subclass, finetune/from_scratch.py) share."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import distributed
from .io import CheckpointError, first_non_finite

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below this


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last checkpoint written before it is kept as it was."""


def run_settings(metadata: dict[str, str], path: str, config_type: type) -> dict:
    """The settings a trainer checkpoint saved (its `config` metadata), for a resumed run to start from; checked by
    building a `config_type` from them, so a bad saved setting is an error naming the file."""
    try:
        settings = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a training checkpoint with readable settings ({type(e).__name__}: {e})") \
            from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: its saved settings are not a JSON object")
    try:
        config_type(**settings)
    except (TypeError, ValueError) as e:  # TypeError: an unknown name, or a value of the wrong kind
        raise CheckpointError(f"{path}: its saved settings are not valid ({e})") from None
    return settings


def claim_out(out: Path, patterns: Sequence[str], overwrite: bool, checkpoint: Path, what: str) -> None:
    """Before a fresh run: an --out folder holding a run (files matching `patterns`, globs below `out`) is refused,
    naming the `checkpoint` that continues it, or with --overwrite emptied of that run's files (`what` lists them;
    nothing else in it is touched), loudly. Left there, the old grids and log would mix with the new run's."""
    files = sorted({path for pattern in patterns for path in out.glob(pattern) if path.is_file()})
    if not files:
        return
    if not overwrite:
        raise ValueError(f"--out {out} already holds a run: --resume {checkpoint} continues it, "
                         f"--overwrite replaces it")
    print(f"--overwrite: replacing the previous run in {out}: deleting its {len(files)} files ({what})",
          file=sys.stderr)
    for path in files:
        path.unlink()


def check_finite_before_saving(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, when: str) -> None:
    """Everything a checkpoint is about to hold (weights, buffers, optimizer state) must be finite, or the run has
    diverged even if its loss has not shown it yet: raise TrainingDiverged and leave the file at `path` as it is."""
    bad = first_non_finite(tensors)
    if bad is not None:
        kept = f"the last good checkpoint is {path}" if Path(path).exists() else "no checkpoint was written"
        raise TrainingDiverged(f"{bad} became NaN or infinite {when}; stopped without saving it; {kept}. "
                               "Try a lower learning rate")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's batch order: one generator per (seed, epoch), so a resumed run rebuilds the same order.
    Wrapped into the generator's range so every allowed seed works (no seed in use before the wrap changes)."""
    return (seed * 100_003 + epoch) % SEED_LIMIT


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


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")  # how an optimizer steps, not its state


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], settings: str) -> None:
    """Load `optimizer_to_tensors`' output into `opt`. Each group keeps `opt`'s own implementation keys: this run's
    --[no-]fused-optimizer and device choose the kernel, not the run that saved the checkpoint."""
    meta = json.loads(settings)
    for saved, ours in zip(meta["param_groups"], opt.param_groups):
        saved.update({k: ours[k] for k in IMPLEMENTATION_KEYS if k in ours})
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current iteration; the same signal again stops at
    once. (torchrun passes the signal it gets to every rank; a rank that gets one alone stops all: see
    minigen.gan.parallel.agree.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])
        print(f"\nstopping after this iteration to save a checkpoint ({signal.Signals(signum).name} again to quit at "
              f"once){distributed.rank_label()}", file=sys.stderr)

    def __exit__(self, *exc):
        for s in self.SIGNALS:
            signal.signal(s, self.previous[s])
