"""Metrics against confusion matrices worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.metrics import ConfusionMatrix, format_table, metrics_from_confusion, plot_confusion

# rows = truth, columns = prediction
HAND = [
    [5, 1, 0],
    [2, 3, 1],
    [0, 1, 4],
]
# truth totals (TP+FN) = 6, 6, 5; predicted totals (TP+FP) = 7, 5, 5; TP = 5, 3, 4; N = 17
HAND_IOU = [5 / (6 + 7 - 5), 3 / (6 + 5 - 3), 4 / (5 + 5 - 4)]  # 5/8, 3/8, 2/3
HAND_DICE = [10 / 13, 6 / 11, 8 / 10]
HAND_PRECISION = [5 / 7, 3 / 5, 4 / 5]
HAND_RECALL = [5 / 6, 3 / 6, 4 / 5]


def pairs_from_matrix(matrix: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (pred, target) pixels realising a confusion matrix, in a shuffled order."""
    target, pred = [], []
    for t, row in enumerate(matrix):
        for p, n in enumerate(row):
            target += [t] * n
            pred += [p] * n
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
    return torch.tensor(pred)[order], torch.tensor(target)[order]


def test_hand_computed_3x3():
    m = metrics_from_confusion(np.array(HAND), ["a", "b", "c"])
    for name, iou, dice, prec, rec, pixels in zip(
        "abc", HAND_IOU, HAND_DICE, HAND_PRECISION, HAND_RECALL, (6, 6, 5), strict=True
    ):
        pc = m["per_class"][name]
        assert pc["iou"] == pytest.approx(iou)
        assert pc["dice"] == pytest.approx(dice)
        assert pc["precision"] == pytest.approx(prec)
        assert pc["recall"] == pytest.approx(rec)
        assert pc["pixels"] == pixels
    assert m["miou"] == pytest.approx(5 / 9)  # (5/8 + 3/8 + 2/3) / 3
    assert m["mdice"] == pytest.approx(sum(HAND_DICE) / 3)
    assert m["pixel_accuracy"] == pytest.approx(12 / 17)
    assert m["mean_accuracy"] == pytest.approx(32 / 45)  # (5/6 + 1/2 + 4/5) / 3
    assert m["fw_iou"] == pytest.approx((6 * 5 / 8 + 6 * 3 / 8 + 5 * 2 / 3) / 17)  # 28/51
    assert m["num_pixels"] == 17
    json.dumps(m, allow_nan=False)


def test_update_builds_the_matrix_and_batches_add_up():
    pred, target = pairs_from_matrix(HAND)
    whole = ConfusionMatrix(3, ignore_index=255)
    whole.update(pred.reshape(1, 17), target.reshape(1, 17))
    assert whole.matrix.dtype == torch.int64
    assert whole.matrix.tolist() == HAND

    parts = ConfusionMatrix(3, ignore_index=255)
    for chunk_p, chunk_t in zip(pred.split(5), target.split(5), strict=True):
        parts.update(chunk_p, chunk_t)
    assert torch.equal(parts.matrix, whole.matrix)
    assert parts.compute()["miou"] == pytest.approx(5 / 9)

    merged = ConfusionMatrix(3)
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(pred[:9], target[:9])
    b.update(pred[9:], target[9:])
    merged.merge(a).merge(b)
    assert merged.matrix.tolist() == HAND

    whole.reset()
    assert whole.matrix.sum() == 0


def test_ignored_pixels_are_excluded_whatever_their_prediction():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 1, 255], [2, 255, 255]])
    pred = torch.tensor([[0, 2, 1], [2, 99, -4]])  # garbage under the ignored pixels is fine
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert cm.compute()["num_pixels"] == 3


def test_absent_class_is_left_out_of_the_mean():
    m4 = np.zeros((4, 4), dtype=np.int64)
    m4[:3, :3] = HAND  # class 3: zero row and zero column
    m = metrics_from_confusion(m4)
    assert m["per_class"]["3"]["iou"] is None
    assert m["per_class"]["3"]["dice"] is None
    assert m["per_class"]["3"]["recall"] is None
    assert m["per_class"]["3"]["pixels"] == 0
    assert m["miou"] == pytest.approx(5 / 9)  # not (5/9 * 3 + 0) / 4, not (... + 1) / 4
    assert m["mean_accuracy"] == pytest.approx(32 / 45)
    json.dumps(m, allow_nan=False)


def test_class_only_predicted_counts_with_iou_zero():
    # class 2 never occurs in the truth but is predicted twice
    matrix = [
        [3, 0, 1],
        [0, 2, 1],
        [0, 0, 0],
    ]
    m = metrics_from_confusion(matrix, ["bg", "x", "ghost"])
    ghost = m["per_class"]["ghost"]
    assert ghost["iou"] == 0.0
    assert ghost["precision"] == 0.0
    assert ghost["recall"] is None
    # IoU bg = 3/(4+3-3) = 3/4, x = 2/(3+2-2) = 2/3, ghost = 0
    assert m["miou"] == pytest.approx((3 / 4 + 2 / 3 + 0) / 3)
    assert m["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)  # only classes in the truth
    assert m["fw_iou"] == pytest.approx((4 * 3 / 4 + 3 * 2 / 3) / 7)


def test_empty_matrix_is_all_undefined():
    m = metrics_from_confusion(np.zeros((2, 2), dtype=np.int64))
    assert m["miou"] is None and m["pixel_accuracy"] is None and m["fw_iou"] is None
    assert m["num_pixels"] == 0
    json.dumps(m, allow_nan=False)


def test_out_of_range_target_raises_naming_the_value():
    cm = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(ValueError, match=r"\[7\]"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, 255]))
    with pytest.raises(ValueError, match="-1"):
        cm.update(torch.tensor([0, 1]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert cm.matrix.sum() == 0  # nothing was counted by the failed updates


def test_format_table_lists_every_class_and_the_summary():
    m = metrics_from_confusion(np.array(HAND), ["road", "car", "sky"])
    table = format_table(m)
    for word in (
        "road",
        "car",
        "sky",
        "IoU",
        "Dice",
        "Precision",
        "Recall",
        "Pixels",
        "mIoU 55.56",
        "aAcc 70.59",
    ):
        assert word in table
    assert "62.50" in table  # IoU of road in %
    m4 = metrics_from_confusion(np.pad(np.array(HAND), ((0, 1), (0, 1))))
    row = format_table(m4).splitlines()[-3]  # the absent class: undefined values shown as '-'
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["3", "-", "-", "-", "-", "0"]


def test_plot_confusion_writes_a_png_without_pyplot_figures(tmp_path):
    out = plot_confusion(torch.tensor(HAND), ["a", "b", "c"], tmp_path / "sub" / "cm.png")
    assert out.exists()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
