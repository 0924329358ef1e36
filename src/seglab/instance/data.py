"""Objects, one by one: COCO annotations or instance-id masks -> boxes, masks, labels.

``read_instances(sample, spec)`` is the one place a sample's objects are read, whatever the
layout: COCO polygons, uncompressed and compressed RLE (``iscrowd`` kept as a flag), or an
instance-id mask (one integer per object, 0 = background) with ``spec.class_map``. An image
without objects gives empty arrays, which torchvision's detectors train on as pure background.

``InstanceDataset`` turns samples into ``(image uint8 [3,H,W], target)`` with the target's
``boxes`` and ``masks`` as torchvision ``tv_tensors``, so transforms v2 move them with the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from seglab.data.io import BadSample, class_table, decode_coco_segmentation, read_image, read_instance_ids
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import SeglabError


@dataclass
class Instances:
    """The objects of one image, as numpy arrays (N objects, image H x W)."""

    masks: np.ndarray  # (N, H, W) uint8 0/1
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 (continuous: a 1-pixel object is 1 wide)
    labels: np.ndarray  # (N,) int64 class indices 1..K
    crowd: np.ndarray  # (N,) bool: COCO iscrowd regions (scored as "ignore", never trained on)
    area: np.ndarray  # (N,) float32: the annotation's area (COCO's small/medium/large use it)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of_target(cls, target: dict[str, Any]) -> Instances:
        """The objects of an :class:`InstanceDataset` target (tensors) as numpy arrays."""
        return cls(
            masks=target["masks"].numpy(),
            boxes=target["boxes"].numpy(),
            labels=target["labels"].numpy(),
            crowd=target["iscrowd"].numpy().astype(bool),
            area=target["area"].numpy(),
        )


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) tight boxes x1, y1, x2 + 1, y2 + 1; an empty mask gives zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        if len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def coco_instances(annotations: list[dict[str, Any]], size: tuple[int, int]) -> Instances:
    """COCO annotations (``category_id`` already a class index) -> :class:`Instances`.

    Boxes are the annotations' own ``bbox``; an annotation without a usable segmentation gets
    its box as its mask (a detection-only file still trains Mask R-CNN's box head sensibly)."""
    h, w = size
    masks, boxes, labels, crowd, area = [], [], [], [], []
    for ann in annotations:
        bbox = ann.get("bbox")
        m = decode_coco_segmentation(ann.get("segmentation"), size, ann.get("id"))
        if m is None:
            if not bbox or bbox[2] <= 0 or bbox[3] <= 0:
                continue  # nothing to learn from: no shape and no box
            m = np.zeros((h, w), dtype=np.uint8)
            x, y, bw, bh = (round(v) for v in bbox)
            m[max(y, 0) : y + max(bh, 1), max(x, 0) : x + max(bw, 1)] = 1
        if bbox and bbox[2] > 0 and bbox[3] > 0:
            x, y, bw, bh = bbox
            box = [x, y, x + bw, y + bh]
        else:
            box = mask_boxes(m[None])[0].tolist()
        masks.append(m)
        boxes.append(box)
        labels.append(int(ann["category_id"]))
        crowd.append(bool(ann.get("iscrowd", 0)))
        area.append(float(ann.get("area") or m.sum()))
    return _pack(masks, boxes, labels, crowd, area, size)


def mask_instances(ids: np.ndarray, spec: DatasetSpec, mask_path: Path) -> Instances:
    """An instance-id mask (H, W) -> :class:`Instances`; classes from ``spec.class_map`` or all 1."""
    table = class_table(spec, mask_path)
    object_ids = [int(i) for i in np.unique(ids) if i != 0]
    masks, labels = [], []
    for i in object_ids:
        label = 1 if table is None else table.get(i)
        if label is None:
            continue  # an object the class map leaves out is not trained or scored
        masks.append((ids == i).astype(np.uint8))
        labels.append(label)
    stacked = np.stack(masks) if masks else np.zeros((0, *ids.shape), np.uint8)
    boxes = mask_boxes(stacked)
    return _pack(list(stacked), boxes.tolist(), labels, [False] * len(labels), stacked.sum((1, 2)).tolist(), ids.shape)


def _pack(masks, boxes, labels, crowd, area, size) -> Instances:
    h, w = size
    return Instances(
        masks=np.stack(masks).astype(np.uint8) if masks else np.zeros((0, h, w), np.uint8),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        crowd=np.asarray(crowd, dtype=bool),
        area=np.asarray(area, dtype=np.float32),
    )


def read_instances(sample: Sample, spec: DatasetSpec) -> Instances:
    """The objects of ``sample``, from its COCO annotations or its instance-id mask."""
    if spec.mask_encoding == "coco":
        if sample.size is None:
            raise SeglabError(f"COCO sample {sample.image} has no image size; the annotation file is incomplete")
        return coco_instances(sample.annotations or [], sample.size)
    if spec.mask_encoding != "instance" or sample.mask is None:
        raise SeglabError(
            f"{spec.root}: --task instance/detect needs COCO annotations or instance-id masks "
            f"(mask_encoding: instance), not {spec.mask_encoding} masks"
        )
    return mask_instances(read_instance_ids(sample.mask), spec, Path(sample.mask))


# --------------------------------------------------------------------------- dataset and transforms


def train_transform(img_size: int, scale_range: tuple[float, float], hflip: float, jitter: float) -> v2.Transform:
    """Flip, scale jitter and a square ``img_size`` crop (padded when smaller), moving boxes and masks
    with the image. Boxes are clipped to the crop; objects left with less than 2 pixels are dropped.

    The crop is exactly ``img_size``, the size the detector resizes to, so its own resize is a no-op
    and the scale jitter survives."""
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(hflip)]
    steps.append(v2.ScaleJitter((img_size, img_size), scale_range=scale_range, antialias=True))
    steps.append(v2.RandomCrop((img_size, img_size), pad_if_needed=True))
    if jitter:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2, labels_getter=_per_object)]
    return v2.Compose(steps)


def _per_object(inputs: tuple[Any, dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes must filter along with the boxes (it finds the masks itself)."""
    target = inputs[1]
    return target["labels"], target["iscrowd"], target["area"]


class InstanceDataset(Dataset):
    """``(image uint8 [C,H,W], target)`` pairs; target: ``boxes`` (BoundingBoxes XYXY), ``labels``,
    ``masks`` (Mask [N,H,W] uint8), ``iscrowd``, ``area`` and ``image_id`` (the sample's index).

    Crowd regions are kept only when ``keep_crowd`` (evaluation); training drops them, as
    torchvision's own references do. With ``transform`` None images keep their size: the
    detector resizes them, and predictions come back in the image's own pixels."""

    def __init__(
        self,
        samples: list[Sample],
        spec: DatasetSpec,
        transform: v2.Transform | None = None,
        *,
        keep_crowd: bool = False,
        tight_boxes: bool = True,
        in_channels: int = 3,
    ) -> None:
        self.samples, self.spec, self.transform = samples, spec, transform
        self.keep_crowd, self.tight_boxes, self.in_channels = keep_crowd, tight_boxes, in_channels
        self.seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, seed: int) -> None:
        self.seed = seed

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        sample = self.samples[index]
        try:
            image = read_image(sample.image, self.in_channels)
        except BadSample as e:
            raise SeglabError(str(e)) from None
        inst = read_instances(sample, self.spec)
        if inst.masks.shape[1:] != image.shape[:2]:
            raise SeglabError(
                f"{sample.image} is {image.shape[1]}x{image.shape[0]} but its annotations are for "
                f"{inst.masks.shape[2]}x{inst.masks.shape[1]}; fix the image size in the annotations"
            )
        keep = np.ones(len(inst), bool) if self.keep_crowd else ~inst.crowd
        h, w = image.shape[:2]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(inst.boxes[keep]), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(inst.masks[keep])),
            "labels": torch.from_numpy(inst.labels[keep]),
            "iscrowd": torch.from_numpy(inst.crowd[keep].astype(np.int64)),
            "area": torch.from_numpy(inst.area[keep]),
        }
        pixels = image if image.flags.writeable else image.copy()
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1))
        if self.transform is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.seed * 1_000_003 + index)  # each sample's augmentation depends on (seed, index)
            img, target = self.transform(img, target)
            torch.random.set_rng_state(generator_state)
            if self.tight_boxes and len(target["masks"]):  # a cropped object's box: the part left in view
                tight = mask_boxes(target["masks"].numpy())
                visible = (tight[:, 2] - tight[:, 0] >= 1) & (tight[:, 3] - tight[:, 1] >= 1)
                target = {k: v[visible] for k, v in target.items()}
                target["boxes"] = tv_tensors.BoundingBoxes(
                    torch.from_numpy(tight[visible]), format="XYXY", canvas_size=tuple(img.shape[-2:])
                )
        target["image_id"] = index
        return img.as_subclass(torch.Tensor), target


def collate_instances(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detectors take lists: images differ in size and targets in object count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
