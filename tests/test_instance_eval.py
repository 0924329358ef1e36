"""Box and mask AP on hand-made cases whose answer is worked out by hand.

COCO's AP averages, over IoU thresholds 0.50:0.05:0.95, the precision interpolated at 101 recall
points 0, 0.01, ..., 1. With two objects of which the detector finds one with its top-scoring
detection, recall reaches 0.5 at precision 1: 51 of the 101 points score 1, so AP = 51/101.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglab.instance.data import Instances
from seglab.instance.evaluate import CocoAccumulator, format_ap_table

SIZE = (64, 64)
HALF = 51 / 101  # recall 0.5 at precision 1


def _truth(boxes: list[list[float]], labels: list[int], crowd: list[bool] | None = None) -> Instances:
    masks = np.zeros((len(boxes), *SIZE), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, int(y1) : int(y2), int(x1) : int(x2)] = 1
    return Instances(
        masks=masks,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        crowd=np.asarray(crowd or [False] * len(boxes)),
        area=masks.sum((1, 2)).astype(np.float32),
    )


def _prediction(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), 1, *SIZE)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, 0, round(y1) : round(y2), round(x1) : round(x2)] = 0.9
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "scores": torch.tensor(scores),
        "masks": masks,
    }


def _score(truth: Instances, prediction: dict[str, torch.Tensor], names=("background", "a", "b")):
    acc = CocoAccumulator(list(names))
    acc.add_ground_truth(0, SIZE, truth)
    acc.add_prediction(0, prediction)
    return acc.compute()


G1, G2, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]


def test_one_of_two_found_first_is_51_of_101():
    m = _score(_truth([G1, G2], [1, 1]), _prediction([G1, FAR], [1, 1], [0.9, 0.8]))
    for kind in ("box", "mask"):
        assert m[kind]["AP"] == pytest.approx(HALF)
        assert m[kind]["AP50"] == pytest.approx(HALF) and m[kind]["AP75"] == pytest.approx(HALF)
        assert m[kind]["APs"] == pytest.approx(HALF)  # 100-pixel objects are "small" (< 32^2)
        assert m[kind]["APm"] is None and m[kind]["APl"] is None  # no medium or large objects
        assert m[kind]["per_class"] == {"a": pytest.approx(HALF), "b": None}
    assert m["num_images"] == 1 and m["num_objects"] == 2


def test_a_false_positive_ranked_first_halves_precision():
    m = _score(_truth([G1, G2], [1, 1]), _prediction([FAR, G1], [1, 1], [0.95, 0.9]))
    assert m["box"]["AP"] == pytest.approx(0.5 * HALF)


def test_a_detection_on_a_crowd_region_is_ignored_not_false():
    truth = _truth([G1, G2, FAR], [1, 1, 1], crowd=[False, False, True])
    m = _score(truth, _prediction([FAR, G1], [1, 1], [0.95, 0.9]))
    assert m["box"]["AP"] == pytest.approx(HALF)
    assert m["num_objects"] == 2  # the crowd region is not an object to find


def test_iou_062_counts_at_three_of_ten_thresholds():
    # [0, 0, 10, 6.2] against [0, 0, 10, 10]: IoU 0.62, a match at 0.50, 0.55 and 0.60 only
    m = _score(_truth([G1, G2], [1, 1]), _prediction([[0, 0, 10, 6.2]], [1], [0.9]))
    assert m["box"]["AP50"] == pytest.approx(HALF)
    assert m["box"]["AP75"] == 0
    assert m["box"]["AP"] == pytest.approx(0.3 * HALF)


def test_classes_are_averaged_and_a_wrong_class_is_a_miss():
    truth = _truth([G1, G2], [1, 2])
    m = _score(truth, _prediction([G1, G2], [1, 2], [0.9, 0.8]))
    assert m["box"]["AP"] == pytest.approx(1.0) and m["box"]["per_class"] == {
        "a": pytest.approx(1.0),
        "b": pytest.approx(1.0),
    }
    m = _score(truth, _prediction([G1, G2], [1, 1], [0.9, 0.8]))  # G2 found but called "a"
    assert m["box"]["per_class"]["b"] == 0 and m["box"]["AP"] == pytest.approx(0.5)


def test_no_detections_score_zero_where_there_is_truth():
    m = _score(_truth([G1], [1]), _prediction([], [], []))
    assert m["box"]["AP"] == 0 and m["box"]["per_class"] == {"a": 0.0, "b": None}
    assert "a " in format_ap_table(m)
