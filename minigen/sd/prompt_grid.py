"""Several samples of each of a list of prompts, from the same seeds for every prompt, and their grid (one row per
prompt, labelled): what `train_sd.py` draws when a run ends, and what the colour test of a trained emoji model
(bench/bench_sd_colours.py) judges."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from tqdm import tqdm

from ..plot import make_grid, save_png, with_row_labels
from .pipeline import Pipeline


def draw_prompts(pipe: Pipeline, prompts: Sequence[str], per_prompt: int, seed: int = 0, progress: bool = True,
                 **sampling) -> torch.Tensor:
    """(P, per_prompt, 3, H, W) in [0, 1]: sample k of every prompt starts from generator seed + k. `sampling`:
    Pipeline's keywords (steps, guidance_scale, sampler, height, ...)."""
    rows = []
    for prompt in tqdm(prompts, desc="drawing prompts", unit="prompt", disable=not progress, leave=False):
        generators = [torch.Generator().manual_seed(seed + k) for k in range(per_prompt)]
        rows.append(pipe(prompt, num_images=per_prompt, generator=generators, output="float", **sampling).cpu())
    return torch.stack(rows)


def save_prompt_grid(images: torch.Tensor, prompts: Sequence[str], path: str | os.PathLike,
                     label_width: int = 120) -> None:
    """images (P, N, 3, H, W) in [0, 1] -> one PNG, a row per prompt with the prompt on its left."""
    p, n = images.shape[:2]
    grid = make_grid(images.flatten(0, 1) * 2 - 1, nrow=n)
    save_png(with_row_labels(grid, list(prompts), width=label_width), path)
