"""Predicting objects: ``seglab.load(best.pt)`` on a detector checkpoint gives a :class:`DetectorModel`.

model = seglab.load("runs/train/facade/weights/best.pt")
r = model.predict("street.jpg", conf=0.3)
r.instances.boxes, r.instances.masks, r.instances.labels, r.instances.scores
r.plot()            # (H, W, 3) uint8: masks, boxes and "class score" labels drawn on the image
r.save("out/")      # overlays/<name>.png, masks/<name>.png (instance ids), labels/<name>.json
r.semantic()        # (H, W) class indices: the instances painted into a semantic mask
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from seglab.engine.checkpoint import ModelCard
from seglab.engine.inference import amp_dtype, amp_on, resolve_device
from seglab.engine.predictor import Predictor, Result, atomic_save
from seglab.errors import SeglabError
from seglab.files import atomic_path
from seglab.instance.models import DETECTIONS_PER_IMAGE

DEFAULT_CONF = 0.25  # the lowest score kept unless told: predict, `seglab predict --conf` and serve's ?conf=


@dataclass
class Detections:
    """The objects found in one image, highest score first."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in the image's pixels
    labels: np.ndarray  # (N,) int64 class indices (1..K)
    scores: np.ndarray  # (N,) float32 0..1
    masks: np.ndarray | None  # (N, H, W) bool (Mask R-CNN), None for a box detector; see paste_masks
    names: list[str]  # (N,) class names

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(repr=False)
class InstanceResult(Result):
    """A detector's prediction: the objects found, highest score first."""

    image: np.ndarray  # (H, W, C) uint8, as read
    instances: Detections
    classes: list[str]
    colors: list[tuple[int, int, int]]
    path: Path | None = None

    @property
    def task(self) -> str:  # type: ignore[override]
        return "detect" if self.instances.masks is None else "instance"

    def summary(self) -> str:
        counts = Counter(self.instances.names)
        return ", ".join(f"{n} {name}" for name, n in counts.most_common()) or "no objects"

    def semantic(self) -> np.ndarray:
        """(H, W) class indices (uint8; uint16 past 256 classes), 0 = background; where objects overlap,
        the higher score wins."""
        inst = self.instances
        wide = len(inst) > 0 and int(np.max(inst.labels)) > 255
        out = np.zeros(self.image.shape[:2], dtype=np.uint16 if wide else np.uint8)
        if inst.masks is None:
            raise SeglabError("a box detector predicts no masks; train --task instance for masks")
        for i in reversed(range(len(inst))):  # lowest score first, so the highest is painted last
            out[inst.masks[i]] = inst.labels[i]
        return out

    def instance_ids(self) -> np.ndarray:
        """(H, W) uint16: object i (in score order) is i + 1, 0 = background; the higher score wins overlaps."""
        out = np.zeros(self.image.shape[:2], dtype=np.uint16)
        inst = self.instances
        if inst.masks is not None:
            for i in reversed(range(len(inst))):
                out[inst.masks[i]] = i + 1
        return out

    def plot(self, *, alpha: float = 0.5, legend: bool = True, boxes: bool = True, labels: bool = True) -> np.ndarray:
        """The image with each object's mask, box and "class score" label drawn, (H, W, 3) uint8 (the
        labels are the legend: ``legend`` changes nothing)."""
        from seglab.plots import draw_instances

        inst = self.instances
        objects = [(n, float(s), int(k)) for n, s, k in zip(inst.names, inst.scores, inst.labels, strict=True)]
        return draw_instances(
            self.image, objects, inst.boxes if boxes else None, inst.masks, self.colors, alpha, labels
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "image": str(self.path) if self.path else None,
            "size": list(self.image.shape[:2]),
            "instances": self.objects(),
        }

    def objects(self) -> list[dict[str, Any]]:
        """One dict per object: class, label, score, box [x1, y1, x2, y2], mask as COCO RLE."""
        from seglab.instance.evaluate import rle_encode

        inst = self.instances
        rles = rle_encode(inst.masks) if inst.masks is not None else None
        out = []
        for i in range(len(inst)):
            entry: dict[str, Any] = {
                "class": inst.names[i],
                "label": int(inst.labels[i]),
                "score": round(float(inst.scores[i]), 5),
                "box": [round(float(v), 2) for v in inst.boxes[i]],
            }
            if rles is not None:
                entry["mask"] = rles[i]
            out.append(entry)
        return out

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """The objects as COCO results entries (bbox x, y, w, h; segmentation RLE) for ``image_id``."""
        from seglab.instance.evaluate import to_coco_results

        return to_coco_results(image_id, self.instances)

    def save(self, out_dir: str | Path, *, name: str | None = None, alpha: float = 0.5) -> dict[str, Path]:
        """overlays/<name>.png (the plot), labels/<name>.json and, for masks, masks/<name>.png (instance
        ids); each file whole or not at all."""
        out = Path(out_dir)
        stem = name or self.stem
        written = {"overlay": out / "overlays" / f"{stem}.png", "labels": out / "labels" / f"{stem}.json"}
        atomic_save(Image.fromarray(self.plot(alpha=alpha)), written["overlay"])
        with atomic_path(written["labels"]) as tmp:
            tmp.write_text(json.dumps(self.objects()))
        if self.instances.masks is not None:
            written["mask"] = out / "masks" / f"{stem}.png"
            atomic_save(Image.fromarray(self.instance_ids()), written["mask"])
        return written


class DetectorModel(Predictor):
    """A trained Mask R-CNN / Faster R-CNN with its classes and colours (see the module docstring)."""

    def __init__(
        self,
        model: FasterRCNN,
        card: ModelCard,
        *,
        device: str = "auto",
        amp: bool = False,
        metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.card, self.amp, self.metrics, self.config = card, amp, metrics, config or {}
        self.backend = "pytorch"
        if amp_on(self.device, amp):
            from seglab.instance.models import mixed_precision

            mixed_precision(self.model, self.device.type, amp_dtype(self.device))

    def predict(
        self,
        source: str | Path | np.ndarray | Sequence[str | Path | np.ndarray],
        *,
        conf: float = DEFAULT_CONF,
        batch: int = 1,
    ) -> InstanceResult | list[InstanceResult]:
        """Objects in one image (a path or an (H, W, C) uint8 array) or many (a folder or a list),
        keeping those scoring at least ``conf``."""
        from seglab.engine.predictor import expand_source

        sources, single = expand_source(source)
        results = list(self.iter_predict(sources, conf=conf, batch=batch))
        return results[0] if single else results

    def iter_predict(
        self, sources: Sequence[str | Path | np.ndarray], *, conf: float = DEFAULT_CONF, batch: int = 1
    ) -> Iterator[InstanceResult]:
        from seglab.engine.predictor import read_batches

        if not 0 <= conf <= 1:
            raise SeglabError(f"predict: --conf {conf}: use a score between 0 and 1")
        for pending in read_batches(sources, batch, 3):
            yield from self._predict_batch(pending, conf)

    def _predict_batch(self, items: list[tuple[np.ndarray, Path | None]], conf: float) -> Iterator[InstanceResult]:
        xs = [torch.tensor(im[..., :3]).permute(2, 0, 1).to(self.device).float() / 255 for im, _ in items]
        found = detect(self.model, xs, self.card.classes, min_score=conf)
        for (image, path), detections in zip(items, found, strict=True):
            yield InstanceResult(image, detections, self.card.classes, self.card.colors, path)

    def evaluate(
        self,
        data: str | Path,
        *,
        split: str = "val",
        batch: int = 2,
        workers: int = 2,
        limit: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        progress: bool = True,
        data_cache: str | Path | None = None,
    ):
        """Box AP (and mask AP) on a split, by pycocotools; returns a ``DetectionEval``."""
        from seglab.data import get_split, resolve_dataset
        from seglab.instance.data import InstanceDataset
        from seglab.instance.evaluate import evaluate_detector

        spec = resolve_dataset(data, cache_dir=data_cache, progress=progress, task=self.task)
        if spec.classes[1:] != self.card.classes[1:]:
            raise SeglabError(
                f"{data} has classes {', '.join(spec.classes[1:])} but the model was trained on "
                f"{', '.join(self.card.classes[1:])}; evaluate on data with the same classes"
            )
        samples = get_split(spec, split, val_fraction=val_fraction, seed=seed)[:limit]
        dataset = InstanceDataset(samples, spec, keep_crowd=True)
        return evaluate_detector(
            self.model,
            dataset,
            device=self.device,
            batch=batch,
            workers=workers,
            progress=progress,
            desc=f"val {split}",
        )

    def truth(self, sample: Any, spec: Any) -> InstanceResult:
        from seglab.data import read_image
        from seglab.instance.data import read_instances

        return labelled(read_image(sample.image, 3), read_instances(sample, spec), self.card, sample.image)

    def scores(self, evaluation: Any) -> Any:
        from seglab.engine.report import Scores

        m, colors = evaluation.metrics, self.card.colors
        kinds = [k for k in ("mask", "box") if k in m]  # the first one picks best.pt
        names = list(m[kinds[0]]["per_class"])  # the classes after background
        rows = [(n, tuple(colors[i]), [m[k]["per_class"][n] for k in kinds]) for i, n in enumerate(names, start=1)]
        headline = {f"{k} {stat}": m[k][stat] for k in kinds for stat in ("AP", "AP50")}
        return Scores(headline, [f"{k} AP" for k in kinds], rows, evaluation.confusion, [*names, "background"])


def labelled(image: np.ndarray, inst: Any, card: ModelCard, path: Path | None) -> InstanceResult:
    """Labelled objects (:class:`seglab.instance.data.Instances`, crowd regions left out) as a result
    to draw: tags name the class without a score; a box detector's have no masks."""
    keep = ~inst.crowd
    labels = inst.labels[keep]
    found = Detections(
        boxes=inst.boxes[keep],
        labels=labels,
        scores=np.full(len(labels), np.nan, np.float32),
        masks=inst.masks[keep].astype(bool) if card.task == "instance" else None,
        names=[card.classes[k] for k in labels],
    )
    return InstanceResult(image, found, card.classes, card.colors, path)


@torch.no_grad()
def detect(
    model: Any,
    images: list[torch.Tensor],
    classes: list[str],
    *,
    min_score: float,
    max_dets: int = DETECTIONS_PER_IMAGE,
) -> list[Detections]:
    """The objects ``model`` finds in each image (float [3, H, W], 0..1): the at most ``max_dets``
    highest-scoring of those scoring at least ``min_score``, with their masks at the image's size.

    ``model`` is a torchvision detector in eval mode, or anything with its eval-mode contract (an
    exported graph: masks already at the image's size). A torchvision Mask R-CNN's masks are pasted
    here, for the kept objects only and over their boxes only (``paste_masks``), instead of
    torchvision's float image-sized canvas for every object it returns."""
    unpasted = isinstance(model, GeneralizedRCNN)
    outputs = _forward_unpasted(model, images) if unpasted else model(images)
    found = []
    for image, out in zip(images, outputs, strict=True):
        keep = top_scoring(out["scores"], min_score, max_dets)
        boxes = out["boxes"][keep].float().cpu()
        labels = out["labels"][keep].cpu().numpy()
        masks = None
        if "masks" in out:
            kept = out["masks"][keep].float().cpu()
            size = (image.shape[-2], image.shape[-1])
            masks = paste_masks(kept, boxes, size) if unpasted else (kept[:, 0] > 0.5).numpy()
        scores = out["scores"][keep].float().cpu().numpy()
        found.append(Detections(boxes.numpy(), labels, scores, masks, [classes[k] for k in labels]))
    return found


def top_scoring(scores: torch.Tensor, min_score: float, max_dets: int) -> torch.Tensor:
    """Indices of the at most ``max_dets`` highest ``scores`` that reach ``min_score``, best first."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[scores[order] >= min_score][:max_dets]


def _forward_unpasted(model: GeneralizedRCNN, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """torchvision's eval-mode ``GeneralizedRCNN.forward`` without the mask pasting of its last step:
    boxes in the image's pixels, masks still the mask head's [N, 1, 28, 28] probabilities."""
    from torchvision.models.detection.transform import resize_boxes

    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    outputs, _ = model.roi_heads(features, proposals, batch.image_sizes)
    for out, resized, image in zip(outputs, batch.image_sizes, images, strict=True):
        out["boxes"] = resize_boxes(out["boxes"], resized, image.shape[-2:])
    return outputs


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Mask R-CNN's [N, 1, M, M] probabilities in boxes [N, 4] (image pixels) -> (N, H, W) bool at 0.5.

    The same pixels as torchvision's ``paste_masks_in_image`` then ``> 0.5`` (its padding, box
    expansion, integer box and bilinear resize), but each mask is resized and thresholded over its
    box only, not written into a float (H, W) canvas of its own. The array is laid out so that
    ``masks.transpose(1, 2, 0)`` is (H, W, N) in Fortran order, what pycocotools encodes without a copy."""
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    h, w = size
    padded, scale = expand_masks(masks, padding=1)
    out = np.zeros((len(masks), w, h), dtype=bool)  # each object transposed: column-major
    for i, (x0, y0, x1, y1) in enumerate(expand_boxes(boxes, scale).to(torch.int64).tolist()):
        box_h, box_w = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
        resized = F.interpolate(padded[i : i + 1], size=(box_h, box_w), mode="bilinear", align_corners=False)
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y1 + 1, h), min(x1 + 1, w)
        # thresholded by numpy: a torch op this small costs more in waiting for its second thread
        # than it computes when the machine is busy (8x slower at load 3 on 2 cores)
        crop = resized[0, 0].numpy()[top - y0 : bottom - y0, left - x0 : right - x0] > 0.5
        out[i, left:right, top:bottom] = crop.T
    return out.transpose(0, 2, 1)
