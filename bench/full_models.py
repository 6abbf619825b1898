"""How the benches build their models: on the device they run on, and random init at most once per model.

A model built under `torch.device(device)` draws its random init there: a full SDXL UNet's 2.6B parameters take
about 12 s of init on a CPU (then a copy to the GPU), well under a second on a GPU. A second model with the same
tensors (minigen's beside its reference, the same UNet with and without LoRA) is built on the meta device and
handed those tensors (`same_weights`): no init, no copy. `BUILDS` counts the random inits and the copies by kind,
for the GPU suite's report: `make bench-gpu` used to init the full UNet ~36 times, on the CPU.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable

import torch
from torch import nn

BUILDS: Counter[str] = Counter()  # "<kind>" -> random inits, "<kind> (same weights)" -> models given existing tensors


def build(kind: str, make: Callable[[], nn.Module], device: str | torch.device, seed: int = 0) -> nn.Module:
    """make() with its random init (from `seed`) run on `device`."""
    BUILDS[kind] += 1
    torch.manual_seed(seed)
    with torch.device(device):
        return make()


def same_weights(kind: str, make: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """make() holding `state`'s tensors themselves (diffusers' names are minigen's): built on the meta device, so
    nothing is initialised or copied. The state must cover every parameter and buffer (minigen's models keep all
    their buffers in it)."""
    BUILDS[kind + " (same weights)"] += 1
    with torch.device("meta"):
        model = make()
    model.load_state_dict(state, assign=True)
    return model


_STATES: dict[str, dict[str, torch.Tensor]] = {}


def random_state(kind: str, make: Callable[[], nn.Module], config: dict, device: str | torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict, in `dtype` on `device`, of one `build(kind, make, device)`: built once per process for each
    (kind, config, device, dtype), then the same tensors for every caller (who must not change them in place)."""
    key = json.dumps([kind, config, str(torch.device(device)), str(dtype)], sort_keys=True, default=str)
    if key not in _STATES:
        _STATES[key] = build(kind, make, device).to(dtype).state_dict()
    return _STATES[key]
