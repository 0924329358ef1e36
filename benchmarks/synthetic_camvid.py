"""CamVid with and without pix2pix pairs, at the same compute budget: does synthetic data help the
rare classes? Runs (or, where a run folder already exists, reads) every step, then writes
results/synthetic_camvid.json and prints the table.

    python benchmarks/synthetic_camvid.py [--seeds 0 1] [--data ../shared/data/camvid]

Steps, all seglab commands (about 20 min for the generator and 7-8 min per segmenter on 2 CPU cores):
1. ``seglab gen train --config configs/camvid_pix2pix.yaml``: the generator, 36 epochs at 180x240.
2. ``seglab gen augment --n 184 --rare Pole SignSymbol Fence Pedestrian Bicyclist --paste 2``: 184
   synthetic pairs (half the real training set) from training label maps, rare-class rich, each with
   the rare-class regions of 2 other maps pasted in; the dataset lists them beside the 367 real pairs.
3. ``seglab train --config configs/camvid_synth_base.yaml`` (LR-ASPP + ImageNet EfficientNet-Lite0 at
   180x240, batch 8) for 15 epochs on the 367 real pairs (45 steps per epoch, 675 steps), and for 10
   epochs on the 551 real + synthetic pairs (68 steps per epoch, 680 steps): the same compute.

Scores: val mIoU and per-class IoU of each run's last epoch (weights/last.pt; no epoch is picked on
val), on the 101 real val images.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import last_scores, write_result

RARE = ["Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist"]
SYNTH = "runs/synth/camvid_rare184"
GENERATOR = "runs/gen/camvid_pix2pix/weights/generator.pt"


def seglab(*args: str) -> None:
    command = [sys.executable, "-m", "seglab", *args]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def segmenter(name: str, seed: int, data: str | None, epochs: int) -> dict:
    run = Path("runs/train") / name
    if not (run / "weights" / "last.pt").is_file():
        extra = ["--data", data] if data else []
        seglab("train", "--config", "configs/camvid_synth_base.yaml", *extra, "--epochs", str(epochs),
               "--seed", str(seed), "--name", name, "--exist-ok")  # fmt: skip
    return last_scores(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    if not Path(GENERATOR).is_file():
        seglab("gen", "train", "--config", "configs/camvid_pix2pix.yaml", "--exist-ok")
    if not (Path(SYNTH) / "data.yaml").is_file():
        seglab("gen", "augment", "--weights", GENERATOR, "--out", SYNTH, "--n", "184", "--rare", *RARE, "--paste", "2")
    runs = {"real": [], "real+synthetic": []}
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"_seed{seed}"
        runs["real"].append(segmenter(f"camvid_real_only{suffix}", seed, None, 15))
        runs["real+synthetic"].append(segmenter(f"camvid_real_synth{suffix}", seed, SYNTH, 10))

    def mean(rows: list[dict], key: str | None) -> float:
        values = [r["miou"] if key is None else r["iou"][key] for r in rows]
        return round(sum(values) / len(values), 2)

    classes = list(runs["real"][0]["iou"])
    print(f"{'class':12s} {'real':>22s} {'real+synthetic':>22s}")
    for key in [None, *classes]:
        cells = []
        for rows in runs.values():
            each = " / ".join(f"{r['miou'] if key is None else r['iou'][key]:.1f}" for r in rows)
            cells.append(f"{each} ({mean(rows, key):.1f})")
        star = " *" if key in RARE else ""
        print(f"{key or 'mIoU':12s} {cells[0]:>22s} {cells[1]:>22s}{star}")
    summary = {name: {"miou": mean(rows, None), **{c: mean(rows, c) for c in classes}} for name, rows in runs.items()}
    write_result(
        Path(__file__).parent / "results" / "synthetic_camvid.json",
        seeds=args.seeds,
        rare=RARE,
        runs=runs,
        mean_over_seeds=summary,
    )


if __name__ == "__main__":
    main()
