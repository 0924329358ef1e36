"""``seglab data check``: read every file of a dataset once and report what is wrong with it.

Every sample of every split is decoded in full (a truncated PNG is found here, not in
epoch 7): missing partners, unreadable / empty / truncated files, image and mask sizes
that differ, and label values that are neither a class nor ``ignore_index`` -- each
problem names the file. Then it asks :func:`seglab.data.formats.train_val_splits`, the check
every trainer makes before it starts, whether training could start on these splits (both
present, both with labelled pixels), so ``data check`` is OK only where ``train`` would run.
Over the train split it also counts pixels per class and suggests class weights
(median-frequency, inverse-frequency, ENet).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seglab.data.formats import get_split, resolve_dataset, split_names, thread_map, train_val_splits
from seglab.data.io import read_image, read_mask
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import SeglabError
from seglab.losses import CLASS_WEIGHT_METHODS, class_weights_from_counts

MAX_SHOWN_PROBLEMS = 50  # in report.format(); report.problems keeps them all


@dataclass
class Problem:
    """One thing wrong with the dataset. ``kind``: layout, unreadable, size, label, color or split
    (training could not start on the splits; ``path`` is None)."""

    kind: str
    path: Path | None
    message: str  # names the file and says what to do

    def __str__(self) -> str:
        return self.message


@dataclass
class _SampleResult:
    problems: list[Problem]
    counts: np.ndarray | None  # (num_classes,) int64 pixels per class, None if unreadable
    ignored: int = 0  # pixels labelled ignore_index

    @property
    def labelled(self) -> bool:
        """Whether the mask has a pixel of some class (what train_val_splits asks of each split)."""
        return self.counts is not None and bool(self.counts.any())


@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``ok`` is True when there is no problem."""

    root: Path
    layout: str
    mask_encoding: str
    classes: list[str]
    ignore_index: int
    split_counts: dict[str, int]
    problems: list[Problem]
    notes: list[str]
    class_counts: np.ndarray  # (C,) int64: pixels per class over the train split
    image_counts: np.ndarray  # (C,) int64: labelled pixels of the train images in which c appears
    images_with_class: np.ndarray  # (C,) int64: train images in which c appears
    ignore_pixels: int  # train pixels labelled ignore_index
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (C,) suggested weights
    samples_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A readable report: splits, notes, problems, class histogram with suggested weights."""
        title = (
            f"dataset {self.root}: {self.layout} layout, {self.mask_encoding} masks, "
            f"{len(self.classes)} classes, ignore_index {self.ignore_index}"
        )
        lines = [*report_head(title, self.split_counts, self.notes, self.problems), "", *self._histogram()]
        return "\n".join([*lines, "", verdict(self.problems, f"{self.samples_checked} samples", self.seconds)])

    def _histogram(self) -> list[str]:
        labelled = int(self.class_counts.sum())
        total = labelled + self.ignore_pixels
        if total == 0:
            return ["class histogram (train): no readable training mask"]
        ignored = f"{self.ignore_pixels:,} px = {100 * self.ignore_pixels / total:.2f}%"
        lines = [
            f"class histogram (train split, {labelled:,} labelled pixels; ignore ({self.ignore_index}): {ignored}):"
        ]
        width = max(10, *(len(c) for c in self.classes))
        methods = [m for m in CLASS_WEIGHT_METHODS if m in self.weights]
        header = f"  {'id':>3}  {'class':<{width}}  {'pixels':>13}  {'%':>7}  {'images':>6}"
        lines.append(header + "".join(f"  {m:>8}" for m in methods))
        for c, name in enumerate(self.classes):
            count = int(self.class_counts[c])
            row = (
                f"  {c:>3}  {name:<{width}}  {count:>13,}  {100 * count / max(labelled, 1):>6.2f}%"
                f"  {int(self.images_with_class[c]):>6}"
            )
            lines.append(row + "".join(f"  {self.weights[m][c]:>8.3f}" for m in methods))
        if methods:
            lines.append(
                "  suggested class weights: median = median-frequency balancing, inverse = 1/frequency "
                "(mean 1), enet = 1/ln(1.02 + p); use with seglab train --class-weights METHOD"
            )
        return lines


def report_head(title: str, split_counts: dict[str, int], notes: list[str], problems: list[Problem]) -> list[str]:
    """The first lines of a ``data check`` report: the dataset, its splits, the notes, the problems."""
    lines = [title, "splits: " + ", ".join(f"{name} {n}" for name, n in split_counts.items())]
    lines += [f"  note: {note}" for note in notes]
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  - {p.message}" for p in problems[:MAX_SHOWN_PROBLEMS]]
        if len(problems) > MAX_SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_SHOWN_PROBLEMS} more")
    return lines


def verdict(problems: list[Problem], checked: str, seconds: float) -> str:
    """The last line of a ``data check`` report: OK, or how many problems."""
    status = "OK" if not problems else f"FAILED: {len(problems)} problem(s)"
    return f"{status} ({checked} checked in {seconds:.1f} s)"


def _check_sample(sample: Sample, spec: DatasetSpec) -> _SampleResult:
    """Decode one image and its mask; the problems found and the mask's per-class pixel counts."""
    problems: list[Problem] = []
    try:
        image = read_image(sample.image)
    except SeglabError as e:
        problems.append(Problem("unreadable", sample.image, str(e)))
        image = None
    if image is None and spec.mask_encoding == "coco":  # the annotations are drawn for an image that is there
        return _SampleResult(problems, None)
    unknown: Counter = Counter()
    try:
        mask = read_mask(sample, spec, unknown_colors=unknown)
    except SeglabError as e:
        mask_path = sample.mask or sample.image
        problems.append(Problem("unreadable", mask_path, str(e)))
        return _SampleResult(problems, None)
    label_file = sample.mask or sample.image  # COCO: the image the annotations belong to
    where = f"{sample.mask}" if sample.mask else f"the annotations of {sample.image}"
    if image is not None and image.shape[:2] != mask.shape:
        problems.append(
            Problem(
                "size",
                label_file,
                f"size mismatch: image {sample.image} is {image.shape[1]}x{image.shape[0]} but "
                f"{where} is {mask.shape[1]}x{mask.shape[0]} (width x height); "
                "re-export the mask at the image's size",
            )
        )
    hist = np.bincount(mask.ravel(), minlength=256).astype(np.int64)
    c = spec.num_classes
    bad = [v for v in np.flatnonzero(hist).tolist() if v >= c and v != spec.ignore_index]
    if bad:
        values = ", ".join(f"{v} ({int(hist[v]):,} px)" for v in bad[:10])
        more = f" and {len(bad) - 10} more values" if len(bad) > 10 else ""
        problems.append(
            Problem(
                "label",
                label_file,
                f"{where}: label values outside [0, {c}) that are not ignore_index {spec.ignore_index}: "
                f"{values}{more}; fix the mask, or list the classes / set ignore_index in data.yaml",
            )
        )
    if unknown:
        shown = ", ".join(f"{rgb} ({n:,} px)" for rgb, n in unknown.most_common(5))
        problems.append(
            Problem(
                "color",
                label_file,
                f"{where}: {sum(unknown.values()):,} pixels have colours that are not in colors "
                f"(read as ignore): {shown}; add them to colors: in data.yaml or fix the mask",
            )
        )
    return _SampleResult(problems, hist[:c], int(hist[spec.ignore_index]))


def _accumulate(counts: Sequence[np.ndarray | None], num_classes: int) -> tuple[np.ndarray, ...]:
    """(pixels per class, labelled pixels of the images holding c, images holding c)."""
    class_counts = np.zeros(num_classes, dtype=np.int64)
    image_counts = np.zeros(num_classes, dtype=np.int64)
    images_with = np.zeros(num_classes, dtype=np.int64)
    for k in counts:
        if k is None:
            continue
        present = k > 0
        class_counts += k
        image_counts[present] += int(k.sum())
        images_with += present
    return class_counts, image_counts, images_with


def class_pixel_counts(samples: Sequence[Sample], spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts over ``samples``' masks and, per class, the labelled pixels of the images
    in which it appears -- the two inputs of ``class_weights_from_counts(..., image_counts=)``.
    Values outside the classes (and ignore) are not counted."""
    c = spec.num_classes

    def count(sample: Sample) -> np.ndarray:
        mask = read_mask(sample, spec)
        return np.bincount(mask.ravel(), minlength=256)[:c].astype(np.int64)

    class_counts, image_counts, _ = _accumulate(thread_map(count, list(samples)), c)
    return class_counts, image_counts


def check_dataset(data: str | Path, *, val_fraction: float = 0.1, task: str = "semantic") -> Any:
    """Check every sample of every split of the dataset at ``data`` (a folder or data.yaml): a
    :class:`CheckReport`, or with ``task`` "instance" the objects' report of
    :func:`seglab.data.check_instance.check_instances`.

    Problems do not raise: they are collected in ``report.problems`` (``report.ok`` is False).
    A dataset whose layout cannot be understood at all still raises SeglabError.
    """
    if task == "instance":
        from seglab.data.check_instance import check_instances

        return check_instances(data, val_fraction=val_fraction)
    start = time.perf_counter()
    spec = resolve_dataset(data, strict=False)
    problems = [Problem("layout", None, p) for p in spec.problems]
    samples = [s for split in spec.splits.values() for s in split]
    results = thread_map(lambda s: _check_sample(s, spec), samples)
    for r in results:
        problems.extend(r.problems)

    result_of = {id(s): r for s, r in zip(samples, results, strict=True)}
    split_counts = {name: len(samples) for name, samples in spec.splits.items()}
    train: list[Sample] = list(spec.splits.get("train", []))
    try:  # the splits training will see, including a held-out val
        split_counts = {n: len(get_split(spec, n, val_fraction=val_fraction)) for n in split_names(spec)}
        train = get_split(spec, "train", val_fraction=val_fraction) if train else []
    except SeglabError:  # e.g. one training image and no val split: train_val_splits says so below
        pass
    try:  # what every trainer checks before it starts (seed 0, train's default, picks the held-out val)
        train_val_splits(spec, val_fraction=val_fraction, seed=0, labelled=lambda s: result_of[id(s)].labelled)
    except SeglabError as e:
        problems.append(Problem("split", None, str(e)))
    notes = list(spec.notes)
    train_results = [result_of[id(s)] for s in train]
    class_counts, image_counts, images_with = _accumulate([r.counts for r in train_results], spec.num_classes)
    ignore_pixels = sum(r.ignored for r in train_results)
    weights: dict[str, np.ndarray] = {}
    if class_counts.sum() > 0:
        for method in CLASS_WEIGHT_METHODS:
            weights[method] = class_weights_from_counts(class_counts, method, image_counts=image_counts)
    return CheckReport(
        root=spec.root,
        layout=spec.format,
        mask_encoding=spec.mask_encoding,
        classes=list(spec.classes),
        ignore_index=spec.ignore_index,
        split_counts=split_counts,
        problems=problems,
        notes=notes,
        class_counts=class_counts,
        image_counts=image_counts,
        images_with_class=images_with,
        ignore_pixels=ignore_pixels,
        weights=weights,
        samples_checked=len(samples),
        seconds=time.perf_counter() - start,
    )


def shared_images(samples: Sequence[Sample], train: Sequence[Sample]) -> list[tuple[Path, Path]]:
    """(image of ``samples``, image of ``train``) pairs that are one file or hold the same bytes: a val
    split that shares images with training scores what the model has seen. Only files of equal size
    are read, and a file only once."""
    import hashlib

    def digest(path: Path, cache: dict[Path, str]) -> str:
        if path not in cache:
            cache[path] = hashlib.sha1(path.read_bytes()).hexdigest()
        return cache[path]

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:  # missing: reported where it is read
            return -1

    by_size: dict[int, list[Path]] = {}
    for sample in train:
        by_size.setdefault(size(sample.image), []).append(sample.image)
    by_size.pop(-1, None)
    cache: dict[Path, str] = {}
    shared = []
    for sample in samples:
        image = sample.image
        for other in by_size.get(size(image), []):
            if image.resolve() == other.resolve() or digest(image, cache) == digest(other, cache):
                shared.append((image, other))
                break
    return shared
