"""The ``voc`` layout: PASCAL VOC's JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/."""

from __future__ import annotations

from pathlib import Path

from seglab.data.formats.common import (
    SPLIT_ORDER,
    Metadata,
    _finish,
    _images_in,
    _listing,
    _register,
    _spec,
    color_palette,
    read_text,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def _detect_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir()


def _voc_metadata(root: Path) -> Metadata:
    names_file = root / "class_names.txt"
    if not names_file.is_file():
        return Metadata(classes=list(VOC_CLASSES), colors=color_palette(len(VOC_CLASSES)), mask_encoding="index")
    names = [line.strip() for line in read_text(names_file, "class names file").splitlines() if line.strip()]
    ignore_line = bool(names) and names[0] == "__ignore__"  # labelme: label -1, stored as 255 in the PNGs
    if ignore_line:
        names = names[1:]
    if names and names[0].strip("_").lower() == "background":
        names[0] = "background"
    if not names:
        raise SeglabError(f"{names_file} lists no class names; one name per line, in label order")
    note = f"class names from {names_file} ({len(names)} classes"
    note += "; '__ignore__' is label 255, not a class)" if ignore_line else ")"
    return Metadata(classes=names, colors=color_palette(len(names)), mask_encoding="index", note=note)


@_register("voc", "JPEGImages/, SegmentationClass/*.png and ImageSets/Segmentation/{train,val}.txt", _detect_voc)
def load_voc(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    notes: list[str] = []
    images = {p.stem: p for p in _images_in(root / "JPEGImages")}
    masks = {p.stem: p for p in _images_in(root / "SegmentationClass")}
    sets = root / "ImageSets" / "Segmentation"
    lists: dict[str, Path] = {}
    for split in SPLIT_ORDER:
        given = getattr(cfg, split)
        if given:
            path = root / given if given.endswith(".txt") else sets / f"{given}.txt"
            if not path.is_file():
                raise SeglabError(f"{split}: image set {path} not found; fix '{split}:' in data.yaml")
            lists[split] = path
        elif (sets / f"{split}.txt").is_file():
            lists[split] = sets / f"{split}.txt"
    splits: dict[str, list[Sample]] = {}
    for split, path in lists.items():
        ids = [line.split()[0] for line in read_text(path, "image set").splitlines() if line.strip()]
        if split == "test" and not any(i in masks for i in ids):
            notes.append(f"{path}: no SegmentationClass masks for these images; test split not used")
            continue
        no_image = [i for i in ids if i not in images]
        no_mask = [i for i in ids if i not in masks]
        if no_image:
            problems.append(f"{path}: {len(no_image)} id(s) without an image in JPEGImages/: {_listing(no_image)}")
        if no_mask:
            problems.append(f"{path}: {len(no_mask)} id(s) without a mask in SegmentationClass/: {_listing(no_mask)}")
        splits[split] = [Sample(image=images[i], mask=masks[i]) for i in ids if i in images and i in masks]
    if not lists:
        no_image = sorted(set(masks) - set(images))
        if no_image:
            problems.append(
                f"{len(no_image)} mask(s) in SegmentationClass/ without an image in JPEGImages/: {_listing(no_image)}"
            )
        splits["train"] = [Sample(image=images[k], mask=masks[k]) for k in sorted(masks) if k in images]
        notes.append(
            f"no ImageSets/Segmentation/ lists in {root}: every SegmentationClass mask "
            f"({len(splits['train'])}) is used as train"
        )
    return _finish(_spec(root, "voc", splits, notes, problems), cfg, _voc_metadata(root), str(root))
