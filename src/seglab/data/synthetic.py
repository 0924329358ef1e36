"""A small procedurally generated dataset of coloured shapes, for ``seglab demo`` and tests.

Classes: ``background``, ``circle``, ``rectangle``, ``triangle``. Each image has a blotchy,
noisy grey-ish background and 2-5 shapes that may overlap (later shapes occlude earlier
ones, and the mask follows). Each shape class has its own colour distribution (reddish,
greenish, bluish) wide enough that the distributions overlap, and one shape in five takes
another class's colour, so a model has to look at shape as well as colour; rectangles are
striped and triangles speckled, so texture helps a little too. A 2-pixel band along
every boundary between different classes is labelled ``ignore_index`` (255), as in VOC.

Layout written under ``root``::

    images/train/0000.png ...   RGB
    images/val/0000.png ...
    masks/train/0000.png ...    L mode, values in {0, 1, 2, 3, 255}
    masks/val/0000.png ...
    data.yaml                   classes, colors, ignore_index, mask_encoding

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the
files are byte-identical for a seed and the validation images do not depend on ``n_train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

CLASSES = ("background", "circle", "rectangle", "triangle")
# Display colours (plots, overlays); not the colours the shapes are drawn with.
COLORS = ((0, 0, 0), (220, 60, 60), (60, 180, 75), (65, 105, 225))
IGNORE_INDEX = 255

# Mean RGB each shape class is drawn with; per-shape colour = mean + N(0, _COLOR_STD).
_SHAPE_MEANS = np.array([[205.0, 70.0, 70.0], [70.0, 190.0, 85.0], [75.0, 95.0, 210.0]])
_COLOR_STD = 35.0
_SWAP_COLOUR_P = 0.2  # chance a shape takes another class's colour
_SPLIT_IDS = {"train": 0, "val": 1}


def make_shapes_dataset(
    root: str | Path, *, n_train: int = 160, n_val: int = 40, size: int = 96, seed: int = 0
) -> Path:
    """Write the shapes dataset under ``root`` and return ``root`` (the folder holding data.yaml).

    ``size`` is the side of the square images. Existing files of the same names are
    overwritten; nothing else under ``root`` is touched.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        image_dir = root / "images" / split
        mask_dir = root / "masks" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
            image, mask = _draw_sample(rng, size)
            Image.fromarray(image).save(image_dir / f"{index:04d}.png")
            Image.fromarray(mask).save(mask_dir / f"{index:04d}.png")
    data = {
        "classes": list(CLASSES),
        "colors": [list(c) for c in COLORS],
        "ignore_index": IGNORE_INDEX,
        "mask_encoding": "index",
    }
    (root / "data.yaml").write_text(
        "# Synthetic shapes dataset written by seglab.data.synthetic.make_shapes_dataset\n"
        + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    )
    return root


def _draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its mask (H, W) uint8."""
    image = _background(rng, size)  # float (H, W, 3)
    label = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, len(CLASSES)))
        region = _shape_region(rng, cls, size)
        if not region.any():
            continue
        colour_cls = cls
        if rng.random() < _SWAP_COLOUR_P:
            colour_cls = int(rng.choice([c for c in range(1, len(CLASSES)) if c != cls]))
        colour = _SHAPE_MEANS[colour_cls - 1] + rng.normal(0.0, _COLOR_STD, 3)
        fill = np.broadcast_to(colour, (size, size, 3)).copy()
        if cls == 2:  # rectangles: stripes in a random direction
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(4.0, 8.0)
            phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
            fill += 28.0 * np.sin(phase)[..., None]
        elif cls == 3:  # triangles: coarse speckle
            fill += rng.normal(0.0, 22.0, (size, size, 1))
        image[region] = fill[region]
        label[region] = cls
    image += rng.normal(0.0, 10.0, image.shape)  # sensor noise over everything
    mask = label.copy()
    mask[_boundaries(label)] = IGNORE_INDEX
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted blotches: a coarse random grid upsampled smoothly, around a random grey."""
    grey = rng.uniform(70.0, 180.0)
    tint = rng.normal(0.0, 15.0, 3)
    coarse = rng.normal(0.0, 25.0, (5, 5, 3)) + grey + tint
    coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return smooth.copy()


def _shape_region(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Boolean (H, W) region of one circle (1), rotated rectangle (2) or triangle (3)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(0.09, 0.24) * size
    cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
    if cls == 1:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        if cls == 2:
            aspect = rng.uniform(0.45, 1.0)
            half = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) * r
        else:
            angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.normal(0, 0.15, 3)
            half = np.stack([np.cos(angles), np.sin(angles)], axis=1) * r * 1.2
        theta = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = half @ rot.T + np.array([cx, cy])
        draw.polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(canvas) > 0


def _boundaries(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a different class (a 2-pixel band along each edge)."""
    edge = np.zeros(label.shape, dtype=bool)
    diff_v = label[1:, :] != label[:-1, :]
    diff_h = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= diff_v
    edge[:-1, :] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge
