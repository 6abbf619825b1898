"""Shared test set-up: offline hubs, few threads, and the torchvision shim the oracle libraries need."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# CI has 2 cores; more threads than that only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The registry's torchvision is a CUDA build: on CPU torch its import fails with "operator torchvision::nms does not
# exist", which also breaks importing transformers and diffusers. Defining the two op schemas first lets it import;
# no test calls them.
try:
    _tv = torch.library.Library("torchvision", "DEF")
    _tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _tv.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined (a real CPU torchvision, or a second conftest import)
    pass
