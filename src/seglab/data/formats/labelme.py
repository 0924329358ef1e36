"""The ``labelme`` layout: one LabelMe JSON per image (polygons, rectangles, circles).

A file is ``{"shapes": [{"label", "points", "group_id", "shape_type"}, ...], "imagePath",
"imageHeight", "imageWidth", ...}``. Shapes sharing a label and a ``group_id`` are one object;
rectangles (2 corners) and circles (centre and a point on the circle) become polygons. Lines,
line strips and points hold no area and are left out (counted in a note). The image is the file
``imagePath`` names (relative to the JSON) or one of the same name beside the JSON; the embedded
``imageData`` is never decoded. Split folders (train/, val/, ...) give the splits; otherwise every
file is train and seglab holds out val itself. Classes are the labels in sorted order after
background (0), unless data.yaml lists ``classes:``.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from seglab.data.formats.common import IMAGE_SUFFIXES, SPLIT_ALIASES, _listing, _register, _size_problem, thread_map
from seglab.data.formats.shapes import (
    MAX_LABEL_FILE_BYTES,
    ShapeError,
    annotation,
    box_points,
    ellipse_points,
    finish_objects,
    label_classes,
    numbers,
    pixel_polygon,
    read_limited,
    skipped_note,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

REGION_SHAPES = ("polygon", "rectangle", "circle")
SNIFF_BYTES = 1 << 16  # read from a .json to tell a LabelMe file from others


def _split_folders(root: Path) -> dict[str, Path]:
    """{split: folder}: split-named subfolders (train/, val/, ...), or the whole root as train."""
    found: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(p.name.lower())
        if split and p.is_dir() and split not in found:
            found[split] = p
    return found or {"train": root}


def _looks_like_labelme(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"shapes"' in head


def _detect_labelme(root: Path) -> bool:
    folders = _split_folders(root).values()
    return any(_looks_like_labelme(p) for folder in folders for p in itertools.islice(folder.rglob("*.json"), 3))


# --------------------------------------------------------------------------- one file


class _File:
    """One LabelMe file, parsed: its content, or the problem that stopped it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.content: dict[str, Any] | None = None
        self.problem: str | None = None
        try:
            content = json.loads(read_limited(path, "LabelMe file", MAX_LABEL_FILE_BYTES))
        except SeglabError as e:
            self.problem = str(e)
            return
        except (json.JSONDecodeError, RecursionError) as e:
            self.problem = f"{path}: not valid JSON ({e}); fix it or save it again in LabelMe"
            return
        if isinstance(content, dict) and "shapes" in content:
            self.problem = _structure_problem(path, content)
            self.content = None if self.problem else content

    @property
    def labels(self) -> list[str]:
        return [s["label"] for s in self.content["shapes"]] if self.content else []


def _structure_problem(path: Path, content: dict[str, Any]) -> str | None:
    """What is wrong with the fields seglab reads, or None."""
    fix = "fix it or save it again in LabelMe"
    h, w = content.get("imageHeight"), content.get("imageWidth")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        return f"{path}: imageHeight/imageWidth {h!r}/{w!r} are not positive integers; {fix}"
    if not isinstance(content.get("imagePath"), str | None):
        return f"{path}: imagePath is not a string; {fix}"
    shapes = content["shapes"]
    if not isinstance(shapes, list):
        return f"{path}: 'shapes' is not a list; {fix}"
    for i, shape in enumerate(shapes):
        if not (
            isinstance(shape, dict) and isinstance(shape.get("label"), str) and isinstance(shape.get("points"), list)
        ):
            return f"{path}: shape {i} needs a 'label' (text) and 'points' (a list of [x, y]); {fix}"
        if not isinstance(shape.get("shape_type") or "polygon", str) or not isinstance(
            shape.get("group_id"), int | str | None
        ):
            return f"{path}: shape {i} has a malformed shape_type or group_id; {fix}"
    return None


def _image_of(file: _File, root: Path) -> tuple[Path | None, str | None]:
    """The image ``file`` annotates, or None and why not."""
    content = file.content or {}
    named = str(content.get("imagePath") or "").replace("\\", "/")
    candidates = [file.path.parent / named] if named else []
    candidates += [file.path.with_suffix(s) for s in sorted(IMAGE_SUFFIXES)]
    for path in candidates:
        if path.is_file():
            if not path.resolve().is_relative_to(root.resolve()):
                return None, f"{file.path}: imagePath {named} lies outside the dataset folder {root}; move the image in"
            return path, None
    embedded = " (the image embedded as imageData is not read)" if content.get("imageData") else ""
    return None, (
        f"{file.path}: image {named or file.path.stem} not found beside it{embedded}; "
        "put the image file next to the JSON, or fix imagePath"
    )


def _two_points(points: list[Any], what: str) -> tuple[list[float], list[float]]:
    """The 2 points a rectangle (its corners) or a circle (centre, a point on it) is given by."""
    if len(points) != 2 or any(not isinstance(p, list) or len(p) != 2 for p in points):
        raise ShapeError(f"a {what} needs 2 [x, y] points, it has {len(points)}")
    first, second = (numbers(p) for p in points)
    return first, second


def _region(shape: dict[str, Any], size: tuple[int, int]) -> list[float]:
    """One region shape as a pixel polygon."""
    kind = shape.get("shape_type") or "polygon"
    points = shape["points"]
    if kind == "rectangle":
        (x1, y1), (x2, y2) = _two_points(points, kind)
        points = box_points(x1, y1, x2, y2)
    elif kind == "circle":
        (cx, cy), (px, py) = _two_points(points, kind)
        r = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
        points = ellipse_points(cx, cy, r, r)
    return pixel_polygon(points, size)


def _objects(
    file: _File, size: tuple[int, int], index: dict[str, int], problems: list[str], skipped: Counter[str]
) -> list[dict[str, Any]]:
    """The file's region shapes as annotations, one per object (shapes of one label and group_id merge)."""
    grouped: dict[Any, dict[str, Any]] = {}
    for i, shape in enumerate((file.content or {})["shapes"]):
        kind, label = shape.get("shape_type") or "polygon", shape["label"]
        where = f"{file.path}: shape {i} ({kind} '{label}')"
        if kind not in REGION_SHAPES:
            skipped[kind] += 1
            continue
        if label not in index:
            problems.append(f"{where}: label not in data.yaml's classes; add it to classes: or relabel the shape")
            continue
        try:
            polygon = _region(shape, size)
        except ShapeError as e:
            problems.append(f"{where}: {e}; fix the shape in LabelMe")
            continue
        key = (label, shape["group_id"]) if shape.get("group_id") is not None else i
        if key in grouped:
            grouped[key]["segmentation"].append(polygon)
        else:
            grouped[key] = annotation([polygon], index[label], len(grouped))
    return list(grouped.values())


# --------------------------------------------------------------------------- the layout


@_register(
    "labelme",
    "LabelMe JSON files (one per image, beside it), optionally in train/ and val/ folders",
    _detect_labelme,
    objects=True,
)
def load_labelme(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    folders = _split_folders(root)
    files = {
        split: thread_map(_File, sorted(p for p in folder.rglob("*.json") if p.is_file()))
        for split, folder in folders.items()
    }
    parsed = [f for split_files in files.values() for f in split_files]
    problems += [f.problem for f in parsed if f.problem]
    others = [f.path.name for f in parsed if f.content is None and f.problem is None]
    classes, index = label_classes(sorted({label for f in parsed for label in f.labels}), cfg)
    notes = [f"LabelMe: {len(parsed) - len(others)} annotation files in {', '.join(map(str, folders.values()))}"]
    if others:
        notes.append(f"{len(others)} JSON file(s) without LabelMe shapes left out: {_listing(others)}")
    skipped: Counter[str] = Counter()
    splits: dict[str, list[Sample]] = {}
    for split, split_files in files.items():
        samples = []
        for file in (f for f in split_files if f.content is not None):
            image, problem = _image_of(file, root)
            content = file.content or {}
            size = (content["imageHeight"], content["imageWidth"])
            declared = {"height": size[0], "width": size[1], "file_name": content.get("imagePath")}
            problem = problem or _size_problem(file.path, (declared, image))  # type: ignore[arg-type]
            if problem:
                problems.append(problem)
                continue
            objects = _objects(file, size, index, problems, skipped)
            samples.append(Sample(image=image, annotations=objects, size=size))  # type: ignore[arg-type]
        splits[split] = samples
    notes += skipped_note(skipped, "LabelMe shapes")
    return finish_objects(root, "labelme", splits, classes, cfg, notes, problems)
