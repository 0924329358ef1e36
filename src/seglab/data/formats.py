"""Understanding a dataset folder: which layout it is, its classes, and its splits.

``resolve_dataset(path)`` turns a folder (or a ``data.yaml``) into a :class:`DatasetSpec`.
Each layout is a :class:`DatasetFormat` in the ``FORMATS`` registry with a ``detect(root)``
that looks only at the folder's structure and a ``load(root, cfg)`` that lists the samples.
Detection is tried in registry order; ``format:`` in data.yaml skips it.

What is not in data.yaml is worked out and written to ``spec.notes`` so the user can see
it: built-in metadata for layouts recognised by structure (SegNet's CamVid, VOC,
Cityscapes), how masks are encoded (index / RGB colour / binary 0-255), and otherwise the
number of classes from the largest label in the masks.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from seglab.config import build_config, read_yaml
from seglab.data.io import pack_rgb, read_raw_mask
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

# --------------------------------------------------------------------------- built-in metadata

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")  # fmt: skip
CAMVID_COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


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


FORMATS: Registry[DatasetFormat] = Registry("dataset format")


def _register(name: str, expects: str, detect: Callable[[Path], bool]) -> Callable:
    def add(load: Callable[[Path, DataConfig], DatasetSpec]) -> Callable[[Path, DataConfig], DatasetSpec]:
        FORMATS.register(name)(DatasetFormat(name, detect, load, expects))
        return load

    return add


# --------------------------------------------------------------------------- small helpers

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on a few threads (PIL and zlib release the GIL while decoding)."""
    if len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def _listing(paths: Sequence[Any]) -> str:
    """'a, b, c' for up to MAX_LISTED names, then 'and N more'."""
    shown = ", ".join(str(p) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


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
    """Guess how masks are encoded from up to 8 of them: 'rgb', 'binary' or 'index'."""
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
    if values and values <= {0, 255} and 255 in values and "P" not in modes:
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
    if cfg.classes is not None and len(cfg.classes) > 255:
        raise SeglabError(f"{source}: {len(cfg.classes)} classes; masks are 8-bit, so at most 255 are possible")
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
    if cfg.mask_encoding != "auto":
        encoding = cfg.mask_encoding
        if (encoding == "coco") != (spec.format == "coco"):
            raise SeglabError(
                f"{source}: mask_encoding {encoding} does not fit the {spec.format} layout; "
                "coco goes with COCO annotation files only (or leave mask_encoding: auto)"
            )
    elif spec.format == "coco":
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
    if ignore < len(classes):
        raise SeglabError(
            f"{source}: ignore_index {ignore} is also a class index ({classes[ignore]!r}); "
            f"use a value of at least {len(classes)} (usually 255)"
        )
    if len(classes) > 255:
        raise SeglabError(f"{source}: {len(classes)} classes; masks are 8-bit, so at most 255 are possible")
    spec.classes, spec.colors, spec.ignore_index, spec.mask_encoding = classes, colors, ignore, encoding
    return spec


# --------------------------------------------------------------------------- pairs


def _find_listed(token: str, root: Path, list_dir: Path) -> Path | None:
    """A path from a list file: absolute, relative to the root or the list, or its last two parts under root.

    The last rule rescues lists written on another machine, e.g. SegNet's
    ``/SegNet/CamVid/train/x.png`` found as ``<root>/train/x.png``.
    """
    p = Path(token)
    candidates = [p] if p.is_absolute() else []
    candidates += [root / token.lstrip("/"), list_dir / token.lstrip("/"), root / Path(*p.parts[-2:])]
    return next((c for c in candidates if c.is_file()), None)


def _read_pair_list(list_file: Path, root: Path, problems: list[str]) -> list[Sample]:
    samples = []
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SeglabError(f"cannot read pair list {list_file}: {e}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        where = f"{list_file} line {number}"
        if len(parts) != 2:
            what = "only one path (an image without its mask)" if len(parts) == 1 else f"{len(parts)} paths"
            problems.append(f"{where}: {what}; each line must be 'image_path mask_path'")
            continue
        found = [_find_listed(t.strip(), root, list_file.parent) for t in parts]
        missing = [f"{kind} '{t}'" for kind, t, f in zip(("image", "mask"), parts, found, strict=True) if f is None]
        if missing:
            problems.append(f"{where}: {' and '.join(missing)} not found (looked under {root})")
            continue
        samples.append(Sample(image=found[0], mask=found[1]))  # type: ignore[arg-type]
    return samples


def _detect_pairs(root: Path) -> bool:
    return any((root / f"{s}.txt").is_file() for s in SPLIT_ORDER)


def _camvid_metadata(root: Path, splits: dict[str, list[Sample]]) -> Metadata | None:
    """SegNet's CamVid, recognised by structure: pair lists, trainannot/ and valannot/, labels 0..11."""
    if not ((root / "trainannot").is_dir() and (root / "valannot").is_dir()):
        return None
    masks = [s for s in splits.get("train", []) if s.mask is not None]
    if not masks or not all(s.mask.parent.name == "trainannot" for s in masks):  # type: ignore[union-attr]
        return None
    hist, n_read = _scan_index_masks(_evenly(masks, 8))
    if n_read == 0 or np.flatnonzero(hist).max() > 11:
        return None
    return Metadata(
        classes=list(CAMVID_CLASSES),
        colors=list(CAMVID_COLORS),
        ignore_index=11,
        mask_encoding="index",
        note=(
            "SegNet CamVid layout recognised (pair lists with trainannot/ and valannot/): using the 11 "
            "CamVid classes and colours with ignore_index 11 (void); a data.yaml with classes: overrides this"
        ),
    )


@_register("pairs", "train.txt / val.txt (/ test.txt) listing 'image_path mask_path' per line", _detect_pairs)
def load_pairs(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    splits = {}
    for split in SPLIT_ORDER:
        given = getattr(cfg, split)
        list_file = root / given if given else root / f"{split}.txt"
        if given and not list_file.is_file():
            raise SeglabError(f"{split}: pair list {list_file} not found; fix '{split}:' in data.yaml")
        if list_file.is_file():
            splits[split] = _read_pair_list(list_file, root, problems)
    spec = _spec(root, "pairs", splits, [], problems)
    return _finish(spec, cfg, None if cfg.classes else _camvid_metadata(root, splits), str(root))


# --------------------------------------------------------------------------- VOC


def _detect_voc(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir()


def _voc_metadata(root: Path) -> Metadata:
    names_file = root / "class_names.txt"
    if not names_file.is_file():
        return Metadata(classes=list(VOC_CLASSES), colors=color_palette(len(VOC_CLASSES)), mask_encoding="index")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
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
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
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


# --------------------------------------------------------------------------- Cityscapes


def _detect_cityscapes(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


@_register(
    "cityscapes",
    "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png with gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
    _detect_cityscapes,
)
def load_cityscapes(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    notes: list[str] = []
    splits: dict[str, list[Sample]] = {}
    for split in SPLIT_ORDER:
        folder = getattr(cfg, split) or split
        images_dir, masks_dir = root / "leftImg8bit" / folder, root / "gtFine" / folder
        if not images_dir.is_dir():
            if getattr(cfg, split):
                raise SeglabError(f"{split}: {images_dir} not found; fix '{split}:' in data.yaml")
            continue
        if not masks_dir.is_dir():
            notes.append(f"{images_dir} has no gtFine/{folder} labels; split '{split}' not used")
            continue
        samples, missing = [], []
        for image in sorted(images_dir.rglob("*_leftImg8bit.png")):
            prefix = image.name[: -len("_leftImg8bit.png")]
            mask = masks_dir / image.parent.relative_to(images_dir) / f"{prefix}_gtFine_labelIds.png"
            if mask.is_file():
                samples.append(Sample(image=image, mask=mask))
            else:
                missing.append(mask)
        if missing:
            problems.append(f"{len(missing)} image(s) in {images_dir} without a labelIds mask: {_listing(missing)}")
        splits[split] = samples
    meta = Metadata(
        classes=list(CITYSCAPES_CLASSES),
        colors=list(CITYSCAPES_COLORS),
        mask_encoding="cityscapes",
        fixed=True,
        note="Cityscapes layout: labelIds mapped to the 19 train ids, every other id -> ignore_index",
    )
    return _finish(_spec(root, "cityscapes", splits, notes, problems), cfg, meta, str(root))


# --------------------------------------------------------------------------- COCO


def _coco_files(root: Path) -> dict[str, Path]:
    """{split: annotation json}.

    From annotations/*.json, <split>/_annotations.coco.json (Roboflow) or one at the root.
    """
    found: dict[str, Path] = {}
    ann_dir = root / "annotations"
    if ann_dir.is_dir():
        jsons = sorted(ann_dir.glob("*.json"), key=lambda p: (not p.name.startswith("instances"), p.name))
        for path in jsons:
            name = path.stem.lower()
            split = next((s for s in ("train", "val", "test") if s in name), None)
            if split and split not in found:
                found[split] = path
        if not found and len(jsons) == 1:
            found["train"] = jsons[0]
    for folder, split in SPLIT_ALIASES.items():
        path = root / folder / "_annotations.coco.json"
        if split not in found and path.is_file():
            found[split] = path
    if not found:
        for name in ("_annotations.coco.json", "annotations.json", "instances.json"):
            if (root / name).is_file():
                found["train"] = root / name
                break
    return found


def _detect_coco(root: Path) -> bool:
    return bool(_coco_files(root))


def _read_coco(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SeglabError(f"cannot read COCO annotations {path}: {e}; fix or re-export the file") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in content]
    if not isinstance(content, dict) or missing:
        raise SeglabError(
            f"{path} is not a COCO instances file (missing {', '.join(missing)}); export COCO 'instances' annotations"
        )
    return content


def _coco_classes(files: dict[str, dict[str, Any]], notes: list[str]) -> tuple[list[str], dict[int, int]]:
    """Class names (0 = background) and {category id: class index}."""
    first_split, first = next(iter(files.items()))
    categories = sorted(first["categories"], key=lambda c: c["id"])
    for split, content in files.items():
        other = {c["id"]: c["name"] for c in content["categories"]}
        if other != {c["id"]: c["name"] for c in categories}:
            raise SeglabError(
                f"the COCO categories of split '{split}' differ from those of '{first_split}'; "
                "export all splits with the same categories"
            )
    used = Counter(a["category_id"] for content in files.values() for a in content["annotations"])
    parents = {c.get("supercategory") for c in categories}
    names: list[str] = ["background"]
    index: dict[int, int] = {}
    for cat in categories:
        cid, name = cat["id"], str(cat["name"])
        is_parent = name in parents and any(c.get("supercategory") == name and c["id"] != cid for c in categories)
        if used[cid] == 0 and is_parent:
            notes.append(
                f"COCO category {cid} '{name}' dropped: it has no annotations and is the supercategory "
                "of the others (the parent class Roboflow exports)"
            )
            continue
        if name.strip("_").lower() == "background":
            index[cid] = 0  # an explicit background category is the background class
            notes.append(f"COCO category {cid} '{name}' is the background class (0)")
            continue
        if name in names:
            name = f"{name} ({cid})"
        index[cid] = len(names)
        names.append(name)
    if len(names) == 1:
        raise SeglabError(f"the COCO file of split '{first_split}' has no usable categories; export them too")
    notes.append(
        f"COCO: {len(names) - 1} categories -> classes 1..{len(names) - 1}; 0 = background "
        "(pixels no annotation covers); crowd regions are ignored"
    )
    return names, index


def _coco_image_dir(json_path: Path, root: Path, split: str, content: dict[str, Any]) -> Path:
    """The folder that ``file_name`` is relative to: the json's, the root, images/, train2017/, ..."""
    stem = json_path.stem.removeprefix("instances_")
    bases = [json_path.parent, root, root / "images", root / stem, root / "images" / stem, root / split]
    for image in content["images"][:1]:
        for base in bases:
            if (base / image["file_name"]).is_file():
                return base
    return json_path.parent


@_register(
    "coco",
    "a COCO instances json: annotations/*.json, annotations.json, or {train,valid}/_annotations.coco.json (Roboflow)",
    _detect_coco,
)
def load_coco(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    notes: list[str] = []
    paths = _coco_files(root)
    for split in SPLIT_ORDER:
        given = getattr(cfg, split)
        if given:
            if not (root / given).is_file():
                raise SeglabError(f"{split}: COCO file {root / given} not found; fix '{split}:' in data.yaml")
            paths[split] = root / given
    files = {split: _read_coco(path) for split, path in paths.items()}
    classes, index = _coco_classes(files, notes)
    splits: dict[str, list[Sample]] = {}
    for split, content in files.items():
        base = _coco_image_dir(paths[split], root, split, content)
        by_image: dict[Any, list[dict[str, Any]]] = {}
        unknown: Counter[int] = Counter()
        for ann in content["annotations"]:
            if ann["category_id"] not in index:
                unknown[ann["category_id"]] += 1
                continue
            by_image.setdefault(ann["image_id"], []).append({**ann, "category_id": index[ann["category_id"]]})
        if unknown:
            problems.append(f"{paths[split]}: annotations with unknown category ids {dict(unknown)}")
        samples, missing = [], []
        for image in content["images"]:
            path = base / image["file_name"]
            if not path.is_file():
                missing.append(image["file_name"])
                continue
            samples.append(
                Sample(
                    image=path,
                    annotations=by_image.get(image["id"], []),
                    size=(int(image["height"]), int(image["width"])),
                )
            )
        if missing:
            problems.append(f"{paths[split]}: {len(missing)} image(s) not found in {base}: {_listing(missing)}")
        splits[split] = samples
    meta = Metadata(classes=classes, mask_encoding="coco", fixed=True)
    return _finish(_spec(root, "coco", splits, notes, problems), cfg, meta, str(root))


# --------------------------------------------------------------------------- folders

IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labels", "label", "annotations", "annotation", "gt")
MASK_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_gt", "_seg")  # stripped from mask names to match


def _folder_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (image folder, mask folder)}.

    Looks for images/<split> + masks/<split>, <split>/images + <split>/masks, or flat
    images/ + masks/ (train only)."""
    found: dict[str, tuple[Path, Path]] = {}
    for folder, split in SPLIT_ALIASES.items():
        for idir in IMAGE_DIRS:
            for mdir in MASK_DIRS:
                for images, masks in (
                    (root / idir / folder, root / mdir / folder),
                    (root / folder / idir, root / folder / mdir),
                ):
                    if split not in found and images.is_dir() and masks.is_dir():
                        found[split] = (images, masks)
    if not found:
        for idir in IMAGE_DIRS:
            for mdir in MASK_DIRS:
                images, masks = root / idir, root / mdir
                if (
                    "train" not in found
                    and images.is_dir()
                    and masks.is_dir()
                    and any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir())
                ):
                    found["train"] = (images, masks)
    return found


def _detect_folders(root: Path) -> bool:
    return bool(_folder_pairs(root))


def _key(path: Path, folder: Path, strip: tuple[str, ...] = ()) -> str:
    """Relative path without extension, the name images and masks are matched on."""
    key = path.relative_to(folder).with_suffix("").as_posix()
    for suffix in strip:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _match_folders(images_dir: Path, masks_dir: Path, problems: list[str]) -> list[Sample]:
    images: dict[str, Path] = {}
    duplicates = []
    for p in _images_in(images_dir):
        k = _key(p, images_dir)
        if k in images:
            duplicates.append(p)
        images[k] = p
    masks: dict[str, Path] = {}
    for p in _images_in(masks_dir):
        k = _key(p, masks_dir)
        if k not in images:
            k = _key(p, masks_dir, MASK_SUFFIXES)
        if k in masks:
            duplicates.append(p)
        masks[k] = p
    if duplicates:
        problems.append(
            f"several files share a name (only the extension differs): {_listing(duplicates)}; keep one per image"
        )
    no_mask = [images[k].relative_to(images_dir) for k in images if k not in masks]
    no_image = [masks[k].relative_to(masks_dir) for k in masks if k not in images]
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) in {images_dir} without a mask in {masks_dir}: "
            f"{_listing(no_mask)}; add the masks or move the images out"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) in {masks_dir} without an image in {images_dir}: "
            f"{_listing(no_image)}; add the images or remove the masks"
        )
    return [Sample(image=images[k], mask=masks[k]) for k in sorted(images) if k in masks]


def _mask_dir_for(images_dir: Path) -> Path | None:
    """The mask folder beside an image folder: images/train -> masks/train, train/image -> train/label, ..."""
    parts = images_dir.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].lower() in IMAGE_DIRS:
            for mdir in MASK_DIRS:
                candidate = Path(*parts[:i], mdir, *parts[i + 1 :])
                if candidate.is_dir():
                    return candidate
    return None


@_register(
    "folders",
    "images/{train,val}/ with masks/{train,val}/ (or train/images + train/masks), matched by file name",
    _detect_folders,
)
def load_folders(root: Path, cfg: DataConfig) -> DatasetSpec:
    problems: list[str] = []
    pairs = _folder_pairs(root)
    for split in SPLIT_ORDER:
        given = getattr(cfg, split)
        if not given:
            continue
        dirs = [root / t for t in given.split()]
        mask_dir = dirs[1] if len(dirs) == 2 else _mask_dir_for(dirs[0])
        if len(dirs) > 2 or not dirs[0].is_dir() or mask_dir is None or not mask_dir.is_dir():
            raise SeglabError(
                f"{split}: '{given}' in data.yaml must be an image folder with a masks folder beside it "
                f"(images/... -> masks/...), or 'IMAGE_DIR MASK_DIR'; not found under {root}"
            )
        pairs[split] = (dirs[0], mask_dir)
    splits = {split: _match_folders(images, masks, problems) for split, (images, masks) in pairs.items()}
    return _finish(_spec(root, "folders", splits, [], problems), cfg, None, str(root))


# --------------------------------------------------------------------------- entry points


def _read_config(data: Path) -> tuple[Path, DataConfig, Path | None]:
    """(dataset root, DataConfig, the data.yaml read or None)."""
    if data.is_file():
        if data.suffix.lower() not in (".yaml", ".yml"):
            raise SeglabError(f"{data}: expected a dataset folder or a data.yaml file")
        yaml_path: Path | None = data
    else:
        yaml_path = next((data / n for n in ("data.yaml", "data.yml") if (data / n).is_file()), None)
    if yaml_path is None:
        return data, DataConfig(), None
    cfg = build_config(DataConfig, read_yaml(yaml_path), str(yaml_path))
    _validate_config(cfg, str(yaml_path))
    root = yaml_path.parent / cfg.path if data.is_file() else data / cfg.path
    return Path(os.path.normpath(root)), cfg, yaml_path


def _detect(root: Path, cfg: DataConfig) -> str:
    for name, fmt in FORMATS.items():
        if fmt.detect(root):
            return name
    given = [v for v in (cfg.train, cfg.val, cfg.test) if v]
    if given and all(v.endswith(".txt") for v in given):
        return "pairs"
    if given and all(v.endswith(".json") for v in given):
        return "coco"
    tried = "; ".join(f"{name}: {fmt.expects}" for name, fmt in FORMATS.items())
    raise SeglabError(
        f"{root}: unknown dataset layout. Tried {tried}. Arrange the files in one of these layouts, "
        "or write a data.yaml with format: and train:/val: pointing at your lists"
    )


def resolve_dataset(data: str | Path, *, strict: bool = True) -> DatasetSpec:
    """Understand the dataset at ``data`` (a folder, or a data.yaml) and list its samples.

    A ``data.yaml`` inside the folder is read automatically; one given directly has its
    ``path:`` relative to itself. Layout problems (list lines naming missing files, images
    without masks) raise a SeglabError listing them; with ``strict=False`` they are kept in
    ``spec.problems`` instead and the affected samples left out (``seglab data check`` does this).
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise SeglabError(f"dataset not found: {path}; pass a dataset folder or its data.yaml")
    root, cfg, yaml_path = _read_config(path)
    if not root.is_dir():
        raise SeglabError(f"{yaml_path}: path: {cfg.path} -> {root} is not a folder; fix 'path:' in data.yaml")
    if not any(p.name not in ("data.yaml", "data.yml") for p in root.iterdir()):
        raise SeglabError(
            f"dataset folder {root} is empty; put the images and masks there (e.g. images/train, masks/train)"
        )
    name = cfg.format if cfg.format != "auto" else _detect(root, cfg)
    spec = FORMATS[name].load(root, cfg)
    if yaml_path is not None:
        spec.notes.insert(0, f"settings from {yaml_path}")
    if not spec.splits and not spec.problems:
        raise SeglabError(
            f"{root}: the {name} layout was recognised but it lists no images; expected {FORMATS[name].expects}"
        )
    if strict and spec.problems:
        shown = "; ".join(spec.problems[:MAX_LISTED])
        more = f"; and {len(spec.problems) - MAX_LISTED} more" if len(spec.problems) > MAX_LISTED else ""
        raise SeglabError(
            f"{root}: {len(spec.problems)} problem(s) in the dataset: {shown}{more}; "
            f"fix them (`seglab data check {data}` lists everything)"
        )
    return spec


def _holdout(n: int, val_fraction: float, seed: int) -> list[int]:
    k = max(1, round(n * val_fraction))
    return sorted(random.Random(seed).sample(range(n), k))


def get_split(spec: DatasetSpec, name: str, *, val_fraction: float = 0.1, seed: int = 0) -> list[Sample]:
    """The samples of split ``name`` ('train', 'val', 'test'; 'valid' means 'val').

    When the dataset has no val split, ``val`` is a seeded random ``val_fraction`` of train
    (the same seed always gives the same images) and ``train`` leaves those images out; the
    hold-out is noted in ``spec.notes``.
    """
    split = SPLIT_ALIASES.get(name, name)
    has_val = "val" in spec.splits
    if split in spec.splits and (split != "train" or has_val):
        return list(spec.splits[split])
    if split in ("train", "val") and "train" in spec.splits:
        train = spec.splits["train"]
        if not 0 < val_fraction < 1:
            raise SeglabError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        if len(train) < 2:
            raise SeglabError(
                f"{spec.root}: no val split and only {len(train)} training image(s) to hold out from; add a val split"
            )
        held = _holdout(len(train), val_fraction, seed)
        note = (
            f"no val split in {spec.root}: holding out {val_fraction * 100:g}% of train "
            f"({len(held)} images, seed {seed})"
        )
        if note not in spec.notes:
            spec.notes.append(note)
        if split == "val":
            return [train[i] for i in held]
        held_set = set(held)
        return [s for i, s in enumerate(train) if i not in held_set]
    available = list(spec.splits) + ([] if has_val or "train" not in spec.splits else ["val (held out from train)"])
    raise SeglabError(
        f"{spec.root}: no split '{name}'{did_you_mean(name, list(spec.splits))}; available: {', '.join(available)}"
    )


def split_names(spec: DatasetSpec) -> list[str]:
    """The splits :func:`get_split` can return, including a held-out 'val'."""
    names = list(spec.splits)
    if "val" not in names and "train" in names:
        names.insert(names.index("train") + 1, "val")
    return names
