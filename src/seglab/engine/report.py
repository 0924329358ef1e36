"""What a person opens after a run: pictures of the data and the predictions, and ``report.html``.

Every training run (after each validation) and ``seglab val`` write, beside their metrics:

    train_batches.jpg     augmented training images with their labels, as the model sees them (training)
    val_predictions.jpg   val images, each label beside the prediction
    per_class.png         IoU (semantic) or AP (detectors) per class, in the class colours
    confusion_matrix.png  row-normalised; a detector's has a background row and column
    report.html           the figures, a per-class table (its colours are the legend) and the pictures

The engine draws them for every task alike; a task's predictor brings what differs: ``truth(sample,
spec)``, a sample's labels as a :class:`~seglab.engine.predictor.Result`, and ``scores(evaluation)``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seglab.engine.predictor import Result, atomic_save
from seglab.errors import SeglabError
from seglab.files import atomic_path
from seglab.plots import background_classes, plot_per_class, tile_grid

EXAMPLES = 8  # val images in val_predictions.jpg, training samples in train_batches.jpg
PICTURES = {  # file: (section, caption), in the order the report shows them
    "val_predictions.jpg": ("predictions", "val images: the label (left) beside the prediction (right)"),
    "per_class.png": ("per-class", "per class, worst at the bottom"),
    "confusion_matrix.png": ("confusion", "confusion matrix, each true class's row sums to 1"),
    "curves.png": ("curves", "losses, val scores (a star on the best epoch) and learning rate per epoch"),
    "train_batches.jpg": ("batches", "training images as the model sees them: augmented, with their labels"),
}


@dataclass
class Scores:
    """A task's figures as the report shows them (fractions 0..1; None where there is no answer)."""

    headline: dict[str, float | None]  # {"mIoU": 0.71, ...}
    columns: list[str]  # the per-class table's columns; per_class.png draws the first
    rows: list[tuple[str, tuple[int, int, int], list[float | None]]]  # (class, colour, one value per column)
    confusion: np.ndarray | None = None  # [true, predicted] counts
    confusion_names: list[str] = field(default_factory=list)


def legend(classes: Sequence[str], colors: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, int, int]]]:
    """The classes a grid shows, with their colours (background left out)."""
    skip = background_classes(classes)
    return [(n, (c[0], c[1], c[2])) for i, (n, c) in enumerate(zip(classes, colors, strict=True)) if i not in skip]


def write_examples(path: Path, results: Sequence[Result]) -> Path:
    """Results drawn on their images (training samples with their labels), four to a row."""
    sheet = tile_grid(
        [(r.plot(legend=False), r.stem) for r in results],
        columns=4,
        legend=legend(results[0].classes, results[0].colors),
    )
    atomic_save(sheet, path, quality=90)
    return path


def write_pictures(
    folder: Path, predictor: Any, samples: Sequence[Any], spec: Any, scores: Scores, **predict: Any
) -> None:
    """val_predictions.jpg (the first EXAMPLES readable ``samples``, predicted with ``predict`` options),
    per_class.png and confusion_matrix.png in ``folder``."""
    from seglab.metrics import plot_confusion

    tiles: list[tuple[np.ndarray, str]] = []
    for sample in samples:
        if len(tiles) == 2 * EXAMPLES:
            break
        try:
            truth = predictor.truth(sample, spec)
        except SeglabError:  # an unreadable sample: validation has named it already
            continue
        found = predictor.predict(truth.image, **predict)
        tiles += [(truth.plot(legend=False), f"{truth.stem}: label"), (found.plot(legend=False), "prediction")]
    if tiles:
        shown = legend(predictor.card.classes, predictor.card.colors)
        atomic_save(tile_grid(tiles, columns=4, legend=shown), folder / "val_predictions.jpg", quality=90)
    with atomic_path(folder / "per_class.png") as tmp:
        title = f"{scores.columns[0]} per class (%)"
        plot_per_class({name: values[0] for name, _, values in scores.rows}, tmp, title=title,
                       colors=[color for _, color, _ in scores.rows])  # fmt: skip
    if scores.confusion is not None:
        with atomic_path(folder / "confusion_matrix.png") as tmp:
            plot_confusion(scores.confusion, scores.confusion_names, tmp)


def write_report(folder: Path, *, title: str, facts: dict[str, str], scores: Scores) -> Path:
    """``folder``/report.html: ``facts`` (what was measured), the headline figures, the per-class
    table and every picture of PICTURES that is in ``folder``. Self-contained: no script, no fetch."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    e = html.escape
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items())
    headline = "".join(f'<div class="figure"><b>{pct(v)}</b>{e(k)}</div>' for k, v in scores.headline.items())
    head = "".join(f"<th>{e(c)}</th>" for c in scores.columns)
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:rgb{tuple(color)}"></span>{e(name)}</td>'
        + "".join(f"<td>{pct(v)}</td>" for v in values)
        + "</tr>"
        for name, color, values in scores.rows
    )
    figures = "".join(
        f'<figure id="{section}"><img src="{name}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, (section, caption) in PICTURES.items()
        if (folder / name).is_file()
    )
    page = f"""<!doctype html>
<html lang="en"><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222 }}
table {{ border-collapse: collapse; margin: 1em 0 }} td, th {{ padding: 3px 12px; text-align: left }}
#per-class tr:nth-child(even) {{ background: #f3f3f3 }} #per-class td + td {{ text-align: right }}
.swatch {{ display: inline-block; width: 1em; height: 1em; margin-right: .5em; border: 1px solid #444;
  vertical-align: middle }}
.figure {{ display: inline-block; margin: 0 2em 1em 0 }} .figure b {{ display: block; font-size: 2em }}
figure {{ margin: 1.5em 0 }} figure img {{ max-width: 100%; border: 1px solid #ccc }}
</style>
<h1>{e(title)}</h1>
<table id="facts">{fact_rows}</table>
<section id="headline">{headline}</section>
<h2>Per class</h2>
<table id="per-class"><thead><tr><th>class</th>{head}</tr></thead><tbody>{rows}</tbody></table>
{figures}
</html>
"""
    path = folder / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
