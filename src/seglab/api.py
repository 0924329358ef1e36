"""The Python API. The command line calls exactly these functions.

import seglab
run = seglab.train(data="path/to/data", model="unet", epochs=20)
model = seglab.load(run.best)
r = model.predict("street.png"); r.mask; r.overlay(); r.save("out/")
metrics = model.evaluate("path/to/data", split="val")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglab.config import TrainConfig, load_train_config
from seglab.engine.checkpoint import load_model
from seglab.engine.evaluator import EvalResult
from seglab.errors import SeglabError
from seglab.files import atomic_path
from seglab.semantic.predictor import SegModel

__all__ = ["SegModel", "TrainRun", "load", "train", "write_metrics"]


@dataclass
class TrainRun:
    run_dir: Path
    rows: list[dict[str, Any]]
    stopped: int | None = None  # the signal that stopped the run early (its last.pt resumes it)
    best_score: float = -1.0  # the best val score: mIoU (semantic), mask AP (instance), box AP (detect)

    @property
    def best(self) -> Path:
        return self.run_dir / "weights" / "best.pt"

    @property
    def last(self) -> Path:
        return self.run_dir / "weights" / "last.pt"


def train(config: str | None = None, *, progress: bool = True, log=print, **overrides: Any) -> TrainRun:
    """Train a model; keyword arguments are the fields of :class:`seglab.config.TrainConfig`."""
    from seglab.engine.trainer import Trainer, auto_resume, resume_config
    from seglab.tasks import get_task

    checkpoint = None
    overrides = auto_resume(TrainConfig, overrides)
    if overrides.get("resume"):
        cfg, checkpoint = resume_config(TrainConfig, overrides, log=log)
    else:
        cfg = load_train_config(config, **overrides)
    out = Trainer(cfg, get_task(cfg.task), progress=progress, log=log, checkpoint=checkpoint).fit()
    return TrainRun(out["run_dir"], out["rows"], out["stopped"], out["best"])


def load(weights: str | Path, *, device: str = "auto", amp: bool = False, trust: bool = False) -> Any:
    """Load a seglab checkpoint (``best.pt`` / ``last.pt``), or a seglab export (``.onnx``, run by
    ONNX Runtime; ``.torchscript``; ``.pt2``), for prediction and evaluation.

    A semantic model comes back as a :class:`SegModel`; a Mask R-CNN / Faster R-CNN checkpoint
    (``--task instance`` / ``detect``) as a :class:`seglab.instance.predictor.DetectorModel` (its
    export as an ``ExportedDetector``, the same interface): the task's predictor, whatever the file.
    Checkpoints are read as data only; ``trust=True`` also loads one that needs pickled Python
    objects (which can run code: only for files you made yourself, e.g. with an older seglab)."""
    from seglab.deploy.runtime import exported_format, weights_task
    from seglab.tasks import get_task

    if exported_format(weights):
        if amp:
            raise SeglabError(f"--amp applies to checkpoints; {weights} runs in the precision it was exported in")
        return get_task(weights_task(weights)).exported(weights, device=device)
    model, card, ckpt = load_model(weights, trust=trust)
    predictor = get_task(card.task).predictor
    return predictor(model, card, device=device, amp=amp, metrics=ckpt.get("metrics"), config=ckpt.get("config"))


def write_metrics(result: EvalResult, out_dir: str | Path, class_names: list[str]) -> Path:
    """metrics.json and confusion_matrix.png into ``out_dir``."""
    from seglab.metrics import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result.metrics, indent=2))
    plot_confusion(result.confusion.numpy(), class_names, out / "confusion_matrix.png")
    return path
