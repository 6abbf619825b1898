"""Pictures of training, drawn with pillow alone: image grids and line charts (axes, ticks, legend, smoothing).

    save_grid(images, "grid.png", nrow=8)                          # (N, 3, H, W) in [-1, 1], or uint8
    plot_curves({"G": (steps, g), "D": (steps, d)}, "loss.png", title="losses", smooth=0.9)
    plot_panels([Panel({...}, "losses"), Panel({...}, "D output", ylim=(0, 1))], "curves.png")
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write

# Colours of successive series (a colour-blind-friendly palette: Okabe and Ito).
COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (120, 120, 120), (240, 228, 66)]


def signed_to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] or uint8, tensor or array -> uint8 array (N, H, W, 3)."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def save_png(image: Image.Image, path: str | os.PathLike, pnginfo=None) -> None:
    """Write a PNG atomically; pnginfo: its text chunks (a PIL PngInfo, e.g. `png_info.png_text`)."""
    with atomic_write(path) as f:
        image.save(f, format="PNG", pnginfo=pnginfo)


def make_grid(images, nrow: int = 8, padding: int = 2, background: int = 255) -> Image.Image:
    """Tile N images into rows of `nrow`, `padding` pixels apart."""
    pixels = signed_to_uint8(images)  # (N, H, W, 3)
    n, h, w, _ = pixels.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), background, np.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return Image.fromarray(grid)


def save_grid(images, path: str | os.PathLike, nrow: int = 8, padding: int = 2) -> None:
    """Write a grid of images as one PNG (atomically). images: (N, 3, H, W) in [-1, 1], or uint8."""
    save_png(make_grid(images, nrow, padding), path)


def with_row_labels(image: Image.Image, labels: Sequence[str], width: int = 96) -> Image.Image:
    """`image` (rows of equal height, one per label) with a white margin on the left naming each row."""
    sheet = Image.new("RGB", (image.width + width, image.height), "white")
    sheet.paste(image, (width, 0))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    row_height = image.height / max(1, len(labels))
    for k, label in enumerate(labels):
        text = label if len(label) <= width // 6 else label[: width // 6 - 1] + "…"
        draw.text((4, (k + 0.5) * row_height), text, fill="black", font=font, anchor="lm")
    return sheet


def smooth_ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider; 0 = none)."""
    out, avg, norm = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = avg / norm
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:.6g}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"


@dataclass
class Panel:
    """One chart: {name: (steps, values)}; `ylim` fixes the y range (else it fits the data)."""
    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    title: str = ""
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    xlabel: str = "step"
    smooth: float = 0.0
    colours: list[tuple[int, int, int]] = field(default_factory=lambda: COLOURS)


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel,
               font: ImageFont.ImageFont) -> None:
    left, top, right, bottom = box
    # Plot area inside the box, leaving room for the title, tick labels and axis labels.
    x0, y0, x1, y1 = left + 62, top + 24, right - 28, bottom - 36  # room for the last x tick's label
    clean = {}
    for name, (xs, ys) in panel.series.items():
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        ok = np.isfinite(xs) & np.isfinite(ys)  # a NaN or inf point is left out, not drawn as a spike
        clean[name] = (xs[ok], ys[ok])
    all_x = np.concatenate([xs for xs, _ in clean.values()] + [np.zeros(0)])
    all_y = np.concatenate([ys for _, ys in clean.values()] + [np.zeros(0)])
    xlo, xhi = (all_x.min(), all_x.max()) if all_x.size else (0.0, 1.0)
    ylo, yhi = panel.ylim or ((all_y.min(), all_y.max()) if all_y.size else (0.0, 1.0))
    if xhi <= xlo:
        xhi = xlo + 1
    if yhi <= ylo:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    if panel.ylim is None:
        pad = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad

    def px(x, y):
        return (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    draw.text(((x0 + x1) / 2, top + 4), panel.title, fill="black", font=font, anchor="ma")
    for v in nice_ticks(ylo, yhi):
        _, y = px(xlo, v)
        draw.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((x0 - 6, y), tick_label(v), fill="black", font=font, anchor="rm")
    for v in nice_ticks(xlo, xhi):
        x, _ = px(v, ylo)
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        draw.text((x, y1 + 6), tick_label(v), fill="black", font=font, anchor="ma")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, bottom - 4), panel.xlabel, fill="black", font=font, anchor="md")
    if panel.ylabel:
        draw.text((left + 4, y0 - 18), panel.ylabel, fill="black", font=font)

    for i, (name, (xs, ys)) in enumerate(clean.items()):
        colour = panel.colours[i % len(panel.colours)]
        if panel.smooth > 0 and len(ys) > 1:
            faint = tuple(c + (255 - c) * 2 // 3 for c in colour)  # the raw values, behind the smoothed line
            draw_line(draw, [px(x, y) for x, y in zip(xs, ys)], faint, (x0, y0, x1, y1))
            ys = smooth_ema(ys, panel.smooth)
        points = [px(x, y) for x, y in zip(xs, ys)]
        draw_line(draw, points, colour, (x0, y0, x1, y1), width=2)
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    # The legend goes last, on a white box, so no line runs through it.
    text_width = max((draw.textlength(name, font=font) for name in clean), default=0)
    lx = x1 - 40 - text_width
    draw.rectangle([lx - 4, y0 + 4, x1 - 4, y0 + 8 + 16 * len(clean)], fill="white", outline=(200, 200, 200))
    for i, name in enumerate(clean):
        ly = y0 + 6 + 16 * i
        draw.line([(lx, ly + 7), (lx + 20, ly + 7)], fill=panel.colours[i % len(panel.colours)], width=3)
        draw.text((lx + 26, ly), name, fill="black", font=font)


def draw_line(draw, points, colour, clip, width: int = 1) -> None:
    """A polyline with its points clamped into the plot area (a fixed ylim must not let lines spill out)."""
    x0, y0, x1, y1 = clip
    points = [(min(max(x, x0), x1), min(max(y, y0), y1)) for x, y in points]
    if len(points) > 1:
        draw.line(points, fill=colour, width=width, joint="curve")


def plot_panels(panels: list[Panel], path: str | os.PathLike, title: str = "",
                size: tuple[int, int] = (900, 340)) -> None:
    """Charts stacked vertically, each `size` (width, height) pixels, in one PNG written atomically."""
    width, height = size
    head = 26 if title else 0
    image = Image.new("RGB", (width, head + height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    if title:
        draw.text((width / 2, 6), title, fill="black", font=ImageFont.load_default(size=15), anchor="ma")
    for i, panel in enumerate(panels):
        draw_panel(draw, (0, head + i * height, width, head + (i + 1) * height), panel, font)
    save_png(image, path)


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                title: str = "", xlabel: str = "step", ylabel: str = "", smooth: float = 0.0) -> None:
    """One chart of several series {name: (steps, values)}, with axes, ticks and a legend, as a PNG."""
    plot_panels([Panel(series, title, ylabel, xlabel=xlabel, smooth=smooth)], path)
