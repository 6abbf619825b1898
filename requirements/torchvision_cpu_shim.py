"""Lets the registry's torchvision (a CUDA build) import beside the CPU torch, in any process of the test venv.

`make test` copies this file into .venv's site-packages with a one-line `.pth` that imports it at start-up. It only
adds an import hook: nothing (not even torch) is imported until some code imports torchvision. Then, first, it
defines the two operator schemas whose absence makes that import fail ("operator torchvision::nms does not exist");
diffusers, transformers, pytorch-fid and torch-fidelity import torchvision, so without this none of the oracles
import on a CPU machine. No test calls the two operators. Not part of minigen: minigen never imports torchvision.
"""

import importlib.abc
import sys

_libraries = []  # the schema definitions live as long as their Library object


class _DefineOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_ops()
        return None  # the normal finders do the import


def _define_ops() -> None:
    import torch

    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        _libraries.append(lib)
    except RuntimeError:  # already defined: a torchvision built for this torch
        pass


sys.meta_path.insert(0, _DefineOpsFirst())
