"""What a dataset is, once its layout has been understood.

Every layout (pair lists, image/mask folders, VOC, Cityscapes, COCO) is turned into one
:class:`DatasetSpec`: class names, colours, ignore index, how masks are encoded, and the
samples of each split. Everything downstream (datasets, ``data check``, training) reads
only this, never the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How a mask file is turned into class indices:
#   index      single-channel PNG (L or P mode) whose values are class indices
#   rgb        RGB colour mask, mapped through DatasetSpec.colors
#   binary     0/255 mask mapped to {0, 1}
#   cityscapes *_labelIds PNG mapped to the 19 Cityscapes train ids (others -> ignore)
#   coco       no mask file: polygons/RLE in Sample.annotations are rasterised
#   instance   instance-id PNG/TIFF: one integer per object, 0 = background; the class of each
#              object from DatasetSpec.class_map, else class 1 (the one foreground class)
MASK_ENCODINGS = ("index", "rgb", "binary", "cityscapes", "coco", "instance")


@dataclass
class Sample:
    """One image and where its labels come from."""

    image: Path
    mask: Path | None = None
    # COCO only: the image's annotations (dicts with 'segmentation', 'category_id', 'iscrowd')
    # already mapped to contiguous class indices in 'category_id', and the image size (h, w).
    annotations: list[dict[str, Any]] | None = None
    size: tuple[int, int] | None = None
    coco_id: int | None = None  # COCO only: the image's id in the file (COCO results JSON refers to it)


@dataclass
class DatasetSpec:
    root: Path
    format: str  # pairs, folders, voc, cityscapes, coco, labelme, cvat, yolo
    classes: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int
    mask_encoding: str  # one of MASK_ENCODINGS
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was detected or assumed, for the log
    # Layout problems found while listing samples (a list line naming a missing file, an image
    # without a mask); the affected samples are left out. Only non-empty with
    # resolve_dataset(..., strict=False), which `seglab data check` uses: strict mode raises instead.
    problems: list[str] = field(default_factory=list)
    # mask_encoding instance only: {mask file name: {instance id: class index}} from data.yaml's
    # class_map; None means every object is class 1
    class_map: dict[str, dict[int, int]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DataConfig:
    """The keys a ``data.yaml`` may hold. Relative paths are relative to the YAML file."""

    path: str = "."  # dataset root
    format: str = "auto"  # auto, pairs, folders, voc, cityscapes, coco, labelme, cvat, yolo
    train: str | None = None  # split source: a pair list, a folder, an ImageSet name, a COCO json
    val: str | None = None
    test: str | None = None
    classes: list[str] | None = None  # class names in label order
    colors: list[list[int]] | None = None  # RGB colour per class (plots, and decoding rgb masks)
    ignore_index: int | None = None  # label value that is not scored (default 255)
    mask_encoding: str = "auto"  # auto, index, rgb, binary, instance (instance-id masks, 0 = background)
    class_map: str | None = None  # instance masks: a JSON {mask file name: {instance id: class name}}
    names: list[str] | None = None  # yolo: Ultralytics' class names, YOLO class 0 first (seglab adds background)
