"""The LoRA family's formats as one thing: a layer of a file is a `LayerDelta`, whose job is "the change to this
weight (and bias) at strength s". Every consumer (sampling, baking, merging LoRAs, the family check) asks it that.

The formats, with r the rank, α the layer's alpha (none stored: scale 1), c = α/r, W the layer's weight (out, in[, kh, kw]):

    LoRA / LoCon   ΔW = c · up · down, reshaped to W (Hu et al. 2021; kohya's LoCon: k x k down on convolutions)
      Tucker       ΔW = c · mid ×₁ up ×₂ down, mid (r, r, kh, kw) (LyCORIS' `use_tucker`)
    LoHa           ΔW = c · (w1a · w1b) ⊙ (w2a · w2b), r = w1b's rows (Hyeon-Woo et al. 2022, FedPara); + Tucker t1, t2
    LoKr           ΔW = c · kron(w1, w2), each factor whole or a low-rank pair; r from the factored side, both
                   whole: c = 1 (Yeh et al. 2024, LyCORIS); + Tucker t2 on w2
    full           ΔW = diff, Δb = diff_b (LyCORIS' full fine-tune difference)
    GLoRA          ΔW = c · (W · a1 · a2 + b1 · b2) (Chavan et al. 2023, "One-for-All")
    DoRA           a `dora_scale` m beside any of them (Liu et al. 2024): W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per
                   output row when m is (out, 1, ...), per input column when m is (1, in, ...); at strength s the
                   weight is W + s · (W' − W), as ComfyUI interpolates (LyCORIS trains at s = 1)
    peft DoRA      diffusers/peft `lora_magnitude_vector` m (out,): W'(s) = m · (W + s·c·B·A) / ‖W + s·c·B·A‖ (rows),
                   as diffusers' `fuse_lora(lora_scale=s)` computes it: s scales B·A before the normalisation

Tensors are kept as the file stores them (any float dtype); deltas are computed in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .products import Scratch, bf16_arithmetic

# The tensors each kind reads, by the suffix after the layer's name in kohya/LyCORIS files: (required, optional).
# peft's `lora_A.weight` / `lora_B.weight` are read as lora_down / lora_up, its `lora_magnitude_vector` as magnitude.
KINDS = {
    "LoRA": ({"lora_down.weight", "lora_up.weight"}, {"lora_mid.weight", "alpha", "dora_scale", "magnitude"}),
    "LoHa": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2", "alpha", "dora_scale"}),
    "LoKr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
                     "dora_scale"}),
    "full": ({"diff"}, {"diff_b"}),
    "GLoRA": ({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}, {"bm.weight", "alpha", "dora_scale"}),
}
SUFFIXES = frozenset(s for required, optional in KINDS.values() for s in required | optional)
# What tells the kinds apart, tried in order
MARKERS = (("diff", "full"), ("a1.weight", "GLoRA"), ("hada_w1_a", "LoHa"), ("lokr_", "LoKr"),
           ("lora_down.weight", "LoRA"))
# The order of the per-file summary (`--lora` prints one line per file); LoCon is LoRA on a k x k convolution.
SUMMARY_KINDS = ("LoRA", "LoCon", "LoHa", "LoKr", "full", "GLoRA", "DoRA")


class LayerFormatError(ValueError):
    """A layer whose tensors fit no LoRA-family format (missing or unknown parts, shapes that do not chain)."""


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (n, k[, 1, 1]) @ b (k, ...) flattened: (n, prod(b.shape[1:])), into `out` when given."""
    return torch.mm(a.float().flatten(1), b.float().flatten(1), out=out)


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """core (r, r, kh, kw) with up (out, r) on its first mode and down (r, in) on its second: (out, in, kh, kw)."""
    return torch.einsum("ij...,oi,jn->on...", core.float(), up.float().flatten(1), down.float().flatten(1))


@dataclass
class LayerDelta:
    """One layer of a LoRA-family file: its kind and its tensors, keyed by their file suffixes (KINDS).
    `bf16_values`: the factors hold bf16 values exactly (stored in bf16, then made fp32 by `float`)."""
    kind: str
    tensors: dict[str, torch.Tensor]
    bf16_values: bool = False

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LayerDelta":
        """Tell the kind from the parts present; a part no format has, a missing one, or a mix of formats is a
        LayerFormatError naming it."""
        unknown = sorted(set(tensors) - SUFFIXES)
        if unknown:
            raise LayerFormatError(f"unknown parts {unknown}")
        kind = next((k for marker, k in MARKERS if any(s.startswith(marker) for s in tensors)), None)
        if kind is None:
            raise LayerFormatError(f"only {sorted(tensors)}: no weights of a known LoRA format")
        required, optional = KINDS[kind]
        missing, foreign = required - set(tensors), set(tensors) - required - optional
        if kind == "LoKr":
            missing = {p for p in ("w1", "w2") if f"lokr_{p}" not in tensors
                       and not {f"lokr_{p}_a", f"lokr_{p}_b"} <= set(tensors)}
        if missing or foreign:
            raise LayerFormatError(f"a {kind} layer " + (f"without {sorted(missing)}" if missing else
                                                         f"with parts of another format {sorted(foreign)}"))
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise LayerFormatError("a LoHa layer with only one of its Tucker cores hada_t1, hada_t2")
        layer = cls(kind, dict(tensors))
        if layer.alpha_tensor is not None and layer.alpha_tensor.numel() != 1:
            raise LayerFormatError(f"{layer.alpha_tensor.numel()} alphas, not one")
        for (a, i), (b, j) in layer._chained_axes():
            if tensors[a].dim() <= i or tensors[b].dim() <= j or tensors[a].shape[i] != tensors[b].shape[j]:
                raise LayerFormatError(f"its ranks differ: {a} {tuple(tensors[a].shape)} and {b} "
                                       f"{tuple(tensors[b].shape)} do not chain")
        return layer

    def _chained_axes(self) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        """The pairs of (part, axis) that must be one size, the rank between two factors."""
        t = self.tensors
        if self.kind == "LoRA":
            pairs = [(("lora_up.weight", 1), ("lora_down.weight", 0))]
            if "lora_mid.weight" in t:
                pairs += [(("lora_mid.weight", 0), ("lora_up.weight", 1)),
                          (("lora_mid.weight", 1), ("lora_down.weight", 0))]
            return pairs
        if self.kind == "LoHa":
            if "hada_t1" in t:  # w?_a (r, out), w?_b (r, in)
                return [((f"hada_t{n}", 0), (f"hada_w{n}_a", 0)) for n in (1, 2)] + \
                       [((f"hada_t{n}", 1), (f"hada_w{n}_b", 0)) for n in (1, 2)]
            return [((f"hada_w{n}_a", 1), (f"hada_w{n}_b", 0)) for n in (1, 2)]
        if self.kind == "LoKr":
            pairs = [(("lokr_w1_a", 1), ("lokr_w1_b", 0))] if "lokr_w1_a" in t else []
            if "lokr_t2" in t:  # w2_a (r, b), w2_b (r, d)
                pairs += [(("lokr_t2", 0), ("lokr_w2_a", 0)), (("lokr_t2", 1), ("lokr_w2_b", 0))]
            elif "lokr_w2_a" in t:
                pairs.append((("lokr_w2_a", 1), ("lokr_w2_b", 0)))
            return pairs
        if self.kind == "GLoRA":
            return [(("a1.weight", 1), ("a2.weight", 0)), (("b1.weight", 1), ("b2.weight", 0))]
        return []

    # ------------------------------------------------------------------------------------------ what it is
    @property
    def alpha_tensor(self) -> torch.Tensor | None:
        return self.tensors.get("alpha")

    @property
    def summary_kind(self) -> str:
        """LoRA, or LoCon for a LoRA with a k x k (not 1 x 1) down or a Tucker core; else the kind."""
        t = self.tensors
        if self.kind == "LoRA" and ("lora_mid.weight" in t or math.prod(t["lora_down.weight"].shape[2:]) > 1):
            return "LoCon"
        return self.kind

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors or "magnitude" in self.tensors

    @property
    def needs_weight(self) -> bool:
        """Whether the change depends on the weight it applies to (DoRA, GLoRA): no delta without the base model."""
        return self.dora or self.kind == "GLoRA"

    @property
    def rank(self) -> int | None:
        """The rank that divides alpha: LoRA's down rows, LoHa's w1b rows, LoKr's factored side (w2's if both are),
        GLoRA's a2 rows; None where no side is low-rank (full; LoKr with both factors whole)."""
        t = self.tensors
        if self.kind == "LoRA":
            return t["lora_down.weight"].shape[0]
        if self.kind == "LoHa":
            return t["hada_w1_b"].shape[0]
        if self.kind == "LoKr":
            side = next((p for p in ("w2", "w1") if f"lokr_{p}_b" in t), None)
            return t[f"lokr_{side}_b"].shape[0] if side else None
        return t["a2.weight"].shape[0] if self.kind == "GLoRA" else None

    @property
    def scale(self) -> float:
        """c = alpha / rank; 1 with no alpha stored (sd-scripts: alpha = rank), or no low-rank side."""
        rank = self.rank
        if rank is None or self.alpha_tensor is None:
            return 1.0
        return float(self.alpha_tensor) / rank

    @property
    def row_step(self) -> int | None:
        """The output rows whose change can be computed alone, in blocks of a multiple of this (`rows`): 1, or
        LoKr's w2 rows (a block of kron(w1, w2)'s rows is a block of w1's rows times w2); None when each row needs
        the whole weight (DoRA normalised per input column)."""
        t = self.tensors
        if "dora_scale" in t and not self._dora_on_output(self.shape()[0]):
            return None
        if self.kind == "LoKr":
            if "lokr_w2" in t:
                return t["lokr_w2"].shape[0]
            return t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0]  # t2: w2_a (r, b); else w2_a (b, r)
        return 1

    def rows(self, block: slice) -> "LayerDelta":
        """This layer restricted to a block of the weight's output rows (a multiple of `row_step`): its `delta` of
        W[block] is the rows `block` of its delta of W. Only the factors on the output side are sliced (views, no
        copies); the bias part is dropped (it is small: `delta_bias` of the whole layer)."""
        t = dict(self.tensors)
        t.pop("diff_b", None)
        on_rows = {"LoRA": ("lora_up.weight",), "full": ("diff",), "GLoRA": ("b1.weight",),
                   "LoHa": ("hada_w1_a", "hada_w2_a")}.get(self.kind, ())
        for name in on_rows:
            axis = 1 if name.startswith("hada") and "hada_t1" in t else 0  # with Tucker cores, w?_a is (r, out)
            t[name] = t[name].narrow(axis, block.start, block.stop - block.start)
        if self.kind == "LoKr":  # the rows of w1 whose kron with w2 gives `block`
            step = self.row_step
            w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
            t[w1] = t[w1][block.start // step:block.stop // step]
        for name in ("dora_scale", "magnitude"):  # one value per output row (row_step says so for dora_scale)
            if name in t:
                t[name] = t[name][block]
        return LayerDelta(self.kind, t, self.bf16_values)

    def _dora_on_output(self, out_rows: int) -> bool:
        """Whether `dora_scale` holds one value per output row (else per input column)."""
        m = self.tensors["dora_scale"]
        return m.shape[0] == out_rows and m.numel() == out_rows

    def set_alpha(self, alpha: float) -> None:
        """The alpha a file gives outside the layer (peft's adapter metadata)."""
        self.tensors["alpha"] = torch.tensor(float(alpha))

    def shape(self) -> tuple[int, ...]:
        """The shape of the raw change before it is reshaped to W: (out, in[, kh, kw]) or (out, in * kh * kw)."""
        t = {k: v.shape for k, v in self.tensors.items()}
        if self.kind == "LoRA":
            down = t["lora_down.weight"]
            k = t["lora_mid.weight"][2:] if "lora_mid.weight" in t else down[2:]
            return (t["lora_up.weight"][0], down[1], *k)
        if self.kind == "LoHa":
            if "hada_t1" in t:
                return (t["hada_w1_a"][1], t["hada_w1_b"][1], *t["hada_t1"][2:])
            return (t["hada_w1_a"][0], math.prod(t["hada_w1_b"][1:]))
        if self.kind == "LoKr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
            if "lokr_w2" in t:
                w2 = tuple(t["lokr_w2"])
            elif "lokr_t2" in t:
                w2 = (t["lokr_w2_a"][1], t["lokr_w2_b"][1], *t["lokr_t2"][2:])
            else:
                w2 = (t["lokr_w2_a"][0], *t["lokr_w2_b"][1:])
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        if self.kind == "full":
            return tuple(t["diff"])
        b2 = t["b2.weight"]
        k = t["bm.weight"][2:] if "bm.weight" in t else b2[2:]
        return (t["b1.weight"][0], b2[1], *k)

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether the change has W's output rows and element count (it is then reshaped to W), a DoRA magnitude
        one value per output row or input column, and GLoRA's a1 W's input width."""
        shape, t = self.shape(), self.tensors
        magnitude = t.get("dora_scale", t.get("magnitude"))
        return (shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)
                and (magnitude is None or magnitude.numel() in weight_shape[:2])
                and ("a1.weight" not in t or t["a1.weight"].shape[0] == weight_shape[1]))

    # ------------------------------------------------------------------------------------------ the math
    def raw(self, weight: torch.Tensor | None = None, factor: float = 1.0) -> torch.Tensor:
        """factor · c · ΔW of the format (no DoRA), shaped like `weight` when given; a new fp32 tensor. GLoRA needs
        `weight`. The scalars go into the smallest factor: one pass over the whole-weight-sized result, not three."""
        t, f = self._on(weight), factor * self.scale
        if self.kind == "LoRA":
            up, down = t["lora_up.weight"].float() * f, t["lora_down.weight"]  # (out, r[, 1, 1]), (r, in[, kh, kw])
            if "lora_mid.weight" in t:  # down (r, in, 1, 1), mid (r, r, kh, kw)
                delta = _tucker(t["lora_mid.weight"], up, down)
            else:
                delta = _mm(up, down)  # (out, in * kh * kw)
        elif self.kind == "LoHa":
            if "hada_t1" in t:  # w?_a (r, out), w?_b (r, in): cores between them
                delta = (_tucker(t["hada_t1"], t["hada_w1_a"].T.float() * f, t["hada_w1_b"])
                         * _tucker(t["hada_t2"], t["hada_w2_a"].T, t["hada_w2_b"]))
            else:  # w?_a (out, r), w?_b (r, in * kh * kw)
                delta = _mm(t["hada_w1_a"].float() * f, t["hada_w1_b"]) * _mm(t["hada_w2_a"], t["hada_w2_b"])
        elif self.kind == "LoKr":
            w1, w2 = self._kron_factors(t)
            delta = torch.kron(w1 * f, w2)
        elif self.kind == "full":
            delta = t["diff"].float() * f
        else:  # GLoRA: W (out, in, ...) times a1 (in, r) a2 (r, in) on the input axis, plus b1 (out, r) b2 (r, in, ...)
            if weight is None:
                raise ValueError("a GLoRA layer's change depends on the weight it applies to")
            a1, a2 = t["a1.weight"].float().flatten(1), t["a2.weight"].float().flatten(1) * f  # (in, r), (r, in)
            wa = torch.einsum("oi...,ir->or...", weight.float(), a1)  # (out, r[, kh, kw]): W·a1 first, never (in, in)
            delta = torch.einsum("or...,ri->oi...", wa, a2)
            b1 = t["b1.weight"].float() * f
            delta += (_tucker(t["bm.weight"], b1, t["b2.weight"]) if "bm.weight" in t
                      else _mm(b1, t["b2.weight"])).view(weight.shape)
        return delta.reshape(weight.shape) if weight is not None else delta.reshape(self.shape())

    def _add_raw(self, weight: torch.Tensor, factor: float, onto: torch.Tensor, out: torch.Tensor,
                 scratch: Scratch) -> torch.Tensor:
        """out = onto + factor · c · ΔW (no DoRA), fp32, shaped like `weight`. The kinds that are products of factors
        add them onto `onto` in one pass instead of forming ΔW first: LoRA/LoCon its product (in `scratch`) added,
        LoHa its two products multiplied in (addcmul), GLoRA on a Linear one product of [W·a1 | b1] and [a2; b2]
        added (addmm; not on bf16 arithmetic: W's values are not bf16)."""
        t, f = self._on(weight), factor * self.scale
        flat, into = onto.flatten(1), out.view(len(out), -1)  # (n, in * kh * kw)
        if self.kind == "LoRA" and "lora_mid.weight" not in t:  # up (n, r[, 1, 1]) @ down (r, in[, kh, kw])
            product = scratch.take("w1", into.shape, into.device)
            torch.add(flat, self._product(t["lora_up.weight"], t["lora_down.weight"], product), alpha=f, out=into)
        elif self.kind == "LoHa" and "hada_t1" not in t:  # (w1a · w1b) ⊙ (w2a · w2b)
            w1 = self._product(t["hada_w1_a"], t["hada_w1_b"], scratch.take("w1", into.shape, into.device))
            w2 = self._product(t["hada_w2_a"], t["hada_w2_b"], scratch.take("w2", into.shape, into.device))
            torch.addcmul(flat, w1, w2, value=f, out=into)
        elif self.kind == "GLoRA" and weight.dim() == 2 and "bm.weight" not in t:  # W·a1·a2 + b1·b2 as one product
            left = torch.cat([weight @ t["a1.weight"].float(), t["b1.weight"].float()], dim=1)  # (n, 2r)
            right = torch.cat([t["a2.weight"].float(), t["b2.weight"].float()])  # (2r, in)
            torch.addmm(flat, left, right, alpha=f, out=into)
        else:
            torch.add(onto, self.raw(weight, factor), out=out)
        return out

    def add_change(self, weight: torch.Tensor, strength: float, onto: torch.Tensor, out: torch.Tensor,
                   scratch: Scratch | None = None) -> torch.Tensor:
        """out = onto + the change to `weight` (out, in[, kh, kw]) at `strength`; all fp32, shaped like `weight`;
        `out` may be `onto` (also when that is `weight`: the change is formed before out is written). Intermediate
        products go into `scratch`'s buffers (reused block after block). Returns out."""
        scratch = scratch or Scratch()
        if not self.dora:
            return self._add_raw(weight, strength, onto, out, scratch)
        t, v = self._on(weight), scratch.take("dora", weight.shape, weight.device)
        if "magnitude" in t:  # peft DoRA: s scales c·B·A, then the rows are renormalised (diffusers' fuse_lora)
            directional = self._add_raw(weight, strength, weight, v, scratch)  # v = W + s·ΔW
            ratio, strength = dora_ratio(directional, t["magnitude"]), 1.0
        else:  # W + s · (W' − W), as ComfyUI interpolates
            directional = self._add_raw(weight, 1.0, weight, v, scratch)  # v = W + ΔW
            # Patch: ComfyUI divides output-axis DoRA by ‖W‖ instead of ‖W + ΔW‖; this is DoRA's definition (Liu et
            # al. 2024, eq. 5) and what LyCORIS trains.
            ratio = dora_ratio(directional, t["dora_scale"], self._dora_on_output(len(weight)))
        # out = onto + s · (ratio · v − W) in two passes, right also when out is onto and that is W itself
        torch.add(onto, weight, alpha=-strength, out=out)
        return out.addcmul_(directional, ratio, value=strength)

    def float(self) -> "LayerDelta":
        """This layer with its tensors in fp32, the precision its change is computed in (files mostly store bf16 or
        fp16): converted once, not for every block of rows. It remembers factors stored in bf16 (`_product`)."""
        bf16 = self.bf16_values or all(v.dtype == torch.bfloat16 for v in self.tensors.values() if v.dim() >= 2)
        return LayerDelta(self.kind, {k: v.float() for k, v in self.tensors.items()}, bf16)

    def _product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Two of the layer's factors multiplied, a (n, r[, 1, 1]) @ b (r, ...) flattened into `out` (fp32): on the
        CPU's bf16 arithmetic when they hold bf16 values (`bf16_arithmetic`: the same numbers, faster)."""
        with bf16_arithmetic(self.bf16_values and out.device.type == "cpu"):
            return _mm(a, b, out)

    def _on(self, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tensors on `weight`'s device (a GPU model's), where the change is computed."""
        if weight is None:
            return self.tensors
        return {k: v.to(weight.device) for k, v in self.tensors.items()}

    def _kron_factors(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """LoKr's w1 (a, c[, 1, 1]) and w2 (b, d[, kh, kw]), rebuilt from their pairs where factored; fp32."""
        w1 = t["lokr_w1"].float() if "lokr_w1" in t else _mm(t["lokr_w1_a"], t["lokr_w1_b"])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].float()
        elif "lokr_t2" in t:  # w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)
            # Patch: torch 2.13's kron refuses the non-contiguous einsum result (ComfyUI logs the error and leaves
            # the layer unpatched); LyCORIS' forward makes it contiguous first, and so does this.
            w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"].T, t["lokr_w2_b"]).contiguous()
        else:  # w2_a (b, r), w2_b (r, d[, kh, kw])
            b2 = t["lokr_w2_b"]
            w2 = _mm(t["lokr_w2_a"], b2).view(-1, *b2.shape[1:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)  # (a, c, 1, 1): kron keeps w2's kernel
        return w1, w2

    def delta(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The change to `weight` (out, in[, kh, kw]) at `strength`: W(s) - W, fp32, shaped like `weight`."""
        if not self.dora:
            return self.raw(weight, strength)
        w = weight.float()
        change = torch.zeros_like(w)
        return self.add_change(w, strength, change, change)

    def delta_bias(self, strength: float = 1.0) -> torch.Tensor | None:
        """The change to the layer's bias at `strength` (full's diff_b), or None."""
        b = self.tensors.get("diff_b")
        return None if b is None else b.float() * strength


def dora_ratio(v: torch.Tensor, magnitude: torch.Tensor, output_axis: bool = True) -> torch.Tensor:
    """magnitude / ‖v‖, shaped to multiply v (out, in[, kh, kw]): DoRA's weight is ratio · v (Liu et al. 2024, eq. 5),
    v the directional part W + ΔW, the norm per output row (over in, kh, kw; magnitude's out values in any shape)
    or per input column (over out, kh, kw). fp32."""
    axis = 0 if output_axis else 1
    norm = torch.linalg.vector_norm(v.float(), dim=tuple(d for d in range(v.dim()) if d != axis), keepdim=True)
    return magnitude.float().reshape(norm.shape) / norm


def decomposed(v: torch.Tensor, magnitude: torch.Tensor, output_axis: bool = True) -> torch.Tensor:
    """DoRA's weight magnitude · v / ‖v‖ (`dora_ratio`), a new fp32 tensor."""
    return v.float() * dora_ratio(v, magnitude, output_axis)
