"""``seglab demo``: the whole pipeline on a generated dataset, in about two minutes on 2 CPU cores.

Generates shapes on textured backgrounds, trains a small U-Net, evaluates it against a
chance baseline, predicts a few images and writes ``report.html`` with overlays.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from seglab.api import load, train, write_metrics
from seglab.data.synthetic import make_shapes_dataset
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
    report = write_report(out, result.metrics, chance, [p.stem for p in images], run.run_dir)
    elapsed = time.perf_counter() - t0
    print(f"demo: done in {elapsed:.0f} s; open {report}")
    return {"miou": miou, "chance_miou": chance, "seconds": elapsed}


def write_report(out: Path, metrics: dict, chance: float, stems: list[str], run_dir: Path) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_pct(m['iou'])}</td><td>{_pct(m['dice'])}</td></tr>"
        for name, m in metrics["per_class"].items()
    )
    figures = "".join(
        f'<figure><img src="predict/overlays/{s}.jpg" width="192"><figcaption>{s}</figcaption></figure>' for s in stems
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>seglab demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px}} figure{{display:inline-block}}</style>
<h1>seglab demo</h1>
<p>val mIoU <b>{_pct(metrics["miou"])}</b> (chance {100 * chance:.1f}), pixel accuracy
{_pct(metrics["pixel_accuracy"])}.</p>
<table><tr><th>class</th><th>IoU</th><th>Dice</th></tr>{rows}</table>
<h2>Predictions</h2>{figures}
<h2>Training</h2><img src="{run_dir.name}/curves.png" width="700">
<p>Confusion matrix:</p><img src="val/confusion_matrix.png" width="420">
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
