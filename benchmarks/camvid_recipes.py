"""By-hand benchmark: the shipped CamVid recipes, val mIoU against wall-clock minutes, over seeds.

Not a test. Trains each recipe (a config in configs/) once per seed with ``seglab train``, one
run after another so each has the machine to itself, then reads every run's metrics.csv and
best.pt and prints:

  - the final and best val mIoU per run, mean over seeds, and the training minutes;
  - val mIoU per class of each run's best weights;
  - val mIoU against cumulative wall-clock minutes (epoch times, validation included),
    drawn to benchmarks/results/camvid_recipes.png.

    python benchmarks/camvid_recipes.py [--recipes pretrained scratch] [--seeds 0 1] [--report-only]

Besides the two shipped recipes, ``--recipes`` takes the levers measured on top of them (a
config and the flags that change it; ``LEVERS`` below). ``--report-only`` skips training and
reports the runs already in runs/train/ (named ``<config name>_seed<N>``, a lever's
``camvid_<lever>_seed<N>``). Writes benchmarks/results/camvid_recipes.json (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from common import write_result

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "configs" / "camvid_lraspp_lite0.yaml"
# recipe -> (config, flags on top of it)
RECIPES = {"pretrained": (PRETRAINED, []), "scratch": (ROOT / "configs" / "camvid_lraspp_scratch.yaml", [])}
LEVERS = {  # toward 75 mIoU within 60 minutes (issue 17): the pretrained recipe, changed
    "lite2-median-57min": (PRETRAINED, ["--encoder", "efficientnet_lite2", "--class-weights", "median",
                                        "--time", "57", "--epochs", "25"]),
}  # fmt: skip
RECIPES.update(LEVERS)


def run_dir(recipe: str, seed: int) -> Path:
    config, flags = RECIPES[recipe]
    name = f"camvid_{recipe}" if flags else yaml.safe_load(config.read_text())["name"]
    return ROOT / "runs" / "train" / f"{name}_seed{seed}"


def train(recipe: str, seed: int) -> None:
    out = run_dir(recipe, seed)
    cmd = [
        sys.executable,
        "-m",
        "seglab",
        "train",
        "--config",
        str(RECIPES[recipe][0]),
        *RECIPES[recipe][1],
        "--seed",
        str(seed),
        "--name",
        out.name,
        "--out",
        str(out.parent),
        "--exist-ok",
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def read_run(recipe: str, seed: int) -> dict | None:
    folder = run_dir(recipe, seed)
    if not (folder / "metrics.csv").is_file():
        return None
    with (folder / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    minutes, curve = 0.0, []
    for row in rows:
        minutes += float(row["epoch_time_s"]) / 60
        if row["val_miou"]:
            curve.append((round(minutes, 2), 100 * float(row["val_miou"])))
    best = torch.load(folder / "weights" / "best.pt", map_location="cpu", weights_only=True)
    return {
        "recipe": recipe,
        "seed": seed,
        "run": str(folder.relative_to(ROOT)),
        "epochs": len(rows),
        "minutes": round(minutes, 1),
        "final_miou": curve[-1][1],
        "best_miou": 100 * best["metrics"]["miou"],
        "per_class_iou": {name: 100 * (c["iou"] or 0.0) for name, c in best["metrics"]["per_class"].items()},
        "curve": curve,
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{r['recipe']} seed {r['seed']}")
    ax.axhline(75, color="grey", linestyle="-.", linewidth=1, label="goal with ImageNet weights: 75")
    ax.axhline(60, color="grey", linestyle="--", linewidth=1, label="goal without: 60")
    ax.set(
        xlabel="wall-clock training minutes (validation included)",
        ylabel="CamVid val mIoU",
        title="seglab CamVid recipes on a 2-core CPU",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--report-only", action="store_true", help="report existing runs, train nothing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "camvid_recipes.json"))
    args = parser.parse_args()

    if not args.report_only:
        for recipe in args.recipes:
            for seed in args.seeds:
                train(recipe, seed)
    runs = [r for recipe in args.recipes for seed in args.seeds if (r := read_run(recipe, seed))]
    if not runs:
        sys.exit("no finished runs to report; run without --report-only first")

    print("\n| recipe | seed | epochs | training minutes | final val mIoU | best val mIoU |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['recipe']} | {r['seed']} | {r['epochs']} | {r['minutes']} | {r['final_miou']:.2f} | "
            f"{r['best_miou']:.2f} |"
        )
    for recipe in args.recipes:
        finals = [r["final_miou"] for r in runs if r["recipe"] == recipe]
        if len(finals) > 1:
            print(f"| {recipe} | mean ± sd | | | {statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f} | |")

    classes = list(runs[0]["per_class_iou"])
    print("\n| recipe | seed | " + " | ".join(classes) + " |")
    print("|---|---|" + "---|" * len(classes))
    for r in runs:
        cells = " | ".join(f"{r['per_class_iou'][c]:.1f}" for c in classes)
        print(f"| {r['recipe']} | {r['seed']} | {cells} |")

    print("\nval mIoU against wall-clock minutes:")
    for r in runs:
        print(f"  {r['recipe']} seed {r['seed']}: " + ", ".join(f"{m:.0f} min {v:.1f}" for m, v in r["curve"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out.with_suffix(".png"))
    recipes = {k: " ".join([str(c.relative_to(ROOT)), *f]) for k, (c, f) in RECIPES.items() if k in args.recipes}
    write_result(out, recipes=recipes, runs=runs)
    print(f"\nwritten {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
