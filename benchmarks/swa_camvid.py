"""CamVid's scratch recipe with and without ``--swa``, the same epochs, two seeds: does stochastic
weight averaging find a better optimum? Runs (or, where a run folder already exists, reads) each
run, then writes results/swa_camvid.json and prints the table.

    python benchmarks/swa_camvid.py [--seeds 0 1] [--epochs 10]

Runs: ``seglab train --config configs/camvid_lraspp_scratch.yaml --epochs E --seed S``, once as it
is and once with ``--swa`` (its defaults: averaging from epoch floor(0.75 E) + 1 at a constant
learning rate of lr/10 after a one-epoch anneal, BatchNorm statistics recomputed on the training
data before each validation). Scores: val mIoU and per-class IoU of each run's last epoch
(weights/last.pt, the average for the ``--swa`` runs; no epoch is picked on val).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import last_scores, write_result


def run(name: str, seed: int, epochs: int, swa: bool) -> dict:
    folder = Path("runs/train") / name
    if not (folder / "weights" / "last.pt").is_file():
        command = [sys.executable, "-m", "seglab", "train", "--config", "configs/camvid_lraspp_scratch.yaml",
                   "--epochs", str(epochs), "--seed", str(seed), "--name", name, "--exist-ok",
                   *(["--swa"] if swa else [])]  # fmt: skip
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return last_scores(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"plain": [], "--swa": []}
    for seed in args.seeds:
        for key, swa in (("plain", False), ("--swa", True)):
            name = f"camvid_scratch_{args.epochs}ep{'_swa' if swa else ''}_seed{seed}"
            runs[key].append(run(name, seed, args.epochs, swa))

    def mean(rows: list[dict], key: str | None) -> float:
        values = [r["miou"] if key is None else r["iou"][key] for r in rows]
        return round(sum(values) / len(values), 2)

    classes = list(runs["plain"][0]["iou"])
    print(f"| {'class':12s} | {'plain':>22s} | {'--swa':>22s} |\n|---|---|---|")
    for key in [None, *classes]:
        cells = []
        for rows in runs.values():
            each = " / ".join(f"{r['miou'] if key is None else r['iou'][key]:.1f}" for r in rows)
            cells.append(f"{each} ({mean(rows, key):.1f})")
        print(f"| {key or 'mIoU':12s} | {cells[0]:>22s} | {cells[1]:>22s} |")
    summary = {name: {"miou": mean(rows, None), **{c: mean(rows, c) for c in classes}} for name, rows in runs.items()}
    write_result(
        Path(__file__).parent / "results" / "swa_camvid.json",
        seeds=args.seeds,
        epochs=args.epochs,
        runs=runs,
        mean_over_seeds=summary,
    )


if __name__ == "__main__":
    main()
