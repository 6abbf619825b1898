"""Checkpoint merging that streams: peak memory is a few tensors, never whole models.

Methods (per tensor; fp32 arithmetic with one rounding to the output dtype):
    weighted sum     theta = (1 - alpha) * A + alpha * B          (seed 004)
    add difference   theta = A + alpha * (B - C)                 (moves A by the change that turned C into B)
    bake LoRAs       theta = A + sum of each layer's change at its ratio (`bake.py`)
(writing LoRA files, by extraction from two checkpoints or by merging LoRAs, is `minigen.merge.extract`'s).

Components are told apart by the single-file key prefixes: `first_stage_model.` is the VAE (copied from A by
default, as seed 004 does: merged VAEs make anime models worse), `conditioner.embedders.` / `cond_stage_model.` are the
text encoders (merged unless skipped), `model.diffusion_model.` is the UNet (block-weighted merging gives each of its
blocks an alpha: `block_weights`). Everything else (EMA copies, schedule buffers, integer position ids) is copied
from A.
SDXL diffusers folders are read through the same single-file names (`DiffusersFolder`), and written from them
(`DiffusersFolderWriter`, still tensor by tensor) when the output is not a `.safetensors` name.

The whole plan is made from the inputs' headers before a byte is written, so every bad input (corrupt header, not a
Stable Diffusion checkpoint, shape mismatch under `strict`, other architecture, output over an input, too little disk)
fails before there is an output; the output itself appears only when it is complete (written as a temporary file or
folder, then renamed). NaN or infinite values, in an input or in a result, are refused as they are met: the output is
never silently NaN. Pickled inputs (.ckpt) are read whole, only when allowed (`open_checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from ..sd.checkpoint_files import (TensorFile, check_output, open_checkpoint, open_output, output_metadata,
                                   sha256_file)
from ..io import FLOAT_DTYPES, CheckpointError, all_finite
from ..sd.checkpoint_keys import UNET_PREFIX, VAE_PREFIX
from ..sd.detect import MODEL_NAMES, detect_family

TEXT_PREFIXES = ("conditioner.embedders.", "cond_stage_model.")  # SDXL's two text encoders, SD 1.x/2.x's one
BLOCK_GROUPS = ("IN", "M", "OUT")  # the UNet's input blocks, middle block, output blocks: in this order

CHUNK = 1 << 20  # elements read and computed at once: fp32 temporaries of 4 MB, whatever the tensor's size


class MergeWarning(UserWarning):
    """Something the merge worked around (missing keys, skipped shapes, alpha outside [0, 1])."""


@dataclass
class MergeRecipe:
    method: str = "weighted_sum"  # or "add_difference"
    alpha: float = 0.5
    block_alphas: tuple[float, ...] | None = None  # 3 (IN, MID, OUT) or one per UNet block, BASE optionally first
    # "copy" (from A), "merge", or the path of a VAE file to put in; None: "copy", but "merge" (at BASE's weight) with
    # a BASE-first block list, as Merge Block Weighted, supermerger and sd-mecha do (MBW: base_alpha covers the text
    # encoders and the VAE). Seed 004's preset says "copy".
    vae: str | None = None
    merge_text_encoders: bool = True
    dtype: str | None = None  # "fp16", "bf16", "fp32"; None keeps each tensor's dtype from A


@dataclass
class MergeReport:
    merged: int = 0
    copied: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # input name -> keys of A it lacks (A's copy kept)
    shape_mismatches: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, A's shape, other's shape)
    output_bytes: int = 0
    lora_summaries: list[str] = field(default_factory=list)  # baking: one line per LoRA file (lora_summary)


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) * a + alpha * b, as one lerp kernel (a + alpha * (b - a)): the same up to float rounding, faster.

    On fp16/bf16 tensors torch's lerp computes in fp32 and rounds once, so it may run on the stored dtype directly.
    """
    return torch.lerp(a, b, alpha, out=out)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.add(a, b - c, alpha=alpha, out=out)  # a + alpha * (b - c); b - c rounds, so inputs are fp32


class Method(NamedTuple):
    formula: Callable[..., torch.Tensor]  # formula(*inputs, alpha, out=None)
    n_inputs: int
    one_rounding: bool  # computes in fp32 internally even on fp16/bf16 inputs: no need to upcast them first


METHODS = {"weighted_sum": Method(weighted_sum, 2, True), "add_difference": Method(add_difference, 3, False)}


def component(key: str) -> str:
    """'vae', 'text', 'unet' or 'other' from a single-file key."""
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(TEXT_PREFIXES):
        return "text"
    if key.startswith(UNET_PREFIX):
        return "unet"
    return "other"


# Block-weighted merging names the UNet's blocks as A1111's Merge Block Weighted extension and supermerger do:
# INnn for input_blocks.nn, M00 for middle_block, OUTnn for output_blocks.nn (IN00..IN11, M00, OUT00..OUT11 in
# SD 1.x/2.x: 25; IN00..IN08, M00, OUT00..OUT08 in SDXL: 19), and BASE for everything merged outside the UNet
# (the text encoders; the VAE too with --vae merge, and by default when BASE is given).

def block_of(key: str) -> str:
    """The block whose weight a single-file key takes: "IN03", "M00", "OUT11"; "stem" for the UNet's layers before its
    blocks (time and label embeddings), "head" for those after them (`out.`); "BASE" outside the UNet."""
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    group, _, rest = key[len(UNET_PREFIX):].partition(".")
    number = rest.partition(".")[0]
    if group == "middle_block":
        return "M00"
    if group in ("input_blocks", "output_blocks") and number.isdigit():
        return f"{'IN' if group == 'input_blocks' else 'OUT'}{int(number):02d}"
    return "head" if group == "out" else "stem"


def _group(block: str) -> int:
    """0, 1, 2 for an input, the middle, an output block (by name)."""
    return BLOCK_GROUPS.index(block.rstrip("0123456789"))


def unet_blocks(keys: list[str]) -> list[str]:
    """The UNet blocks a checkpoint's keys hold, by name, in order: IN.., M00, OUT.."""
    names = {block_of(k) for k in keys} - {"stem", "head", "BASE"}
    return sorted(names, key=lambda name: (_group(name), name))


def block_weights(alphas: tuple[float, ...], keys: list[str]) -> dict[str, float]:
    """{block name (`block_of`'s): alpha} from a recipe's block alphas, for the checkpoint with these keys; keys of a
    block not named take the recipe's alpha.

    3 numbers weight every input block, the middle block and every output block (the stem, head and BASE keep the
    alpha). One number per UNet block weights each (MBW's form: the stem goes with IN00 and the head with the last
    OUT block, as bbc-mc's Merge Block Weighted does); one more, first, is BASE's. Any other count is a ValueError
    naming the counts this checkpoint's architecture takes."""
    blocks = unet_blocks(keys)
    if not blocks:
        raise ValueError("--block-alphas weights the UNet's blocks, and the checkpoint has none")
    if len(alphas) == 3:
        return {name: alphas[_group(name)] for name in blocks}
    if len(alphas) not in (len(blocks), len(blocks) + 1):
        raise ValueError(f"--block-alphas takes 3 numbers (IN, MID, OUT), {len(blocks)} (one per UNet block of "
                         f"{MODEL_NAMES[detect_family(keys)]}: {blocks[0]}..{blocks[-1]}) or {len(blocks) + 1} "
                         f"(BASE, for the text encoders and the VAE, first); got {len(alphas)}")
    named = dict(zip((["BASE"] if len(alphas) > len(blocks) else []) + blocks, alphas))
    return named | {"stem": named[blocks[0]], "head": named[blocks[-1]]}


@dataclass
class Step:
    key: str
    sources: list[tuple[TensorFile, str]]  # (file, key in it): one source is a copy, several are a merge
    alpha: float = 0.0


def _plan(files: list[TensorFile], vae_file: TensorFile | None, recipe: MergeRecipe, weights: dict[str, float],
          strict: bool, report: MergeReport) -> list[Step]:
    """Decide, from the headers only, where each of A's tensors comes from, and at which alpha (`weights`: the
    alpha of each block named in it, `block_weights`)."""
    a, others = files[0], files[1:]
    steps = []
    for key in a.keys():
        kind = component(key)
        if vae_file is not None and kind == "vae":
            # A VAE file holds the VAE's own keys, with or without the single-file prefix.
            vae_key = key if key in vae_file.header else key[len(VAE_PREFIX):]
            candidates = [(vae_file, vae_key)]
        elif (not a.dtype(key).is_floating_point or kind == "other" or (kind == "vae" and recipe.vae == "copy")
              or (kind == "text" and not recipe.merge_text_encoders)):
            candidates = []
        else:
            candidates = [(f, key) for f in others]
        usable = True
        for f, k in candidates:
            if k not in f.header:
                report.missing.setdefault(str(f.path), []).append(key)
                usable = False
            elif f.shape(k) != a.shape(key):
                report.shape_mismatches.append((key, a.shape(key), f.shape(k)))
                usable = False
        if not usable or not candidates:
            steps.append(Step(key, [(a, key)]))
        elif vae_file is not None and kind == "vae":
            steps.append(Step(key, candidates))
        else:
            steps.append(Step(key, [(a, key)] + candidates, weights.get(block_of(key), recipe.alpha)))
    if strict and report.shape_mismatches:
        listed = "\n  ".join(f"{k}: {sa} vs {sb}" for k, sa, sb in report.shape_mismatches[:20])
        raise CheckpointError(f"{len(report.shape_mismatches)} tensors differ in shape (strict mode):\n  {listed}")
    return steps


def check_same_model(files: list[TensorFile]) -> None:
    """Refuse a file that is no Stable Diffusion checkpoint (a LoRA, a diffusers part, a GAN: merged key by key it
    would be copied or mixed blindly). SDXL and SD 1.x share some key names; merged key by key they would make a
    broken hybrid, so refuse that too."""
    for f in files:
        if not any(component(k) != "other" for k in f.keys()):
            raise CheckpointError(
                f"{f.path} is not a Stable Diffusion single-file checkpoint: none of its {len(f.keys())} tensors "
                f"(e.g. {f.keys()[:2]}) is under {UNET_PREFIX}, {VAE_PREFIX} or a text encoder's "
                f"{' / '.join(TEXT_PREFIXES)}")
    kinds = [detect_family(f.keys()) for f in files]
    for f, kind in zip(files[1:], kinds[1:]):
        if kind != kinds[0]:
            raise CheckpointError(f"cannot merge different architectures: {files[0].path} is {MODEL_NAMES[kinds[0]]}, "
                                  f"{f.path} is {MODEL_NAMES[kind]}")


def _merge_tensor(step: Step, method: Method, out_dtype: torch.dtype) -> torch.Tensor:
    """formula(inputs..., alpha), reading and computing CHUNK elements at a time: only the output is held whole.

    The arithmetic is fp32 with one rounding to the output dtype: inputs are upcast, unless they already have the
    output's dtype and the formula computes in fp32 internally (then it writes straight into the output, 2x faster).
    """
    shape = step.sources[0][0].shape(step.key)
    out = torch.empty(shape, dtype=out_dtype).reshape(-1)  # (N,)
    native = method.one_rounding and all(f.dtype(k) == out_dtype for f, k in step.sources)
    for i in range(0, out.numel(), CHUNK):
        j = min(i + CHUNK, out.numel())
        chunks = [f.get_flat(k, i, j) for f, k in step.sources]  # each (j - i,)
        if native:
            method.formula(*chunks, step.alpha, out=out[i:j])
        else:
            out[i:j] = method.formula(*(t.float() for t in chunks), step.alpha)
    return out.reshape(shape)


def merge_checkpoints(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike,
                      recipe: MergeRecipe | None = None, c: str | os.PathLike | None = None,
                      strict: bool = False, progress: bool = True, output_format: str | None = None,
                      allow_pickle: bool = False) -> MergeReport:
    """Merge checkpoints A and B (and C for add difference), single files or SDXL diffusers folders, into `out`,
    streaming.

    The output has A's keys in A's order. Keys of A missing in another input, or of another shape there, keep A's
    tensor (a MergeWarning counts them; `strict` makes a shape mismatch an error). Returns what was done.
    output_format: "single_file" or "diffusers" (an SDXL folder); by default a folder unless `out` ends in
    .safetensors. A folder written from a single-file A takes the configs its tensors give (`detect.detect`).
    allow_pickle: read .ckpt/.pt inputs (whole, with weights_only=True).
    """
    recipe = recipe or MergeRecipe()
    if recipe.method not in METHODS:
        raise ValueError(f"unknown merge method {recipe.method!r}; choose from {sorted(METHODS)}")
    method = METHODS[recipe.method]
    n_inputs = method.n_inputs
    paths = [Path(p) for p in (a, b, c)[:n_inputs] if p is not None]
    if len(paths) != n_inputs:
        raise ValueError(f"{recipe.method} needs {n_inputs} checkpoints (A, B{', C' if n_inputs == 3 else ''})")
    if recipe.dtype is not None and recipe.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unknown output dtype {recipe.dtype!r}; choose from {sorted(FLOAT_DTYPES)}")
    for value in (recipe.alpha, *(recipe.block_alphas or ())):
        if not math.isfinite(value):
            raise ValueError(f"alpha must be a finite number, got {value}")
        if not 0 <= value <= 1:
            warnings.warn(f"alpha {value} is outside [0, 1]: the merge extrapolates beyond its inputs",
                          MergeWarning, stacklevel=2)
    out = Path(out)
    vae_path = None if recipe.vae in (None, "copy", "merge") else Path(recipe.vae)
    inputs = dict(zip(["A", "B", "C"], paths)) | ({"VAE": vae_path} if vae_path else {})  # role -> path

    files: list = []
    vae_file = None
    try:
        for p in paths:
            files.append(open_checkpoint(p, allow_pickle))
        vae_file = open_checkpoint(vae_path, allow_pickle) if vae_path is not None else None
        check_same_model(files)
        weights = block_weights(recipe.block_alphas, files[0].keys()) if recipe.block_alphas else {}
        if recipe.vae is None:
            recipe = replace(recipe, vae="merge" if "BASE" in weights else "copy")
        report = MergeReport()
        steps = _plan(files, vae_file, recipe, weights, strict, report)
        if vae_file is not None and not any(s.sources[0][0] is vae_file for s in steps):
            raise CheckpointError(f"{vae_path} holds none of the VAE's single-file tensors (e.g. "
                                  f"{next((k for k in files[0].keys() if component(k) == 'vae'), VAE_PREFIX + '*')}, with or without "
                                  f"its prefix): a diffusers-format VAE, or not a VAE?")
        specs = output_specs(steps, recipe.dtype)
        _warn_about(report)

        def produce(step: Step, dtype: torch.dtype) -> torch.Tensor:
            if len(step.sources) == 1:
                report.copied += 1
                return step.sources[0][0].get(step.sources[0][1]).to(dtype)
            report.merged += 1
            return _merge_tensor(step, method, dtype)

        report.output_bytes = stream_out(out, open_output(out, output_format, files[0]), inputs,
                                          output_metadata(files[0]), {"type": "minigen", **asdict(recipe)}, specs,
                                          steps, produce, progress)
        return report
    finally:
        for f in files + ([vae_file] if vae_file else []):
            f.close()


def stream_out(out: Path, open_writer: Callable, inputs: dict[str, Path], base_metadata: dict[str, str],
                recipe: dict, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], steps: list, produce,
                progress: bool) -> int:
    """Write `out` with tensors produce(step, dtype), one step per key of `specs`, through
    open_writer(specs, metadata) (a single file's or a diffusers folder's writer); returns the bytes written.

    Checks the output path and free disk first. The header, metadata included, is written first, but a digest needs
    a full read of its file: the inputs are hashed in background threads while writing, and the digests filled in
    over placeholders of their length at the end."""
    nbytes = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs.values())
    check_output(out, list(inputs.values()), nbytes + (1 << 20))  # + room for the header
    placeholders = {role: str(i).zfill(64) for i, role in enumerate(inputs)}  # distinct: digests are keys
    with tqdm(total=nbytes, unit="B", unit_scale=True, desc=recipe["method"], disable=not progress) as bar, \
            open_writer(specs, _metadata(base_metadata, recipe, inputs, placeholders)) as writer, \
            ThreadPoolExecutor(len(inputs)) as pool:  # the bar closes last: an error message comes after it
        digests = {role: pool.submit(sha256_file, p) for role, p in inputs.items()}
        for key, step in zip(specs, steps):
            tensor = produce(step, specs[key][1])
            if not all_finite(tensor):
                raise ValueError(f"{out}: the result for {key} holds NaN or infinite values (the arithmetic overflows "
                                 f"{specs[key][1]}: alpha too far outside [0, 1], or a LoRA ratio too large?)")
            writer.write(key, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        digests = {role: d.result() for role, d in digests.items()}
        writer.rewrite_metadata(_metadata(base_metadata, recipe, inputs, digests))
    return nbytes


def output_specs(steps: list[Step], dtype_name: str | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of the output: the dtype named for float tensors, else the source's own."""
    specs = {}
    for s in steps:
        src, key = s.sources[0]
        dtype = src.dtype(key)
        if dtype_name is not None and dtype.is_floating_point:
            dtype = FLOAT_DTYPES[dtype_name]
        specs[s.key] = (src.shape(key), dtype)
    return specs


def _metadata(base: dict[str, str], recipe: dict, inputs: dict[str, Path], digests: dict[str, str]) -> dict[str, str]:
    """The base's metadata plus the recipe. A1111's merger writes these two keys too, so its UI shows the sources."""
    models: dict[str, dict[str, str]] = {}
    for role, p in inputs.items():
        if digests[role] in models:  # the same model twice (merged with itself): one entry with both roles
            models[digests[role]]["role"] += "," + role
        else:
            models[digests[role]] = {"name": p.name, "role": role}
    return {**base, "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def _warn_about(report: MergeReport) -> None:
    for path, keys in report.missing.items():
        warnings.warn(f"{len(keys)} tensors of A are missing in {path}; A's tensors are kept "
                      f"(first: {keys[0]})", MergeWarning, stacklevel=3)
    if report.shape_mismatches:
        key, sa, sb = report.shape_mismatches[0]
        warnings.warn(f"{len(report.shape_mismatches)} tensors differ in shape and keep A's tensor "
                      f"(first: {key}: {sa} vs {sb})", MergeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------- LoRA baking
