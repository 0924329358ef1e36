"""Box and mask AP on hand-made cases whose answer is worked out by hand; the bound on what the
evaluator feeds COCOeval (a real detector's raw output, the real facade annotations).

COCO's AP averages, over IoU thresholds 0.50:0.05:0.95, the precision interpolated at 101 recall
points 0, 0.01, ..., 1. With two objects of which the detector finds one with its top-scoring
detection, recall reaches 0.5 at precision 1: 51 of the 101 points score 1, so AP = 51/101.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglab.instance.data import Instances
from seglab.instance.evaluate import CocoAccumulator, format_ap_table, rle_encode
from seglab.instance.predictor import Detections, detect, paste_masks

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


def _prediction(boxes: list[list[float]], labels: list[int], scores: list[float]) -> Detections:
    masks = np.zeros((len(boxes), *SIZE), bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, round(y1) : round(y2), round(x1) : round(x2)] = True
    return Detections(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        masks=masks,
        names=[f"class{k}" for k in labels],
    )


def _score(truth: Instances, prediction: Detections, names=("background", "a", "b")):
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


def test_mask_ap_sizes_a_detection_by_its_mask_not_its_box():
    # a false positive whose mask is a 1-pixel frame (156 px, "small") in a 40x40 box (1600 px,
    # "medium"), ranked above the true small object: it counts against small-object mask AP
    # (pycocotools would take the box's area and ignore it there, were the box left in the result)
    frame = np.zeros((1, *SIZE), bool)
    frame[0, 20:60, 20:60] = True
    frame[0, 21:59, 21:59] = False
    found = _prediction([[20, 20, 60, 60], G1], [1, 1], [0.95, 0.9])
    found.masks = np.concatenate([frame, found.masks[1:]])
    m = _score(_truth([G1], [1]), found)
    assert m["mask"]["APs"] == pytest.approx(0.5) and m["mask"]["AP"] == pytest.approx(0.5)
    assert m["box"]["APs"] == pytest.approx(1.0)  # boxes: the 40x40 false positive is medium, ignored for small


# ------------------------------------------------------------------ the bound on what COCOeval is fed


def test_paste_masks_is_torchvisions_pasting_over_the_box_only():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    h, w = 90, 123
    xy = torch.rand(60, 2, generator=g) * torch.tensor([w, h]) - 10  # some boxes start outside the image
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 80 + 0.2], 1)
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, w), boxes[:, 1::2].clamp(0, h)
    masks = torch.rand(60, 1, 28, 28, generator=g)
    expected = (paste_masks_in_image(masks, boxes, (h, w))[:, 0] > 0.5).numpy()
    pasted = paste_masks(masks, boxes, (h, w))
    assert pasted.shape == (60, h, w) and expected.sum() > 1000
    assert np.array_equal(pasted, expected)
    assert pasted.transpose(1, 2, 0).flags.f_contiguous  # what pycocotools encodes without a copy
    assert rle_encode(pasted) == [rle_encode(m[None])[0] for m in expected]


@pytest.fixture(scope="module")
def facade_val(shared_data):
    from seglab.data import get_split, resolve_dataset
    from seglab.instance.data import InstanceDataset

    spec = resolve_dataset(shared_data / "facade_coco", task="instance")
    samples = get_split(spec, "val", val_fraction=0.1, seed=0)[:2]
    return InstanceDataset(samples, spec, keep_crowd=True)


def test_evaluator_feeds_cocoeval_at_most_100_per_image_and_scores_as_cocoeval(facade_val, shared_data):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from seglab.instance.evaluate import MAX_DETS, MIN_SCORE, STAT_NAMES, evaluate_detector
    from seglab.instance.models import DetectorSpec, build_detector

    torch.manual_seed(0)
    model = build_detector(DetectorSpec("maskrcnn", "resnet18", len(facade_val.spec.classes), img_size=128)).eval()
    # an untrained head scores every class near 1/11: with torchvision's limits opened up, its raw
    # output is hundreds of objects per image, far past what COCOeval scores
    model.roi_heads.detections_per_img, model.roi_heads.score_thresh = 300, 0.0
    images = [facade_val[i][0].float() / 255 for i in range(len(facade_val))]
    raw = detect(model, images, facade_val.spec.classes, min_score=0.0, max_dets=10**6)  # all it returns
    assert all((found.scores >= MIN_SCORE).sum() > 2 * MAX_DETS for found in raw)

    result = evaluate_detector(model, facade_val, device=torch.device("cpu"), workers=0, progress=False)
    coco_ids = [s.coco_id for s in facade_val.samples]
    for coco_id, found in zip(coco_ids, raw, strict=True):
        kept = [r["score"] for r in result.results if r["image_id"] == coco_id]
        assert len(kept) == MAX_DETS  # the 100 best of each image, best first
        assert kept == pytest.approx(np.sort(found.scores)[::-1][:MAX_DETS].tolist(), abs=1e-5)

    # the same detections scored by pycocotools straight from the annotation file
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(shared_data / "facade_coco" / "train" / "_annotations.coco.json"))
        for iou_type, ours in (("bbox", "box"), ("segm", "mask")):
            drop = "bbox" if iou_type == "segm" else None  # a mask result is sized by its mask
            dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in result.results])
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = coco_ids
            ev.evaluate(), ev.accumulate(), ev.summarize()
            expected = {n: (float(v) if v >= 0 else None) for n, v in zip(STAT_NAMES, ev.stats, strict=True)}
            assert {n: result.metrics[ours][n] for n in STAT_NAMES} == pytest.approx(expected)
