"""Pictures a run leaves behind: training curves, overlays, palettes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _float(value: Any) -> float | None:
    """A metrics.csv cell as a finite float, or None (empty, not a number, NaN, inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series(rows: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    return [(int(r["epoch"]), scale * v) for r in rows if (v := _float(r.get(key))) is not None]


def plot_curves(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    scores: dict[str, str] | None = None,
    title: str = "val (%)",
    losses: dict[str, str] | None = None,
    best: str | None = None,
) -> Any:
    """Three panels from metrics.csv rows: the losses, the val scores and the learning rate per epoch.

    ``losses`` and ``scores`` map metrics.csv columns to legend labels (scores are fractions, shown
    x 100; defaults: train and val loss, val mIoU and pixel accuracy). The loss axis is linear unless
    the losses span more than 30x; ``best`` (a score column) gets a star on its best epoch. Epochs are
    whole numbers on every axis. Returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(14, 4), dpi=100)
    ax_loss, ax_score, ax_lr = fig.subplots(1, 3)
    drawn = []
    for key, label in (losses or {"train_loss": "train", "val_loss": "val"}).items():
        points = _series(rows, key)
        if points:
            ax_loss.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
            drawn += [v for _, v in points]
    positive = [v for v in drawn if v > 0]
    log = bool(positive) and len(positive) == len(drawn) and max(positive) / min(positive) > 30
    ax_loss.set(title="loss" + (" (log scale)" if log else ""), xlabel="epoch", yscale="log" if log else "linear")
    if not log:
        ax_loss.set_ylim(bottom=0)
    top = 0.0
    for key, label in (scores or {"val_miou": "mIoU", "val_pixel_accuracy": "pixel accuracy"}).items():
        points = _series(rows, key, 100.0)
        if not points:
            continue
        (line,) = ax_score.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        top = max(top, *(v for _, v in points))
        if key == best:
            epoch, value = max(points, key=lambda p: p[1])  # the first of equal bests, as the trainer keeps it
            ax_score.plot([epoch], [value], marker="*", markersize=14, color=line.get_color(), linestyle="none",
                          label=f"best: {value:.1f} at epoch {epoch}")  # fmt: skip
    ax_score.set(title=title, xlabel="epoch", ylim=(0, min(100.0, top * 1.15 + 1) if top else 100.0))
    lr = _series(rows, "lr")
    if lr:
        ax_lr.plot(*zip(*lr, strict=True), marker="o", markersize=3, color="tab:gray")
    ax_lr.set(title="learning rate (at the epoch's end)", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_score, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def palette_image(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> Image.Image:
    """An index mask (H, W) as a PNG-ready image whose pixel values are the class indices: a palette
    ('P') image showing the class colours, or, past 256 classes (more than a palette holds), a
    16-bit greyscale one ('I;16')."""
    if len(colors) > 256 or (mask.dtype.itemsize > 1 and mask.size and int(mask.max()) > 255):
        return Image.fromarray(np.asarray(mask, np.uint16))
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    flat = [c for color in colors for c in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


OVERLAY_BAND = 1024  # rows blended at a time: float work stays a few MB whatever the image's size


def blend_image(
    image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5
) -> Image.Image:
    """Overlay class colours on an RGB (or greyscale) uint8 image, as a PIL image.

    Blended a band of rows at a time through a colour lookup table, so the only image-sized
    buffers are the result and PIL's copy of it, whatever the number of classes."""
    lut = np.zeros((max(256, len(colors), int(mask.max()) + 1 if mask.size else 0), 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)
    h, w = mask.shape
    out = np.empty((h, w, 3), np.uint8)
    for top in range(0, h, OVERLAY_BAND):
        rows = slice(top, top + OVERLAY_BAND)
        base = image[rows].reshape(-1, w, image.shape[2] if image.ndim == 3 else 1).astype(np.float32)
        out[rows] = np.rint(base * (1 - alpha) + lut[mask[rows]] * alpha)  # grey broadcasts to RGB
    return Image.fromarray(out)


def blend(image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """:func:`blend_image` as an (H, W, 3) uint8 array."""
    return np.asarray(blend_image(image, mask, colors, alpha))
