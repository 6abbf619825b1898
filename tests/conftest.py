"""Shared test set-up: offline hubs and few threads. (The oracles import on CPU torch thanks to
requirements/torchvision_cpu_shim.py, which `make test` installs into .venv.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores; more threads than that only adds contention. MINIGEN_TEST_THREADS=1 runs the suite at one thread:
# run it both ways to find a test that asserts bit-for-bit equality where the kernels only promise rounding.
THREADS = int(os.environ.get("MINIGEN_TEST_THREADS", min(2, os.cpu_count() or 1)))
torch.set_num_threads(THREADS)
# The CLIs choose their threads from the load average when --threads is not given (speed.apply_threads); under the
# suite they keep these, in-process and in the subprocesses they start, so no test depends on the machine's load.
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads spin-wait (a tiny UNet
    forward measured 5-13 s with 2 threads against 0.15 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
