"""What every benchmark script shares: where results go, the run's provenance, a run's scores."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision


def write_result(path: str | Path, **fields: Any) -> None:
    """Write ``fields`` as JSON to ``path`` with the date, machine and library versions first."""
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        **fields,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def last_scores(run: Path) -> dict:
    """A finished training run's last epoch: val mIoU and per-class IoU in points, from its last.pt."""
    from seglab.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "weights" / "last.pt")
    metrics = ckpt["metrics"]
    return {
        "run": str(run),
        "epochs": ckpt["epoch"],
        "miou": round(100 * metrics["miou"], 2),
        "iou": {k: round(100 * v["iou"], 2) for k, v in metrics["per_class"].items()},
    }
