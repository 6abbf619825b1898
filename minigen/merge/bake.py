"""Baking LoRAs into a checkpoint (`merge.py A --lora style.safetensors:0.8`): theta = A + the sum of each layer's
change at its file's ratio, for every format `minigen.lora.formats` reads (LoRA, LoCon, LoHa, LoKr, DoRA, full,
GLoRA), streamed tensor by tensor through `checkpoints.py`'s writer."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..sd.checkpoint_files import (DiffusersFolder, TensorFile, open_checkpoint, open_output, output_metadata)
from ..io import FLOAT_DTYPES, CheckpointError
from ..lora.formats import LayerDelta
from ..sd.lora_files import LoRAFileError
from ..sd.lora_reading import check_lora_family, lora_summary, read_lora
from ..sd.convert import lora_targets
from ..sd.detect import detect_family, unet_names
from .checkpoints import MergeReport, Step, check_same_model, output_specs, stream_out


def lora_deltas(base: TensorFile | DiffusersFolder, loras: list[tuple[Path, float]], summaries: list[str]
                 ) -> dict[str, list[tuple[int | None, float, LayerDelta]]]:
    """{checkpoint key: [(third, ratio, layer)]} from the LoRA files: the weights their layers change and, for
    layers that change a bias (full's diff_b), the bias beside it. Appends each file's summary to `summaries`."""
    keys, shapes = base.keys(), {k: base.shape(k) for k in base.keys()}
    try:
        targets = lora_targets(keys, unet_names(shapes, base.metadata, str(base.path)))  # SGM and diffusers names
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    family = detect_family(keys)
    deltas: dict[str, list] = {}
    for path, ratio in loras:
        parsed, layout, metadata = read_lora(path)
        check_lora_family(parsed, metadata, family, str(path))
        summaries.append(f"{path}: {lora_summary(parsed, layout, metadata)}")
        unmatched = [f"{c}:{n}" for c, layers in parsed.items() for n in layers if (c, n) not in targets]
        if unmatched:
            raise LoRAFileError(f"{path}: {len(unmatched)} layers match no tensor of the checkpoint, e.g. "
                                f"{unmatched[:3]} (a LoRA for another model?)")
        for component, layers in parsed.items():
            for name, layer in layers.items():
                key, third = targets[(component, name)]
                shape = shapes[key] if third is None else (shapes[key][0] // 3, *shapes[key][1:])
                if not layer.fits(shape):
                    raise LoRAFileError(f"{path}: {component} layer {name}'s {layer.kind} changes {layer.shape()}, "
                                        f"but {key} is {shapes[key]} (a LoRA for another model?)")
                deltas.setdefault(key, []).append((third, ratio, layer))
                if layer.delta_bias() is not None:
                    bias = key.removesuffix("weight") + "bias"  # `.weight` -> `.bias`, `in_proj_weight` -> `in_proj_bias`
                    if bias not in shapes or math.prod(shapes[bias]) != shapes[key][0]:
                        raise LoRAFileError(f"{path}: {component} layer {name} changes a bias, but {key} has no bias "
                                            f"of {shape[0]} values beside it")
                    deltas.setdefault(bias, []).append((third, ratio, layer))
    return deltas


def apply_deltas(key: str, w: torch.Tensor, deltas: list[tuple[int | None, float, LayerDelta]]) -> torch.Tensor:
    """w (fp32) with the changes of `deltas` added, each computed on the original w (so that stacked DoRA files bake
    as `sample.py` applies them) and on its third of the rows where q, k and v share one tensor."""
    original = w.clone()
    for third, ratio, layer in deltas:
        rows, w0 = (w, original) if third is None else (w.view(3, -1, *w.shape[1:])[third],
                                                       original.view(3, -1, *w.shape[1:])[third])
        rows += layer.delta_bias(ratio) if key.endswith("bias") else layer.delta(w0, ratio)
    return w


def bake_loras(checkpoint: str | os.PathLike, loras: list[tuple[str | os.PathLike, float]],
               out: str | os.PathLike, dtype: str | None = None, progress: bool = True,
               output_format: str | None = None, allow_pickle: bool = False) -> MergeReport:
    """Write `checkpoint` with LoRAs folded in: W + the sum of each layer's change at its file's ratio, tensor by
    tensor (`minigen.lora.formats`: LoRA, LoCon, LoHa, LoKr, DoRA, full, GLoRA).

    loras: [(LoRA file, ratio)], any layout `minigen.sd.lora_reading` reads (kohya, LyCORIS, diffusers/peft).
    output_format, allow_pickle: as for `merge_checkpoints`.
    """
    loras = [(Path(p), float(r)) for p, r in loras]
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"unknown output dtype {dtype!r}; choose from {sorted(FLOAT_DTYPES)}")
    for path, ratio in loras:
        if not math.isfinite(ratio):
            raise ValueError(f"{path}: the LoRA's ratio must be a finite number, got {ratio}")
    base = open_checkpoint(checkpoint, allow_pickle)
    try:
        check_same_model([base])
        report = MergeReport()
        deltas = lora_deltas(base, loras, report.lora_summaries)
        steps = [Step(k, [(base, k)]) for k in base.keys()]
        specs = output_specs(steps, dtype)

        def produce(step: Step, dtype: torch.dtype) -> torch.Tensor:
            w = base.get(step.key)
            if step.key not in deltas:
                report.copied += 1
                return w.to(dtype)
            report.merged += 1
            return apply_deltas(step.key, w.float(), deltas[step.key]).to(dtype)

        inputs = {"A": Path(checkpoint)} | {f"LoRA{i}": p for i, (p, _) in enumerate(loras)}
        recipe = {"type": "minigen", "method": "bake_lora", "loras": [[p.name, r] for p, r in loras], "dtype": dtype}
        out = Path(out)
        report.output_bytes = stream_out(out, open_output(out, output_format, base), inputs,
                                          output_metadata(base), recipe, specs, steps, produce, progress)
        return report
    finally:
        base.close()
