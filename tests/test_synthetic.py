"""The synthetic shapes dataset: layout, value ranges, determinism."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image

from seglab.data.synthetic import CLASSES, IGNORE_INDEX, make_shapes_dataset


def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_value_ranges(tmp_path):
    root = make_shapes_dataset(tmp_path / "shapes", n_train=6, n_val=3, size=40, seed=0)
    assert root == tmp_path / "shapes"
    for split, n in (("train", 6), ("val", 3)):
        images = sorted((root / "images" / split).glob("*.png"))
        masks = sorted((root / "masks" / split).glob("*.png"))
        assert [p.name for p in images] == [f"{i:04d}.png" for i in range(n)]
        assert [p.name for p in masks] == [p.name for p in images]
    seen: set[int] = set()
    for mask_path in (root / "masks").rglob("*.png"):
        with (
            Image.open(mask_path) as m,
            Image.open(root / "images" / mask_path.parent.name / mask_path.name) as im,
        ):
            assert m.mode == "L" and im.mode == "RGB"
            assert m.size == im.size == (40, 40)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values <= set(range(len(CLASSES))) | {IGNORE_INDEX}
        seen |= values
    assert seen == set(range(len(CLASSES))) | {IGNORE_INDEX}  # every class shows up somewhere

    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["classes"] == list(CLASSES)
    assert data["ignore_index"] == 255
    assert len(data["colors"]) == len(CLASSES) and all(len(c) == 3 for c in data["colors"])


def test_deterministic_for_a_seed(tmp_path):
    a = file_bytes(make_shapes_dataset(tmp_path / "a", n_train=4, n_val=2, size=32, seed=7))
    b = file_bytes(make_shapes_dataset(tmp_path / "b", n_train=4, n_val=2, size=32, seed=7))
    c = file_bytes(make_shapes_dataset(tmp_path / "c", n_train=4, n_val=2, size=32, seed=8))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    # validation images do not depend on how many training images were made
    d = file_bytes(make_shapes_dataset(tmp_path / "d", n_train=1, n_val=2, size=32, seed=7))
    assert all(d[k] == a[k] for k in a if "/val/" in k)


def test_images_are_not_trivially_separable_by_colour(tmp_path):
    """Shapes overlap the background's colour range a little: a per-pixel colour rule is not enough."""
    root = make_shapes_dataset(tmp_path / "s", n_train=12, n_val=0, size=48, seed=1)
    pixels, labels = [], []
    for p in sorted((root / "images" / "train").glob("*.png")):
        with Image.open(p) as im, Image.open(root / "masks" / "train" / p.name) as m:
            pixels.append(np.asarray(im).reshape(-1, 3))
            labels.append(np.asarray(m).reshape(-1))
    x, y = np.concatenate(pixels).astype(float), np.concatenate(labels)
    keep = y != IGNORE_INDEX
    x, y = x[keep], y[keep]
    # nearest class mean colour
    means = np.stack([x[y == c].mean(0) for c in range(len(CLASSES))])
    guess = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (guess == y).mean()
    assert 0.3 < accuracy < 0.97
