"""What every predictor returns (:class:`Result`, the semantic :class:`SegResult`) and the helpers
the predictors share: reading sources, naming outputs, saving files atomically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglab.files import atomic_path
from seglab.plots import background_classes, blend_image, confidence_image, draw_legend, palette_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class Predictor:
    """What ``seglab.load`` returns, whatever the task: ``predict`` gives :class:`Result` objects,
    ``card`` says what the model is (task, architecture, classes, colours, preprocessing) and
    ``backend`` what runs it (pytorch, onnxruntime, torchscript, ...)."""

    card: Any  # seglab.engine.checkpoint.ModelCard
    backend: str
    device: Any  # torch.device

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def truth(self, sample: Any, spec: Any) -> Result:
        """A dataset sample's labels as a :class:`Result` of this task: what the report draws beside
        the prediction."""
        raise NotImplementedError

    def scores(self, evaluation: Any) -> Any:
        """What ``evaluate`` returned, as the report shows it: a :class:`seglab.engine.report.Scores`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        card, shown = self.card, ", ".join(self.card.classes[:6])
        more = f", ... {len(card.classes) - 6} more" if len(card.classes) > 6 else ""
        return (
            f"{type(self).__name__}({card.task}, {card.arch} on {card.encoder}, {len(card.classes)} classes "
            f"[{shown}{more}], img_size {card.img_size}, {self.backend} on {self.device})"
        )


class Result:
    """One image's prediction, whatever the task. Every task's result has ``task``, ``image``
    ((H, W, C) uint8, as read), ``path``, ``classes`` and ``colors``; ``plot()`` draws it on the
    image, ``to_json()`` is a dict that ``json.dumps`` takes, ``save(out_dir)`` writes each of its
    files whole or not at all, and its repr says what was found in one line."""

    image: np.ndarray
    path: Path | None
    classes: list[str]
    colors: list[tuple[int, int, int]]

    @property
    def task(self) -> str:
        raise NotImplementedError

    @property
    def stem(self) -> str:
        return self.path.stem if self.path else "image"

    def plot(self, *, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The prediction drawn on the image, (H, W, 3) uint8; ``legend``: with a list of the classes
        drawn on it (where the task's drawing does not name them on the objects already)."""
        raise NotImplementedError

    def summary(self) -> str:
        """What was found, in a few words (for the repr)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, out_dir: str | Path, *, name: str | None = None, alpha: float = 0.5) -> dict[str, Path]:
        raise NotImplementedError

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return f"{type(self).__name__}({self.task}, {self.path or 'array'}, {w}x{h}: {self.summary()})"


@dataclass(repr=False)
class SegResult(Result):
    """A semantic model's prediction. ``mask`` is (H, W) class indices at the image's own size."""

    image: np.ndarray  # (H, W, C) uint8, as read
    mask: np.ndarray  # (H, W) uint8 class indices (uint16 for models of more than 256 classes)
    classes: list[str]
    colors: list[tuple[int, int, int]]
    confidence: np.ndarray | None = None  # (H, W) float32, probability of the chosen class
    path: Path | None = None
    unlabelled: int | None = None  # a label's ignore index: never painted (ground truth drawn as a result)

    @property
    def task(self) -> str:
        return "semantic"

    def overlay(self, alpha: float = 0.5, *, unpainted: Sequence[str] | None = None, legend: bool = True) -> np.ndarray:
        """The image with class colours blended in and a legend of the classes painted, (H, W, 3) uint8.
        ``unpainted``: class names left as the image is (default: a class named background)."""
        return np.asarray(self._overlay(alpha, unpainted, legend))

    def plot(self, *, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        return self.overlay(alpha, legend=legend)

    def _overlay(self, alpha: float, unpainted: Sequence[str] | None, legend: bool) -> Image.Image:
        skip = background_classes(self.classes) if unpainted is None else class_indices(unpainted, self.classes)
        skip += [] if self.unlabelled is None else [self.unlabelled]
        picture = blend_image(self.image, self.mask, self.colors, alpha, skip)
        if legend:  # the classes painted, largest first
            shares = self.areas()
            painted = sorted(((shares[n], i) for i, n in enumerate(self.classes) if n in shares and i not in skip),
                             reverse=True)  # fmt: skip
            draw_legend(picture, [(f"{self.classes[i]} {_percent(s)}", self.colors[i]) for s, i in painted])
        return picture

    def areas(self) -> dict[str, float]:
        """Fraction of the image each predicted class covers."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.classes))[: len(self.classes)]
        return {name: float(c) / self.mask.size for name, c in zip(self.classes, counts, strict=True) if c}

    def summary(self) -> str:
        top = sorted(self.areas().items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{name} {100 * share:.0f}%" for name, share in top)

    def to_json(self) -> dict[str, Any]:
        return {"image": str(self.path) if self.path else None, "size": list(self.mask.shape), "areas": self.areas()}

    def save(
        self,
        out_dir: str | Path,
        *,
        save_conf: bool = False,
        alpha: float = 0.5,
        name: str | None = None,
        unpainted: Sequence[str] | None = None,
    ) -> dict[str, Path]:
        """Write masks/<stem>.png (palette PNG of class indices; 16-bit past 256 classes), overlays/<stem>.jpg
        (see :meth:`overlay`) and, with ``save_conf``, confidence/<stem>.png (viridis, with a 0-1 scale),
        under ``name`` instead of the image's stem when given. Each file appears whole or not at all."""
        out = Path(out_dir)
        stem = name or self.stem
        written = {"mask": out / "masks" / f"{stem}.png", "overlay": out / "overlays" / f"{stem}.jpg"}
        atomic_save(palette_image(self.mask, self.colors), written["mask"])
        atomic_save(self._overlay(alpha, unpainted, legend=True), written["overlay"], quality=90)
        if save_conf and self.confidence is not None:
            written["confidence"] = out / "confidence" / f"{stem}.png"
            atomic_save(confidence_image(self.confidence), written["confidence"])
        return written


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%" if share >= 0.01 else "<1%"


def class_indices(names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """The indices of class ``names`` (``none``: no class), or one line naming the one that is not a class."""
    from seglab.errors import SeglabError
    from seglab.registry import did_you_mean

    if [n.lower() for n in names] == ["none"]:
        return []
    for name in names:
        if name not in classes:
            raise SeglabError(
                f"--unpainted {name}: not a class of this model{did_you_mean(name, list(classes))}; "
                f"its classes: {', '.join(classes)} (or none)"
            )
    return [classes.index(n) for n in names]


def atomic_save(image: Image.Image, path: Path, **params: Any) -> None:
    """``image`` written to ``path`` whole or not at all."""
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


def read_batches(
    sources: Sequence[str | Path | np.ndarray], batch: int, channels: int
) -> Iterator[list[tuple[np.ndarray, Path | None]]]:
    """The images of ``sources`` (paths or (H, W[, C]) uint8 arrays), ``batch`` at a time, as
    (H, W, ``channels``) arrays with their paths: what every predictor's loop reads, so at most one
    batch of decoded images is held."""
    from seglab.data.io import read_image

    pending: list[tuple[np.ndarray, Path | None]] = []
    for item in sources:
        if isinstance(item, np.ndarray):
            image = item if item.ndim == 3 else item[..., None]
            if image.shape[-1] == 1 and channels > 1:  # a greyscale array for an RGB model
                image = image.repeat(channels, -1)
            pending.append((image, None))
        else:
            pending.append((read_image(item, channels), Path(item)))
        if len(pending) == batch:
            yield pending
            pending = []
    if pending:
        yield pending
