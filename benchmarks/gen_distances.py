"""The unconditional generators at equal wall-clock compute: DCGAN, VAE and StyleGAN2 each trained
for the same minutes on CamVid and on the facade images, then FD-Lite0 and KD-Lite0 against the
held-out images, beside the real-vs-real floor. Writes results/gen_distances.json and prints the table.

    python benchmarks/gen_distances.py [--minutes 20] [--img-size 64] [--data camvid facade]

Runs: ``seglab gen train --data D --model M --img-size 64 --time MINUTES --width 32 --disc-width 32
--batch 8 --amp`` (32 channels at full resolution in both networks, doubling towards the coarse
ones; DCGAN's discriminator takes --width; each model's own optimiser recipe; ``--time`` fits the
epochs, and the learning-rate schedule, to the minutes),
into ``runs/gen/dist_<data>_<model>_<minutes>min`` (a finished run folder is read, not retrained).
Scores: ``seglab gen eval``'s FD/KD-Lite0 on as many generated images as there are held-out images
(CamVid: the 101 val images; the facade COCO folder has one split, so its 10% hold-out, 41 images),
and the same distances from as many real training images (the floor). The facade folder is read as
``seglab gen train`` reads any dataset: its images, at the long side given; the polygons are unused.
Run it alone on a quiet machine: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import write_result

from seglab.gen.evaluate import evaluate_generator

DATASETS = {"camvid": "camvid", "facade": "facade_coco"}
MODELS = ("dcgan", "vae", "stylegan")


def train(data: Path, model: str, name: str, args: argparse.Namespace) -> Path:
    run = Path("runs/gen") / name
    if not (run / "weights" / "generator.pt").is_file():
        command = [sys.executable, "-m", "seglab", "gen", "train", "--data", str(data), "--model", model,
                   "--img-size", str(args.img_size), "--time", str(args.minutes), "--epochs", "1000",
                   "--width", "32", "--disc-width", "32", "--batch", "8", "--amp", "--seed", str(args.seed),
                   "--name", name, "--exist-ok",
                   *(["--limit", str(args.limit)] if args.limit else [])]  # fmt: skip
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training minutes per model and dataset")
    parser.add_argument("--img-size", type=int, default=64, help="long side of the images (CamVid: 48x64)")
    parser.add_argument("--data", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--data-root", default="../shared/data", help="folder holding camvid/ and facade_coco/")
    parser.add_argument("--limit", type=int, help="smoke runs: the first N images of each split only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for key in args.data:
        data = Path(args.data_root) / DATASETS[key]
        for model in args.models:
            run = train(data, model, f"dist_{key}_{model}_{args.minutes:g}min", args)
            report = evaluate_generator(
                run / "weights" / "generator.pt", data=str(data), limit=args.limit, seed=args.seed,
                log=lambda line: print(line, flush=True),
            )  # fmt: skip
            grids = sorted((run / "samples").glob("epoch_*.png"))
            lite0 = report["lite0"]
            rows.append({
                "data": key, "model": model, "size": report["size"], "images": report["images"],
                "epochs": len(grids), "fd_lite0": round(lite0["fd"], 1), "kd_lite0": round(lite0["kid"], 3),
                "kd_lite0_std": round(lite0["kid_std"], 3),
                "floor_fd_lite0": round(lite0["real_train"]["fd"], 1),
                "floor_kd_lite0": round(lite0["real_train"]["kid"], 3),
                "run": str(run), "sample_grid": str(grids[-1]) if grids else None,
            })  # fmt: skip

    print(f"\n{args.minutes:g} min per model and dataset at long side {args.img_size}\n")
    print("| data | model | epochs | FD-Lite0 | KD-Lite0 | real-vs-real FD / KD | sample grid |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['model']} | {r['epochs']} | {r['fd_lite0']} | {r['kd_lite0']} +- {r['kd_lite0_std']} "
            f"| {r['floor_fd_lite0']} / {r['floor_kd_lite0']} | {r['sample_grid']} |"
        )
    write_result(
        Path(__file__).parent / "results" / "gen_distances.json",
        minutes=args.minutes,
        img_size=args.img_size,
        limit=args.limit,
        seed=args.seed,
        rows=rows,
    )


if __name__ == "__main__":
    main()
