"""pix2pix training-step speed on this CPU: float32 against seglab's `--amp` (bfloat16 autocast), and
the discriminator width the CamVid recipe uses, measured in one run (interleaved rounds).

    python benchmarks/gen_speed.py [--size 180 240] [--batch 4] [--rounds 3]

One step = the discriminator's step on real and generated pairs, then the generator's (adversarial
plus L1), exactly as ``GenTask.step`` and the training loop run it, on random label maps of CamVid's 11 classes.
Rows: generator width 32 (the recipe), discriminator width 64 (pix2pix's) or 32 (the recipe).
"""

from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import torch
from common import write_result

from seglab.engine.distributed import DistInfo
from seglab.engine.schedule import Plan
from seglab.gen.config import GenConfig
from seglab.gen.models import GenCard, build_discriminator, init_weights
from seglab.gen.task import GenTask

ROWS = {
    "baseline: D width 64, float32": (64, False),
    "D width 64, --amp": (64, True),
    "D width 32, float32": (32, False),
    "recipe: D width 32, --amp": (32, True),
}


class _Bench:
    """GenTask's networks and step, and the loop's backward and optimiser steps, without a dataset
    or a run folder."""

    def __init__(self, cfg: GenConfig, size: list[int]) -> None:
        loop = types.SimpleNamespace(device=torch.device("cpu"), dist=DistInfo(), log=print, progress=False)
        self.task = GenTask(cfg, loop)  # type: ignore[arg-type]
        self.task.card = GenCard("pix2pix", size, num_classes=11, ignore_index=11, width=cfg.width)
        generator, discriminator = self.task.card.build(), build_discriminator(self.task.card, width=cfg.disc_width)
        init_weights(generator)
        init_weights(discriminator)
        self.task.models = {"generator": generator, "discriminator": discriminator}
        self.parts = self.task.optimizers(Plan(steps_per_epoch=1, epochs=1))

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        for part, loss, _ in self.task.step(batch, self.task.models):
            optimizer = self.parts[part][0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[180, 240])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and round (after one warm-up)")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    batch = {
        "labels": torch.randint(0, 12, (args.batch, *args.size), generator=g),
        "image": torch.randint(0, 256, (args.batch, 3, *args.size), generator=g, dtype=torch.uint8),
    }
    benches = {
        name: _Bench(GenConfig(data="-", width=32, disc_width=dw, amp=amp), args.size)
        for name, (dw, amp) in ROWS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(args.rounds):
        for name, bench in benches.items():
            bench.step(batch)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                bench.step(batch)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = min(times[next(iter(ROWS))])
    rows = []
    for name in ROWS:
        best = min(times[name])
        rows.append({"row": name, "s_per_step": round(best, 3), "speedup": round(base / best, 2)})
        print(f"{name:32s} {best:6.3f} s/step  {base / best:5.2f}x")
    write_result(
        Path(__file__).parent / "results" / "gen_speed.json",
        size=args.size,
        batch=args.batch,
        rounds=args.rounds,
        steps=args.steps,
        rows=rows,
    )


if __name__ == "__main__":
    main()
