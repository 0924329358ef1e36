"""Pictures a run leaves behind: training curves, overlays, palettes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot_curves(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    scores: dict[str, str] | None = None,
    title: str = "val mIoU (%)",
    losses: dict[str, str] | None = None,
) -> None:
    """Losses and the val scores per epoch, side by side, from metrics.csv rows.

    ``scores`` maps metrics.csv columns (fractions, shown x 100) to legend labels; default: val
    mIoU. ``losses`` does the same for the left panel; default: train and val loss."""
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_miou = fig.subplots(1, 2)
    for key, label in (losses or {"train_loss": "train", "val_loss": "val"}).items():
        points = [(e, _float(r.get(key))) for e, r in zip(epochs, rows, strict=True)]
        points = [(e, v) for e, v in points if v is not None]
        if points:
            ax_loss.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_loss.legend()
    for key, label in (scores or {"val_miou": ""}).items():
        points = [(e, 100 * v) for e, r in zip(epochs, rows, strict=True) if (v := _float(r.get(key))) is not None]
        if points:
            ax_miou.plot(*zip(*points, strict=True), marker="o", label=label or None)
    if scores:
        ax_miou.legend()
    ax_miou.set(title=title, xlabel="epoch")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


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
