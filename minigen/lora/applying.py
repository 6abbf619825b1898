"""A LoRA file's layers on a model: each `formats.LayerDelta` either as an adapter that comes off again (plain LoRA
and LoCon on the fly, the other kinds merged with the original weight kept aside) or added into the weight for good
(what `sample.py` does, as ComfyUI and A1111 patch a model)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .formats import LayerDelta
from .products import Scratch
from .layers import LoRAAdapter, LoRALayer, LoRATensors, add_changes, bias_with_changes, wrap_layer


class DeltaAdapter(nn.Module):
    """A layer of a LoRA file of any format (`LayerDelta`), read-only: the change it makes to the base layer's
    weight and bias at a multiplier. It is meant to be merged (`add_lora_deltas` does): unmerged, every forward
    recomputes the whole change."""

    def __init__(self, layer: LayerDelta):
        super().__init__()
        self.layer = layer

    def output(self, x: torch.Tensor, multiplier: float, layer: LoRALayer) -> torch.Tensor:
        base = layer.base
        w = layer.original_weight if layer.original_weight is not None else base.weight  # W without merged adapters
        delta, bias = self.delta_weight(w, multiplier).to(x.dtype), self.delta_bias(multiplier)
        bias = None if bias is None else bias.to(x.dtype)
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, delta, bias, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, delta, bias)

    @property
    def row_step(self) -> int | None:
        return self.layer.row_step

    def delta_weight(self, weight: torch.Tensor, multiplier: float, rows: slice | None = None) -> torch.Tensor:
        return (self.layer if rows is None else self.layer.rows(rows)).delta(weight, multiplier)

    def add_change(self, weight: torch.Tensor, multiplier: float, rows: slice | None, onto: torch.Tensor,
                   out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        """out = onto + the change to `weight` (W[rows], fp32) at `multiplier` (`add_changes`)."""
        layer = self.layer if rows is None else self.layer.rows(rows)
        return layer.add_change(weight, multiplier, onto, out, scratch)

    def delta_bias(self, multiplier: float) -> torch.Tensor | None:
        return self.layer.delta_bias(multiplier)


def add_lora_deltas(model: nn.Module, layers: dict[str, LayerDelta], name: str = "default",
                    multiplier: float = 1.0, removable: bool = True) -> None:
    """Apply a file's layers ({module path: LayerDelta}, any LoRA-family format) at `multiplier`.
    removable: as an adapter named `name` that `remove_lora` takes off exactly. Plain LoRA and LoCon layers (up ·
    down and nothing else) run on the fly as `LoRAAdapter`s: nothing of the weight's size in memory, two thin products
    per step. Every other kind's change is a whole weight (or needs W: DoRA), so it is computed once and merged, W kept
    aside: memory for a second copy of those weights.
    Not removable (sample.py, as ComfyUI and A1111 apply a LoRA): every layer's change is added into its weight in
    place, nothing kept and nothing left to compute per step; the model is changed for good."""
    scratch = Scratch()  # one set of buffers for every layer's blocks
    for path, layer in layers.items():
        if not removable:
            _bake(model.get_submodule(path), layer, multiplier, scratch)
            continue
        wrapped = wrap_layer(model, path)
        adapter = low_rank_adapter(wrapped.base, layer)
        wrapped.add(name, adapter or DeltaAdapter(layer), multiplier)
        if adapter is None:
            wrapped.merge([name])


def _bake(module: nn.Module, layer: LayerDelta, multiplier: float, scratch: Scratch) -> None:
    """Add `layer`'s change at `multiplier` into a Linear or Conv2d's weight and bias in place (a `LoRALayer`'s
    saved W when it has adapters merged: they are then computed again on the new W)."""
    adapter = DeltaAdapter(layer.float())  # converted once for the layer, not once per block of its rows
    kept = isinstance(module, LoRALayer) and module.original_weight is not None
    base = module.base if isinstance(module, LoRALayer) else module
    weight, bias = (module.original_weight, module.original_bias) if kept else (base.weight, base.bias)
    with torch.no_grad():
        new_bias = bias_with_changes(bias, [(adapter, multiplier)])  # first: a refused bias change changes nothing
        add_changes(weight, [(adapter, multiplier)], weight, scratch)
        if new_bias is not bias:
            bias.copy_(new_bias)
    if kept:
        module.rebuild_weight()


def low_rank_adapter(base: nn.Linear | nn.Conv2d, layer: LayerDelta) -> LoRAAdapter | None:
    """A plain LoRA/LoCon layer as a frozen `LoRAAdapter` on `base` (scale alpha / rank as the file's); None for
    anything else (Tucker, DoRA, other kinds) or a shape the adapter's down and up cannot hold."""
    t = layer.tensors
    if layer.kind != "LoRA" or set(t) - {"lora_down.weight", "lora_up.weight", "alpha"}:
        return None
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else (1, 1)
    if tuple(down.shape[2:]) not in ((), kernel) or tuple(up.shape[2:]) not in ((), (1, 1)) or \
            (isinstance(base, nn.Conv2d) and kernel != (1, 1) and down.dim() != 4):
        return None
    rank = down.shape[0]
    adapter = LoRAAdapter(base, rank, layer.scale * rank)
    adapter.set_tensors(LoRATensors(down, up, layer.scale * rank))
    return adapter.requires_grad_(False)
