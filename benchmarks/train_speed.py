"""By-hand benchmark: seglab's trainer against the plain torchvision-reference loop, on CamVid.

Not a test. For each model, in one process and one run (so both sides see the same machine):

  baseline  the loop of torchvision's references/segmentation/train.py: the same seglab model
            and the same CamVid pairs and augmentation (seglab's TrainTransform), a standard
            DataLoader decoding every PNG every epoch, eager float32, contiguous memory,
            AdamW, cross-entropy with the void label ignored.
  seglab    seglab's own Trainer (the code `seglab train` runs) on the same model, data,
            seed and batch: bfloat16 autocast, channels-last, decoded-image cache.

Both start from the same initial weights and see the same batches in the same order. The
first ``--warmup`` optimiser steps are not timed (allocator and oneDNN warm-up); images/s is
measured over the next ``--steps`` steps, data loading included, as a user experiences it.
The mean loss over the timed steps is printed for both: the same batches through the same
weights, so a fast path that hurt the optimisation would show there.

Also measured, in the same run:
  - the data pipeline alone (DataLoader, decode + augmentation, no model), cached and not, to
    compare with the rate training consumes images;
  - this CPU's matmul peak in float32 and bfloat16, to state the achieved FLOP/s (convolutions
    and matmuls of forward + backward, counted by torch.utils.flop_counter) as a fraction of it.

    python benchmarks/train_speed.py [--data ../shared/data/camvid] [--models lraspp unet deeplabv3plus]
                                     [--steps 10] [--warmup 2] [--workers 1]

Prints a table and writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import write_result

from seglab.config import TrainConfig
from seglab.data import EpochSampler, SegmentationDataset, TrainTransform, get_split, resolve_dataset
from seglab.data.dataset import build_loader
from seglab.engine.inference import normalize
from seglab.engine.trainer import Trainer
from seglab.models import build_model
from seglab.semantic.task import SemanticTask

ROOT = Path(__file__).resolve().parents[1]
# the three models the issue names: LR-ASPP MobileNetV3-Large, U-Net ResNet-18, DeepLabV3+ MobileNetV3
MODELS = {
    "lraspp": "mobilenet_v3_large",
    "unet": "resnet18",
    "deeplabv3plus": "mobilenet_v3_large",
}
IMG_SIZE, CROP, BATCH, LR, SEED = 480, (360, 480), 8, 1e-3, 0


def train_transform(spec) -> TrainTransform:
    """The augmentation of TrainConfig's defaults (scale 0.5-2, flip 0.5, jitter 0.2), as the Trainer builds it."""
    return TrainTransform(IMG_SIZE, CROP, (0.5, 2.0), 0.5, 0.2, spec.ignore_index)


class StepClock:
    """Timestamps of every optimiser step (a post-step hook: no change to the loop it measures)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.times: list[float] = []
        optimizer.register_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def images_per_s(self, warmup: int, batch: int) -> float:
        timed = self.times[warmup - 1 :]  # from the end of the last warm-up step
        return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_gflop(model: nn.Module) -> float:
    """GFLOP of one training step at BATCH x CROP: 3x the forward's convolutions and matmuls.

    The forward is counted by torch.utils.flop_counter; backward is taken as twice the forward
    (the usual convention: gradients for inputs and for weights). The counter's own backward
    count is not used: it ignores ``groups`` (a 64-channel depthwise convolution's backward
    counts 65x its forward), which puts MobileNet steps at 13x their real cost.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, *CROP))
    model.train()
    return 3 * BATCH * counter.get_total_flops() / 1e9


def baseline(args, model: nn.Module, spec, samples, n_steps: int) -> dict:
    """torchvision's reference loop, as people copy it: fp32, contiguous, PNGs decoded every time."""
    dataset = SegmentationDataset(samples, spec, train_transform(spec))
    dataset.set_epoch(SEED * 100_003)  # the very augmentation the seglab run draws
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=seglab_order(len(samples)),
        num_workers=args.workers,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(ignore_index=spec.ignore_index)
    clock, losses = StepClock(optimizer), []
    model.train()
    for batch in loader:
        image = normalize(batch["image"], model.mean, model.std)
        loss = criterion(model(image), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == n_steps
    return {"images_per_s": clock.images_per_s(args.warmup, BATCH), "loss": statistics.mean(losses[args.warmup :])}


def seglab_order(n: int):
    """The Trainer's epoch-0 order (EpochSampler with the same seed), so both see the same batches."""
    sampler = EpochSampler(n, batch=BATCH, shuffle=True, seed=SEED, drop_last=True)
    sampler.set_epoch(0)
    return sampler


def seglab_trainer(args, arch: str, encoder: str, init: dict, n_images: int, run_dir: Path) -> dict:
    cfg = TrainConfig(
        data=args.data,
        model=arch,
        encoder=encoder,
        img_size=IMG_SIZE,
        crop_size=list(CROP),
        batch=BATCH,
        epochs=1,
        lr=LR,
        warmup_epochs=0,
        scheduler="constant",
        amp=True,
        channels_last=True,
        cache=True,
        workers=args.workers,
        limit=n_images,
        seed=SEED,
        out=str(run_dir),
        name=arch,
        plots=False,
        nonfinite="skip",
    )
    trainer = Trainer(cfg, SemanticTask, progress=False, log=lambda *a, **k: None)
    trainer.shipped.load_state_dict(init)
    clock, losses = StepClock(trainer.parts["model"][0]), []
    trainer.task.loss_fn = _recording(trainer.task.loss_fn, losses)
    trainer.train_epoch(0)
    return {"images_per_s": clock.images_per_s(args.warmup, BATCH), "loss": statistics.mean(losses[args.warmup :])}


def _recording(loss_fn, losses: list[float]):
    def wrapped(logits, target):
        loss = loss_fn(logits, target)
        losses.append(loss.item())
        return loss

    return wrapped


def loader_rate(spec, samples, workers: int, cache: bool) -> float:
    """Images/s the DataLoader alone delivers: decode (unless cached) + augmentation + collate."""
    dataset = SegmentationDataset(samples, spec, train_transform(spec), cache=cache)
    loader = build_loader(dataset, batch=BATCH, shuffle=True, workers=workers, ignore_index=spec.ignore_index, seed=0)
    t, n = None, 0
    for i, batch in enumerate(loader):
        if i == 0:  # worker start-up and the cache fill are not the steady rate
            t = time.perf_counter()
            continue
        n += batch["image"].shape[0]
    assert t is not None
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps first")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"--data {args.data}: not a folder; point it at the CamVid folder of ../shared/data")

    spec = resolve_dataset(args.data)
    train = get_split(spec, "train", val_fraction=0.0, seed=SEED)
    n_steps = args.warmup + args.steps
    samples = train[: n_steps * BATCH]
    peak = {"float32": peak_gflops(torch.float32), "bfloat16": peak_gflops(torch.bfloat16)}
    print(
        f"matmul peak, {torch.get_num_threads()} threads: float32 {peak['float32']:.0f} GFLOP/s, "
        f"bfloat16 {peak['bfloat16']:.0f} GFLOP/s"
    )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            encoder = MODELS[arch]
            torch.manual_seed(SEED)
            model = build_model(arch, num_classes=spec.num_classes, encoder=encoder)
            init = {k: v.clone() for k, v in model.state_dict().items()}
            gflop = step_gflop(model)
            torch.manual_seed(SEED)
            base = baseline(args, model, spec, samples, n_steps)
            fast = seglab_trainer(args, arch, encoder, init, len(samples), Path(tmp))
            row = {
                "model": f"{arch} ({encoder})",
                "step_gflop": gflop,
                "baseline_images_per_s": base["images_per_s"],
                "seglab_images_per_s": fast["images_per_s"],
                "speedup": fast["images_per_s"] / base["images_per_s"],
                "baseline_loss": base["loss"],
                "seglab_loss": fast["loss"],
                "baseline_gflops": gflop / BATCH * base["images_per_s"],
                "seglab_gflops": gflop / BATCH * fast["images_per_s"],
            }
            rows.append(row)
            print(
                f"{row['model']}: baseline {row['baseline_images_per_s']:.2f} img/s, seglab "
                f"{row['seglab_images_per_s']:.2f} img/s, {row['speedup']:.2f}x; loss {base['loss']:.3f} vs "
                f"{fast['loss']:.3f}",
                flush=True,
            )

    pipeline = {
        f"workers {w}, {'cached' if cache else 'decode'}": loader_rate(spec, train[:96], w, cache)
        for w in (1, 2)
        for cache in (False, True)
    }

    print()
    print(
        "| model | step GFLOP | baseline img/s | seglab img/s | speedup | baseline GFLOP/s (% fp32 peak) "
        "| seglab GFLOP/s (% bf16 peak) | mean loss base / seglab |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['step_gflop']:.0f} | {r['baseline_images_per_s']:.2f} | "
            f"{r['seglab_images_per_s']:.2f} | **{r['speedup']:.2f}x** | {r['baseline_gflops']:.0f} "
            f"({100 * r['baseline_gflops'] / peak['float32']:.0f}%) | {r['seglab_gflops']:.0f} "
            f"({100 * r['seglab_gflops'] / peak['bfloat16']:.0f}%) | "
            f"{r['baseline_loss']:.3f} / {r['seglab_loss']:.3f} |"
        )
    print()
    print("| data pipeline (decode + augmentation + collate, no model) | img/s |")
    print("|---|---|")
    for name, rate in pipeline.items():
        print(f"| {name} | {rate:.1f} |")
    settings = {"batch": BATCH, "crop": CROP, "img_size": IMG_SIZE, "steps": args.steps, "warmup": args.warmup}
    write_result(
        args.out,
        settings={**settings, "workers": args.workers},
        matmul_peak_gflops=peak,
        models=rows,
        data_pipeline_images_per_s=pipeline,
    )
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
