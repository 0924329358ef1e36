"""``seglab export`` for Mask R-CNN and Faster R-CNN: one graph, checked against eager PyTorch.

torchvision's detectors trace: under tracing they take their ONNX-friendly paths (the resize,
the padding to a multiple of 32 and the mask pasting computed from the traced image size, the
pasting loop scripted), which is how torchvision's own test_onnx.py exports them. ``DetectorGraph``
wraps one as the exporters want it, one image tensor in and a tuple of tensors out, with the image
size and the number of objects dynamic, so one file takes any image, as the checkpoint does.

The check (``check_detector_parity``): the eager detector and the exported file on the same real
images (the val split of the data the model was trained on, each at its own size), their detections
matched object by object (same class, box IoU at least 0.5, greedily in score order); the file is
kept only when nearly every object is found by both, with boxes within a pixel and masks that
agree (TOLERANCE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_iou

from seglab.deploy.export import ExportSteps, export_metadata, onnx_export, parity_samples, torchscript_export
from seglab.deploy.runtime import DETECTOR_FORMATS, DETECTOR_INPUT
from seglab.engine.checkpoint import ModelCard
from seglab.errors import SeglabError
from seglab.instance.runtime import load_detector_graph, output_names

# share of objects found by both (of the larger count), max |box difference| in pixels, mean mask IoU
TOLERANCE = (0.98, 1.0, 0.98)
MATCH_IOU = 0.5  # two detections of one class with boxes overlapping this much are the same object


class DetectorGraph(nn.Module):
    """A torchvision detector in eval mode as one exportable graph: image [3, H, W] (float RGB
    0..1) -> (boxes [N, 4], labels [N], scores [N], masks [N, 1, H, W] for Mask R-CNN). The
    exporters take tensors and tuples, not torchvision's list of images and list of dicts."""

    def __init__(self, detector: FasterRCNN, names: tuple[str, ...]) -> None:
        super().__init__()
        self.detector, self.names = detector, names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.detector([image])[0]
        return tuple(out[name] for name in self.names)


@dataclass
class DetectorParity:
    """How an exported detector's objects compare with eager PyTorch's on the same images."""

    images: int
    source: str  # where the images came from
    objects: int  # eager PyTorch's detections, all images together
    exported_objects: int  # the export's
    matched: int  # objects found by both: same class, boxes overlapping by IoU >= MATCH_IOU
    max_box_diff: float  # pixels, largest coordinate difference of a matched pair
    max_score_diff: float
    mask_iou: float | None  # mean IoU of matched objects' masks at 0.5 (Mask R-CNN), None for boxes only
    min_mask_iou: float | None
    passed: bool

    def format(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        masks = "" if self.mask_iou is None else f", mask IoU mean {self.mask_iou:.4f} (min {self.min_mask_iou:.4f})"
        return (
            f"parity on {self.images} {self.source}: {self.matched} of {self.objects} objects matched "
            f"({self.exported_objects} in the export), max |box diff| {self.max_box_diff:.2e} px, "
            f"max |score diff| {self.max_score_diff:.2e}{masks} ({verdict})"
        )


def detector_steps(
    model: FasterRCNN,
    card: ModelCard,
    ckpt: dict[str, Any],
    weights: str | Path,
    format: str,
    opset: int,
    data: str | Path | None,
    count: int,
) -> ExportSteps:
    """How ``seglab export`` writes and checks a detector (see ``deploy.export.export``)."""
    if format not in DETECTOR_FORMATS:
        raise SeglabError(
            f"export: --format {format}: seglab exports a {card.arch} to {' or '.join(DETECTOR_FORMATS)} "
            "(torchvision's detectors do not go through torch.export); use --format onnx"
        )
    images, source = _parity_images(card, ckpt, data, count)
    names = output_names(card)
    config = ckpt.get("config") or {}
    meta = export_metadata(
        card,
        ckpt,
        weights,
        format,
        dynamic=True,
        dynamic_batch=False,
        half=False,
        input_shape=DETECTOR_INPUT,
        input="float32 [3, height, width], RGB pixel / 255, any size: the graph resizes the long side to img_size",
        output=(
            "boxes [N, 4] x1 y1 x2 y2 in input pixels, labels [N] (class indices 1..K), scores [N]"
            + (", masks [N, 1, height, width] probabilities (0.5 = the object's outline)" if "masks" in names else "")
        ),
        val_fraction=config.get("val_fraction"),
        seed=config.get("seed"),
    )
    graph = DetectorGraph(model, names).eval()
    example = images[0].float() / 255

    def write(tmp: Path) -> None:
        if format == "torchscript":
            torchscript_export(graph, example, tmp, meta)
            return
        objects = {0: "objects"}
        axes = {"image": {1: "height", 2: "width"}, **{name: objects for name in names}}
        if "masks" in names:
            axes["masks"] = {0: "objects", 2: "height", 3: "width"}
        doc = f"seglab {card.arch} detector; metadata 'seglab' holds its classes, colours and preprocessing"
        onnx_export(graph, example, tmp, meta, opset=opset, names=(["image"], list(names)), axes=axes, doc=doc)

    return ExportSteps(write, lambda tmp: check_detector_parity(model, card, tmp, images, source))


def _parity_images(card: ModelCard, ckpt: dict[str, Any], data: str | Path | None, count: int) -> tuple[list, str]:
    """``count`` uint8 RGB images [3, H, W] at their own sizes (the detector resizes them itself)."""
    from seglab.data import read_image

    samples, source = parity_samples(card, ckpt, data, count)
    if samples is None:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (count, 3, card.img_size, card.img_size), generator=generator, dtype=torch.uint8)
        return list(noise), source
    return [torch.from_numpy(read_image(s.image, 3).copy()).permute(2, 0, 1) for s in samples], source


@torch.no_grad()
def check_detector_parity(
    model: FasterRCNN, card: ModelCard, exported: Path, images: list[torch.Tensor], source: str
) -> DetectorParity:
    """Eager float32 PyTorch against the exported file, image by image (see the module docstring)."""
    graph, _, _ = load_detector_graph(exported, torch.device("cpu"))
    model.eval()
    objects = exported_objects = matched = 0
    box_diffs, score_diffs, ious = [0.0], [0.0], []
    for image in images:
        x = image.float() / 255
        expected, got = model([x])[0], graph([x])[0]
        objects, exported_objects = objects + len(expected["scores"]), exported_objects + len(got["scores"])
        pairs = match_detections(expected, got)
        matched += len(pairs)
        for i, j in pairs:
            box_diffs.append(float((expected["boxes"][i] - got["boxes"][j]).abs().max()))
            score_diffs.append(float((expected["scores"][i] - got["scores"][j]).abs()))
            if "masks" in expected:
                a, b = expected["masks"][i, 0] > 0.5, got["masks"][j, 0] > 0.5
                union = int((a | b).sum())
                ious.append(int((a & b).sum()) / union if union else 1.0)
    share, max_box, min_iou = TOLERANCE
    most = max(objects, exported_objects)
    mask_iou = float(np.mean(ious)) if ious else None
    passed = (
        (matched >= share * most)
        and bool(np.isfinite(max(box_diffs)))
        and max(box_diffs) <= max_box
        and (mask_iou is None or mask_iou >= min_iou)
    )
    return DetectorParity(
        images=len(images),
        source=source,
        objects=objects,
        exported_objects=exported_objects,
        matched=matched,
        max_box_diff=max(box_diffs),
        max_score_diff=max(score_diffs),
        mask_iou=mask_iou,
        min_mask_iou=min(ious) if ious else None,
        passed=passed,
    )


def match_detections(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Pairs (i in a, j in b) of the same object: same label, box IoU >= MATCH_IOU; each of a's
    detections, highest score first, takes the best-overlapping one of b's still free."""
    if not len(a["boxes"]) or not len(b["boxes"]):
        return []
    iou = box_iou(a["boxes"].float(), b["boxes"].float())
    iou[a["labels"][:, None] != b["labels"][None, :]] = 0
    pairs, free = [], torch.ones(len(b["boxes"]), dtype=torch.bool)
    for i in torch.argsort(a["scores"], descending=True).tolist():
        overlap = torch.where(free, iou[i], torch.zeros(()))
        j = int(overlap.argmax())
        if overlap[j] >= MATCH_IOU:
            pairs.append((i, j))
            free[j] = False
    return pairs
