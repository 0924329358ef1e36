"""The ``folders`` layout: image and mask folders (images/train + masks/train, ...) matched by file name."""

from __future__ import annotations

from pathlib import Path

from seglab.data.formats.common import (
    IMAGE_SUFFIXES,
    SPLIT_ALIASES,
    SPLIT_ORDER,
    _finish,
    _images_in,
    _listing,
    _register,
    _spec,
)
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

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
