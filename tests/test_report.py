"""What a run leaves for a person to look at: train_batches.jpg, val_predictions.jpg, per_class.png,
the confusion matrix (a detector's too) and report.html, opened in headless Chromium.

The browser test is skipped when Playwright or Chromium is missing, except under CI (the CI
variable set), where it must run. Screenshots go to $SEGLAB_TEST_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.api import train
from seglab.cli import main
from seglab.engine.predictor import SegResult
from seglab.instance.data import Instances
from seglab.instance.evaluate import confusion_counts
from seglab.instance.predictor import Detections
from seglab.plots import tile_grid
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, browser_api  # noqa: F401 (browser_api: a fixture)

CAMVID = ["--img-size", "96", "--batch", "4", "--limit", "12", "--workers", "0", "--epochs", "1"]
CAMVID_CLASSES = 11
TRAINING_PICTURES = ("train_batches.jpg", "val_predictions.jpg", "per_class.png", "confusion_matrix.png", "curves.png")


@pytest.fixture(scope="module")
def camvid_run(shared_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a CamVid training run folder, a `seglab val` folder of its best.pt)."""
    out = tmp_path_factory.mktemp("report")
    args = ["train", "--data", str(shared_data / "camvid"), "--model", "unet", "--encoder", "resnet18", *CAMVID]
    assert main([*args, "--out", str(out), "--name", "run"]) == 0
    weights = out / "run" / "weights" / "best.pt"
    assert main(["val", "--weights", str(weights), "--limit", "6", "--workers", "0", "--out", str(out / "val")]) == 0
    return out / "run", out / "val"


def test_training_and_val_write_their_pictures(camvid_run):
    run, val = camvid_run
    for name in TRAINING_PICTURES:
        assert Image.open(run / name).size[0] > 300, name  # a real picture, not an empty stub
    for name in ("val_predictions.jpg", "per_class.png", "confusion_matrix.png", "report.html", "metrics.json"):
        assert (val / name).is_file(), name
    # 8 val samples (the run's val split is --limit 12's) x (label, prediction), 4 tiles to a row, and 6 in val
    assert Image.open(run / "val_predictions.jpg").height > Image.open(val / "val_predictions.jpg").height


def test_reports_in_a_browser(browser_api, camvid_run):  # noqa: F811
    artifacts = Path(os.environ.get("SEGLAB_TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    run, val = camvid_run
    best = float(next(csv.DictReader((run / "metrics.csv").open()))["val_miou"])
    with browser_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        outside = []  # a report fetches nothing from outside the run's folders
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(run.parent.as_uri()) else None)
        for folder, figures in ((run, ("predictions", "per-class", "confusion", "curves", "batches")),
                                (val, ("predictions", "per-class", "confusion"))):  # fmt: skip
            page.goto((folder / "report.html").as_uri())
            assert page.title().startswith("seglab ")
            headline = page.locator("#headline").inner_text()
            assert "mIoU" in headline and "pixel accuracy" in headline
            rows = page.locator("#per-class tbody tr")
            assert rows.count() == CAMVID_CLASSES
            assert rows.first.locator("td").first.inner_text() == "Sky"
            swatch = rows.nth(3).locator(".swatch").evaluate("e => getComputedStyle(e).backgroundColor")
            assert swatch == "rgb(128, 64, 128)"  # Road's colour: the table is the legend
            assert [page.locator(f"figure#{f}").count() for f in figures] == [1] * len(figures)
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert len(loaded) == len(figures) and min(loaded) > 300  # every picture is there and decodes
            page.screenshot(path=str(artifacts / f"report_{folder.name}.png"), full_page=True)
        facts = page.locator("#facts").inner_text()  # the val report says what it measured
        assert "best.pt" in facts and "camvid" in facts and "num images\t6" in facts
        page.goto((run / "report.html").as_uri())
        assert f"mIoU {100 * best:.2f} at epoch 1" in page.locator("#facts").inner_text()
        browser.close()
    assert not outside


def test_drawing_the_batches_leaves_training_as_it_was(tmp_path):
    """train_batches.jpg is drawn before the first step from the training set; the losses must be
    those of a run without plots, to the last digit."""
    from seglab.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", n_train=16, n_val=4, size=48, seed=0)
    losses = {}
    for plots in (True, False):
        run = train(data=str(data), epochs=1, out=str(tmp_path), name=f"plots{plots}", model="unet",
                    encoder="resnet18", img_size=48, batch=4, workers=0, plots=plots, jitter=0.2)  # fmt: skip
        losses[plots] = run.rows[0]["train_loss"]
        assert (run.run_dir / "train_batches.jpg").is_file() == plots
        assert (run.run_dir / "report.html").is_file() == plots
    assert losses[True] == losses[False]


def test_a_label_leaves_its_ignore_pixels_unpainted():
    image = np.full((8, 8, 3), 90, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255  # ignore
    result = SegResult(image, mask, ["road", "car"], [(200, 0, 0), (0, 200, 0)], unlabelled=255)
    drawn = result.plot(legend=False)
    assert (drawn[:4] == 90).all() and (drawn[4:] != 90).any()


def test_the_grid_enlarges_small_tiles_and_carries_a_legend():
    tiles = [
        (np.zeros((16, 32, 3), np.uint8), "a very long caption that cannot fit above a tile at all") for _ in range(3)
    ]
    sheet = np.asarray(tile_grid(tiles, columns=2, tile=128, legend=[("car", (0, 200, 0))]))
    assert sheet.shape[1] == 2 * (128 + 4) + 4
    assert (sheet == (0, 0, 0)).all(-1).sum() >= 3 * 128 * 64 * 0.99  # each 32 px tile drawn 128 px wide
    assert ((sheet == (0, 200, 0)).all(-1)).any()  # the legend's swatch


def _instances(boxes, labels, crowd=None) -> Instances:
    n = len(labels)
    return Instances(
        masks=np.zeros((n, 64, 64), np.uint8),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        crowd=np.zeros(n, bool) if crowd is None else np.asarray(crowd),
        area=np.ones(n, np.float32),
    )


def test_a_detector_confusion_matrix_counts_matches_confusions_misses_and_false_alarms():
    truth = _instances([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 40, 10, 50]], [1, 2, 1, 2],
                       crowd=[False, False, False, True])  # fmt: skip
    found = Detections(
        boxes=np.asarray(
            [[0, 0, 10, 11], [20, 20, 30, 29], [55, 0, 64, 9], [40, 40, 50, 50], [0, 40, 10, 50]], np.float32
        ),
        labels=np.asarray([1, 1, 2, 1, 2]),
        scores=np.asarray([0.9, 0.8, 0.7, 0.1, 0.9], np.float32),  # the 4th is under DEFAULT_CONF
        masks=None,
        names=["a", "a", "b", "a", "b"],
    )
    counts = confusion_counts(truth, found, num_classes=3)  # classes a, b; background last
    # a found as a; b found as a; a missed (its detection scored too low); b found on nothing labelled
    # (the crowd region it sits on is not an object) and another b on nothing
    assert counts.tolist() == [[1, 0, 1], [1, 0, 0], [0, 2, 0]]
