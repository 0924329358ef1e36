"""``seglab data check --task instance``: the dataset's objects, counted, and what is wrong with them.

Every image is decoded and every object drawn, as ``seglab train --task instance`` will read them
(:func:`seglab.instance.data.read_instances`): unreadable images or annotations and objects drawn
at another size than their image are problems (exit status 2, as ``data check``). Over all splits
it reports objects per class, objects per image (min / median / max), empty images, COCO's object
sizes (small < 32², medium < 96², large, by mask area), a histogram of box sizes and degenerate polygons (fewer than 3
points, no area, points outside the image), each naming its file and object. Degenerate polygons
are drawn as nothing (or clipped) and do not stop training, so they are warnings, not problems.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seglab.data.check import MAX_SHOWN_PROBLEMS, Problem, report_head, verdict
from seglab.data.formats import resolve_dataset, thread_map, train_val_splits
from seglab.data.formats.shapes import EDGE_TOLERANCE, polygon_area
from seglab.data.io import read_image
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import SeglabError

SIZE_BINS = (("small", 32**2), ("medium", 96**2), ("large", float("inf")))  # COCO's area ranges
BOX_SIDES = (8, 16, 32, 64, 128, 256)  # the box-size histogram's bin edges: sqrt(box width x height), px


@dataclass
class _Objects:
    """What one sample holds: problems, objects per class, object areas, degenerate polygons."""

    problems: list[Problem] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    sides: list[float] = field(default_factory=list)  # sqrt(box width x box height)
    degenerate: list[str] = field(default_factory=list)
    readable: bool = True


@dataclass
class InstanceReport:
    """What :func:`check_instances` found; ``ok`` when there is no problem."""

    root: Path
    layout: str
    classes: list[str]
    split_counts: dict[str, int]
    problems: list[Problem]
    notes: list[str]
    per_class: np.ndarray  # (C,) objects of each class
    per_image: list[int]  # objects in each readable image
    empty: list[Path]  # readable images without objects
    sizes: dict[str, int]  # SIZE_BINS name -> objects
    boxes: list[int]  # objects per BOX_SIDES bin: < 8 px, 8-16, ..., >= 256
    degenerate: list[str]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A readable report: splits, notes, problems, then the object statistics."""
        title = f"dataset {self.root}: {self.layout} layout, {len(self.classes)} classes (instance task)"
        lines = report_head(title, self.split_counts, self.notes, self.problems)
        total = int(self.per_class.sum())
        lines += ["", f"objects per class ({total:,} objects):"]
        width = max(10, *(len(c) for c in self.classes))
        for c, name in enumerate(self.classes):
            if c or self.per_class[c]:  # background holds objects only in odd files
                lines.append(f"  {c:>3}  {name:<{width}}  {int(self.per_class[c]):>8,}")
        counts = np.asarray(self.per_image or [0])
        lines.append(
            f"objects per image: min {counts.min()}, median {np.median(counts):g}, max {counts.max()}; "
            f"{len(self.empty)} of {len(self.per_image)} images have none"
            + (
                f" ({', '.join(p.name for p in self.empty[:5])}{', ...' if len(self.empty) > 5 else ''})"
                if self.empty
                else ""
            )
        )
        lines.append(
            "object sizes (COCO, by mask area): "
            + ", ".join(f"{name} {n:,} ({100 * n / max(total, 1):.1f}%)" for name, n in self.sizes.items())
        )
        lines.append("box sizes (the square root of width x height):")
        edges = ["0", *map(str, BOX_SIDES), ""]
        for (low, high), n in zip(itertools.pairwise(edges), self.boxes, strict=True):
            bar = "#" * round(40 * n / max(max(self.boxes), 1))
            lines.append(f"  {low + '-' + high if high else low + '+':>8} px  {n:>8,}  {bar}")
        lines.append(f"degenerate polygons: {len(self.degenerate)}")
        lines += [f"  - {d}" for d in self.degenerate[:MAX_SHOWN_PROBLEMS]]
        if len(self.degenerate) > MAX_SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.degenerate) - MAX_SHOWN_PROBLEMS} more")
        return "\n".join([*lines, "", verdict(self.problems, f"{len(self.per_image)} images", self.seconds)])


def degenerate_polygons(sample: Sample, spec: DatasetSpec) -> list[str]:
    """The polygons of ``sample``'s annotations that have fewer than 3 points, no area, or points
    outside the image, each as 'file: annotation ID (class): why'."""
    found = []
    h, w = sample.size or (0, 0)
    for ann in sample.annotations or []:
        segmentation = ann.get("segmentation")
        if not isinstance(segmentation, list):
            continue
        name = spec.classes[ann["category_id"]] if 0 <= ann["category_id"] < spec.num_classes else "?"
        where = f"{sample.image}: annotation {ann.get('id')} ({name})"
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(isinstance(v, int | float) for v in polygon):
                continue  # not drawable at all: read_instances reports it
            xy = np.asarray(polygon[: len(polygon) // 2 * 2], dtype=np.float64).reshape(-1, 2)
            if len(xy) < 3:
                found.append(f"{where}: a polygon of {len(xy)} point(s)")
            elif polygon_area(polygon) == 0:
                found.append(f"{where}: a polygon with no area")
            elif ((xy < -EDGE_TOLERANCE) | (xy > (w + EDGE_TOLERANCE, h + EDGE_TOLERANCE))).any():
                found.append(f"{where}: a polygon reaching outside the {w}x{h} image (clipped when drawn)")
    return found


def _check(sample: Sample, spec: DatasetSpec) -> _Objects:
    from seglab.instance.data import read_instances

    result = _Objects(degenerate=degenerate_polygons(sample, spec))
    try:
        image = read_image(sample.image)
    except SeglabError as e:
        result.problems.append(Problem("unreadable", sample.image, str(e)))
        result.readable = False
        return result
    try:
        objects = read_instances(sample, spec)
    except SeglabError as e:
        result.problems.append(Problem("unreadable", sample.mask or sample.image, str(e)))
        result.readable = False
        return result
    if len(objects) and objects.masks.shape[1:] != image.shape[:2]:
        result.problems.append(
            Problem(
                "size",
                sample.image,
                f"size mismatch: image {sample.image} is {image.shape[1]}x{image.shape[0]} but its objects are "
                f"drawn at {objects.masks.shape[2]}x{objects.masks.shape[1]}; fix the image size in the annotations",
            )
        )
    result.labels, result.areas = objects.labels.tolist(), objects.masks.sum((1, 2)).tolist()
    w, h = (objects.boxes[:, 2:] - objects.boxes[:, :2]).T
    result.sides = np.sqrt(np.clip(w * h, 0, None)).tolist()
    return result


def check_instances(data: str | Path, *, val_fraction: float = 0.1) -> InstanceReport:
    """Check the objects of every sample of every split of the dataset at ``data``."""
    start = time.perf_counter()
    spec = resolve_dataset(data, strict=False, task="instance")
    problems = [Problem("layout", None, p) for p in spec.problems]
    samples = [s for split in spec.splits.values() for s in split]
    results = thread_map(lambda s: _check(s, spec), samples)
    count = {id(s): len(r.labels) for s, r in zip(samples, results, strict=True)}
    try:
        train_val_splits(spec, val_fraction=val_fraction, seed=0, labelled=lambda s: count[id(s)] > 0)
    except SeglabError as e:
        problems.append(Problem("split", None, str(e)))
    labels = [label for r in results for label in r.labels]
    areas = np.asarray([a for r in results for a in r.areas], dtype=np.float64)
    lower = 0.0
    sizes = {}
    for name, upper in SIZE_BINS:
        sizes[name] = int(((areas >= lower) & (areas < upper)).sum())
        lower = upper
    sides = np.asarray([side for r in results for side in r.sides], dtype=np.float64)
    boxes = np.bincount(np.searchsorted(BOX_SIDES, sides, side="right"), minlength=len(BOX_SIDES) + 1)
    readable = [(s, r) for s, r in zip(samples, results, strict=True) if r.readable]
    return InstanceReport(
        root=spec.root,
        layout=spec.format,
        classes=list(spec.classes),
        split_counts={name: len(split) for name, split in spec.splits.items()},
        problems=problems + [p for r in results for p in r.problems],
        notes=list(spec.notes),
        per_class=np.bincount(np.asarray(labels, dtype=np.int64), minlength=spec.num_classes)[: spec.num_classes],
        per_image=[len(r.labels) for _, r in readable],
        empty=[s.image for s, r in readable if not r.labels],
        sizes=sizes,
        boxes=boxes.tolist(),
        degenerate=[d for r in results for d in r.degenerate],
        seconds=time.perf_counter() - start,
    )
