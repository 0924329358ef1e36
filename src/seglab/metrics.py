"""Segmentation metrics from one confusion matrix.

Everything is derived from an int64 confusion matrix ``M`` ``[C, C]`` whose rows are the
ground truth and whose columns are the prediction: ``M[t, p]`` counts pixels of true class
``t`` predicted as ``p``. Accumulate it batch by batch with :class:`ConfusionMatrix` (it is
a plain tensor, so it can be summed across processes), then turn it into numbers with
:func:`metrics_from_confusion`.

Per class c, with ``TP = M[c, c]``, ``FN = sum(M[c, :]) - TP``, ``FP = sum(M[:, c]) - TP``::

    IoU       = TP / (TP + FP + FN)
    Dice (F1) = 2 TP / (2 TP + FP + FN)
    precision = TP / (TP + FP)
    recall    = TP / (TP + FN)             (MMSegmentation's per-class "Acc")

A value whose denominator is 0 is undefined and reported as ``None``, never 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` int64 confusion matrix (rows = truth, columns = prediction).

    >>> cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    >>> for logits, mask in batches:
    ...     cm.update(logits.argmax(1), mask)
    >>> cm.compute(["bg", "cat", "dog"])["miou"]

    In distributed evaluation put it on each process's device and sum the tensor:
    ``torch.distributed.all_reduce(cm.matrix)`` (or :meth:`all_reduce`).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add a batch: ``pred`` and ``target`` are integer class maps of the same shape.

        Pixels whose target is ``ignore_index`` are skipped, whatever their prediction.
        A target or prediction outside ``[0, num_classes)`` raises ValueError naming the
        values: a label the data layer let through, or a model with the wrong head.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
        pred = pred.reshape(-1).to(device=target.device, dtype=torch.int64)
        target = target.reshape(-1).to(torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        c = self.num_classes
        bad_t = (target < 0) | (target >= c)
        if bad_t.any():
            values = torch.unique(target[bad_t]).tolist()
            raise ValueError(
                f"target holds values {values[:20]} outside [0, {c}) that are not the ignore index "
                f"{self.ignore_index}; the dataset's masks or its class list are wrong"
            )
        bad_p = (pred < 0) | (pred >= c)
        if bad_p.any():
            values = torch.unique(pred[bad_p]).tolist()
            raise ValueError(f"pred holds values {values[:20]} outside [0, {c}); the model has the wrong head")
        # Each (truth, prediction) pair becomes one bin of a flat C*C histogram.
        counts = torch.bincount(c * target + pred, minlength=c * c).reshape(c, c)
        self.matrix += counts.to(self.matrix.device)

    def reset(self) -> None:
        self.matrix.zero_()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when torch.distributed is initialised; else no-op."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The metrics of the counts so far (see :func:`metrics_from_confusion`)."""
        return metrics_from_confusion(self.matrix, class_names)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def metrics_from_confusion(
    matrix: Tensor | np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Turn a confusion matrix (rows = truth) into a JSON-serialisable dict.

    Keys:

    - ``miou``: mean IoU over the classes present in the ground truth *or* the prediction;
      a class absent from both (its row and column are zero) is left out, while a class
      only predicted counts with IoU 0. ``mdice`` is the same mean of Dice.
    - ``pixel_accuracy``: ``trace(M) / sum(M)``.
    - ``mean_accuracy``: mean recall over the classes present in the ground truth.
    - ``fw_iou``: frequency-weighted IoU, ``sum_c (n_c / N) * IoU_c`` over classes with
      ``n_c = sum(M[c, :]) > 0`` (Long et al., FCN).
    - ``num_pixels``: ``N = sum(M)``, the scored pixels.
    - ``per_class``: ``{name: {"iou", "dice", "precision", "recall", "pixels"}}`` where
      ``pixels`` is the class's ground-truth pixel count.

    Undefined values (nothing to divide by) are ``None``.
    """
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    m = m.astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {m.shape}")
    num_classes = m.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a {num_classes}-class confusion matrix")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")

    tp = np.diag(m)
    gt = m.sum(axis=1)  # TP + FN
    predicted = m.sum(axis=0)  # TP + FP
    total = m.sum()

    per_class: dict[str, dict[str, Any]] = {}
    ious: list[float | None] = []
    dices: list[float | None] = []
    recalls: list[float | None] = []
    for c, name in enumerate(names):
        iou = _ratio(tp[c], gt[c] + predicted[c] - tp[c])
        dice = _ratio(2 * tp[c], gt[c] + predicted[c])
        recall = _ratio(tp[c], gt[c])
        ious.append(iou)
        dices.append(dice)
        recalls.append(recall)
        per_class[name] = {
            "iou": iou,
            "dice": dice,
            "precision": _ratio(tp[c], predicted[c]),
            "recall": recall,
            "pixels": int(gt[c]),
        }

    fw_terms = [gt[c] / total * ious[c] for c in range(num_classes) if gt[c] > 0 and ious[c] is not None]
    return {
        "miou": _mean(ious),
        "mdice": _mean(dices),
        "pixel_accuracy": _ratio(tp.sum(), total),
        "mean_accuracy": _mean(recalls),
        "fw_iou": float(sum(fw_terms)) if fw_terms else None,
        "num_pixels": int(total),
        "per_class": per_class,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A per-class table (values in %) and summary lines, in the style of MMSegmentation::

        +------------+-------+-------+-----------+--------+--------+
        | Class      |   IoU |  Dice | Precision | Recall | Pixels |
        +------------+-------+-------+-----------+--------+--------+
        | background | 97.10 | 98.53 |     98.90 |  98.16 | 812345 |
        ...
        mIoU 81.20 | mDice 89.01 | aAcc 96.40 | mAcc 88.75 | fwIoU 93.12 | pixels 1228800

    Undefined values print as ``-``.
    """
    header = ["Class", "IoU", "Dice", "Precision", "Recall", "Pixels"]
    rows = [
        [name, _pct(v["iou"]), _pct(v["dice"]), _pct(v["precision"]), _pct(v["recall"]), str(v["pixels"])]
        for name, v in metrics["per_class"].items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        # Class names left-aligned, numbers right-aligned.
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(parts) + " |"

    summary = " | ".join(
        f"{label} {_pct(metrics.get(key))}"
        for label, key in (
            ("mIoU", "miou"),
            ("mDice", "mdice"),
            ("aAcc", "pixel_accuracy"),
            ("mAcc", "mean_accuracy"),
            ("fwIoU", "fw_iou"),
        )
    )
    summary += f" | pixels {metrics.get('num_pixels', 0)}"
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule, summary])


def plot_confusion(
    matrix: Tensor | np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Write a row-normalised confusion matrix (each true class's row sums to 1) as a PNG.

    Rows with no ground-truth pixels are left at 0. Uses the Agg canvas on its own
    ``Figure``, so no pyplot state is created or leaked.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    m = m.astype(np.float64)
    n = m.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names given for a {n}-class confusion matrix")
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    side = min(max(4.0, 0.45 * n + 2.5), 30.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=list(class_names), rotation=90 if n > 6 else 45, ha="right")
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (row-normalised)")
    if n <= 25:  # cell labels become unreadable beyond that
        for t in range(n):
            for p in range(n):
                value = norm[t, p]
                ax.text(
                    p,
                    t,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
