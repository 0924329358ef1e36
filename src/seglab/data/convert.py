"""``seglab data convert``: any dataset seglab reads -> PNG masks, COCO JSON or YOLO-seg labels.

The source is read with :func:`~seglab.data.formats.resolve_dataset`, so every layout works (folders,
pairs, VOC, Cityscapes, COCO, LabelMe, CVAT, YOLO-seg, built-in names). Targets:

``png``   semantic: ``images/<split>/``, ``masks/<split>/<stem>.png`` class indices, and a data.yaml
          (classes, colors, ignore_index) that seglab's folders layout reads back.
``coco``  instance: ``annotations/instances_<split>.json`` and ``images/<split>/``.
``yolo``  Ultralytics YOLO-seg: ``images/<split>/``, ``labels/<split>/<stem>.txt`` (``class x1 y1 ...``
          normalised to 0..1) and an Ultralytics data.yaml (``path``, ``train``, ``val``, ``names``).

Objects come from the source's annotations, or from its masks: each id of an instance-id mask is
one object, and each 8-connected region of each class of a semantic mask is one (a class named
background, and ignore pixels, give none). Outlines are traced by
:func:`~seglab.data.formats.shapes.mask_polygons`; holes are filled, and objects are written
largest first, so a region drawn inside another's hole is drawn over it again. Images are
hard-linked (copied across file systems). Everything is written into a hidden folder beside
``--out`` and renamed into place at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from seglab.data.formats import get_split, resolve_dataset
from seglab.data.formats.shapes import is_background, mask_polygons, polygon_area
from seglab.data.io import class_table, decode_coco_segmentation, read_instance_ids, read_mask
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import SeglabError
from seglab.files import remove, remove_stale_temporaries, temporary
from seglab.registry import did_you_mean

TARGETS = ("png", "coco", "yolo")
VAL_FRACTION = 0.1  # yolo: the val split held out of train when the source has none (as `seglab train` does)


@dataclass
class Obj:
    """One object: its class index in the source spec, COCO segmentation (polygons or RLE), crowd flag."""

    label: int
    segmentation: Any
    crowd: bool = False


@dataclass
class ConvertResult:
    """What a conversion read and wrote."""

    source: str  # the source layout
    target: str
    out: Path
    images: int = 0
    objects: int = 0
    classes: list[str] = field(default_factory=list)  # the classes written (no background for coco/yolo)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The one line ``seglab data convert`` prints."""
        objects = f", {self.objects} objects" if self.target != "png" else ""
        use = {
            "png": f"seglab train --data {self.out}",
            "coco": f"seglab train --data {self.out} --task instance",
            "yolo": f"yolo segment train data={self.out / 'data.yaml'}, or seglab train --data {self.out}",
        }[self.target]
        notes = "".join(f"; {n}" for n in self.notes)
        return (
            f"data convert: {self.images} images{objects} of {len(self.classes)} classes from {self.source} "
            f"-> {self.target} in {self.out}{notes}; train with: {use}"
        )


# --------------------------------------------------------------------------- objects of a sample


def categories(spec: DatasetSpec) -> list[tuple[int, str]]:
    """(class index, name) of the classes that are objects: all but a first class named background."""
    first = 1 if spec.classes and is_background(spec.classes[0]) else 0
    return [(c, spec.classes[c]) for c in range(first, spec.num_classes)]


def sample_objects(sample: Sample, spec: DatasetSpec) -> tuple[list[Obj], tuple[int, int]]:
    """The objects of ``sample`` (see the module docstring) and its (h, w)."""
    if spec.mask_encoding == "coco":
        objs = [
            Obj(int(a["category_id"]), a.get("segmentation"), bool(a.get("iscrowd")))
            for a in sample.annotations or []
            if a["category_id"] != 0  # an explicit background category
        ]
        return objs, sample.size  # type: ignore[return-value]
    if spec.mask_encoding == "instance":
        ids = read_instance_ids(sample.mask)  # type: ignore[arg-type]
        table = class_table(spec, Path(sample.mask))  # type: ignore[arg-type]
        objs = []
        for i in (int(i) for i in np.unique(ids) if i != 0):
            label = 1 if table is None else table.get(i)
            if label is not None:
                objs.append(Obj(label, mask_polygons(ids == i)))
        return objs, ids.shape  # type: ignore[return-value]
    mask = read_mask(sample, spec)
    regions = [Obj(c, [p]) for c, _ in categories(spec) for p in mask_polygons(mask == c)]
    regions.sort(key=lambda o: -polygon_area(o.segmentation[0]))  # largest first: holes are drawn over again
    return regions, mask.shape  # type: ignore[return-value]


def polygons_of(obj: Obj, size: tuple[int, int]) -> list[list[float]]:
    """An object's outline polygons (an RLE is traced)."""
    if isinstance(obj.segmentation, list):
        return [list(map(float, p)) for p in obj.segmentation if isinstance(p, list) and len(p) >= 6]
    mask = decode_coco_segmentation(obj.segmentation, size)
    return mask_polygons(mask) if mask is not None else []


# --------------------------------------------------------------------------- files


def _place(image: Path, dest: Path) -> None:
    """Hard-link ``image`` to ``dest``, or copy it where links cannot be made (another file system)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(image, dest)
    except OSError:
        shutil.copyfile(image, dest)


def _named(samples: list[Sample]) -> Iterator[tuple[Sample, str]]:
    """Each sample with a file name unique in its split by stem (``a.jpg``, ``a_1.png``, ...)."""
    used: set[str] = set()
    for sample in samples:
        stem, suffix = sample.image.stem, sample.image.suffix
        name, k = stem, 0
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        yield sample, name + suffix


def _write_yaml(path: Path, content: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------- writers


def write_png(spec: DatasetSpec, tmp: Path, out: Path, result: ConvertResult) -> None:
    """Semantic index masks and a data.yaml for seglab's folders layout."""
    for split, samples in spec.splits.items():
        for sample, name in _named(samples):
            _place(sample.image, tmp / "images" / split / name)
            masks = tmp / "masks" / split
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(read_mask(sample, spec), "L").save(masks / f"{Path(name).stem}.png")
            result.images += 1
    _write_yaml(
        tmp / "data.yaml",
        {
            "format": "folders",
            "mask_encoding": "index",
            "classes": list(spec.classes),
            "colors": [list(c) for c in spec.colors],
            "ignore_index": spec.ignore_index,
        },
    )
    result.classes = list(spec.classes)


def write_coco(spec: DatasetSpec, tmp: Path, out: Path, result: ConvertResult) -> None:
    """A COCO instances file per split, category ids 1..K (the ids seglab's coco layout reads back)."""
    from pycocotools import mask as mask_utils

    cats = categories(spec)
    category_id = {c: i + 1 for i, (c, _) in enumerate(cats)}
    (tmp / "annotations").mkdir()
    for split, samples in spec.splits.items():
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, (sample, name) in enumerate(_named(samples), 1):
            objs, (h, w) = sample_objects(sample, spec)
            _place(sample.image, tmp / "images" / split / name)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            for obj in objs:
                mask = decode_coco_segmentation(obj.segmentation, (h, w))
                if mask is None or not mask.any() or obj.label not in category_id:
                    continue
                rle = mask_utils.encode(np.asfortranarray(mask))
                segmentation = obj.segmentation
                if not isinstance(segmentation, list):
                    segmentation = {"size": [h, w], "counts": rle["counts"].decode()}
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id[obj.label],
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(obj.crowd),
                })  # fmt: skip
        content = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": category_id[c], "name": n, "supercategory": "none"} for c, n in cats],
        }
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
        result.images += len(images)
        result.objects += len(annotations)
    result.classes = [n for _, n in cats]


def write_yolo(spec: DatasetSpec, tmp: Path, out: Path, result: ConvertResult) -> None:
    """YOLO-seg label files, one line per polygon, and an Ultralytics data.yaml."""
    cats = categories(spec)
    yolo_class = {c: i for i, (c, _) in enumerate(cats)}
    splits = dict(spec.splits)
    if "val" not in splits and "train" in splits:
        held = {s: get_split(spec, s, val_fraction=VAL_FRACTION) for s in ("train", "val")}
        splits = {**splits, **held}
        result.notes.append(f"no val split: {len(splits['val'])} train images held out as val (seed 0)")
    crowd = 0
    for split, samples in splits.items():
        labels = tmp / "labels" / split
        labels.mkdir(parents=True)
        for sample, name in _named(samples):
            objs, (h, w) = sample_objects(sample, spec)
            _place(sample.image, tmp / "images" / split / name)
            lines = []
            for obj in objs:
                if obj.crowd or obj.label not in yolo_class:
                    crowd += obj.crowd
                    continue
                for polygon in polygons_of(obj, (h, w)):
                    xy = (np.asarray(polygon).reshape(-1, 2) / (w, h)).clip(0, 1)
                    lines.append(" ".join([str(yolo_class[obj.label]), *(f"{v:.6f}" for v in xy.ravel())]))
            (labels / f"{Path(name).stem}.txt").write_text("".join(f"{line}\n" for line in lines))
            result.images += 1
            result.objects += len(lines)
    if crowd:
        result.notes.append(f"{crowd} crowd regions left out (YOLO-seg has none)")
    content: dict[str, Any] = {"path": str(out.resolve())}
    content.update({s: f"images/{s}" for s in splits})
    content["names"] = {i: n for i, (_, n) in enumerate(cats)}
    _write_yaml(tmp / "data.yaml", content)
    result.classes = [n for _, n in cats]


WRITERS: dict[str, Callable[[DatasetSpec, Path, Path, ConvertResult], None]] = {
    "png": write_png,
    "coco": write_coco,
    "yolo": write_yolo,
}


def convert_dataset(
    source: str | Path, to: str, out: str | Path, *, task: str = "semantic", data_cache: str | Path | None = None
) -> ConvertResult:
    """Convert the dataset at ``source`` to format ``to`` (png, coco, yolo) in the new or empty folder
    ``out``. ``task`` "instance" reads a mask layout's masks as instance ids (one object per id)."""
    if to not in TARGETS:
        raise SeglabError(f"data convert: --to {to}{did_you_mean(to, TARGETS)}: choose one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SeglabError(f"data convert: --out {out} is not an empty folder; choose a new one")
    spec = resolve_dataset(source, cache_dir=data_cache, task=task)
    from seglab.data.shards import ShardSpec

    if isinstance(spec, ShardSpec):  # seglab data pack's: its samples are in tar files, its splits empty
        raise SeglabError(f"data convert: {source} is a shard set; convert the dataset it was packed from")
    result = ConvertResult(source=spec.format, target=to, out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary(out, directory=True)
    try:
        WRITERS[to](spec, tmp, out, result)
        os.replace(tmp, out)  # onto an empty folder too
    finally:
        remove(tmp)
    return result
