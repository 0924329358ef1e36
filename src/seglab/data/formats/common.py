"""What the dataset layouts share: the ``FORMATS`` registry, :class:`Metadata`, small helpers,
mask probing, and :func:`_finish`, which fills in classes, colours, ignore index and mask encoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from seglab.data.io import MAX_PIXELS, UnreadableImage, pack_rgb, probe_image, read_raw_mask
from seglab.data.spec import MASK_ENCODINGS, DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError
from seglab.registry import Registry, did_you_mean

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})
DEFAULT_IGNORE_INDEX = 255
# Folder names accepted for each split, and the split they mean.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}  # fmt: skip
SPLIT_ORDER = ("train", "val", "test")
MAX_SCANNED_MASKS = 1000  # masks read to infer classes or colours when data.yaml does not say
MAX_LISTED = 5  # file names shown in one error before "and N more"
# Semantic masks are 8-bit: classes 0..254 and the ignore value 255. Only --task instance/detect
# (objects, not label maps) can use more; resolve_dataset refuses more for the semantic task.
MAX_SEMANTIC_CLASSES = 255

# --------------------------------------------------------------------------- palette and metadata


def color_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC palette: ``n`` distinct colours, black first (bits of the index spread over RGB)."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


@dataclass
class Metadata:
    """Classes and mask encoding a layout brings with it (built in, or read from its files)."""

    classes: list[str]
    colors: list[tuple[int, int, int]] | None = None
    ignore_index: int = DEFAULT_IGNORE_INDEX
    mask_encoding: str | None = None  # None: detect from the mask files
    note: str | None = None
    fixed: bool = False  # class indices are defined by the layout: data.yaml may rename, not resize


# --------------------------------------------------------------------------- registry


@dataclass
class DatasetFormat:
    """One dataset layout: how to recognise it and how to list its samples."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, DataConfig], DatasetSpec]
    expects: str  # the files it looks for, shown when no layout matches
    objects: bool = False  # its samples hold COCO-style annotations (mask_encoding coco), not mask files


FORMATS: Registry[DatasetFormat] = Registry("dataset format")


def _register(name: str, expects: str, detect: Callable[[Path], bool], *, objects: bool = False) -> Callable:
    def add(load: Callable[[Path, DataConfig], DatasetSpec]) -> Callable[[Path, DataConfig], DatasetSpec]:
        FORMATS.register(name)(DatasetFormat(name, detect, load, expects, objects))
        return load

    return add


def has_objects(fmt: str) -> bool:
    """Whether layout ``fmt`` lists objects (COCO, LabelMe, CVAT, YOLO-seg) rather than mask files."""
    return fmt in FORMATS and FORMATS[fmt].objects


# --------------------------------------------------------------------------- small helpers

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on a few threads (PIL and zlib release the GIL while decoding)."""
    if len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def read_text(path: Path, what: str) -> str:
    """The text of a list or names file, or a SeglabError naming it (unreadable, not UTF-8)."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise SeglabError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise SeglabError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _listing(paths: Sequence[Any]) -> str:
    """'a, b, c' for up to MAX_LISTED names, then 'and N more'."""
    shown = ", ".join(str(p) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _size_problem(json_path: Path, found: tuple[dict[str, Any], Path]) -> str | None:
    """Why the declared size of ``found`` (an image entry of ``json_path`` and its file) cannot be trusted, or None.

    Masks are drawn at the declared size, so it is checked before any is: against the size in the
    image file's header (only the header is read) and a pixel cap. A file that declares 60000x60000
    for a 64x48 image would otherwise allocate gigabytes per annotation. The size turned by 90
    degrees passes here (EXIF-rotated photos are decoded upright): it costs no more memory, and
    reading the sample finds out whether it fits the decoded image.
    """
    image, path = found
    h, w, name = image["height"], image["width"], image["file_name"]
    try:
        header = probe_image(path)
        real: tuple[int, int] | None = (header.width, header.height)
    except UnreadableImage as e:  # over the pixel cap (its size is known), or unreadable: read_image reports
        real = e.size  # that by file, and no mask is drawn for an image that cannot be read
    if real is not None and (w, h) not in (real, real[::-1]):
        return (
            f"{json_path}: image {name} is declared {w}x{h} (width x height) but {path} is {real[0]}x{real[1]}; "
            "fix its width and height in the annotation file"
        )
    if h * w > MAX_PIXELS:
        return f"{json_path}: image {name} declares {w}x{h} pixels, more than {MAX_PIXELS:,}; fix its width and height"
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _evenly(items: Sequence[T], n: int) -> list[T]:
    """At most ``n`` items spread evenly over ``items`` (all of them when there are few)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def _spec(root: Path, fmt: str, splits: dict[str, list[Sample]], notes: list[str], problems: list[str]) -> DatasetSpec:
    """A DatasetSpec with placeholder classes, filled in by :func:`_finish`."""
    names = [*SPLIT_ORDER, *sorted(set(splits) - set(SPLIT_ORDER))]
    ordered = {s: splits[s] for s in names if splits.get(s)}  # empty splits are dropped
    return DatasetSpec(
        root=root,
        format=fmt,
        classes=[],
        colors=[],
        ignore_index=DEFAULT_IGNORE_INDEX,
        mask_encoding="index",
        splits=ordered,
        notes=notes,
        problems=problems,
    )


# --------------------------------------------------------------------------- mask probing


def _probe_encoding(samples: Sequence[Sample]) -> tuple[str, str | None]:
    """Guess how masks are encoded from up to 8 of them: 'rgb', 'binary' or 'index', and a note saying so.

    Binary needs both 0 and 255: masks of 255 alone are no evidence of it (all foreground? all
    ignore?), so they are read as class indices, where 255 is the default ignore value."""
    values: set[int] = set()
    modes: set[str] = set()
    for sample in _evenly(samples, 8):
        try:
            raw, mode = read_raw_mask(sample.mask)  # type: ignore[arg-type]
        except SeglabError:
            continue  # `data check` reports it
        if (
            raw.ndim == 3
            and raw.shape[-1] >= 3
            and not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]))
        ):
            return "rgb", "masks are RGB colour images: colours are mapped to classes"
        modes.add(mode)
        values |= set(np.unique(raw).tolist())
    if values == {255} and "P" not in modes:  # the few masks probed may be all-foreground ones
        hist, n_read = _scan_index_masks(samples)
        values = set(np.flatnonzero(hist).tolist())
        if values == {255}:
            return "index", (
                f"the {n_read} masks read hold only the value 255: not read as binary (that needs 0 and 255) "
                "but as class indices, where 255 is the ignore value unless ignore_index says otherwise; "
                "set mask_encoding: binary in data.yaml if 255 means foreground"
            )
    if values == {0, 255} and "P" not in modes:
        return "binary", (
            "masks hold only the values 0 and 255: read as binary, 0 -> 0 (background), "
            "255 -> 1 (foreground); "
            "set mask_encoding: index in data.yaml if 255 means 'ignore' instead"
        )
    return "index", None


def _scan_index_masks(samples: Sequence[Sample]) -> tuple[np.ndarray, int]:
    """Histogram (256,) of the stored values over up to MAX_SCANNED_MASKS masks, and how many were read."""

    def hist(sample: Sample) -> np.ndarray | None:
        try:
            raw, _ = read_raw_mask(sample.mask)  # type: ignore[arg-type]
        except SeglabError:
            return None
        if raw.ndim == 3:
            raw = raw[..., 0]
        if raw.dtype != np.uint8:
            raw = raw.clip(0, 255).astype(np.uint8)
        return np.bincount(raw.ravel(), minlength=256)

    results = [h for h in thread_map(hist, _evenly(samples, MAX_SCANNED_MASKS)) if h is not None]
    total = np.sum(results, axis=0) if results else np.zeros(256, dtype=np.int64)
    return total, len(results)


def _scan_colors(samples: Sequence[Sample]) -> tuple[list[tuple[int, int, int]], int]:
    """Distinct RGB colours over up to MAX_SCANNED_MASKS colour masks (sorted), and how many were read."""

    def colours(sample: Sample) -> np.ndarray | None:
        try:
            raw, _ = read_raw_mask(sample.mask)  # type: ignore[arg-type]
        except SeglabError:
            return None
        if raw.ndim == 2:
            raw = np.repeat(raw[..., None], 3, axis=-1)
        return np.unique(pack_rgb(raw[..., :3]))

    found = [c for c in thread_map(colours, _evenly(samples, MAX_SCANNED_MASKS)) if c is not None]
    keys = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in keys.tolist()], len(found)


# --------------------------------------------------------------------------- classes, colours, encoding


def _validate_config(cfg: DataConfig, source: str) -> None:
    """The checks on a data.yaml that need no dataset: names, ranges, lengths."""
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise SeglabError(
            f"{source}: unknown format '{cfg.format}'{did_you_mean(cfg.format, list(FORMATS))}; "
            f"choose auto or one of: {', '.join(FORMATS)}"
        )
    encodings = ("auto", *MASK_ENCODINGS)
    if cfg.mask_encoding not in encodings:
        raise SeglabError(
            f"{source}: unknown mask_encoding '{cfg.mask_encoding}'"
            f"{did_you_mean(cfg.mask_encoding, encodings)}; choose one of: {', '.join(encodings)}"
        )
    if cfg.classes is not None and not cfg.classes:
        raise SeglabError(f"{source}: classes is empty; list the class names in label order")
    for i, c in enumerate(cfg.colors or []):
        if len(c) != 3 or not all(0 <= v <= 255 for v in c):
            raise SeglabError(f"{source}: colors[{i}] = {c} is not an [r, g, b] triple of 0..255 values")
    if cfg.classes is not None and cfg.colors is not None and len(cfg.colors) != len(cfg.classes):
        raise SeglabError(
            f"{source}: {len(cfg.colors)} colors for {len(cfg.classes)} classes; give one [r, g, b] per class"
        )
    if cfg.ignore_index is not None and not 0 <= cfg.ignore_index <= 255:
        raise SeglabError(f"{source}: ignore_index must be between 0 and 255, got {cfg.ignore_index}")


def _finish(spec: DatasetSpec, cfg: DataConfig, meta: Metadata | None, source: str) -> DatasetSpec:
    """Fill classes, colours, ignore index and mask encoding: data.yaml, then metadata, then the masks."""
    if not spec.splits:
        return spec
    masks = [s for split in spec.splits.values() for s in split if s.mask is not None]
    train_first = [s for s in spec.splits.get("train", []) if s.mask is not None] or masks
    notes = spec.notes
    if meta and meta.note and cfg.classes is None:
        notes.append(meta.note)

    # encoding
    objects = has_objects(spec.format)
    if cfg.mask_encoding == "instance" and not objects:
        return _finish_instance(spec, cfg, source)
    if cfg.mask_encoding != "auto":
        encoding = cfg.mask_encoding
        if (encoding == "coco") != objects:
            raise SeglabError(
                f"{source}: mask_encoding {encoding} does not fit the {spec.format} layout; "
                "coco goes with annotation files only (COCO, LabelMe, CVAT, YOLO-seg; or leave mask_encoding: auto)"
            )
    elif objects:
        encoding = "coco"
    else:
        encoding, note = _probe_encoding(train_first)
        if meta and meta.mask_encoding and encoding != "rgb":
            encoding, note = meta.mask_encoding, None
        if note:
            notes.append(note)
    ignore = cfg.ignore_index if cfg.ignore_index is not None else (meta.ignore_index if meta else DEFAULT_IGNORE_INDEX)
    yaml_colors = [(c[0], c[1], c[2]) for c in cfg.colors] if cfg.colors is not None else None

    # classes
    classes: list[str]
    colors: list[tuple[int, int, int]] | None = yaml_colors
    if encoding == "rgb" and colors is None and not (meta and meta.colors):
        if cfg.classes is not None:
            raise SeglabError(
                f"{source}: the masks are RGB colour images and data.yaml names the classes but not their "
                "colours; add colors: (one [r, g, b] per class, in the same order as classes)"
            )
        colors, n_read = _scan_colors(masks)
        if len(colors) > 255:
            raise SeglabError(
                f"{spec.root}: the colour masks hold {len(colors)} distinct colours, too many for class "
                "labels (JPEG-compressed or anti-aliased masks?); save masks as PNG, "
                "or give colors: in data.yaml"
            )
        notes.append(
            f"classes inferred from the {len(colors)} distinct colours in {n_read} RGB masks "
            f"(class0..class{len(colors) - 1} in sorted colour order); name them with classes: and "
            "colors: in data.yaml"
        )
        classes = [f"class{i}" for i in range(len(colors))]
    elif cfg.classes is not None:
        classes = list(cfg.classes)
        if meta and meta.fixed and len(classes) != len(meta.classes):
            raise SeglabError(
                f"{source}: classes lists {len(classes)} names but the {spec.format} annotations define "
                f"{len(meta.classes)} classes ({', '.join(meta.classes)}); list exactly that many"
            )
    elif meta:
        classes = list(meta.classes)
    elif encoding == "binary":
        classes = ["background", "foreground"]
    elif encoding == "rgb":
        classes = [f"class{i}" for i in range(len(colors or []))]
    else:
        hist, n_read = _scan_index_masks(masks)
        labels = [v for v in np.flatnonzero(hist).tolist() if v != ignore]
        n = (max(labels) + 1) if labels else 1
        if n > MAX_SEMANTIC_CLASSES:
            raise SeglabError(
                f"{source}: the masks hold the value 255, which ignore_index {ignore} makes a class (the 256th); "
                "8-bit masks hold at most 255 classes plus the ignore value: set ignore_index: 255 in data.yaml, "
                "or fix the masks"
            )
        classes = [f"class{i}" for i in range(n)]
        notes.append(
            f"classes inferred from the masks: largest label {n - 1} in {n_read} masks -> {n} classes "
            f"(class0..class{n - 1}, ignore_index {ignore}); name them with classes: in data.yaml"
        )
    if encoding == "rgb" and colors is None and meta and meta.colors:
        colors = list(meta.colors)
    if colors is None:
        meta_colors = list(meta.colors) if meta and meta.colors else []
        colors = meta_colors if len(meta_colors) == len(classes) else color_palette(len(classes))

    if len(colors) != len(classes):
        raise SeglabError(
            f"{source}: data.yaml gives {len(colors)} colors for the {len(classes)} classes of the "
            f"{spec.format} layout; give one [r, g, b] per class"
        )
    ignore = _checked_ignore(ignore, classes, source)
    spec.classes, spec.colors, spec.ignore_index, spec.mask_encoding = classes, colors, ignore, encoding
    return spec


def _checked_ignore(ignore: int, classes: list[str], source: str) -> int:
    """The ignore index, which must not be a class index."""
    if len(classes) > MAX_SEMANTIC_CLASSES:
        # Only --task instance/detect can use these classes (see too_many_classes), and there no label
        # value stands for "ignore": the first value past the classes keeps the card consistent.
        return len(classes)
    if ignore < len(classes):  # len(classes) <= 255 here, so the advice can be followed
        raise SeglabError(
            f"{source}: ignore_index {ignore} is also a class index ({classes[ignore]!r}); "
            f"use a value of at least {len(classes)} (usually 255)"
        )
    return ignore


def too_many_classes(spec: DatasetSpec, source: str) -> str:
    """Why ``spec`` cannot be read as semantic masks (more than 255 classes), and what can be done."""
    n = spec.num_classes
    what = f"{n - 1} COCO categories + background = {n} classes" if spec.format == "coco" else f"{n} classes"
    if spec.mask_encoding in ("coco", "instance"):  # objects: the instance task reads them without a label map
        fix = (
            "train with --task instance or --task detect, which have no such limit, or merge or drop "
            f"categories until at most {MAX_SEMANTIC_CLASSES - 1} remain besides background"
        )
    else:
        fix = f"list at most {MAX_SEMANTIC_CLASSES} classes in data.yaml"
    return (
        f"{source}: {what}, but semantic masks are 8-bit and hold at most {MAX_SEMANTIC_CLASSES} classes "
        f"(0..{MAX_SEMANTIC_CLASSES - 1}) plus the ignore value 255; {fix}"
    )


def _finish_instance(spec: DatasetSpec, cfg: DataConfig, source: str) -> DatasetSpec:
    """Instance-id masks: classes from ``classes:``, the class map's names, or one 'object' class."""
    import json

    names = list(cfg.classes) if cfg.classes is not None else None
    if cfg.class_map is not None:
        path = spec.root / cfg.class_map
        try:
            raw = json.loads(path.read_text())
            assert isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values())
        except (OSError, ValueError, RecursionError, AssertionError):  # UnicodeDecodeError is a ValueError
            raise SeglabError(
                f"{source}: class_map {path} is not a readable JSON object of the form "
                '{"mask file name": {"instance id": "class name"}}; fix or remove class_map:'
            ) from None
        used = [str(c) for ids in raw.values() for c in ids.values()]
        if names is None:
            names = ["background", *dict.fromkeys(used)]
        unknown = sorted(set(used) - set(names[1:]))
        if unknown:
            raise SeglabError(
                f"{source}: class_map {path} names classes not in classes: ({', '.join(unknown)}); add them"
            )
        position = {name: i for i, name in reversed(list(enumerate(names)))}  # the first of repeated names
        try:
            spec.class_map = {m: {int(i): position[str(c)] for i, c in ids.items()} for m, ids in raw.items()}
        except ValueError:
            raise SeglabError(f"{source}: class_map {path}: instance ids must be integers") from None
        negative = [f"{m}: {i}" for m, ids in spec.class_map.items() for i in ids if i < 0]
        if negative:  # an id of -1 would index the class table from its end, relabelling the largest id
            raise SeglabError(
                f"{source}: class_map {path} lists negative instance ids ({_listing(negative)}); "
                "ids are 0 (background) or positive"
            )
        spec.notes.append(f"instance masks: classes of each object from {path} ({len(raw)} masks listed)")
    else:
        names = names or ["background", "object"]
        if len(names) != 2:
            raise SeglabError(
                f"{source}: {len(names)} classes but no class_map: to say which object is which class; "
                "add class_map: (a JSON file) or list two classes (background and the object class)"
            )
        spec.notes.append(f"instance masks: every object is class 1 '{names[1]}' (add class_map: for more classes)")
    ignore = _checked_ignore(cfg.ignore_index if cfg.ignore_index is not None else DEFAULT_IGNORE_INDEX, names, source)
    colors = [(c[0], c[1], c[2]) for c in cfg.colors] if cfg.colors is not None else color_palette(len(names))
    spec.classes, spec.colors, spec.ignore_index, spec.mask_encoding = names, colors, ignore, "instance"
    return spec
