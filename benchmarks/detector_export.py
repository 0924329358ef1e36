"""By-hand benchmark: a trained detector against its own export, scored by COCO AP on held-out images.

Not a test. Exports ``--weights`` (a Mask R-CNN or Faster R-CNN checkpoint of ``seglab train --task
instance|detect``) with ``seglab export`` (its parity check included), then runs the checkpoint
(eager PyTorch) and the export (ONNX Runtime, or TorchScript) over the same ``--limit`` images of
the val split the run held out, and reports box and mask AP of each, their difference, the parity
figures and the seconds each took. The goal: at most 0.5 AP difference.

    seglab train --task instance --data ../shared/data/facade_coco --encoder efficientnet_lite0 \\
        --encoder-weights imagenet --img-size 256 --epochs 2 --limit 60 --out /tmp/det --name run
    python benchmarks/detector_export.py --weights /tmp/det/run/weights/best.pt [--limit 40] [--format onnx]

Prints the figures and writes benchmarks/results/detector_export.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

import seglab
from seglab.deploy.export import export
from seglab.instance.runtime import ExportedDetector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a detector checkpoint (seglab train --task instance)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--data", help="dataset (default: the one the weights were trained on)")
    parser.add_argument("--limit", type=int, default=40, help="held-out images to score (default: 40)")
    parser.add_argument("--check-images", type=int, default=8, help="images in the export's parity check")
    parser.add_argument("--out", default="benchmarks/results/detector_export.json")
    args = parser.parse_args()

    result = export(args.weights, format=args.format, data=args.data, check_images=args.check_images)
    models = {
        "pytorch": seglab.load(args.weights, device="cpu"),
        result.format: ExportedDetector(result.path, device="cpu"),
    }
    first = models["pytorch"]
    data = args.data or first.config["data"]
    holdout = {"val_fraction": first.config.get("val_fraction", 0.1), "seed": first.config.get("seed", 0)}
    scores, seconds = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        evaluation = model.evaluate(data, split="val", limit=args.limit, workers=1, progress=False, **holdout)
        seconds[name] = time.perf_counter() - start
        scores[name] = {k: evaluation.metrics[k] for k in ("box", "mask") if k in evaluation.metrics}
        scores[name]["num_images"] = evaluation.metrics["num_images"]
    torch_scores, export_scores = scores["pytorch"], scores[result.format]
    difference = {
        kind: {stat: 100 * (export_scores[kind][stat] - torch_scores[kind][stat]) for stat in ("AP", "AP50", "AP75")}
        for kind in ("box", "mask")
        if kind in torch_scores
    }
    print(f"export: {result.parity.format()}")
    for name in models:
        shown = ", ".join(f"{k} AP {100 * scores[name][k]['AP']:.2f}" for k in ("box", "mask") if k in scores[name])
        print(f"{name:12} {shown} on {scores[name]['num_images']} held-out images ({seconds[name]:.0f} s)")
    for kind, stats in difference.items():
        print(
            f"{kind} AP difference (export - pytorch), points: " + ", ".join(f"{s} {v:+.3f}" for s, v in stats.items())
        )
    write_result(
        args.out,
        weights=str(args.weights),
        export={
            "path": str(result.path),
            "format": result.format,
            "size_mb": result.size_mb,
            "seconds": result.seconds,
        },
        parity=asdict(result.parity),
        data=str(data),
        holdout=holdout,
        limit=args.limit,
        scores=scores,
        ap_difference_points=difference,
        eval_seconds=seconds,
    )


if __name__ == "__main__":
    main()
