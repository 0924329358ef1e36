"""Prediction results: the mask, its confidence, an overlay, and how they are saved."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglab.files import atomic_path
from seglab.plots import blend, blend_image, palette_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Result:
    """One image's prediction. ``mask`` is (H, W) class indices at the image's own size."""

    image: np.ndarray  # (H, W, C) uint8, as read
    mask: np.ndarray  # (H, W) uint8 class indices (uint16 for models of more than 256 classes)
    classes: list[str]
    colors: list[tuple[int, int, int]]
    confidence: np.ndarray | None = None  # (H, W) float32, probability of the chosen class
    path: Path | None = None

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else "image"

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """The image with class colours blended in, (H, W, 3) uint8."""
        return blend(self.image, self.mask, self.colors, alpha)

    def areas(self) -> dict[str, float]:
        """Fraction of the image each predicted class covers."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes))[: len(self.classes)]
        return {name: float(c) / self.mask.size for name, c in zip(self.classes, counts, strict=True) if c}

    def to_json(self) -> str:
        return json.dumps(
            {"image": str(self.path) if self.path else None, "size": list(self.mask.shape), "areas": self.areas()}
        )

    def save(
        self, out_dir: str | Path, *, confidence: bool = False, alpha: float = 0.5, name: str | None = None
    ) -> dict[str, Path]:
        """Write masks/<stem>.png (palette PNG of class indices; 16-bit past 256 classes), overlays/<stem>.jpg
        and, with ``confidence``, confidence/<stem>.png (probability x 255), under ``name`` instead of the
        image's stem when given. Each file appears whole or not at all."""
        out = Path(out_dir)
        stem = name or self.stem
        written = {"mask": out / "masks" / f"{stem}.png", "overlay": out / "overlays" / f"{stem}.jpg"}
        _atomic_save(palette_image(self.mask, self.colors), written["mask"])
        _atomic_save(blend_image(self.image, self.mask, self.colors, alpha), written["overlay"], quality=90)
        if confidence and self.confidence is not None:
            written["confidence"] = out / "confidence" / f"{stem}.png"
            _atomic_save(Image.fromarray((self.confidence * 255).round().astype(np.uint8)), written["confidence"])
        return written


def _atomic_save(image: Image.Image, path: Path, **params: Any) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, **params)


def list_sources(source: str | Path | Sequence[str | Path], flag: str = "--source") -> list[Path]:
    """A file, a folder (its images, sorted) or a list of files -> image paths; errors name ``flag``."""
    from seglab.errors import SeglabError

    if not isinstance(source, str | Path):
        return [p for s in source for p in list_sources(s, flag)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SeglabError(f"{flag} {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.exists():
        raise SeglabError(f"{flag} {path}: no such file or folder")
    return [path]


def output_names(paths: Sequence[Path]) -> list[str]:
    """The name each image's outputs are saved under: its stem, or its whole file name where stems
    collide (photo.png, photo.jpg -> photo.png.png, photo.jpg.png), so no prediction overwrites another.
    Files of one name from different folders cannot be told apart that way: they are refused."""
    from seglab.errors import SeglabError

    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 else p.name for p in paths]
    for name, count in Counter(names).items():
        if count > 1:
            same = [str(p) for p, n in zip(paths, names, strict=True) if n == name]
            raise SeglabError(
                f"--source: {count} images would save their predictions under one name, {name} "
                f"({', '.join(same[:3])}{', ...' if len(same) > 3 else ''}); predict them into separate --out folders"
            )
    return names


def expand_source(source) -> tuple[list, bool]:
    """What ``predict(source)`` takes -> (the images, whether one result is returned rather than a list):
    an (H, W, C) array or a file (single), a folder (its images), or a list of paths and arrays."""
    import numpy as np

    if isinstance(source, np.ndarray):
        return [source], True
    if isinstance(source, str | Path):
        return [*list_sources(source)], not Path(source).is_dir()
    return list(source), False
