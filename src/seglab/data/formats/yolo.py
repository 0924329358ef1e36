"""The ``yolo`` layout: Ultralytics YOLO-seg labels, ``labels/<split>/<stem>.txt`` beside ``images/<split>/``.

Each line of a label file is one object, ``class x1 y1 x2 y2 ...`` with coordinates normalised to
0..1 by the image's width and height; a detection line ``class cx cy w h`` (5 numbers) is a box.
Class names come from an Ultralytics data.yaml (``names:`` as a list or an ``{index: name}``
mapping), where YOLO's class 0 becomes seglab's class 1 (0 is background). An image without a
label file has no objects, as in Ultralytics. Roboflow's ``train/images`` + ``train/labels`` is
read too, and a data.yaml's ``train: images/train`` names the image folder of a split.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

from seglab.data.formats.common import (
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    SPLIT_ORDER,
    _images_in,
    _register,
    thread_map,
)
from seglab.data.formats.shapes import (
    MAX_LABEL_FILE_BYTES,
    ShapeError,
    UnreadableImage,
    annotation,
    box_points,
    finish_objects,
    numbers,
    pixel_polygon,
    read_limited,
    upright_size,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

ULTRALYTICS_ONLY = ("nc", "download")  # data.yaml keys seglab reads past


def read_ultralytics(values: dict[str, Any], source: str) -> dict[str, Any]:
    """An Ultralytics data.yaml's keys as seglab's: ``names`` (a list or {index: name}) made a list,
    ``nc`` checked against it and dropped, ``download`` dropped."""
    names, nc = values.get("names"), values.get("nc")
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else -1)
        if [str(k) for k in keys] != [str(i) for i in range(len(names))]:
            raise SeglabError(f"{source}: names: must be numbered 0, 1, 2, ... without gaps; fix its keys")
        names = [str(names[k]) for k in keys]
    if nc is not None and isinstance(names, list) and nc != len(names):
        raise SeglabError(f"{source}: nc: {nc} but names: lists {len(names)} classes; make them agree")
    values = {k: v for k, v in values.items() if k not in ULTRALYTICS_ONLY}
    if names is not None:
        values["names"] = names
    return values


def _label_dir(images: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``."""
    parts = list(images.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            return Path(*parts[:i], "labels", *parts[i + 1 :])
    return images.parent / "labels"


def _has_labels(folder: Path) -> bool:
    """Whether ``folder`` holds YOLO label files (text files, not mask images)."""
    if not folder.is_dir():
        return False
    first = list(itertools.islice(folder.rglob("*"), 20))
    return any(p.suffix == ".txt" for p in first) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in first)


def _yolo_dirs(root: Path, cfg: DataConfig | None = None) -> dict[str, tuple[Path, Path]]:
    """{split: (image folder, label folder)}: data.yaml's ``train:``/``val:``, images/<split> +
    labels/<split>, or <split>/images + <split>/labels (Roboflow)."""
    found: dict[str, tuple[Path, Path]] = {}
    for split in SPLIT_ORDER:
        given = getattr(cfg, split) if cfg else None
        if given:
            images = root / given
            if not images.is_dir():
                raise SeglabError(f"{split}: {images} is not a folder of images; fix '{split}:' in data.yaml")
            found[split] = (images, _label_dir(images))
    for folder, split in SPLIT_ALIASES.items():
        for images, labels in (
            (root / "images" / folder, root / "labels" / folder),
            (root / folder / "images", root / folder / "labels"),
        ):
            if split not in found and images.is_dir() and _has_labels(labels):
                found[split] = (images, labels)
    return found


def _detect_yolo(root: Path) -> bool:
    return bool(_yolo_dirs(root))


def _objects(text: str, where: Path, size: tuple[int, int], num: int, problems: list[str]) -> list[dict[str, Any]]:
    """The objects of one label file's ``text`` (``num`` YOLO classes)."""
    h, w = size
    objects: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls, *coords = numbers(fields)
            if cls != int(cls) or not 0 <= cls < num:
                raise ShapeError(f"class {fields[0]} is not one of the {num} classes 0..{num - 1} of data.yaml's names")
            if len(coords) == 4:  # a detection box: centre, width, height
                cx, cy, bw, bh = coords
                points = box_points(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            elif len(coords) >= 6 and len(coords) % 2 == 0:
                points = [coords[i : i + 2] for i in range(0, len(coords), 2)]
            else:
                raise ShapeError(f"{len(fields)} numbers; expected 'class x1 y1 x2 y2 x3 y3 ...' or 'class cx cy w h'")
            polygon = pixel_polygon([[x * w, y * h] for x, y in points], size)
        except ShapeError as e:
            problems.append(f"{where}: line {n}: {e}; fix the line")
            continue
        objects.append(annotation([polygon], int(cls) + 1, len(objects)))
    return objects


def _sample(image: Path, images: Path, labels: Path, num: int) -> tuple[Sample | None, list[str], bool]:
    """(the image's sample or None, the problems found, whether it has a label file)."""
    label = labels / image.relative_to(images).with_suffix(".txt")
    try:
        size = upright_size(image)
    except UnreadableImage as e:
        return None, [str(e)], label.is_file()
    if not label.is_file():
        return Sample(image=image, annotations=[], size=size), [], False
    problems: list[str] = []
    try:
        text = read_limited(label, "YOLO label file", MAX_LABEL_FILE_BYTES)
    except SeglabError as e:
        return None, [str(e)], True
    return Sample(image=image, annotations=_objects(text, label, size, num, problems), size=size), problems, True


def _max_class(dirs: dict[str, tuple[Path, Path]]) -> int:
    """The largest class id in the label files (for datasets without names:)."""
    largest = -1
    for _, labels in dirs.values():
        for path in labels.rglob("*.txt"):
            for line in read_limited(path, "YOLO label file", MAX_LABEL_FILE_BYTES).splitlines():
                first = line.split()[:1]
                if first and first[0].isdigit():
                    largest = max(largest, int(first[0]))
    return largest


@_register(
    "yolo",
    "YOLO-seg labels: images/{train,val}/ with labels/{train,val}/*.txt, names: in an Ultralytics data.yaml",
    _detect_yolo,
    objects=True,
)
def load_yolo(root: Path, cfg: DataConfig) -> DatasetSpec:
    dirs = _yolo_dirs(root, cfg)
    notes: list[str] = []
    if cfg.classes is not None:
        classes = list(cfg.classes)
    elif cfg.names:
        classes = ["background", *cfg.names]
    else:
        n = _max_class(dirs) + 1
        classes = ["background", *(f"class{i}" for i in range(max(n, 1)))]
        notes.append(f"YOLO: no names: in data.yaml; classes 0..{n - 1} named class0.. (add names: to name them)")
    problems: list[str] = []
    splits: dict[str, list[Sample]] = {}
    unlabelled = 0
    for split, (images, labels) in dirs.items():
        read = functools.partial(_sample, images=images, labels=labels, num=len(classes) - 1)
        results = thread_map(read, _images_in(images))
        for _, found, _ in results:
            problems += found
        unlabelled += sum(1 for sample, _, has_file in results if sample and not has_file)
        splits[split] = [sample for sample, _, _ in results if sample is not None]
    if unlabelled:
        notes.append(f"YOLO: {unlabelled} image(s) without a label file: no objects (as in Ultralytics)")
    return finish_objects(root, "yolo", splits, classes, cfg, notes, problems)
