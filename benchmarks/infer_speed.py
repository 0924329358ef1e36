"""By-hand benchmark: seglab's predictor against torchvision-style eager float32 inference.

Not a test. On real CamVid val images at 480x360, in one process and one run:

  torchvision  torchvision.models.segmentation.lraspp_mobilenet_v3_large, eager float32,
               contiguous memory: what people run today (LR-ASPP row only).
  eager fp32   the same seglab model, eager float32, contiguous: the baseline of the ratios.
  seglab       seglab's predictor: ``seglab.load(..., amp=True).predict(images, batch=...)``, its
               fast path (bfloat16 autocast, channels-last, BatchNorm folded into convolutions,
               depthwise layers in float32 where faster), resizing and the masks at the image's
               size included.

For each: batch-1 latency (median over ``--repeats`` images) and batch-8 throughput (images/s,
median of ``--repeats`` batches). Every side ends in a class-index mask per image.

``--weights`` (a trained CamVid checkpoint, e.g. the recipe's best.pt) adds that model's rows
and scores CamVid val both ways (float32 and the fast path): the mIoU difference is the
accuracy cost of the fast path.

    python benchmarks/infer_speed.py [--data ../shared/data/camvid]
                                     [--weights runs/train/camvid_lraspp_lite0_seed0/weights/best.pt]

Prints a table and writes benchmarks/results/infer_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import write_result

import seglab
from seglab.api import SegModel
from seglab.data import get_split, resolve_dataset
from seglab.data.io import read_image
from seglab.engine.checkpoint import ModelCard
from seglab.engine.inference import normalize
from seglab.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def eager_fp32(model: torch.nn.Module, mean, std, torchvision_output: bool = False):
    """The plain loop: normalise, forward in float32, argmax."""
    model = model.eval().to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def run(images: list[np.ndarray]) -> list[torch.Tensor]:
        x = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in images]).contiguous()
        out = model(normalize(x, mean, std))
        logits = out["out"] if torchvision_output else out
        return list(logits.argmax(1).byte())

    return run


def seglab_predictor(model: SegModel):
    def run(images: list[np.ndarray]):
        results = model.predict(images, batch=len(images))
        return [r.mask for r in results]

    return run


def measure(name: str, run, images: list[np.ndarray], repeats: int) -> dict:
    latency = timed(lambda: run(images[:1]), repeats)
    per_batch = timed(lambda: run(images[:BATCH]), repeats)
    row = {"model": name, "latency_ms": 1000 * latency, "images_per_s": BATCH / per_batch}
    print(f"{name}: batch 1 {row['latency_ms']:.1f} ms, batch {BATCH} {row['images_per_s']:.1f} img/s", flush=True)
    return row


def untrained(arch: str, encoder: str, spec) -> tuple[torch.nn.Module, SegModel]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=spec.num_classes, encoder=encoder).eval()
    card = ModelCard(
        arch=arch,
        encoder=encoder,
        num_classes=spec.num_classes,
        in_channels=3,
        classes=spec.classes,
        colors=list(spec.colors),
        ignore_index=spec.ignore_index,
        mean=list(model.mean),
        std=list(model.std),
        img_size=480,
        crop_size=[360, 480],
    )
    same = build_model(arch, num_classes=spec.num_classes, encoder=encoder)
    same.load_state_dict(model.state_dict())
    return model, SegModel(same, card, device="cpu", amp=True)  # the fast path folds and tunes it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--weights", default=str(ROOT / "runs/train/camvid_lraspp_lite0_seed0/weights/best.pt"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer_speed.json"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"--data {args.data}: not a folder; point it at the CamVid folder of ../shared/data")
    spec = resolve_dataset(args.data)
    val = get_split(spec, "val", val_fraction=0.0, seed=0)
    images = [read_image(s.image) for s in val[:BATCH]]
    assert all(im.shape == (360, 480, 3) for im in images), "expected CamVid's 480x360 images"

    rows = []
    # LR-ASPP MobileNetV3-Large: torchvision's own model, the same seglab model eager, seglab's predictor
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)
    model, fast = untrained("lraspp", "mobilenet_v3_large", spec)
    rows.append(
        measure(
            "lraspp mobilenet_v3_large: torchvision eager fp32",
            eager_fp32(tv, model.mean, model.std, True),
            images,
            args.repeats,
        )
    )
    rows.append(
        measure(
            "lraspp mobilenet_v3_large: seglab model eager fp32",
            eager_fp32(model, model.mean, model.std),
            images,
            args.repeats,
        )
    )
    rows.append(measure("lraspp mobilenet_v3_large: seglab predictor", seglab_predictor(fast), images, args.repeats))
    for arch, encoder in (("unet", "resnet18"), ("deeplabv3plus", "mobilenet_v3_large")):
        model, fast = untrained(arch, encoder, spec)
        rows.append(
            measure(f"{arch} {encoder}: eager fp32", eager_fp32(model, model.mean, model.std), images, args.repeats)
        )
        rows.append(measure(f"{arch} {encoder}: seglab predictor", seglab_predictor(fast), images, args.repeats))

    accuracy = None
    if Path(args.weights).is_file():
        slow, fast = (
            seglab.load(args.weights, device="cpu", amp=False),
            seglab.load(args.weights, device="cpu", amp=True),
        )
        name = f"{slow.card.arch} {slow.card.encoder} (trained)"
        rows.append(
            measure(f"{name}: eager fp32", eager_fp32(slow.model, slow.card.mean, slow.card.std), images, args.repeats)
        )
        rows.append(measure(f"{name}: seglab predictor", seglab_predictor(fast), images, args.repeats))
        slow.model.to(memory_format=torch.channels_last)  # eager_fp32 made it contiguous
        miou = {}
        for label, m in (("float32", slow), ("seglab fast path", fast)):
            result = m.evaluate(args.data, split="val", batch=BATCH, workers=1, progress=False)
            miou[label] = 100 * result.metrics["miou"]
            print(f"{name}: CamVid val mIoU {label} {miou[label]:.2f}", flush=True)
        accuracy = {"weights": args.weights, "val_miou": miou, "difference": miou["seglab fast path"] - miou["float32"]}
    else:
        print(f"{args.weights}: not found; skipping the trained model's rows and the mIoU check")

    print()
    print(f"| model | side | batch 1 latency (ms) | batch {BATCH} img/s | throughput vs eager fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        name, side = r["model"].split(": ")
        base = next(b for b in rows if b["model"] in (f"{name}: eager fp32", f"{name}: seglab model eager fp32"))
        r["speedup_vs_eager_fp32"] = r["images_per_s"] / base["images_per_s"]
        print(
            f"| {name} | {side} | {r['latency_ms']:.1f} | {r['images_per_s']:.1f} | {r['speedup_vs_eager_fp32']:.2f}x |"
        )
    if accuracy:
        print(
            f"\nCamVid val mIoU: float32 {accuracy['val_miou']['float32']:.2f}, seglab fast path "
            f"{accuracy['val_miou']['seglab fast path']:.2f} ({accuracy['difference']:+.2f})"
        )
    write_result(args.out, rows=rows, accuracy=accuracy)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
