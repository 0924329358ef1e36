"""By-hand benchmark: every architecture through every export format, checked on CamVid images.

Not a test. For each registered architecture (random weights, CamVid's 11 classes, 360x480
input) and, with ``--weights``, a trained checkpoint: ``seglab export`` to ONNX (fixed and
``--dynamic``), ONNX float16, TorchScript (``--dynamic``) and torch.export, each followed by the
exporter's own parity check against eager PyTorch on ``--images`` CamVid val images. Reports the
largest absolute logit difference, argmax agreement, export time and file size.

    python benchmarks/export_parity.py [--data ../shared/data/camvid]
                                       [--weights runs/train/camvid_lraspp_lite0_seed0/weights/best.pt]

Prints a table and writes benchmarks/results/export_parity.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result

from seglab.deploy.export import export
from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint
from seglab.models import MODELS

FORMATS = [  # (label, format, dynamic, half)
    ("onnx", "onnx", False, False),
    ("onnx --dynamic", "onnx", True, False),
    ("onnx --half", "onnx", False, True),
    ("torchscript --dynamic", "torchscript", True, False),
    ("torch-export", "torch-export", False, False),
]


def random_checkpoint(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    card = ModelCard(
        arch=arch,
        encoder=MODELS[arch].default_encoder,
        num_classes=11,
        in_channels=3,
        classes=[f"class{i}" for i in range(11)],
        colors=[(20 * i, 10 * i, 5 * i) for i in range(11)],
        ignore_index=11,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=480,
        crop_size=[360, 480],
    )
    path = folder / f"{arch}.pt"
    save_checkpoint(path, make_payload(card.build().eval(), card))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).parents[1] / ".." / "shared" / "data" / "camvid"))
    parser.add_argument("--weights", help="a trained checkpoint to add (e.g. the CamVid recipe's best.pt)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--archs", nargs="*", default=sorted(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_parity.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = {f"{arch} (random weights)": random_checkpoint(arch, folder) for arch in args.archs}
        if args.weights:
            models = {f"{Path(args.weights).name} (trained)": Path(args.weights), **models}
        for name, weights in models.items():
            for label, fmt, dynamic, half in FORMATS:
                out = folder / f"{weights.stem}-{label.replace(' ', '').replace('-', '')}"
                suffix = {"onnx": ".onnx", "torchscript": ".torchscript", "torch-export": ".pt2"}[fmt]
                try:
                    result = export(
                        weights,
                        format=fmt,
                        out=out.with_suffix(suffix),
                        dynamic=dynamic,
                        half=half,
                        data=args.data,
                        check_images=args.images,
                        log=lambda message: None,
                    )
                except Exception as e:  # a benchmark reports a failure and goes on
                    rows.append({"model": name, "format": label, "error": str(e)})
                    print(f"{name:40s} {label:22s} FAILED: {e}", flush=True)
                    continue
                p = result.parity
                rows.append(
                    {
                        "model": name,
                        "format": label,
                        "max_abs_diff": p.max_abs_diff,
                        "agreement": p.agreement,
                        "passed": p.passed,
                        "images": p.images,
                        "source": p.source,
                        "seconds": round(result.seconds, 2),
                        "size_mb": round(result.size_mb, 2),
                    }
                )
                print(
                    f"{name:40s} {label:22s} max|d| {p.max_abs_diff:.2e}  agree {100 * p.agreement:8.4f}%  "
                    f"{result.seconds:6.1f} s  {result.size_mb:6.1f} MB  {'ok' if p.passed else 'FAILED'}",
                    flush=True,
                )
    write_result(args.out, data=args.data, images=args.images, rows=rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
