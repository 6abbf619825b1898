"""LoRA: low-rank adapters added to frozen Linear and Conv2d layers, found by module-name patterns.

A LoRA adapter on a layer with weight W (out, in) learns `down` (rank, in) and `up` (out, rank) and changes the
layer's output by `multiplier * scale * up(down(x))`, scale = alpha / rank (Hu et al. 2021, "LoRA"; kohya's alpha).
Merged, the layer's weight is `W + multiplier * scale * up @ down`. On a k x k convolution (LoCon, kohya's conv_dim)
down is a k x k convolution of the layer's stride and padding (rank, in, k, k) and up a 1 x 1 one (out, rank, 1, 1).
With `dora` (DoRA, Liu et al. 2024, as peft's `use_dora` computes it) the adapter also learns a magnitude m per
output channel, started at W's row norms, and the layer's weight is m · (W + scale · up @ down) / ‖W + scale · up @ down‖.

- `add_lora(model, targets, rank, alpha)` wraps every matching layer in a `LoRALayer` and returns the wrapped names.
  Several adapters, each under its own name and multiplier, can sit on one layer (`sample.py --lora a:0.8 --lora b:0.5`).
- `merge_lora` folds the adapters into the base weights (fast inference); `unmerge_lora` restores the exact original
  weights, which are kept aside on merge (recomputing W from a sum of rounded deltas would not be exact).
- `remove_lora` puts the plain layers back. `lora_parameters` / `lora_weights` give only the adapters' tensors.
- `add_changes` fuses changes into a weight a block of output rows at a time, so the CPU reads each weight once and
  writes it once. A LoRA file's layers of any format (`formats.py`) go on a model through `applying.py`; the file
  names of SD's layers live in `sd/lora_files.py` and `sd/lora_reading.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .formats import decomposed
from .products import Scratch

# Module-name patterns (regular expressions searched in the full module path). The names are diffusers' UNet and
# transformers' CLIP names, which minigen's SDXL modules share.
UNET_ATTENTION = (r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",)  # what the seeds train
# kohya's sd-scripts wraps every Linear inside a Transformer2DModel: the attention, the feed-forward, proj_in/out.
UNET_KOHYA = UNET_ATTENTION + (r"attentions\.\d+\.(proj_in|proj_out)$",
                               r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
# sd-scripts' conv_dim (LoCon): the 3x3 convolutions of the resnets and of the down- and upsamplers
UNET_CONV = (r"resnets\.\d+\.(conv1|conv2)$", r"(downsamplers|upsamplers)\.0\.conv$")
TEXT_ENCODER_ATTENTION = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$",)
PRESETS = {"attention": UNET_ATTENTION, "kohya": UNET_KOHYA, "text": TEXT_ENCODER_ATTENTION, "conv": UNET_CONV}


@dataclass
class LoRATensors:
    """One adapter's weights as files store them: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), alpha, and
    DoRA's magnitude (out,) when trained with it."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class LoRAAdapter(nn.Module):
    """down -> up with scale alpha/rank. Input dropout as peft's `lora_dropout` (kohya's `dropout` acts on down's
    output instead; input dropout is what diffusers' SDXL LoRA example trains with)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, init: str = "kohya", dora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        # fp32 adapters on any base dtype: training keeps LoRA weights in fp32 under bf16/fp16 autocast. Made in
        # place on the base's device (also the meta device or fake tensors of a memory plan), never moved there.
        where = {"device": base.weight.device, "dtype": torch.float32, "bias": False}
        if isinstance(base, nn.Conv2d):  # down sees what the layer sees: its kernel, stride, padding and dilation
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  **where)
            self.up = nn.Conv2d(rank, base.out_channels, 1, **where)
        else:
            self.down = nn.Linear(base.in_features, rank, **where)
            self.up = nn.Linear(rank, base.out_features, **where)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)
        # DoRA's magnitude, started at W's norms per output channel (over in, kh, kw): the layer starts unchanged
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(base.weight.detach().float().flatten(1), dim=1)) \
            if dora else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, init: str) -> None:
        """kohya (and peft's default): down kaiming-uniform(a=sqrt(5)), up zeros. 'gaussian' (peft): down N(0, 1/rank).
        Either way up = 0, so a fresh adapter leaves the model's outputs unchanged."""
        if init == "kohya":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.down.weight, std=1 / self.rank)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'kohya' or 'gaussian'")
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype)
        return self.up(self.down(self.dropout(x))) * self.scale

    def output(self, x: torch.Tensor, multiplier: float, layer: "LoRALayer") -> torch.Tensor:
        """What the adapter adds to the layer's output at `multiplier` when not merged."""
        if self.magnitude is None:
            return multiplier * self(x)
        # DoRA as peft's forward: the base output and the low-rank path, both rescaled per output channel by
        # m / ‖W + ΔW‖, that norm detached from the gradient (Liu et al. 2024, section 4.3)
        w = layer.original_weight if layer.original_weight is not None else layer.base.weight
        with torch.no_grad():
            norm = torch.linalg.vector_norm((w.float() + self.low_rank_delta()).flatten(1), dim=1)  # (out,)
        s = self.magnitude / norm  # (out,)
        s = s.view(1, -1, 1, 1) if isinstance(layer.base, nn.Conv2d) else s  # the output's channel axis
        base = layer.base(x)
        if layer.base.bias is not None:
            base = base - (layer.base.bias.view(1, -1, 1, 1) if isinstance(layer.base, nn.Conv2d) else layer.base.bias)
        return multiplier * ((s - 1) * base + s * self(x))

    row_step = 1  # any block of output rows has its own change (`add_changes`)

    def add_change(self, weight: torch.Tensor, multiplier: float, rows: slice | None, onto: torch.Tensor,
                   out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        """out = onto + the change to `weight` (W[rows], fp32) at `multiplier`, all fp32 (`add_changes`); without
        DoRA as one matrix product added onto `onto` (addmm): a third less time than forming the change and adding it."""
        if self.magnitude is not None:
            return torch.add(onto, self.delta_weight(weight, multiplier, rows), out=out)
        up, down = self._scaled_factors(multiplier * self.scale, rows)  # (n, r), (r, in * kh * kw)
        return torch.addmm(onto.flatten(1), up, down, out=out.view(len(out), -1)).view(out.shape)

    def _scaled_factors(self, scale: float, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * up[rows] (out, r), down (r, in * kh * kw)), flattened."""
        return scale * self.up.weight.flatten(1)[rows or slice(None)], self.down.weight.flatten(1)

    def low_rank_delta(self, rows: slice | None = None) -> torch.Tensor:
        """scale * up @ down (of up's `rows`), shaped like the base weight (out, in) or (out, in, kh, kw); fp32."""
        up, down = self._scaled_factors(self.scale, rows)
        return (up @ down).view(up.shape[0], *self.down.weight.shape[1:])

    def delta_weight(self, weight: torch.Tensor, multiplier: float, rows: slice | None = None) -> torch.Tensor:
        """The change to `weight` at `multiplier`: multiplier * scale * up @ down, or with DoRA multiplier times
        (m · (W + ΔW) / ‖W + ΔW‖ - W); fp32. With `rows`, `weight` is W[rows] and the change is those rows'."""
        delta = self.low_rank_delta(rows)
        if self.magnitude is not None:
            delta = decomposed(weight.float() + delta, self.magnitude[rows or slice(None)]) - weight.float()
        return multiplier * delta

    def delta_bias(self, multiplier: float) -> None:
        return None

    def get_tensors(self) -> LoRATensors:
        magnitude = None if self.magnitude is None else self.magnitude.detach()
        return LoRATensors(self.down.weight.detach(), self.up.weight.detach(), self.alpha, magnitude)

    def set_tensors(self, t: LoRATensors) -> None:
        with torch.no_grad():
            self.down.weight.copy_(t.down.reshape(self.down.weight.shape))
            self.up.weight.copy_(t.up.reshape(self.up.weight.shape))
            if self.magnitude is not None:
                self.magnitude.copy_(t.magnitude.reshape(self.magnitude.shape))
        self.alpha = float(t.alpha)


class LoRALayer(nn.Module):
    """A frozen base layer plus named adapters, each with its own multiplier; output = base(x) + what each unmerged
    adapter adds at its multiplier (`output`); merged adapters are in base.weight (and base.bias)."""

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.multipliers: dict[str, float] = {}
        self.merged: list[str] = []  # adapters folded into base.weight
        self.original_weight: torch.Tensor | None = None  # base.weight before the first merge
        self.original_bias: torch.Tensor | None = None  # base.bias before the first merge (when it has one)

    @property
    def weight(self) -> nn.Parameter:
        """The base layer's weight (with merged adapters in it): code that reads a layer's weight reads this one."""
        return self.base.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, adapter in self.adapters.items():
            m = self.multipliers[name]
            if m != 0 and name not in self.merged:
                y = y + adapter.output(x, m, self).to(y.dtype)
        return y

    def add(self, name: str, adapter: nn.Module, multiplier: float = 1.0) -> None:
        if name in self.adapters:
            raise ValueError(f"this layer already has a LoRA named {name!r}; remove it first or pick another name")
        self.adapters[name] = adapter
        self.multipliers[name] = float(multiplier)

    def merge(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        if self.original_weight is None:  # kept as they are, not copied: the merged weight is a new tensor
            self.original_weight = self.base.weight.data
            self.original_bias = None if self.base.bias is None else self.base.bias.data
        self.merged = sorted(set(self.merged) | set(names))
        self.rebuild_weight()

    def unmerge(self, names: Iterable[str]) -> None:
        drop = set(names)
        self.merged = [n for n in self.merged if n not in drop]
        self.rebuild_weight()

    def rebuild_weight(self) -> None:
        """base.weight = W + sum over merged adapters of their change at their multiplier (each computed on the
        saved W: exact and order-free; the bias likewise where an adapter changes it), a new tensor; with none
        merged, the saved W itself again."""
        if self.original_weight is None:
            return
        changes = [(self.adapters[name], self.multipliers[name]) for name in self.merged]
        with torch.no_grad():
            bias = bias_with_changes(self.original_bias, changes)  # first: a refused bias change changes nothing
            w0 = self.original_weight
            self.base.weight.data = add_changes(w0, changes, torch.empty_like(w0)) if changes else w0
            if bias is not None:
                self.base.bias.data = bias
        if not self.merged:
            self.original_weight = self.original_bias = None


# fp32 values in one block of output rows that `add_changes` computes at a time on the CPU (4 MiB): the block and
# its change's products stay in the cache (L3), and each matrix product is large enough for two threads. Measured on
# the 2-core AMD EPYC, a LoHa block of a 1280-wide weight at two threads: 0.47 ns a weight value (0.62 with 1 MiB
# blocks, 0.53 with 8 MiB ones); at one thread all three sizes take ~0.8 ns.
BLOCK_VALUES = 1 << 20


def add_changes(weight: torch.Tensor, changes: list[tuple[nn.Module, float]], out: torch.Tensor,
                scratch: Scratch | None = None) -> torch.Tensor:
    """out = weight + the sum of each adapter's change at its multiplier (`changes`: [(adapter, multiplier)]),
    each computed on `weight`, summed in fp32 and rounded to out's dtype once. On the CPU a block of output rows at a
    time (a multiple of every adapter's `row_step`): the block's fp32 values stay in the cache, so W is read once and
    `out` written once, not a whole-weight pass per operation. Each adapter adds its change onto the running sum
    (`add_change`: plain LoRA as a matrix product added, LoHa's products multiplied in, ...), its intermediate
    products in `scratch` (pass one to reuse its buffers across weights). `out` may be `weight` itself. Returns `out`."""
    scratch = scratch or Scratch()
    rows = step = weight.shape[0]
    steps = [adapter.row_step for adapter, _ in changes]
    if weight.device.type == "cpu" and None not in steps:  # a GPU's kernels are fastest on the whole weight
        unit = math.lcm(*steps)
        step = max(unit, BLOCK_VALUES // max(1, weight[0].numel()) // unit * unit)
    in_place = out is weight
    for start in range(0, rows, step):
        block = slice(start, min(start + step, rows))
        w, target = weight[block], out[block]
        # the sum is formed in out's rows when they are fp32 and contiguous, else in a scratch block rounded once
        fp32 = target.dtype == torch.float32 and target.is_contiguous()
        total = target if fp32 else scratch.take("total", w.shape, w.device)
        base = w  # W's rows in fp32: every change is computed on them (a copy when the first change overwrites them)
        if w.dtype != torch.float32 or (in_place and len(changes) > 1 and fp32):
            base = scratch.take("base", w.shape, w.device).copy_(w)
        for i, (adapter, multiplier) in enumerate(changes):
            adapter.add_change(base, multiplier, block if step < rows else None, base if i == 0 else total, total,
                               scratch)
        if total is not target:
            target.copy_(total)
    return out


def bias_with_changes(bias: torch.Tensor | None, changes: list[tuple[nn.Module, float]]) -> torch.Tensor | None:
    """bias + the changes of the adapters that have one (full's diff_b), summed in fp32; `bias` itself if none. A
    change to a layer without a bias is a ValueError."""
    deltas = [d for adapter, m in changes if (d := adapter.delta_bias(m)) is not None]
    if not deltas:
        return bias
    if bias is None:
        raise ValueError("a LoRA changes the bias of a layer that has none")
    return sum((d.to(bias.device) for d in deltas), bias.float()).to(bias.dtype)


def _lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def matching_modules(model: nn.Module, targets: str | Iterable[str]) -> dict[str, nn.Module]:
    """Linear and Conv2d layers (ungrouped; or LoRALayers already wrapping one) whose module path matches any
    pattern."""
    patterns = [re.compile(t) for t in (PRESETS.get(targets, (targets,)) if isinstance(targets, str) else targets)]
    wrapped = tuple(path + "." for path in _lora_layers(model))
    found = {}
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):  # the base and adapters inside a LoRALayer
            continue
        layer = module.base if isinstance(module, LoRALayer) else module
        is_target = isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)
        if is_target and any(p.search(name) for p in patterns):
            found[name] = module
    return found


def wrap_layer(model: nn.Module, name: str) -> LoRALayer:
    module = model.get_submodule(name)
    if isinstance(module, LoRALayer):
        return module
    parent_name, _, child = name.rpartition(".")
    layer = LoRALayer(module)
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def add_lora(model: nn.Module, targets: str | Iterable[str] = "attention", rank: int = 4,
             alpha: float | None = None, name: str = "default", multiplier: float = 1.0,
             dropout: float = 0.0, init: str = "kohya", dora: bool = False) -> list[str]:
    """Freeze `model`'s own weights and add a trainable adapter named `name` to every layer matching `targets` (a preset name in
    PRESETS or regular expressions). Returns the wrapped module paths; none matching is an error."""
    found = matching_modules(model, targets)
    if not found:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} matches {targets!r}")
    taken = [path for path, m in found.items() if isinstance(m, LoRALayer) and name in m.adapters]
    if taken:  # checked up front so that a refused call changes nothing
        raise ValueError(f"{len(taken)} layers already have a LoRA named {name!r}, e.g. {taken[:3]}")
    adapters = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():  # freeze the base model; adapters added before keep their own setting
        if id(p) not in adapters:
            p.requires_grad_(False)
    for path, module in found.items():
        base = module.base if isinstance(module, LoRALayer) else module
        wrap_layer(model, path).add(name, LoRAAdapter(base, rank, alpha, dropout, init, dora), multiplier)
    return sorted(found)


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapters' parameters (all adapters, or the one named), for the optimizer."""
    return [p for layer in _lora_layers(model).values() for n, a in layer.adapters.items()
            if name is None or n == name for p in a.parameters()]


def lora_weights(model: nn.Module, name: str = "default") -> dict[str, LoRATensors]:
    """{module path: LoRATensors} of the adapter named `name`: what a LoRA file stores."""
    return {path: layer.adapters[name].get_tensors() for path, layer in _lora_layers(model).items()
            if name in layer.adapters}


def lora_names(model: nn.Module) -> list[str]:
    return sorted({n for layer in _lora_layers(model).values() for n in layer.adapters})


def set_multiplier(model: nn.Module, name: str, multiplier: float) -> None:
    for layer in _lora_layers(model).values():
        if name in layer.adapters:
            layer.multipliers[name] = float(multiplier)
            layer.rebuild_weight()


def merge_lora(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Fold adapters (default: all) into the base weights; their forward is then skipped."""
    for layer in _lora_layers(model).values():
        layer.merge(n for n in (layer.adapters if names is None else names) if n in layer.adapters)


def unmerge_lora(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Undo merge_lora: the base weights become exactly what they were (less any adapters still merged)."""
    for layer in _lora_layers(model).values():
        layer.unmerge(list(layer.merged if names is None else names))


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove the adapter named `name` (default: all). Merged adapters are unmerged first, so the base weights are
    the original ones; to keep an adapter baked in, copy the merged weights out before removing (merge.py does)."""
    for path, layer in _lora_layers(model).items():
        doomed = list(layer.adapters) if name is None else [n for n in layer.adapters if n == name]
        layer.unmerge(doomed)
        for n in doomed:
            del layer.adapters[n]
            del layer.multipliers[n]
        if not layer.adapters:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
