"""Box AP and mask AP, computed by pycocotools exactly as the COCO benchmark does.

The ground truth is built from the dataset the model is scored on (COCO files and instance-id
masks alike, at each image's own size, crowd regions marked ``iscrowd`` so they are ignored),
the predictions are turned into COCO results (boxes as x, y, w, h; masks as RLE at 0.5), and
``COCOeval`` does the matching. Metrics are fractions 0..1, like mIoU elsewhere in seglab;
``None`` where COCO has no answer (no objects of that size or class).

COCOeval is fed what it scores, as COCO-style evaluators bound it (torchvision's references,
detectron2): per image the ``MAX_DETS`` (COCO's maxDets, 100) highest-scoring detections of those
scoring at least ``MIN_SCORE``, their masks pasted over their boxes only and encoded in one
pycocotools call per image. A barely trained Mask R-CNN returns tens to 100 low-score objects per
image, and torchvision pasting each into a float canvas the image's size had taken a quarter to
two fifths of ``seglab val`` (benchmarks/detector_val.py, benchmarks/README.md section 6).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN

from seglab.instance.data import InstanceDataset, Instances, collate_instances
from seglab.instance.models import DETECTIONS_PER_IMAGE
from seglab.instance.predictor import DEFAULT_CONF, Detections, detect

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}  # pycocotools' name -> ours
MAX_DETS = DETECTIONS_PER_IMAGE  # COCO's maxDets: COCOeval never scores more per image
MIN_SCORE = 0.05  # torchvision's box_score_thresh and detectron2's test threshold: the model's own floor
CONFUSION_IOU = 0.5  # a detection and a labelled object whose boxes overlap this much are a match


def rle_encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) 0/1 masks -> COCO compressed RLEs with str ``counts`` (JSON-friendly), in one
    pycocotools call (it reads (H, W, N) in Fortran order: ``paste_masks``'s layout, so no copy)."""
    from pycocotools import mask as mask_utils

    if not len(masks):
        return []
    binary = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8, copy=False)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode()
    return rles


@dataclass
class CocoAccumulator:
    """Collects ground truth and predictions image by image, then scores them with COCOeval."""

    class_names: list[str]  # index 0 = background
    masks: bool = True  # score masks as well as boxes
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    def add_ground_truth(self, image_id: int, size: tuple[int, int], inst: Instances) -> None:
        h, w = size
        self.images.append({"id": image_id, "height": h, "width": w})
        rles = rle_encode(inst.masks) if self.masks else None
        for i in range(len(inst)):
            x1, y1, x2, y2 = (float(v) for v in inst.boxes[i])
            ann = {
                "id": len(self.annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                "image_id": image_id,
                "category_id": int(inst.labels[i]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(inst.area[i]),
                "iscrowd": int(inst.crowd[i]),
            }
            if rles is not None:
                ann["segmentation"] = rles[i]
            self.annotations.append(ann)

    def gather(self) -> None:
        """Under torchrun, every rank's images, objects and detections, on every rank (the same
        COCOeval as one process scoring them all); a no-op in one process."""
        from seglab.engine.distributed import gather_objects

        images, annotations, results = (gather_objects(part) for part in (self.images, self.annotations, self.results))
        if len(images) == len(self.images):
            return
        self.images, self.results = images, results
        self.annotations = [{**a, "id": i} for i, a in enumerate(annotations, start=1)]  # ids unique again

    def add_prediction(self, image_id: int, detections: Detections) -> None:
        """One image's objects (``predictor.detect`` bounds them to what COCOeval scores)."""
        self.results += to_coco_results(image_id, detections, masks=self.masks)

    def compute(self) -> dict[str, Any]:
        """{"box": {...}, "mask": {...}} with AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l and per_class AP."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt = COCO()
        gt.dataset = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i, "name": n} for i, n in enumerate(self.class_names) if i > 0],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            gt.createIndex()
        scored = sorted({a["category_id"] for a in self.annotations if not a["iscrowd"]})
        out: dict[str, Any] = {
            "num_images": len(self.images),
            "num_objects": sum(not a["iscrowd"] for a in self.annotations),
        }
        for iou_type, ours in IOU_TYPES.items():
            if iou_type == "segm" and not self.masks:
                continue
            if not self.results:  # loadRes refuses an empty list; no detections scores 0 where there is truth
                zero = 0.0 if scored else None
                out[ours] = {**dict.fromkeys(STAT_NAMES, zero), "per_class": self._per_class(None, scored)}
                continue
            # loadRes edits its input. Without the box, a mask result's area is its mask's, as COCO's
            # small/medium/large want: with it, pycocotools takes the box's area (detectron2 drops it too)
            drop = "bbox" if iou_type == "segm" else None
            with contextlib.redirect_stdout(io.StringIO()):
                dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in self.results])
                ev = COCOeval(gt, dt, iou_type)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = {name: (float(v) if v >= 0 else None) for name, v in zip(STAT_NAMES, ev.stats, strict=True)}
            out[ours] = {**stats, "per_class": self._per_class(ev, scored)}
        return out

    def _per_class(self, ev: Any, scored: list[int]) -> dict[str, float | None]:
        """AP (IoU 0.5:0.95, all sizes, 100 detections) per class; None for a class with no objects."""
        per_class: dict[str, float | None] = {}
        for k, name in enumerate(self.class_names[1:], start=1):
            if k not in scored:
                per_class[name] = None
            elif ev is None:
                per_class[name] = 0.0
            else:
                # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
                p = ev.eval["precision"][:, :, ev.params.catIds.index(k), 0, -1]
                per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else None
        return per_class


def confusion_counts(truth: Instances, found: Detections, num_classes: int) -> np.ndarray:
    """One image's [K + 1, K + 1] counts, rows the labelled class and columns the detected one (classes
    1..K at 0..K-1, background at K), of the detections scoring at least DEFAULT_CONF (what predict
    shows). Matching is greedy by box IoU and ignores the class, so one class taken for another shows;
    a labelled object nothing matched counts as detected background, a detection that matched nothing
    as labelled background. Crowd regions are left out."""
    from torchvision.ops import box_iou

    background = num_classes - 1
    out = np.zeros((num_classes, num_classes), np.int64)
    labels, boxes = truth.labels[~truth.crowd], truth.boxes[~truth.crowd]
    shown = found.scores >= DEFAULT_CONF
    detected, detected_boxes = found.labels[shown], found.boxes[shown]
    free_truth, free_found = set(range(len(labels))), set(range(len(detected)))
    if len(labels) and len(detected):
        iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(detected_boxes)).numpy()
        for t, f in sorted(zip(*np.nonzero(iou >= CONFUSION_IOU), strict=True), key=lambda tf: -iou[tf]):
            if t in free_truth and f in free_found:
                free_truth.discard(t)
                free_found.discard(f)
                out[labels[t] - 1, detected[f] - 1] += 1
    for t in free_truth:
        out[labels[t] - 1, background] += 1
    for f in free_found:
        out[background, detected[f] - 1] += 1
    return out


@dataclass
class DetectionEval:
    metrics: dict[str, Any]  # CocoAccumulator.compute()
    results: list[dict[str, Any]]  # COCO results entries; image_id = the COCO file's id when there is one
    confusion: np.ndarray  # [K + 1, K + 1]: see confusion_counts (background last)


@torch.no_grad()
def evaluate_detector(
    model: FasterRCNN,
    dataset: InstanceDataset,
    *,
    device: torch.device,
    batch: int = 2,
    workers: int = 2,
    progress: bool = True,
    desc: str = "val",
) -> DetectionEval:
    """Run the detector over ``dataset`` (images at their own size) and score it with COCOeval.

    Under torchrun each rank runs every world-th image and COCOeval scores the gathered detections,
    so the metrics equal one process's. Mixed precision is the model's own (``models.mixed_precision``)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from seglab.engine.distributed import all_reduce_sum, current, gather_objects

    model.eval()
    has_masks = bool(model.roi_heads.has_mask())
    acc = CocoAccumulator(dataset.spec.classes, masks=has_masks)
    dist = current()
    share = Subset(dataset, range(dist.rank, len(dataset), dist.world))
    loader = DataLoader(share, batch_size=batch, num_workers=workers, collate_fn=collate_instances)
    results: list[dict[str, Any]] = []
    confusion = np.zeros((len(dataset.spec.classes),) * 2, np.int64)
    for images, targets in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        xs = [im.to(device).float().div_(255) for im in images]
        found = detect(model, xs, dataset.spec.classes, min_score=MIN_SCORE, max_dets=MAX_DETS)
        for image, target, detections in zip(images, targets, found, strict=True):
            index = target["image_id"]
            inst = Instances.of_target(target)
            acc.add_ground_truth(index, tuple(image.shape[-2:]), inst)
            confusion += confusion_counts(inst, detections, len(dataset.spec.classes))
            entries = to_coco_results(index, detections, masks=has_masks)
            acc.results += entries
            coco_id = dataset.samples[index].coco_id
            results += [{**e, "image_id": coco_id if coco_id is not None else index} for e in entries]
    acc.gather()
    confusion = all_reduce_sum(torch.from_numpy(confusion).to(device)).cpu().numpy()
    return DetectionEval(acc.compute(), gather_objects(results), confusion)


def to_coco_results(image_id: int, detections: Detections, *, masks: bool = True) -> list[dict[str, Any]]:
    """One image's objects -> COCO results entries (bbox x, y, w, h; segmentation RLE)."""
    rles = rle_encode(detections.masks) if masks and detections.masks is not None else None
    entries = []
    for i, (x1, y1, x2, y2) in enumerate(detections.boxes.tolist()):
        entry: dict[str, Any] = {
            "image_id": image_id,
            "category_id": int(detections.labels[i]),
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(detections.scores[i]), 5),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        entries.append(entry)
    return entries


def format_ap_table(metrics: dict[str, Any]) -> str:
    """The summary a user reads after ``seglab val --task instance``: one row per kind, then per class."""
    kinds = [k for k in ("box", "mask") if k in metrics]
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def pct(v: float | None) -> str:
        return "   -" if v is None else f"{100 * v:5.1f}"

    names = list(metrics[kinds[0]]["per_class"])
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':{width}}" + " ".join(f"{c:>5}" for c in cols)]
    lines += [f"{kind + ' AP':{width}}" + " ".join(pct(metrics[kind][c]) for c in cols) for kind in kinds]
    lines.append(f"{'AP per class':{width}}" + " ".join(f"{kind:>5}" for kind in kinds))
    for name in names:
        lines.append(f"  {name:{width - 2}}" + " ".join(pct(metrics[kind]["per_class"][name]) for kind in kinds))
    return "\n".join(lines)
