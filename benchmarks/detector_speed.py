"""Mask R-CNN training-step speed on this CPU: the choices seglab makes for detectors, against
torchvision's defaults, measured in one run (interleaved rounds).

    python benchmarks/detector_speed.py [--size 512] [--rounds 3]

Rows (all Mask R-CNN, EfficientNet-Lite0 ImageNet encoder, batch 2, 30 objects per image):
- baseline: a 256-channel pyramid and mask head (torchvision's widths), float32
- 128-channel pyramid and mask head (seglab's for encoders of its own), float32
- 128 channels + seglab's mixed precision (bfloat16 backbone and mask head, float32 boxes)
- 128 channels + autocast over the whole model (how people usually turn on bfloat16): the losses
  it reaches after 10 more steps at lr 0.01 are reported, since it is the one that goes NaN
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import write_result
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from seglab.instance.models import EncoderFPN, mixed_precision
from seglab.models.encoders import build_encoder


def detector(width: int, size: int) -> MaskRCNN:
    torch.manual_seed(0)
    encoder = build_encoder("efficientnet_lite0", weights="imagenet")
    return MaskRCNN(
        EncoderFPN(encoder, width),
        num_classes=None,
        min_size=size,
        max_size=size,
        image_mean=list(encoder.mean),
        image_std=list(encoder.std),
        mask_head=MaskRCNNHeads(width, (width,) * 4, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(width, width, 11),
        box_predictor=FastRCNNPredictor(1024, 11),
    )


def batch(size: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g) * size * 0.8
        wh = torch.rand(30, 2, generator=g) * size / 5 + 8
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        masks = torch.zeros(30, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        images.append(torch.rand(3, size, size, generator=g))
        targets.append({"boxes": boxes, "labels": torch.randint(1, 11, (30,), generator=g), "masks": masks})
    return images, targets


def step(model: nn.Module, opt: torch.optim.Optimizer, data, whole_autocast: bool) -> dict[str, float]:
    images, targets = data
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=whole_autocast):
        losses = model(images, targets)
    sum(losses.values()).backward()
    opt.step()
    opt.zero_grad()
    return {k: v.item() for k, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
    args = parser.parse_args()
    rows = {
        "256 channels, float32 (baseline)": (256, "none"),
        "128 channels, float32": (128, "none"),
        "128 channels, seglab mixed precision": (128, "seglab"),
        "128 channels, autocast over the whole model": (128, "whole"),
    }
    models, opts = {}, {}
    for name, (width, amp) in rows.items():
        models[name] = detector(width, args.size).train()
        if amp == "seglab":
            mixed_precision(models[name], "cpu", torch.bfloat16)
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9)
        step(models[name], opts[name], batch(args.size, 0), amp == "whole")  # warm-up
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, (_, amp) in rows.items():
            data = batch(args.size, r + 1)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(models[name], opts[name], data, amp == "whole")
            times[name].append((time.perf_counter() - t0) / args.steps)
    # numerics: 20 more steps at a realistic learning rate, each row from its current state
    final: dict[str, dict[str, float]] = {}
    for name, (_, amp) in rows.items():
        for g in opts[name].param_groups:
            g["lr"] = 0.01
        for s in range(10):
            final[name] = step(models[name], opts[name], batch(args.size, 100 + s), amp == "whole")
    base = min(times["256 channels, float32 (baseline)"])
    print(
        f"Mask R-CNN train step, batch 2 at {args.size}x{args.size}, best of {args.rounds} rounds x {args.steps} steps"
    )
    print("| variant | s/step | speed-up | total loss after 10 more steps |")
    print("|---|---|---|---|")
    table = []
    for name in rows:
        best = min(times[name])
        loss = sum(final[name].values())
        print(f"| {name} | {best:.2f} | {base / best:.2f}x | {loss:.3f} |")
        table.append({"variant": name, "s_per_step": best, "speedup": base / best, "final_losses": final[name]})
    write_result(Path(__file__).parent / "results" / "detector_speed.json", size=args.size, rows=table)


if __name__ == "__main__":
    main()
