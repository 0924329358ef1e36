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


SCORES = {"val_miou": "mIoU", "val_pixel_accuracy": "pixel accuracy"}  # plot_curves' default score labels


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
    for key, label in (scores or SCORES).items():
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
    epochs = [int(r["epoch"]) for r in rows]
    for ax in (ax_loss, ax_score, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs and min(epochs) == max(epochs):  # one epoch: an axis around it, not 0.95 to 1.05
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
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


def background_classes(classes: Sequence[str]) -> list[int]:
    """The classes an overlay leaves unpainted unless told otherwise: those named background."""
    return [i for i, name in enumerate(classes) if name.strip("_").lower() in ("background", "bg")]


def blend_image(
    image: np.ndarray,
    mask: np.ndarray,
    colors: Sequence[Sequence[int]],
    alpha: float = 0.5,
    unpainted: Sequence[int] = (),
) -> Image.Image:
    """Overlay class colours on an RGB (or greyscale) uint8 image, as a PIL image; the ``unpainted``
    classes show the image as it is.

    Blended a band of rows at a time through colour and opacity lookup tables, so the only
    image-sized buffers are the result and PIL's copy of it, whatever the number of classes."""
    size = max(256, len(colors), int(mask.max()) + 1 if mask.size else 0)
    lut = np.zeros((size, 3), np.float32)
    lut[: len(colors)] = np.asarray(colors, np.float32).reshape(-1, 3)
    opacity = np.full((size, 1), alpha, np.float32)
    opacity[list(unpainted)] = 0.0
    h, w = mask.shape
    out = np.empty((h, w, 3), np.uint8)
    for top in range(0, h, OVERLAY_BAND):
        rows = slice(top, top + OVERLAY_BAND)
        base = image[rows].reshape(-1, w, image.shape[2] if image.ndim == 3 else 1).astype(np.float32)
        a = opacity[mask[rows]]
        out[rows] = np.rint(base * (1 - a) + lut[mask[rows]] * a)  # grey broadcasts to RGB
    return Image.fromarray(out)


def blend(
    image: np.ndarray, mask: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5, unpainted=()
) -> np.ndarray:
    """:func:`blend_image` as an (H, W, 3) uint8 array."""
    return np.asarray(blend_image(image, mask, colors, alpha, unpainted))


LEGEND_ROWS = 24  # the most classes a legend lists


def font(image_size: tuple[int, int]) -> Any:
    """PIL's own scalable font at a size that reads on an image of ``image_size`` (w, h)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=max(11, min(28, min(image_size) // 32)))


def text_color(color: Sequence[int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    r, g, b = (int(c) for c in color[:3])
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_legend(picture: Image.Image, entries: Sequence[tuple[str, Sequence[int]]]) -> Image.Image:
    """(text, colour) swatches in a dark box at the top-left corner of ``picture``, drawn in place."""
    from PIL import ImageDraw

    if not entries:
        return picture
    face = font(picture.size)
    size = face.size
    pad = max(2, size // 3)
    draw = ImageDraw.Draw(picture, "RGBA")
    shown = list(entries[:LEGEND_ROWS])
    if len(entries) > LEGEND_ROWS:
        shown.append((f"... {len(entries) - LEGEND_ROWS} more", (0, 0, 0)))
    width = max(draw.textlength(text, font=face) for text, _ in shown) + size + 3 * pad
    draw.rectangle([0, 0, width, len(shown) * (size + pad) + pad], fill=(0, 0, 0, 170))
    for i, (text, color) in enumerate(shown):
        y = pad + i * (size + pad)
        draw.rectangle([pad, y, pad + size, y + size], fill=tuple(int(c) for c in color[:3]), outline=(255, 255, 255))
        draw.text((2 * pad + size, y), text, fill=(255, 255, 255), font=face)
    return picture


def confidence_image(confidence: np.ndarray) -> Image.Image:
    """Per-pixel confidence (H, W, 0..1) in matplotlib's viridis, with a 0-1 scale bar on the right."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    h, w = confidence.shape
    face = font((w, h))
    bar = max(12, w // 40)
    margin = int(face.getlength("1.00")) + bar + 12
    out = np.full((h, w + margin, 3), 255, np.uint8)
    for top in range(0, h, OVERLAY_BAND):
        rows = slice(top, top + OVERLAY_BAND)
        out[rows, :w] = lut[np.clip(np.rint(confidence[rows] * 255), 0, 255).astype(np.uint8)]
    scale = np.linspace(255, 0, h).round().astype(np.uint8)
    out[:, w + 4 : w + 4 + bar] = lut[scale][:, None]
    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture)
    for value in (1.0, 0.5, 0.0):
        y = min(h - face.size, max(0, round((1 - value) * (h - 1)) - face.size // 2))
        draw.text((w + bar + 8, y), f"{value:.2f}", fill=(0, 0, 0), font=face)
    return picture


def draw_instances(
    image: np.ndarray,
    objects: Sequence[tuple[str, float, int]],
    boxes: np.ndarray | None,
    masks: np.ndarray | None,
    colors: Sequence[Sequence[int]],
    alpha: float = 0.5,
    labels: bool = True,
) -> np.ndarray:
    """Objects drawn on ``image``: each mask blended in its class colour with a solid outline, its box,
    and a "class score" label on a filled tag of that colour, drawn last so that tags stay readable
    where boxes overlap. ``objects`` are (class name, score, class index), best first (a NaN score:
    a label, tagged with its name only); without ``boxes``, masks only."""
    from PIL import ImageDraw

    out = np.array(image[..., :3] if image.ndim == 3 else image[..., None], np.float32)
    if out.shape[-1] == 1:  # greyscale
        out = np.repeat(out, 3, -1)
    palette = [np.asarray(colors[k][:3], np.float32) for _, _, k in objects]
    if masks is not None:
        for i in reversed(range(len(objects))):  # the best object painted last, on top
            m = masks[i]
            out[m] = out[m] * (1 - alpha) + palette[i] * alpha
            inner = m.copy()
            inner[1:] &= m[:-1]
            inner[:-1] &= m[1:]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            out[m & ~inner] = palette[i]
    picture = Image.fromarray(np.rint(out).astype(np.uint8))
    if boxes is None:
        return np.asarray(picture)
    draw = ImageDraw.Draw(picture)
    face = font(picture.size)
    width = max(1, face.size // 8)
    for i in reversed(range(len(objects))):
        draw.rectangle([float(v) for v in boxes[i]], outline=tuple(int(c) for c in palette[i]), width=width)
    if labels:
        tags: list[tuple[float, float, float, float]] = []
        for i, (name, score, _) in enumerate(objects):  # the best object's tag first, where it belongs
            text = name if math.isnan(score) else f"{name} {score:.2f}"  # labels have no score
            x1, y1, _, y2 = (float(v) for v in boxes[i])
            w, h = draw.textlength(text, font=face) + 4, face.size + 4
            x, y = min(x1, picture.width - w), y1 - h if y1 >= h else y1  # above the box, or just inside
            while any(x < b[2] and b[0] < x + w and y < b[3] and b[1] < y + h for b in tags) and y + 2 * h <= y2:
                y += h  # down the box's edge, past the tags already drawn
            tags.append((x, y, x + w, y + h))
            color = tuple(int(c) for c in palette[i])
            draw.rectangle(tags[-1], fill=color)
            draw.text((x + 2, y + 2), text, fill=text_color(color), font=face)
    return np.asarray(picture)


def plot_per_class(
    values: dict[str, float | None], path: str | Path, *, title: str, colors: Sequence[Sequence[int]]
) -> Path:
    """A horizontal bar per class (fractions, shown x 100) in the class's colour, the worst at the
    bottom where the eye ends; a class with no score (absent from the split) says "n/a"."""
    from matplotlib.figure import Figure

    names = list(values)
    order = sorted(range(len(names)), key=lambda i: -1.0 if values[names[i]] is None else values[names[i]] or 0.0)
    fig = Figure(figsize=(7, max(2.0, 0.32 * len(names) + 1.2)), dpi=100)
    ax = fig.subplots()
    for row, i in enumerate(order):
        value = values[names[i]]
        color = [c / 255 for c in colors[i][:3]] if i < len(colors) else "tab:blue"
        ax.barh(row, 100 * (value or 0.0), color=color, edgecolor="black", linewidth=0.5)
        ax.text(
            100 * (value or 0.0) + 1, row, "n/a" if value is None else f"{100 * value:.1f}", va="center", fontsize=8
        )
    ax.set_yticks(range(len(order)), labels=[names[i] for i in order], fontsize=8)
    ax.set(xlim=(0, 110), title=title, xlabel="%")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def tile_grid(
    tiles: Sequence[tuple[np.ndarray, str]],
    columns: int,
    *,
    tile: int = 320,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> Image.Image:
    """(picture, caption) tiles, each scaled to ``tile`` px on its long side (small ones enlarged
    pixel for pixel), in rows of ``columns`` on a white sheet, each caption (its middle cut to fit)
    above its tile, and the ``legend`` (name, colour) swatches in rows below."""
    from PIL import ImageDraw

    face = font((tile, tile))
    head, pad = face.size + 6, 4
    scaled = []
    for picture, caption in tiles:
        image = Image.fromarray(picture).convert("RGB")
        scale = tile / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        scaled.append(
            (image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS), caption)
        )
    cell = (tile + pad, max((im.height for im, _ in scaled), default=0) + head + pad)
    width = columns * cell[0] + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(name, color, measure.textlength(name, font=face) + face.size + 3 * pad) for name, color in legend]
    lines, x = 1 if entries else 0, pad
    for *_, w in entries:
        if x + w > width and x > pad:
            lines, x = lines + 1, pad
        x += w
    rows = math.ceil(len(scaled) / columns)
    sheet = Image.new("RGB", (width, rows * cell[1] + pad + lines * (face.size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(scaled):
        x, y = pad + (k % columns) * cell[0], pad + (k // columns) * cell[1]
        while len(caption) > 12 and draw.textlength(caption, font=face) > tile:
            middle = len(caption) // 2  # a long file name loses its middle: its start and end stay
            caption = caption[: middle - 1] + "…" + caption[middle + 1 :]
        draw.text((x, y), caption, fill=(0, 0, 0), font=face)
        sheet.paste(image, (x, y + head))
    x, y = pad, rows * cell[1] + pad
    for name, color, w in entries:
        if x + w > width and x > pad:
            x, y = pad, y + face.size + pad
        draw.rectangle([x, y, x + face.size, y + face.size], fill=tuple(int(c) for c in color[:3]), outline=(0, 0, 0))
        draw.text((x + face.size + pad, y), name, fill=(0, 0, 0), font=face)
        x += w
    return sheet
