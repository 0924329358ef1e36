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

import functools
import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from seglab.config import build_config, read_yaml
from seglab.data.formats.common import (
    DEFAULT_IGNORE_INDEX,
    FORMATS,
    IMAGE_SUFFIXES,
    MAX_LISTED,
    MAX_SCANNED_MASKS,
    MAX_SEMANTIC_CLASSES,
    SPLIT_ALIASES,
    SPLIT_ORDER,
    DatasetFormat,
    Metadata,
    _listing,
    _validate_config,
    color_palette,
    has_objects,
    thread_map,
    too_many_classes,
)

# Importing a layout module registers it in FORMATS, and _detect tries FORMATS in insertion order,
# so these imports set the detection order (pairs, voc, cityscapes, labelme, cvat, coco, yolo,
# folders): a folder can fit more than one layout and the first match wins. LabelMe's JSONs may sit
# in annotations/, where coco looks, and YOLO's labels/<split> is a mask folder to folders, so both
# go first. Keep them in this order.
# isort: off
from seglab.data.formats.pairs import CAMVID_CLASSES, CAMVID_COLORS, load_pairs
from seglab.data.formats.voc import VOC_CLASSES, load_voc
from seglab.data.formats.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_COLORS, load_cityscapes
from seglab.data.formats.labelme import load_labelme
from seglab.data.formats.cvat import load_cvat
from seglab.data.formats.coco import load_coco
from seglab.data.formats.yolo import load_yolo, read_ultralytics
from seglab.data.formats.folders import IMAGE_DIRS, MASK_DIRS, MASK_SUFFIXES, load_folders

# isort: on
from seglab.data.builtin import BUILTIN_DATASETS, resolve_builtin
from seglab.data.io import read_mask
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError
from seglab.registry import did_you_mean

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_COLORS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_COLORS",
    "DEFAULT_IGNORE_INDEX",
    "FORMATS",
    "IMAGE_DIRS",
    "IMAGE_SUFFIXES",
    "MASK_DIRS",
    "MASK_SUFFIXES",
    "MAX_LISTED",
    "MAX_SCANNED_MASKS",
    "MAX_SEMANTIC_CLASSES",
    "SPLIT_ALIASES",
    "SPLIT_ORDER",
    "VOC_CLASSES",
    "DatasetFormat",
    "Metadata",
    "color_palette",
    "get_split",
    "load_cityscapes",
    "load_coco",
    "load_cvat",
    "load_folders",
    "load_labelme",
    "load_pairs",
    "load_voc",
    "load_yolo",
    "resolve_dataset",
    "split_names",
    "thread_map",
    "train_val_splits",
]

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
    cfg = build_config(DataConfig, read_ultralytics(read_yaml(yaml_path), str(yaml_path)), str(yaml_path))
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


def resolve_dataset(
    data: str | Path,
    *,
    strict: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    task: str = "semantic",
) -> DatasetSpec:
    """Understand the dataset at ``data`` (a folder, a data.yaml, or a built-in name) and list its samples.

    A ``data.yaml`` inside the folder is read automatically; one given directly has its
    ``path:`` relative to itself. Layout problems (list lines naming missing files, images
    without masks) raise a SeglabError listing them; with ``strict=False`` they are kept in
    ``spec.problems`` instead and the affected samples left out (``seglab data check`` does this).

    With ``task`` "instance" or "detect", the masks of a mask-file layout (pairs, folders) are read as
    instance-id masks (``mask_encoding: instance``) unless data.yaml says otherwise.

    A ``data`` that is not an existing path but a built-in name (``camvid``, ``voc2012``,
    ``isbi2012``) is downloaded on first use into ``cache_dir`` (default: the user's cache
    folder; ``progress`` shows the download bar) by :func:`seglab.data.builtin.resolve_builtin`.
    An existing folder of that name wins over the built-in one.

    Shards (a URL, a ``.tar`` brace pattern, a folder with a seglab ``dataset.json``) give a
    :class:`seglab.data.shards.ShardSpec`, whose samples are streamed (``shards.shard_loader``).
    """
    from seglab.data import shards  # imports this module

    if shards.is_shard_source(data):
        return shards.resolve_shards(data)
    path = Path(data).expanduser()
    builtin = None
    if not path.exists() and isinstance(data, str) and data in BUILTIN_DATASETS:
        builtin, path = data, resolve_builtin(data, cache_dir=cache_dir, progress=progress)
    if not path.exists():
        names = list(BUILTIN_DATASETS)
        hint = did_you_mean(str(data), names) if len(path.parts) == 1 else ""
        raise SeglabError(
            f"dataset not found: {path}{hint}; pass a dataset folder or its data.yaml, "
            f"or one of the built-in names: {', '.join(names)}"
        )
    root, cfg, yaml_path = _read_config(path)
    if not root.is_dir():
        raise SeglabError(f"{yaml_path}: path: {cfg.path} -> {root} is not a folder; fix 'path:' in data.yaml")
    if not any(p.name not in ("data.yaml", "data.yml") for p in root.iterdir()):
        raise SeglabError(
            f"dataset folder {root} is empty; put the images and masks there (e.g. images/train, masks/train)"
        )
    name = cfg.format if cfg.format != "auto" else _detect(root, cfg)
    if task in ("instance", "detect") and cfg.mask_encoding == "auto" and not has_objects(name):
        cfg = replace(cfg, mask_encoding="instance")
    spec = FORMATS[name].load(root, cfg)
    if yaml_path is not None:
        spec.notes.insert(0, f"settings from {yaml_path}")
    if builtin is not None:
        spec.notes.insert(0, f"built-in dataset '{builtin}' from {path}")
    if not spec.splits and not spec.problems:
        raise SeglabError(
            f"{root}: the {name} layout was recognised but it lists no images; expected {FORMATS[name].expects}"
        )
    if task == "semantic" and spec.num_classes > MAX_SEMANTIC_CLASSES:
        raise SeglabError(too_many_classes(spec, str(yaml_path or root)))
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


def train_val_splits(
    spec: DatasetSpec,
    *,
    val_fraction: float,
    seed: int,
    limit: int | None = None,
    labelled: Callable[[Sample], bool] | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """The train and val samples a training run uses (each cut to ``limit``), or a SeglabError saying
    why training cannot start on them.

    This is the one place that decides whether the splits are trainable, for every trainer and for
    ``seglab data check``: each split needs an image, and a labelled pixel (a class, not the ignore
    value) somewhere in its masks -- a train split without one trains on nothing, a val split
    without one scores nothing. ``labelled(sample)`` says whether a sample's mask has one; by default
    the masks are read until one does (normally the first). ``data check`` passes what it already read.
    """
    _refuse_shards(spec, "detectors and generators do not train from shards yet (semantic models do)")
    train = get_split(spec, "train", val_fraction=val_fraction, seed=seed)
    val = get_split(spec, "val", val_fraction=val_fraction, seed=seed)
    if limit:
        train, val = train[:limit], val[:limit]
    if not train or not val:
        raise SeglabError(f"{spec.root}: the train and val splits need at least one image each")
    if spec.num_classes > MAX_SEMANTIC_CLASSES:  # --task instance/detect only: no 8-bit label map to read
        return train, val
    has_labels = labelled or functools.partial(_has_labels, spec=spec)
    unlabelled = [name for name, samples in (("train", train), ("val", val)) if not any(map(has_labels, samples))]
    if unlabelled:
        samples = {"train": train, "val": val}
        what = "; ".join(
            f"the {name} split has no labelled pixels: none of its {len(samples[name])} mask(s) "
            f"({_listing([s.mask or s.image for s in samples[name]])}) holds a class value 0..{spec.num_classes - 1}"
            for name in unlabelled
        )
        raise SeglabError(
            f"{spec.root}: {what}; every pixel is ignore_index {spec.ignore_index} (or the masks are unreadable), "
            "so training would learn nothing; fix the masks, or set mask_encoding / ignore_index in data.yaml"
        )
    return train, val


def _has_labels(sample: Sample, *, spec: DatasetSpec) -> bool:
    """Whether ``sample``'s mask has a pixel of a class (values past the classes are check_labels' business)."""
    try:
        return bool((read_mask(sample, spec) < spec.num_classes).any())
    except SeglabError:  # unreadable: training skips it (or stops on it with --strict-data)
        return False


def get_split(spec: DatasetSpec, name: str, *, val_fraction: float = 0.1, seed: int = 0) -> list[Sample]:
    """The samples of split ``name`` ('train', 'val', 'test'; 'valid' means 'val').

    When the dataset has no val split, ``val`` is a seeded random ``val_fraction`` of train
    (the same seed always gives the same images) and ``train`` leaves those images out; the
    hold-out is noted in ``spec.notes``.
    """
    _refuse_shards(spec, "a shard set is streamed, not listed as files (seglab.data.shards.shard_loader reads it)")
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
    listed = ", ".join(available) or "none (every sample was left out: see the problems listed)"
    raise SeglabError(f"{spec.root}: no split '{name}'{did_you_mean(name, list(spec.splits))}; available: {listed}")


def _refuse_shards(spec: DatasetSpec, why: str) -> None:
    from seglab.data.shards import ShardSpec

    if isinstance(spec, ShardSpec):
        raise SeglabError(
            f"{spec.location}: {why}; use the folder the shards were packed from (`seglab val` reads both)"
        )


def split_names(spec: DatasetSpec) -> list[str]:
    """The splits :func:`get_split` can return, including a held-out 'val'."""
    names = list(spec.splits)
    if "val" not in names and "train" in names:
        names.insert(names.index("train") + 1, "val")
    return names
