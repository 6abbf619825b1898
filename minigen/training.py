"""What the two trainers (gan_trainer.py, lora_training.py) share."""

from __future__ import annotations

import json

from .io import CheckpointError


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last checkpoint written before it is kept as it was."""


def run_settings(metadata: dict[str, str], path: str) -> dict:
    """The settings a trainer checkpoint saved (its `config` metadata), for a resumed run to start from."""
    try:
        settings = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a training checkpoint with readable settings ({type(e).__name__}: {e})") \
            from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: its saved settings are not a JSON object")
    return settings
