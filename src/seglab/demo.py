"""``seglab demo``: the whole pipeline on a generated dataset, in about two minutes on 2 CPU cores.

Generates shapes on textured backgrounds, trains a small U-Net, evaluates it against a
chance baseline, predicts a few images and writes ``report.html`` (seglab.engine.report) beside
the val pictures; the training run's own report is in ``train/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from seglab.api import load, train, write_metrics
from seglab.data import get_split, resolve_dataset
from seglab.data.synthetic import make_shapes_dataset
from seglab.engine.report import write_pictures, write_report
from seglab.metrics import format_table

DEMO_SETTINGS: dict[str, Any] = dict(
    model="unet",
    encoder="resnet18",
    img_size=96,
    batch=16,
    lr=3e-3,
    amp=True,
    scale_range=[0.75, 1.25],
    jitter=0.1,
    cache=True,
    workers=0,
    warmup_epochs=0.5,
)
DEMO_EPOCHS = 20


def chance_miou(confusion: np.ndarray) -> float:
    """mIoU of always predicting the most frequent class: its IoU is its frequency, the rest 0."""
    truth = confusion.sum(1)
    present = int((truth > 0).sum())
    return float(truth.max() / truth.sum() / present)


def run_demo(out: Path, *, epochs: int | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = make_shapes_dataset(out / "data", n_train=160, n_val=40, size=96, seed=0)
    print(f"demo: generated 160 train and 40 val images in {data}")

    run = train(
        data=str(data), epochs=epochs or DEMO_EPOCHS, out=str(out), name="train", exist_ok=True, **DEMO_SETTINGS
    )
    model = load(run.best)
    result = model.evaluate(data, split="val", workers=0, progress=False)
    print(format_table(result.metrics))
    write_metrics(result, out / "val", model.classes)
    miou, chance = result.metrics["miou"], chance_miou(result.confusion.numpy())
    print(f"demo: val mIoU {100 * miou:.1f} (chance: {100 * chance:.1f})")

    predictions = out / "predict"
    images = sorted((data / "images" / "val").glob("*.png"))[:6]
    for r in model.predict(images):  # type: ignore[union-attr]
        r.save(predictions)
    scores = model.scores(result)
    spec = resolve_dataset(data, progress=False)
    write_pictures(out, model, get_split(spec, "val"), spec, scores)
    facts = {
        "data": f"{data} (generated: 160 train, 40 val images)",
        "weights": str(run.best),
        "chance mIoU": f"{100 * chance:.2f} (always the most frequent class)",
        "training": str(run.run_dir),
    }
    report = write_report(out, title="seglab demo", facts=facts, scores=scores)
    elapsed = time.perf_counter() - t0
    print(f"demo: done in {elapsed:.0f} s; open {report}")
    return {"miou": miou, "chance_miou": chance, "seconds": elapsed}
