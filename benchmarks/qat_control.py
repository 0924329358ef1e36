"""By-hand control for the QAT row of int8_backends.py: the same fine-tune without quantisation.

Not a test. ``seglab quantize --qat`` fine-tunes a checkpoint for ``--epochs`` on its own recipe
(``seglab.deploy.prune.finetune_config``: a fresh optimiser, a short warm-up, the run's lr x
``QAT_LR_SCALE``, float32, no EMA/SWA) before converting it, so on an under-trained model part of
what it gains is the extra training, not the fake quantisation. This runs exactly that fine-tune
on the float model (same trainer, config, epochs, lr, seed), so the QAT row can be read against it:

    python benchmarks/qat_control.py --weights runs/peers/seglab-lite0_10min/train/weights/best.pt --epochs 2

Writes benchmarks/results/qat_control.json: the fine-tuned float model's val mIoU per epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result

from seglab.deploy.prune import finetune_config
from seglab.deploy.quantize import QAT_LR_SCALE
from seglab.engine.checkpoint import load_model
from seglab.engine.runs import next_run_dir
from seglab.engine.trainer import Trainer
from seglab.semantic.task import SemanticTask

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="the checkpoint int8_backends.py quantised")
    parser.add_argument("--epochs", type=int, default=2, help="int8_backends.py's --qat-epochs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat_control.json"))
    args = parser.parse_args()

    model, card, ckpt = load_model(args.weights)
    trained = ckpt.get("config") or {}
    run_dir = next_run_dir("runs/qat_control", "float", exist_ok=False)
    lr = float(trained["lr"]) * QAT_LR_SCALE
    cfg = finetune_config(
        ckpt, card, "qat_control", epochs=args.epochs, lr=lr, amp=False, ema=False, swa=False,
        out=str(run_dir.parent), name=run_dir.name, exist_ok=True,
    )  # fmt: skip
    result = Trainer(cfg, SemanticTask, model=model.train()).fit()
    curve = [row["val_miou"] for row in result["rows"]]
    print(f"float32 fine-tune, {args.epochs} epoch(s) at lr {lr:g}: val mIoU by epoch {curve}")
    write_result(args.out, weights=args.weights, epochs=args.epochs, lr=lr, val_miou_by_epoch=curve,
                 run_dir=str(result["run_dir"]))  # fmt: skip


if __name__ == "__main__":
    main()
