"""By-hand benchmark: torch.compile (Inductor, CPU) for training, against seglab's eager fast path.

Not a test. For each model of train_speed.py, in one process and one run, on the same CamVid
batches (decoded and augmented once, beforehand, so data loading is not what is compared) and
the same initial weights, an AdamW step at batch 8 on 360x480 crops:

  eager     seglab's training fast path: bfloat16 autocast, channels-last, the depthwise
            convolutions that are faster in float32 kept in float32 (what `seglab train --amp` runs);
  compiled  the same model under ``torch.compile`` (Inductor, default mode), bfloat16 autocast and
            channels-last, as a user would add it; the float32-depthwise choice is left to Inductor.

Reported per model: the first step's seconds (the compile, for the compiled side), steady
images/s over ``--steps`` timed steps after ``--warmup``, the mean loss of the timed steps (the
same batches through the same weights: the two must agree), and the minutes of training after
which the compile has paid for itself.

    python benchmarks/train_compile.py [--models lraspp unet deeplabv3plus] [--steps 8] [--warmup 2]

Writes benchmarks/results/train_compile.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import write_result
from train_speed import BATCH, CROP, LR, MODELS, SEED, train_transform

from seglab.data import SegmentationDataset, get_split, resolve_dataset
from seglab.engine.fastpath import run_in_float32, tune_depthwise
from seglab.engine.inference import normalize
from seglab.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def batches(spec, samples, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` training batches (uint8 images, int64 masks), decoded and augmented once."""
    dataset = SegmentationDataset(samples, spec, train_transform(spec))
    dataset.set_epoch(SEED)
    items = [dataset[i] for i in range(n * BATCH)]
    groups = [items[b : b + BATCH] for b in range(0, n * BATCH, BATCH)]
    return [(torch.stack([it["image"] for it in g]), torch.stack([it["mask"] for it in g])) for g in groups]


def run(model: nn.Module, net: nn.Module, data, ignore_index: int, warmup: int) -> dict:
    """Train ``model`` through ``net`` (itself, or its compiled wrapper) over ``data``: the first
    step's seconds, steady images/s after ``warmup``, and the mean loss of the timed steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore_index)
    times, losses = [], []
    model.train()
    for image, mask in data:
        start = time.perf_counter()
        x = normalize(image, model.mean, model.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = criterion(logits.float(), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    steady = times[warmup:]
    return {
        "first_step_s": times[0],
        "step_s": statistics.median(steady),
        "images_per_s": BATCH * len(steady) / sum(steady),
        "loss": statistics.mean(losses[warmup:]),
        "losses": losses,  # every step's, the warm-up's too: where a side goes non-finite
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile among them)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_compile.json"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"--data {args.data}: not a folder; point it at the CamVid folder of ../shared/data")

    spec = resolve_dataset(args.data)
    data = batches(spec, get_split(spec, "train", val_fraction=0.0, seed=SEED), args.warmup + args.steps)
    rows = []
    for arch in args.models:
        encoder = MODELS[arch]
        sides = {}
        for side in ("eager", "compiled"):
            torch.manual_seed(SEED)  # the same initial weights, and the same dropout draws in training
            model = build_model(arch, num_classes=spec.num_classes, encoder=encoder)
            model = model.to(memory_format=torch.channels_last)
            if side == "eager":
                example = torch.zeros(BATCH, 3, *CROP).contiguous(memory_format=torch.channels_last)
                run_in_float32(model, tune_depthwise(model, example))
            net = model if side == "eager" else torch.compile(model)
            sides[side] = run(model, net, data, spec.ignore_index, args.warmup)
        eager, compiled = sides["eager"], sides["compiled"]
        compile_s = compiled["first_step_s"] - compiled["step_s"]
        saved_per_s = 1 - compiled["step_s"] / eager["step_s"]  # seconds saved per second of eager training
        row = {
            "model": f"{arch} ({encoder})",
            "eager": eager,
            "compiled": compiled,
            "speedup": compiled["images_per_s"] / eager["images_per_s"],
            "compile_s": compile_s,
            "break_even_min": compile_s / saved_per_s / 60 if saved_per_s > 0 else None,
        }
        rows.append(row)
        print(
            f"{row['model']}: eager {eager['images_per_s']:.2f} img/s, compiled {compiled['images_per_s']:.2f} "
            f"img/s ({row['speedup']:.2f}x), compile {compile_s:.0f} s; loss {eager['loss']:.3f} vs "
            f"{compiled['loss']:.3f}",
            flush=True,
        )

    print(
        "\n| model | eager img/s | compiled img/s | ratio | compile s | pays off after | mean loss eager / compiled |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        even = "never" if r["break_even_min"] is None else f"{r['break_even_min']:.0f} min"
        print(
            f"| {r['model']} | {r['eager']['images_per_s']:.2f} | {r['compiled']['images_per_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['compile_s']:.0f} | {even} | {r['eager']['loss']:.3f} / "
            f"{r['compiled']['loss']:.3f} |"
        )
    settings = {"batch": BATCH, "crop": CROP, "steps": args.steps, "warmup": args.warmup, "amp": "bfloat16"}
    write_result(args.out, settings=settings, threads=torch.get_num_threads(), models=rows)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
