"""Where `seglab val` spends its time on a barely trained Mask R-CNN, and the old evaluation path
(torchvision pasting every mask into an image-sized float canvas, one pycocotools call per mask)
against the new one (the top 100 scoring at least 0.05, pasted over their boxes only, one
pycocotools call per image), measured on the same model outputs in one run.

    python benchmarks/detector_val.py [--weights best.pt] [--data D] [--limit 84] [--threads 1] [--out F.json]

Without --weights it first trains one (`seglab train --task instance --img-size 256 --epochs 1
--limit 100 --val-fraction 0.21`, resnet50 from scratch; 10-30 minutes on 2 CPUs). The images are
the checkpoint's val hold-out. Per batch of 2 (as `seglab val`): the forward up to the mask head once,
then both postprocessing paths in alternating order; the COCO results of the two must be equal.
Both are also timed with the image (and boxes) scaled 2x: the original facade photos are 1024 px.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import write_result
from torch.utils.data import DataLoader
from torchvision.models.detection.roi_heads import paste_masks_in_image

import seglab
from seglab.data import get_split, resolve_dataset
from seglab.instance.data import InstanceDataset, Instances, collate_instances
from seglab.instance.evaluate import MAX_DETS, MIN_SCORE, STAT_NAMES, CocoAccumulator, to_coco_results
from seglab.instance.predictor import Detections, _forward_unpasted, paste_masks, top_scoring

ROOT = Path(__file__).resolve().parents[1]


def old_results(image_id: int, out: dict[str, torch.Tensor], size: tuple[int, int]) -> list[dict[str, Any]]:
    """seglab's path before: torchvision's paste (what its postprocess does), then a pycocotools call per mask."""
    from pycocotools import mask as mask_utils

    binary = (paste_masks_in_image(out["masks"], out["boxes"], size)[:, 0] > 0.5).numpy()
    entries = []
    for i, (x1, y1, x2, y2) in enumerate(out["boxes"].tolist()):
        rle = mask_utils.encode(np.asfortranarray(binary[i].astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        box = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        score = round(float(out["scores"][i]), 5)
        entries.append({"image_id": image_id, "category_id": int(out["labels"][i]), "bbox": box, "score": score})
        entries[-1]["segmentation"] = rle
    return entries


def new_results(image_id: int, out: dict[str, torch.Tensor], size: tuple[int, int]) -> list[dict[str, Any]]:
    """seglab's path now (predictor.detect's postprocessing, then evaluate.to_coco_results)."""
    keep = top_scoring(out["scores"], MIN_SCORE, MAX_DETS)
    boxes, scores, labels = out["boxes"][keep], out["scores"][keep], out["labels"][keep]
    found = Detections(boxes.numpy(), labels.numpy(), scores.numpy(), paste_masks(out["masks"][keep], boxes, size), [])
    return to_coco_results(image_id, found)


def scaled(out: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {**out, "boxes": out["boxes"] * k}


def cocoeval_stats(acc: CocoAccumulator, box_in_mask_results: bool) -> dict[str, dict[str, float | None]]:
    """COCOeval's 12 numbers per kind; ``box_in_mask_results`` scores masks as seglab did before (the
    results kept their box, so pycocotools sized each mask result by its box for APs/APm/APl)."""
    if not box_in_mask_results:
        return {k: {n: v[n] for n in STAT_NAMES} for k, v in acc.compute().items() if k in ("box", "mask")}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"images": acc.images, "annotations": acc.annotations}
    gt.dataset["categories"] = [{"id": i, "name": n} for i, n in enumerate(acc.class_names) if i > 0]
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        for iou_type, kind in (("bbox", "box"), ("segm", "mask")):
            ev = COCOeval(gt, gt.loadRes([dict(r) for r in acc.results]), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            out[kind] = {n: (float(v) if v >= 0 else None) for n, v in zip(STAT_NAMES, ev.stats, strict=True)}
    return out


def train(data: str, out: Path) -> Path:
    args = ["--task", "instance", "--data", data, "--img-size", "256", "--epochs", "1", "--limit", "100"]
    args += ["--val-fraction", "0.21", "--workers", "1", "--out", str(out), "--name", "val_bench"]
    subprocess.run([sys.executable, "-m", "seglab", "train", *args], check=True)
    return out / "val_bench" / "weights" / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", help="a Mask R-CNN checkpoint (default: train one into a temporary folder)")
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "facade_coco"))
    parser.add_argument("--limit", type=int, default=84)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--out", help="the JSON written (default: results/detector_val_<threads>threads.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else train(args.data, Path(tmp))
        run(weights, args)


def run(weights: Path, args: argparse.Namespace) -> None:
    model = seglab.load(weights, device="cpu")
    detector = model.model
    spec = resolve_dataset(args.data, task="instance")
    holdout = {"val_fraction": model.config.get("val_fraction", 0.1), "seed": model.config.get("seed", 0)}
    samples = get_split(spec, "val", **holdout)[: args.limit]
    loader = DataLoader(InstanceDataset(samples, spec, keep_crowd=True), batch_size=2, collate_fn=collate_instances)
    acc = CocoAccumulator(spec.classes)
    t = dict.fromkeys(("load", "forward", "old", "new", "old_2x", "new_2x"), 0.0)
    counts = []
    start = time.perf_counter()
    with torch.no_grad():
        for b, (images, targets) in enumerate(loader):
            t["load"] += time.perf_counter() - start
            t0 = time.perf_counter()
            outputs = _forward_unpasted(detector, [im.float() / 255 for im in images])
            t["forward"] += time.perf_counter() - t0
            for image, target, out in zip(images, targets, outputs, strict=True):
                size = (image.shape[-2], image.shape[-1])
                index, counts = target["image_id"], [*counts, len(out["scores"])]
                big = (2 * size[0], 2 * size[1])
                for name in ("old", "new") if b % 2 == 0 else ("new", "old"):  # alternate who goes first
                    fn = old_results if name == "old" else new_results
                    t0 = time.perf_counter()
                    entries = fn(index, out, size)
                    t[name] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    fn(index, scaled(out, 2), big)
                    t[name + "_2x"] += time.perf_counter() - t0
                    if name == "old":
                        old = entries
                    else:
                        new = entries
                assert new == old[:MAX_DETS], f"image {index}: the two paths give different COCO results"
                truth = Instances(
                    target["masks"].numpy(),
                    target["boxes"].numpy(),
                    target["labels"].numpy(),
                    target["iscrowd"].numpy().astype(bool),
                    target["area"].numpy(),
                )
                acc.add_ground_truth(index, size, truth)
                acc.results += new
            start = time.perf_counter()
    t0 = time.perf_counter()
    metrics = cocoeval_stats(acc, box_in_mask_results=False)
    t["cocoeval"] = time.perf_counter() - t0
    before = cocoeval_stats(acc, box_in_mask_results=True)
    n = len(samples)
    old_total = t["load"] + t["forward"] + t["old"] + t["cocoeval"]
    new_total = t["load"] + t["forward"] + t["new"] + t["cocoeval"]
    rows = [
        ("data loading (same both ways)", t["load"], t["load"]),
        ("forward: backbone, RPN, RoI heads (same both ways)", t["forward"], t["forward"]),
        ("mask pasting + RLE + COCO results entries", t["old"], t["new"]),
        ("COCOeval box + mask (same both ways)", t["cocoeval"], t["cocoeval"]),
        ("total", old_total, new_total),
        ("pasting + RLE at 2x image size (1024 px)", t["old_2x"], t["new_2x"]),
    ]
    print(f"{weights}: {n} images, {np.mean(counts):.0f} detections per image (max {max(counts)}), ", end="")
    print(f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the end")
    print("| stage | old s/image | new s/image | old / new |")
    print("|---|---|---|---|")
    for name, old_s, new_s in rows:
        print(f"| {name} | {old_s / n:.3f} | {new_s / n:.3f} | {old_s / new_s:.2f}x |")
    print("| AP (box, mask) | AP | AP50 | AP75 | APs | APm | APl |")
    print("|---|---|---|---|---|---|---|")
    for label, stats in (("before", before), ("now", metrics)):
        for kind in ("box", "mask"):
            cells = " | ".join("-" if stats[kind][c] is None else f"{100 * stats[kind][c]:.2f}" for c in STAT_NAMES[:6])
            print(f"| {kind} {label} | {cells} |")
    write_result(
        args.out or ROOT / "benchmarks" / "results" / f"detector_val_{torch.get_num_threads()}threads.json",
        weights=str(weights),
        images=n,
        detections_per_image={"mean": float(np.mean(counts)), "max": int(max(counts))},
        seconds_per_image={name: {"old": old_s / n, "new": new_s / n} for name, old_s, new_s in rows},
        ratio=old_total / new_total,
        ap_before=before,
        ap_now=metrics,
    )


if __name__ == "__main__":
    main()
