"""`seglab data check`: every problem is found and names its file; histogram and class weights are exact."""

from __future__ import annotations

import time

import numpy as np
import pytest

from seglab.data.check import check_dataset, class_pixel_counts
from seglab.data.formats import get_split, resolve_dataset
from seglab.losses import class_weights_from_counts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_clean_dataset_histogram_and_weights_are_exact(tiny_dataset):
    report = check_dataset(tiny_dataset)
    assert report.ok and report.problems == []
    assert report.split_counts == {"train": 3, "val": 2}
    # train masks (6x8): a = 24 x 0 + 24 x 1; b = 24 x 0 + 24 x 2; c = 40 x 2 + 8 x ignore
    np.testing.assert_array_equal(report.class_counts, [48, 24, 64])
    np.testing.assert_array_equal(report.images_with_class, [2, 1, 2])
    np.testing.assert_array_equal(report.image_counts, [96, 48, 88])  # labelled pixels of those images
    assert report.ignore_pixels == 8
    freq = np.array([48 / 96, 24 / 48, 64 / 88])
    np.testing.assert_allclose(report.weights["median"], np.median(freq) / freq)
    np.testing.assert_allclose(report.weights["enet"], 1 / np.log(1.02 + np.array([48, 24, 64]) / 136))
    text = report.format()
    for expected in (
        "folders layout",
        "train 3, val 2",
        "class2",
        "47.06%",
        "median",
        "enet",
        "OK (5 samples",
    ):
        assert expected in text, expected


def test_class_pixel_counts_matches_report(tiny_dataset):
    spec = resolve_dataset(tiny_dataset)
    counts, image_counts = class_pixel_counts(get_split(spec, "train"), spec)
    np.testing.assert_array_equal(counts, [48, 24, 64])
    np.testing.assert_array_equal(image_counts, [96, 48, 88])
    weights = class_weights_from_counts(counts, "median", image_counts=image_counts)
    assert weights[1] == pytest.approx(np.median([0.5, 0.5, 64 / 88]) / 0.5)


def test_every_problem_is_found_and_names_its_file(tiny_dataset, write_png):
    train_images, train_masks = tiny_dataset / "images" / "train", tiny_dataset / "masks" / "train"
    (tiny_dataset / "data.yaml").write_text("classes: [sky, road, car]\n")
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_png(train_images / "partnerless.png", rgb[:6, :8])  # no mask
    write_png(train_images / "emptymask.png", rgb[:6, :8])
    (train_masks / "emptymask.png").write_bytes(b"")  # 0 bytes
    write_png(train_images / "cutmask.png", rgb)
    good = write_png(train_masks / "cutmask.png", rgb[..., 0] % 3)
    (train_masks / "cutmask.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    write_png(train_images / "textmask.png", rgb[:6, :8])
    (train_masks / "textmask.png").write_text("this is not a PNG")  # non-image with a .png name
    write_png(train_images / "bigger.png", rgb[:10, :12])
    write_png(train_masks / "bigger.png", np.zeros((6, 8), np.uint8))  # size mismatch
    write_png(train_images / "outofrange.png", rgb[:6, :8])
    write_png(train_masks / "outofrange.png", np.array([[0, 7, 7, 9] * 2] * 6, np.uint8))  # 3 classes: 7, 9 bad
    (train_images / "emptyimage.png").write_bytes(b"")  # the image is 0 bytes
    write_png(train_masks / "emptyimage.png", np.zeros((6, 8), np.uint8))

    report = check_dataset(tiny_dataset)
    assert not report.ok
    found = {(p.kind, p.path.name if p.path else None): p.message for p in report.problems}
    layout = [m for (kind, _), m in found.items() if kind == "layout"]
    assert len(layout) == 1 and "partnerless.png" in layout[0] and "without a mask" in layout[0]
    assert "empty (0 bytes)" in found["unreadable", "emptymask.png"]
    assert str(train_masks / "emptymask.png") in found["unreadable", "emptymask.png"]
    assert "truncated" in found["unreadable", "cutmask.png"]
    assert "not an image" in found["unreadable", "textmask.png"]
    assert "12x10" in found["size", "bigger.png"] and "8x6" in found["size", "bigger.png"]
    label = found["label", "outofrange.png"]
    assert str(train_masks / "outofrange.png") in label
    assert "7 (24 px)" in label and "9 (12 px)" in label and "[0, 3)" in label
    assert str(train_images / "emptyimage.png") in found["unreadable", "emptyimage.png"]
    assert len(report.problems) == 7  # nothing reported twice, nothing invented
    text = report.format()
    assert "FAILED: 7 problem(s)" in text and "outofrange.png" in text and "partnerless.png" in text
    assert report.split_counts == {"train": 9, "val": 2}  # the image without a mask is left out


def test_unknown_colours_are_reported(tmp_path, write_png):
    root = tmp_path / "d"
    write_png(root / "images" / "x.png", np.zeros((1, 3, 3), np.uint8))
    write_png(root / "masks" / "x.png", np.array([[[0, 0, 0], [255, 0, 0], [1, 2, 3]]], np.uint8))
    (root / "data.yaml").write_text("classes: [bg, fg]\ncolors: [[0, 0, 0], [255, 0, 0]]\n")
    report = check_dataset(root)
    problem, split = report.problems
    assert problem.kind == "color" and "(1, 2, 3) (1 px)" in problem.message and "x.png" in problem.message
    assert split.kind == "split" and "only 1 training image(s)" in split.message  # what train refuses too


def test_held_out_val_is_counted_and_excluded_from_histogram(tmp_path, write_png):
    root = tmp_path / "d"
    for i in range(10):
        write_png(root / "images" / f"{i}.png", np.zeros((2, 2, 3), np.uint8))
        write_png(root / "masks" / f"{i}.png", np.full((2, 2), i % 2, np.uint8))
    report = check_dataset(root, val_fraction=0.2)
    assert report.ok and report.split_counts == {"train": 8, "val": 2}
    assert report.class_counts.sum() == 8 * 4
    assert any("holding out 20% of train (2 images, seed 0)" in n for n in report.notes)


def test_real_camvid_checks_ok(shared_data):
    start = time.perf_counter()
    report = check_dataset(shared_data / "camvid")
    assert report.ok, report.format()
    assert report.split_counts == {"train": 367, "val": 101} and report.samples_checked == 468
    assert report.class_counts.shape == (11,) and (report.class_counts > 0).all()
    assert report.class_counts.sum() + report.ignore_pixels == 367 * 360 * 480
    assert np.argmax(report.class_counts) == 3  # Road
    assert time.perf_counter() - start < 60
