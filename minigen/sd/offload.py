"""Model CPU offload: a pipeline's models wait in CPU memory and each moves to the GPU only while it runs, as
diffusers' `enable_model_cpu_offload` does. The GPU then holds one model and its activations, not all of them: SDXL
in bf16 keeps 5.1 GB of weights (the UNet) there at once instead of 7.0 GB (the UNet, both text encoders and the
fp32 VAE), so 8-12 GB cards draw 1024x1024 images (with --vae-tiling on 8 GB). The price: each model crosses
PCIe once per image or batch (the UNet, ~0.3 s at 16 GB/s), and the CPU holds the whole model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._pytree import tree_map


class ModelOffload:
    """Moves each added model to `device` when one of its entry modules is called (a forward pre-hook), the model
    there before it back to the CPU, and the call's tensors to `device` too."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.current: nn.Module | None = None  # the model on the GPU

    def add(self, model: nn.Module, entries: list[nn.Module]) -> None:
        """`entries`: the modules through which computation enters `model` (the model itself when only its forward
        is called; the VAE's encoder, decoder and their 1x1 convolutions, which encode() and decode() call)."""
        model.to("cpu")
        for entry in entries:
            entry.register_forward_pre_hook(functools.partial(self._bring, model), with_kwargs=True)

    def _bring(self, model: nn.Module, entry: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.current is not model:
            if self.current is not None:
                self.current.to("cpu")
            model.to(self.device)
            self.current = model

        def move(x):
            return x.to(self.device) if isinstance(x, torch.Tensor) else x
        return tree_map(move, args), tree_map(move, kwargs)
