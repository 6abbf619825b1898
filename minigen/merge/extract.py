"""Writing LoRA files from weights: extracted from two checkpoints (a truncated SVD of tuned - base per layer, as
kohya's `extract_lora_from_models` does) or merged from several LoRAs (an SVD of their weighted sum).

Only layers a LoRA can hold are extracted: the 2-D weights of Linear layers and the 1 x 1 convolutions inside the
UNet's transformer blocks and the text encoders' attention and MLP layers (minigen's LoRA layout has no k x k
convolutions). Norms, biases and embeddings change with a fine-tune too, but no LoRA carries them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from ..io import CheckpointError, all_finite, save_safetensors
from ..sd.lora_files import LoRAFileError, kohya_layer, kohya_metadata, kohya_prefix
from ..sd.lora_reading import family_of_metadata, read_lora
from ..sd.checkpoint_files import check_output, open_checkpoint
from .checkpoints import check_same_model
from ..sd.convert import lora_targets
from ..sd.detect import detect_family, kohya_unet_names


def low_rank(delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out, r[, 1, 1]), down (r, in[, kh, kw]) with up @ down ~ delta (out, in[, kh, kw]): truncated SVD (Eckart-Young).

    As kohya's sd-scripts do, the singular values go into up, and both factors are clamped at the `clamp_quantile`
    of their entries' magnitudes: a few outliers otherwise dominate fp16 files, at the cost of a little accuracy
    (1.0 keeps the plain truncated SVD)."""
    matrix = delta.float().flatten(1)  # (out, in * kh * kw)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]  # (out, r), (r, in')
    if clamp_quantile < 1:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    up = up.reshape(-1, rank, *[1] * (delta.ndim - 2))  # convolutions store up as (out, r, 1, 1)
    return up.contiguous(), down.reshape(rank, *delta.shape[1:]).contiguous()


def is_lora_layer(component: str, name: str, shape: tuple[int, ...]) -> bool:
    """The layers kohya's LoRA wraps: the UNet's transformer blocks (attention, feed-forward, proj_in/out) and the
    text encoders' attention and MLP; of those only Linear weights (out, in) and 1 x 1 convolutions (out, in, 1, 1),
    not the norms in the same blocks."""
    if component == "unet":
        inside = "transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
    else:
        inside = ".encoder.layers." in name
    return inside and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)))


def _lora_bytes(shapes: list[tuple[int, ...]], rank: int) -> int:
    """A bound on the size of a fp32 LoRA of `rank` on layers of these shapes (up, down, alpha), plus a header."""
    return sum(4 * (rank * (shape[0] + math.prod(shape[1:])) + 1) for shape in shapes) + (1 << 20)


def _layer(component: str, name: str, up: torch.Tensor, down: torch.Tensor, family: str) -> dict[str, torch.Tensor]:
    """One layer's kohya keys; alpha = rank (scale 1)."""
    return kohya_layer(kohya_prefix(component, family), name, up, down, alpha=down.shape[0])


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, rank: int = 32,
                 clamp_quantile: float = 0.99, min_diff: float = 0.0, progress: bool = True,
                 allow_pickle: bool = False) -> int:
    """Write a kohya LoRA of `rank` approximating tuned - base layer by layer; returns the number of layers.

    Layers whose largest |difference| is at most `min_diff` are left out. alpha = rank (scale 1)."""
    out = Path(out)
    a = open_checkpoint(base, allow_pickle)
    try:
        b = open_checkpoint(tuned, allow_pickle)
    except BaseException:
        a.close()
        raise
    try:
        check_same_model([a, b])
        targets = {(c, n): (key, third) for (c, n), (key, third) in lora_targets(a.keys()).items()
                   if "." in n and is_lora_layer(c, n, a.shape(key))}  # dotted SGM names only: each layer once
        check_output(out, [Path(base), Path(tuned)], _lora_bytes([a.shape(k) for k, _ in targets.values()], rank))
        family = detect_family(a.keys())
        # SD 1.x/2.x LoRAs name UNet layers by diffusers paths, as sd-scripts writes them
        unet_names = kohya_unet_names({k: a.shape(k) for k in a.keys()}, a.metadata, str(base))
        tensors = {}
        for (component, name), (key, third) in tqdm(targets.items(), desc="extract", disable=not progress):
            if key not in b.header or b.shape(key) != a.shape(key):
                raise CheckpointError(f"{tuned} has no tensor {key} of shape {a.shape(key)}: not a fine-tune of {base}")
            diff = b.get(key).float() - a.get(key).float()  # (out, in[, 1, 1])
            if third is not None:
                diff = diff.view(3, -1, *diff.shape[1:])[third]  # bigG's q, k or v rows of the fused in_proj
            if diff.abs().max() > min_diff:
                if component == "unet" and unet_names is not None:
                    name = unet_names.to_diffusers(name)
                tensors |= _layer(component, name, *low_rank(diff, rank, clamp_quantile), family=family)
        if not tensors:
            raise ValueError(f"{base} and {tuned} do not differ on any LoRA layer (by more than {min_diff}): "
                             f"there is no LoRA to extract")
        extracted = {"minigen.extracted_from": json.dumps({"base": Path(base).name, "tuned": Path(tuned).name})}
        save_safetensors(tensors, out, kohya_metadata(base_model=Path(base).name, rank=rank, alpha=rank,
                                                      title=out.stem, model=family, extra=extracted))
        return len(tensors) // 3
    finally:
        a.close()
        b.close()


def merge_loras(loras: list[tuple[str | os.PathLike, float]], out: str | os.PathLike, rank: int,
                clamp_quantile: float = 0.99) -> int:
    """Write one kohya LoRA of `rank` from the sum of ratio * ΔW of several, layer by layer (re-factorised by SVD;
    any format whose ΔW does not depend on the model: LoRA, LoCon, LoHa, LoKr, full); returns the number of layers.
    The files must name layers the same way."""
    loras = [(Path(p), float(r)) for p, r in loras]
    check_output(Path(out), [p for p, _ in loras], sum(p.stat().st_size for p, _ in loras) + (1 << 20))
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    families = []  # the families the inputs' metadata names: the output says the first one's
    for path, ratio in loras:
        if not math.isfinite(ratio):
            raise ValueError(f"{path}: the LoRA's ratio must be a finite number, got {ratio}")
        parsed, fmt, metadata = read_lora(path)
        families.append(family_of_metadata(metadata))
        if fmt != "kohya":
            raise LoRAFileError(f"{path}: merging LoRAs needs kohya files (got {fmt})")
        for component, layers in parsed.items():
            for name, layer in layers.items():
                if layer.needs_weight or layer.delta_bias() is not None:
                    what = "depends on the model's weights" if layer.needs_weight else "includes a bias"
                    raise LoRAFileError(f"{path}: layer {name} is {'DoRA' if layer.dora else layer.kind}, whose change "
                                        f"{what}, which a LoRA cannot hold: bake it into a checkpoint (merge.py A "
                                        "--lora) and extract from that instead")
                delta = ratio * layer.raw()  # (out, in[, kh, kw])
                if (component, name) in deltas and deltas[(component, name)].shape != delta.shape:
                    raise LoRAFileError(f"{path}: layer {name} is {tuple(delta.shape)} here, "
                                        f"{tuple(deltas[(component, name)].shape)} in an earlier LoRA")
                deltas[(component, name)] = deltas.get((component, name), 0) + delta
    tensors = {}
    for (component, name), delta in deltas.items():
        if not all_finite(delta):
            raise LoRAFileError(f"{component} layer {name}: the weighted sum of the LoRAs overflows float32")
        tensors |= _layer(component, name, *low_rank(delta, rank, clamp_quantile), family=families[0] or "sdxl")
    merged = {"minigen.merged_loras": json.dumps([[p.name, r] for p, r in loras])}
    model = families[0] or "sdxl"
    save_safetensors(tensors, out, kohya_metadata(rank=rank, alpha=rank, title=Path(out).stem, model=model,
                                                  extra=merged))
    return len(deltas)
