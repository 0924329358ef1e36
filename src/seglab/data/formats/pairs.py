"""The ``pairs`` layout: train.txt / val.txt listing 'image_path mask_path', and SegNet's CamVid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seglab.data.formats.common import (
    SPLIT_ORDER,
    Metadata,
    _evenly,
    _finish,
    _register,
    _scan_index_masks,
    _spec,
    read_text,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")  # fmt: skip
CAMVID_COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))  # fmt: skip


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
    lines = read_text(list_file, "pair list").splitlines()
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
    notes: list[str] = []
    splits = {}
    for split in SPLIT_ORDER:
        given = getattr(cfg, split)
        list_file = root / given if given else root / f"{split}.txt"
        if given and not list_file.is_file():
            raise SeglabError(f"{split}: pair list {list_file} not found; fix '{split}:' in data.yaml")
        if not list_file.is_file():
            continue
        before = len(problems)
        splits[split] = _read_pair_list(list_file, root, problems)
        if splits[split] or len(problems) > before:
            continue
        # A list with no pair at all: training cannot start without train; an empty val or test is left out.
        empty = f"{list_file} lists no 'image_path mask_path' pairs"
        if split == "train":
            problems.append(f"{empty}: there is nothing to train on; add the pairs")
        else:
            held = " (val is held out from train)" if split == "val" else ""
            notes.append(f"{empty}: split '{split}' not used{held}")
    spec = _spec(root, "pairs", splits, notes, problems)
    return _finish(spec, cfg, None if cfg.classes else _camvid_metadata(root, splits), str(root))
