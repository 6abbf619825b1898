"""What `evaluate` leaves behind: where each image goes, the results table, the labelled grids (rows: prompts,
columns: models) and the FID-per-epoch plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write
from ..images import open_rgb
from ..plot import make_grid, plot_curves, save_png, with_row_labels

GRID_CELL = 256  # grid cells are shrunk to at most this many pixels a side


def image_path(out: Path, model: str, prompt_index: int, seed: int) -> Path:
    return out / "images" / model / f"{prompt_index:03d}-{seed}.png"


def markdown_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| model | epoch | images | FID | KID x1e3 | IS | PSNR vs base (dB) | SSIM vs base |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kid = "-" if r.get("kid") is None else f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}"
        score = "-" if r.get("is") is None else f"{r['is']:.3f} ± {r['is_std']:.3f}"
        psnr = "inf" if r["model"] != "base" and r.get("psnr_vs_base") is None else num(r.get("psnr_vs_base"), ".2f")
        lines.append(f"| {r['model']} | {num(r.get('epoch'), 'd')} | {r['images']} | {num(r['fid'], '.2f')} | {kid} "
                     f"| {score} | {psnr} | {num(r.get('ssim_vs_base'), '.4f')} |")
    return "\n".join(lines) + "\n"


def labelled_grid(cells: list[np.ndarray], names: Sequence[str], rows: Sequence[str], padding: int = 2) -> Image.Image:
    """uint8 (H, W, 3) cells, row-major with one column per name, under a header naming the columns and beside a
    margin naming the rows."""
    grid = make_grid(torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2), nrow=len(names), padding=padding)
    margin = 120
    grid = with_row_labels(grid, rows, width=margin)
    head = 18
    image = Image.new("RGB", (grid.width, grid.height + head), "white")
    image.paste(grid, (0, head))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=11)
    width = cells[0].shape[1]
    fits = max(4, width // 6)  # characters of the 11-pixel font in one cell
    for i, name in enumerate(names):
        shown = name if len(name) <= fits else ".." + name[-(fits - 2):]  # the end tells checkpoints apart
        draw.text((margin + padding + i * (width + padding), 3), shown, fill="black", font=font)
    return image


def save_grids(out: Path, names: Sequence[str], prompts: Sequence[str], seeds: Sequence[int]) -> list[Path]:
    """One grid per seed: rows are prompts (their beginnings beside the rows; whole in results.md/json), columns
    models (named in a header); cells shrunk to GRID_CELL pixels at most."""
    paths = []
    for seed in seeds:
        cells = []
        for p in range(len(prompts)):
            for name in names:
                image = open_rgb(image_path(out, name, p, seed))
                image.thumbnail((GRID_CELL, GRID_CELL))
                cells.append(np.asarray(image))
        paths.append(out / f"grid-seed{seed}.png")
        save_png(labelled_grid(cells, names, prompts), paths[-1])
    return paths


def plot_fid_per_epoch(rows: list[dict], path: Path) -> bool:
    """FID against epoch for the rows that know their epoch, with the base model's FID as a flat line."""
    epochs = [(r["epoch"], r["fid"]) for r in rows if r.get("epoch") is not None]
    if not epochs:
        return False
    xs, ys = zip(*epochs)
    series = {"LoRA": (xs, ys)}
    base = next(r["fid"] for r in rows if r["model"] == "base")
    series["base"] = ((min(xs), max(xs)), (base, base))
    plot_curves(series, path, title="FID per epoch (lower is closer to the reference)", xlabel="epoch", ylabel="FID")
    return True


def write_json(path: Path, report: dict) -> None:
    with atomic_write(path, mode="w") as f:
        json.dump(report, f, indent=2)
