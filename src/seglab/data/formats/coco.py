"""The ``coco`` layout: COCO instances json files (annotations/*.json, Roboflow exports)."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from seglab.data.formats.common import (
    SPLIT_ALIASES,
    SPLIT_ORDER,
    Metadata,
    _finish,
    _listing,
    _register,
    _size_problem,
    _spec,
    read_text,
    thread_map,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError, short


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


# The fields seglab reads from each entry, and the JSON types they may have (ids may be strings in
# some exports; category ids are sorted, so they must be numbers).
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "images": {"id": (int, str), "file_name": (str,), "height": (int,), "width": (int,)},
    "annotations": {"image_id": (int, str), "category_id": (int, str)},
    "categories": {"id": (int,), "name": (str, int)},
}


def _read_coco(path: Path) -> dict[str, Any]:
    """A COCO instances file, its structure checked: every field seglab reads has the right type."""
    try:
        content = json.loads(read_text(path, "COCO annotations"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise SeglabError(f"cannot read COCO annotations {path}: {e}; fix or re-export the file") from None
    missing = [k for k in _FIELDS if k not in content] if isinstance(content, dict) else list(_FIELDS)
    if missing:
        raise SeglabError(
            f"{path} is not a COCO instances file (missing {', '.join(missing)}); export COCO 'instances' annotations"
        )
    for key, fields in _FIELDS.items():
        entries = content[key]
        if not isinstance(entries, list):
            raise SeglabError(f"{path}: '{key}' is a {type(entries).__name__}, not a list; fix or re-export the file")
        for i, entry in enumerate(entries):
            bad = next(
                (f for f, types in fields.items() if not isinstance(entry, dict) or not _is(entry.get(f), types)), None
            )
            if bad is not None:
                found = f"{bad}={short(entry.get(bad))}" if isinstance(entry, dict) else f"a {type(entry).__name__}"
                kinds = " or ".join(t.__name__ for t in fields[bad]) if isinstance(entry, dict) else "object"
                raise SeglabError(f"{path}: {key}[{i}] has {found}, expected {kinds}; fix or re-export the file")
            if key == "images" and min(entry["height"], entry["width"]) < 1:
                raise SeglabError(
                    f"{path}: images[{i}] ({entry['file_name']}) is {entry['width']}x{entry['height']}; "
                    "width and height must be positive"
                )
    return content


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)  # JSON true is not an id


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
    objects=True,
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
            ids = [f"{cid} ({n})" for cid, n in unknown.most_common()]
            problems.append(f"{paths[split]}: annotations with unknown category ids: {_listing(ids)}")
        samples: list[Sample] = []
        images = [(image, base / image["file_name"]) for image in content["images"]]
        exists = [path.is_file() for _, path in images]
        found = [pair for pair, ok in zip(images, exists, strict=True) if ok]
        missing = [image["file_name"] for (image, _), ok in zip(images, exists, strict=True) if not ok]
        if missing:
            problems.append(f"{paths[split]}: {len(missing)} image(s) not found in {base}: {_listing(missing)}")
        size_problems = thread_map(functools.partial(_size_problem, paths[split]), found)
        for (image, path), size_problem in zip(found, size_problems, strict=True):
            if size_problem:
                problems.append(size_problem)  # the image is left out, as one without a file is
                continue
            samples.append(
                Sample(
                    image=path,
                    annotations=by_image.get(image["id"], []),
                    size=(image["height"], image["width"]),
                    coco_id=image["id"],
                )
            )
        splits[split] = samples
    meta = Metadata(classes=classes, mask_encoding="coco", fixed=True)
    return _finish(_spec(root, "coco", splits, notes, problems), cfg, meta, str(root))
