"""Shared test set-up: offline hubs and few threads. (The oracles import on CPU torch thanks to
requirements/torchvision_cpu_shim.py, which `make test` installs into .venv.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores; more threads than that only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads spin-wait (a tiny UNet
    forward measured 5-13 s with 2 threads against 0.15 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
