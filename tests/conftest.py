"""Shared test set-up: offline hubs and few threads. (The oracles import on CPU torch thanks to
requirements/torchvision_cpu_shim.py, which `make test` installs into .venv.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# CI has 2 cores; more threads than that only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
