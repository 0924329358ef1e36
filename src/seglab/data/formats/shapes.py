"""The shapes annotation tools draw, as COCO-style annotations: what LabelMe, CVAT and YOLO-seg share.

Each of those layouts is read into the Samples a COCO file gives (``annotations`` of polygons in
pixels or RLE, ``category_id`` a class index, ``size`` (h, w), ``mask_encoding`` "coco"), so
training, evaluation and ``data check`` work on them unchanged. Boxes, rotated boxes and
ellipses become polygons; open polylines become strips :data:`LINE_WIDTH` pixels wide (one
4-corner polygon per segment). A shape that cannot be drawn raises :class:`ShapeError`; the
reader adds the file and object and lists it among the dataset's problems.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seglab.data.formats.common import Metadata, _finish, _spec, read_text
from seglab.data.io import UnreadableImage, probe_image
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import SeglabError

MAX_ANNOTATION_BYTES = 1 << 30  # one file for a whole dataset (a CVAT XML of a large project)
MAX_LABEL_FILE_BYTES = 64 << 20  # one file per image (a LabelMe JSON with the image embedded, a YOLO txt)
EDGE_TOLERANCE = 1.0  # pixels a point may lie outside the image (tools snap to the border); clipped onto it
LINE_WIDTH = 3.0  # pixels: how wide an open polyline is drawn
ELLIPSE_POINTS = 32  # polygon points per circle or ellipse


class ShapeError(ValueError):
    """A shape that cannot be drawn; the message says why, the reader says where."""


def read_limited(path: Path, what: str, limit: int) -> str:
    """The text of ``path`` (UTF-8), refused before reading when it is over ``limit`` bytes."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise SeglabError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if size > limit:
        raise SeglabError(f"{what} {path} is {size:,} bytes, more than {limit:,}; split it or re-export it")
    return read_text(path, what)


# --------------------------------------------------------------------------- geometry


def numbers(values: Iterable[Any]) -> list[float]:
    """Coordinates as floats; ShapeError for one that is not a finite number (text, null, NaN)."""
    out = []
    for v in values:
        try:
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            raise ShapeError(f"coordinate {str(v)[:20]!r} is not a number") from None
        if not math.isfinite(x):
            raise ShapeError(f"coordinate {str(v)[:20]!r} is not a finite number")
        out.append(x)
    return out


def pixel_polygon(points: Sequence[Sequence[float]], size: tuple[int, int]) -> list[float]:
    """``[[x, y], ...]`` in pixels -> flat ``[x1, y1, x2, y2, ...]``, checked: every point inside the
    (h, w) image (within :data:`EDGE_TOLERANCE`, then clipped onto it), at least 3 points, some area."""
    xy = _inside(points, size)
    if len(xy) < 3:
        raise ShapeError(f"a polygon needs 3 points or more, it has {len(xy)}")
    flat = xy.ravel().tolist()
    if polygon_area(flat) == 0:
        raise ShapeError("its polygon has no area (all points on one line)")
    return flat


def _inside(points: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """(N, 2) points, each a finite [x, y] inside the (h, w) image within EDGE_TOLERANCE, clipped onto it."""
    if any(not isinstance(p, list | tuple) or len(p) != 2 for p in points):
        raise ShapeError("its points are not [x, y] pairs")
    xy = np.asarray(numbers(v for p in points for v in p), dtype=np.float64).reshape(-1, 2)
    h, w = size
    outside = ((xy < -EDGE_TOLERANCE) | (xy > (w + EDGE_TOLERANCE, h + EDGE_TOLERANCE))).any(axis=1)
    if outside.any():
        x, y = xy[outside][0]
        raise ShapeError(f"point ({x:g}, {y:g}) lies outside the {w}x{h} image")
    return xy.clip(0, (w, h))


def polygon_area(flat: Sequence[float]) -> float:
    """The area of polygon ``[x1, y1, x2, y2, ...]`` (shoelace formula)."""
    x, y = np.asarray(flat[0::2], dtype=np.float64), np.asarray(flat[1::2], dtype=np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def box_points(x1: float, y1: float, x2: float, y2: float, rotation: float = 0.0) -> list[list[float]]:
    """The 4 corners of a box given by two corners, turned ``rotation`` degrees clockwise about its centre."""
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if not rotation:
        return [list(c) for c in corners]
    cx, cy, t = (x1 + x2) / 2, (y1 + y2) / 2, math.radians(rotation)
    cos, sin = math.cos(t), math.sin(t)
    return [[cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos] for x, y in corners]


def ellipse_points(cx: float, cy: float, rx: float, ry: float, rotation: float = 0.0) -> list[list[float]]:
    """:data:`ELLIPSE_POINTS` points on an ellipse (a circle when ``rx == ry``)."""
    t = np.linspace(0, 2 * math.pi, ELLIPSE_POINTS, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    r = math.radians(rotation)
    return np.stack([cx + x * math.cos(r) - y * math.sin(r), cy + x * math.sin(r) + y * math.cos(r)], 1).tolist()


def line_strips(points: Sequence[Sequence[float]], size: tuple[int, int]) -> list[list[float]]:
    """An open polyline as one :data:`LINE_WIDTH`-wide 4-corner polygon per segment (checked as
    :func:`pixel_polygon` checks points)."""
    xy = _inside(points, size)
    if len(xy) < 2:
        raise ShapeError("a polyline needs 2 points or more")
    h, w = size
    strips = []
    for p, q in itertools.pairwise(xy):
        d = q - p
        length = float(np.hypot(*d))
        if length == 0:
            continue
        n = np.array([-d[1], d[0]]) / length * LINE_WIDTH / 2
        quad = np.stack([p + n, q + n, q - n, p - n]).clip(0, (w, h))
        strips.append(quad.ravel().tolist())
    if not strips:
        raise ShapeError("a polyline whose points are all the same has no length")
    return strips


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """The outlines of a 0/1 (H, W) mask's 8-connected regions as flat pixel polygons, holes filled
    (COCO polygons and YOLO-seg lines cannot hold them).

    The mask is traced at twice its resolution, so each outline runs a quarter pixel inside the
    region's edge, through no pixel centre: drawn again (pycocotools, or any pixel-centre rule) it
    covers the same pixels, one-pixel-wide lines included, where tracing at full resolution (through
    the edge pixels' centres) would lose half of every edge pixel."""
    import cv2

    ys, xs = np.nonzero(mask)
    if not len(ys):
        return []
    y0, x0 = int(ys.min()), int(xs.min())
    crop = mask[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1].astype(np.uint8)
    big = np.pad(crop.repeat(2, axis=0).repeat(2, axis=1), 1)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        xy = (contour.reshape(-1, 2).astype(np.float64) - 1 + 0.5) / 2 + (x0, y0)
        if len(xy) >= 3:
            polygons.append(xy.ravel().tolist())
    return polygons


# --------------------------------------------------------------------------- annotations and specs


def annotation(segmentation: Any, category: int, ann_id: int) -> dict[str, Any]:
    """A COCO-style annotation: polygons ``[[x1, y1, ...], ...]`` or an RLE, ``category_id`` a class index."""
    return {"id": ann_id, "segmentation": segmentation, "category_id": category, "iscrowd": 0}


def is_background(name: str) -> bool:
    """Whether a label names the background (LabelMe's ``_background_``, COCO's ``background``)."""
    return name.strip("_").lower() == "background"


def label_classes(labels: Iterable[str], cfg: DataConfig) -> tuple[list[str], dict[str, int]]:
    """Class names (0 = background) and {label: class index}: data.yaml's ``classes:`` (background
    first, as everywhere in seglab) or background + ``labels`` in their order (background labels -> 0)."""
    if cfg.classes is not None:
        names = list(cfg.classes)
    else:
        names = ["background", *dict.fromkeys(n for n in labels if not is_background(n))]
    index = {name: i for i, name in reversed(list(enumerate(names)))}
    index.update({n: 0 for n in [*names, *labels] if is_background(n)})
    return names, index


def finish_objects(
    root: Path,
    fmt: str,
    splits: dict[str, list[Sample]],
    classes: list[str],
    cfg: DataConfig,
    notes: list[str],
    problems: list[str],
) -> DatasetSpec:
    """The spec of a layout read into COCO-style samples (see the module docstring)."""
    meta = Metadata(classes=classes, mask_encoding="coco", fixed=True)
    shown = ", ".join(classes[1:11]) + (", ..." if len(classes) > 11 else "")
    notes.append(f"{fmt}: {len(classes) - 1} classes ({shown}) -> 1..{len(classes) - 1}; 0 = background")
    return _finish(_spec(root, fmt, splits, notes, problems), cfg, meta, str(root))


def skipped_note(skipped: Counter[str], what: str) -> list[str]:
    """A note counting the shapes left out for holding no area ('2 line, 1 point'), or none."""
    if not skipped:
        return []
    kinds = ", ".join(f"{n} {kind}" for kind, n in skipped.most_common())
    return [f"{what} without area left out: {kinds}"]


def upright_size(path: Path) -> tuple[int, int]:
    """(h, w) of an image as seglab decodes it (EXIF orientation applied), from its header;
    UnreadableImage when it is missing, unreadable or too large."""
    header = probe_image(path)
    h, w = header.height, header.width
    try:
        with Image.open(path) as im:
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned by 90 degrees
                h, w = w, h
    except Exception:  # no readable EXIF: the stored orientation
        pass
    return h, w


__all__ = [
    "EDGE_TOLERANCE",
    "LINE_WIDTH",
    "MAX_ANNOTATION_BYTES",
    "MAX_LABEL_FILE_BYTES",
    "ShapeError",
    "UnreadableImage",
    "annotation",
    "box_points",
    "ellipse_points",
    "finish_objects",
    "is_background",
    "label_classes",
    "line_strips",
    "mask_polygons",
    "numbers",
    "pixel_polygon",
    "polygon_area",
    "skipped_note",
    "upright_size",
]
