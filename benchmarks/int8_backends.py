"""By-hand benchmark: seglab's two int8 paths against float32, in one report measured in one run.

Not a test. From one CamVid checkpoint: ``seglab quantize --backend onnxruntime`` (static QDQ on the
fixed-shape ONNX export) and ``--backend pytorch`` (PT2E with the x86 Inductor quantiser, run
compiled), both calibrated on the same ``--calib`` train images, and ``--qat`` (PT2E after
``--qat-epochs`` of quantisation-aware training in seglab's trainer on the checkpoint's own recipe,
its run folder under runs/qat/; ``--qat-epochs 0`` leaves the row out); then
``seglab.deploy.report.measure`` times the files interleaved (eager float32, ONNX Runtime float32,
the int8 files) and scores each on val.

    python benchmarks/int8_backends.py --weights runs/peers/seglab-lite0_10min/train/weights/best.pt

Writes benchmarks/results/int8_backends.json and prints the table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import write_result

from seglab.deploy.quantize import quantize
from seglab.deploy.report import format_report, measure

ROOT = Path(__file__).resolve().parents[1]
CAMVID = (ROOT / ".." / "shared" / "data" / "camvid").resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a CamVid checkpoint (semantic)")
    parser.add_argument("--data", default=str(CAMVID))
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--limit", type=int, help="score only the first N val images")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=2, help="0: no QAT row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_backends.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="int8_backends_"))
    weights = work / "model.pt"
    shutil.copy(args.weights, weights)
    seconds = {}
    files = {"float32 (PyTorch eager)": weights}
    paths = [("onnxruntime", False, "int8 (ONNX Runtime)"), ("pytorch", False, "int8 (PyTorch PT2E, Inductor)")]
    if args.qat_epochs:
        paths.append(("pytorch", True, "int8 (PyTorch PT2E after QAT, Inductor)"))
    for backend, qat, name in paths:
        start = time.perf_counter()
        result = quantize(
            weights, backend=backend, data=args.data, calib=args.calib, report=False, qat=qat, epochs=args.qat_epochs
        )
        seconds[name] = round(time.perf_counter() - start, 1)
        if backend == "onnxruntime":
            files["float32 (ONNX Runtime)"] = result.float_model
        files[name] = result.int8_model
    rows = measure(files, args.data, limit=args.limit, rounds=args.rounds)
    title = f"int8 backends on {Path(args.weights).name}"
    print(format_report(rows, title))
    write_result(
        args.out,
        weights=args.weights,
        calib=args.calib,
        qat_epochs=args.qat_epochs,
        limit=args.limit,
        quantize_seconds=seconds,
        rows=[asdict(r) for r in rows],
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
