"""The ``cityscapes`` layout: leftImg8bit/ images with gtFine/ labelIds masks."""

from __future__ import annotations

from pathlib import Path

from seglab.data.formats.common import SPLIT_ORDER, Metadata, _finish, _listing, _register, _spec
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


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
