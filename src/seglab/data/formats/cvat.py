"""The ``cvat`` layout: a "CVAT for images 1.1" XML export (``annotations.xml`` beside ``images/``).

``<image name width height [subset]>`` elements hold ``<polygon points="x1,y1;x2,y2;...">``,
``<polyline>``, ``<box xtl ytl xbr ybr [rotation]>``, ``<ellipse cx cy rx ry>`` and ``<mask rle
left top width height>`` shapes, each with a ``label`` declared under ``<meta><task>`` (or
``<project>``, ``<job>``) ``<labels>``. Shapes are drawn in ``z_order``. Boxes and ellipses become
polygons; polylines are open, so they become strips :data:`~seglab.data.formats.shapes.LINE_WIDTH`
pixels wide (one object per polyline); masks become COCO RLE. Points, tags, skeletons and cuboids
hold no area and are left out (counted in a note). The images' ``subset`` attribute (Train,
Validation, ...) gives the splits, as do split folders each with its own annotations.xml.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from seglab.data.formats.common import SPLIT_ALIASES, _register, _size_problem, thread_map
from seglab.data.formats.shapes import (
    LINE_WIDTH,
    MAX_ANNOTATION_BYTES,
    ShapeError,
    annotation,
    box_points,
    ellipse_points,
    finish_objects,
    label_classes,
    line_strips,
    numbers,
    pixel_polygon,
    read_limited,
    skipped_note,
)
from seglab.data.io import MAX_PIXELS
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

XML_NAME = "annotations.xml"
REGIONS = ("polygon", "polyline", "box", "ellipse", "mask")


def _cvat_files(root: Path) -> dict[str, Path]:
    """{split: annotations.xml}: one at the root (its images' subsets give the splits, under the key
    ''), or one per split folder."""
    if (root / XML_NAME).is_file():
        return {"": root / XML_NAME}
    found: dict[str, Path] = {}
    for folder, split in SPLIT_ALIASES.items():
        if split not in found and (root / folder / XML_NAME).is_file():
            found[split] = root / folder / XML_NAME
    return found


def _detect_cvat(root: Path) -> bool:
    for path in _cvat_files(root).values():
        with path.open("rb") as f:
            if b"<annotations" in f.read(4096):
                return True
    return False


def _read_xml(path: Path) -> ET.Element:
    """The parsed file (its size bounded first: CPython's expat expands no external entity and
    stops entity-expansion bombs), checked to be a CVAT for images export."""
    try:
        tree = ET.fromstring(read_limited(path, "CVAT annotations", MAX_ANNOTATION_BYTES))
    except ET.ParseError as e:
        raise SeglabError(f"{path}: not valid XML ({e}); fix it or export it again from CVAT") from None
    if tree.tag != "annotations":
        raise SeglabError(f"{path}: the root element is <{tree.tag}>, not <annotations>; export 'CVAT for images 1.1'")
    if tree.find("image") is None and tree.find("track") is not None:
        raise SeglabError(f"{path} is a 'CVAT for video' export (tracks); export 'CVAT for images 1.1' instead")
    return tree


def _declared_labels(tree: ET.Element) -> list[str]:
    """The label names under <meta>'s task, project or job, in their order."""
    names = [e.findtext("name") or "" for e in tree.findall("meta/*/labels/label")]
    return list(dict.fromkeys(n for n in names if n))


# --------------------------------------------------------------------------- shapes


def _attr(element: ET.Element, key: str) -> float:
    value = element.get(key)
    if value is None:
        raise ShapeError(f"attribute {key} is missing")
    return numbers([value])[0]


def _points(element: ET.Element) -> list[list[float]]:
    """``points="x1,y1;x2,y2;..."`` as [[x, y], ...]."""
    pairs = [p.split(",") for p in (element.get("points") or "").split(";") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ShapeError("its points are not 'x,y' pairs separated by ';'")
    return [numbers(p) for p in pairs]


def _mask_rle(element: ET.Element, size: tuple[int, int]) -> dict[str, Any]:
    """A CVAT mask (run lengths over its box, row by row, background first) as a COCO RLE of the image."""
    from pycocotools import mask as mask_utils

    h, w = size
    left, top, bw, bh = (int(_attr(element, k)) for k in ("left", "top", "width", "height"))
    if bw < 1 or bh < 1 or left < 0 or top < 0 or left + bw > w or top + bh > h or bw * bh > MAX_PIXELS:
        raise ShapeError(f"its box {bw}x{bh} at ({left}, {top}) does not fit the {w}x{h} image")
    try:
        runs = np.array([int(r) for r in (element.get("rle") or "").split(",")], dtype=np.int64)
    except ValueError:
        raise ShapeError("its rle is not comma-separated whole numbers") from None
    if (runs < 0).any() or runs.sum() != bw * bh:
        raise ShapeError(f"its rle covers {int(runs.sum()):,} pixels, not the {bw}x{bh} = {bw * bh:,} of its box")
    values = np.arange(len(runs), dtype=np.int64) % 2
    full = np.zeros((h, w), dtype=np.uint8)
    full[top : top + bh, left : left + bw] = np.repeat(values, runs).reshape(bh, bw)
    if not full.any():
        raise ShapeError("its mask is empty")
    rle = mask_utils.encode(np.asfortranarray(full))
    return {"size": [h, w], "counts": rle["counts"].decode()}


def _segmentation(element: ET.Element, size: tuple[int, int]) -> Any:
    """One shape element as a COCO segmentation: a list of polygons, or an RLE."""
    kind = element.tag
    if kind == "polygon":
        return [pixel_polygon(_points(element), size)]
    if kind == "polyline":
        return line_strips(_points(element), size)
    rotation = numbers([element.get("rotation") or 0])[0]
    if kind == "box":
        x1, y1, x2, y2 = (_attr(element, k) for k in ("xtl", "ytl", "xbr", "ybr"))
        return [pixel_polygon(box_points(x1, y1, x2, y2, rotation), size)]
    if kind == "ellipse":
        cx, cy, rx, ry = (_attr(element, k) for k in ("cx", "cy", "rx", "ry"))
        return [pixel_polygon(ellipse_points(cx, cy, rx, ry, rotation), size)]
    return _mask_rle(element, size)


def _z_order(element: ET.Element) -> int:
    try:
        return int(element.get("z_order") or 0)
    except ValueError:
        return 0


def _image_objects(
    image: ET.Element, where: str, size: tuple[int, int], index: dict[str, int], problems: list[str], skipped: Counter
) -> list[dict[str, Any]]:
    """The shapes of one <image>, in z_order, as annotations."""
    shapes = [e for e in image if e.tag in REGIONS]
    skipped.update(e.tag for e in image if e.tag not in REGIONS)
    shapes.sort(key=_z_order)  # stable: shapes of one z_order keep their order
    objects = []
    for i, shape in enumerate(shapes):
        label = shape.get("label") or ""
        what = f"{where} <{shape.tag}> {i} ('{label}')"
        if label not in index:
            problems.append(f"{what}: label not among the task's labels; add it in CVAT or to classes: in data.yaml")
            continue
        try:
            objects.append(annotation(_segmentation(shape, size), index[label], i))
        except (ShapeError, ValueError) as e:
            problems.append(f"{what}: {e}; fix the shape in CVAT and export again")
    return objects


# --------------------------------------------------------------------------- the layout


def _image_base(xml: Path, root: Path, name: str) -> Path:
    """The folder image ``name`` is relative to: images/ beside the XML, the XML's folder, or the root's."""
    for base in (xml.parent / "images", xml.parent, root / "images", root):
        if (base / name).is_file():
            return base
    return xml.parent / "images"


def _image_entry(image: ET.Element, xml: Path) -> tuple[str, tuple[int, int]]:
    """(name, (h, w)) of an <image>, or a SeglabError naming it."""
    name = image.get("name") or ""
    try:
        h, w = int(image.get("height") or 0), int(image.get("width") or 0)
    except ValueError:
        h = w = 0
    if not name or h < 1 or w < 1:
        raise SeglabError(
            f"{xml}: <image id={image.get('id')!r}> needs a name and positive width and height; export it again"
        )
    return name, (h, w)


def _samples(
    tree: ET.Element, xml: Path, root: Path, index: dict[str, int], problems: list[str], skipped: Counter
) -> list[tuple[str, Sample]]:
    """(split from the subset attribute, sample) for each <image> of ``xml`` whose file is there at its size."""
    entries = [(image, *_image_entry(image, xml)) for image in tree.iter("image")]
    paths = [_image_base(xml, root, name) / name for _, name, _ in entries]
    declared = [
        ({"height": s[0], "width": s[1], "file_name": n}, p) for (_, n, s), p in zip(entries, paths, strict=True)
    ]
    size_problems = thread_map(lambda d: _size_problem(xml, d) if d[1].is_file() else None, declared)
    found = []
    for (image, name, size), path, size_problem in zip(entries, paths, size_problems, strict=True):
        if not path.is_file() or size_problem:
            problems.append(size_problem or f"{xml}: image {name} not found in {path.parent}; put it there")
            continue
        subset = SPLIT_ALIASES.get((image.get("subset") or "train").lower(), "train")
        objects = _image_objects(image, f"{xml}: image {name}", size, index, problems, skipped)
        found.append((subset, Sample(image=path, annotations=objects, size=size)))
    return found


@_register(
    "cvat",
    "a 'CVAT for images 1.1' export: annotations.xml beside images/ (or one per train/, val/ folder)",
    _detect_cvat,
    objects=True,
)
def load_cvat(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    files = _cvat_files(root)
    trees = {split: _read_xml(path) for split, path in files.items()}
    declared = [n for tree in trees.values() for n in _declared_labels(tree)]
    found = sorted({e.get("label") or "" for t in trees.values() for i in t.iter("image") for e in i} - {""})
    classes, index = label_classes(list(dict.fromkeys(declared)) or found, cfg)
    skipped: Counter[str] = Counter()
    splits: dict[str, list[Sample]] = {}
    for split, tree in trees.items():
        for subset, sample in _samples(tree, files[split], root, index, problems, skipped):
            splits.setdefault(split or subset, []).append(sample)
    notes = [f"CVAT: {sum(map(len, splits.values()))} images in {', '.join(map(str, files.values()))}"]
    notes += skipped_note(skipped, "CVAT elements")
    lines = sum(1 for tree in trees.values() for _ in tree.iter("polyline"))
    if lines:
        notes.append(f"CVAT: {lines} polylines drawn as strips {LINE_WIDTH:g} pixels wide (one object each)")
    return finish_objects(root, "cvat", splits, classes, cfg, notes, problems)
