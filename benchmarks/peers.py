"""By-hand benchmark: seglab against the tools a user could install instead, on CamVid, scored alike.

Not a test. Each row trains from scratch (or from seglab's offline ImageNet encoders, said in the
row) on CamVid train for a wall-clock budget on this machine, one row after another so each has
the machine to itself; then each tool predicts the 101 val images through its own predict path
and writes the class masks as PNGs at the labels' resolution; one scorer (seglab's dataset-level
confusion matrix, void ignored) scores every row. Nobody is scored by their own metric.

Rows (``--rows``):

  yolo26n-sem, yolo26s-sem  Ultralytics' semantic task from its YAMLs, ``pretrained=False``, its own
                            augmentation and schedule, ``imgsz=480 batch=8 device=cpu``, and its
                            ``time=`` budget (it fits the epochs to the time); everything else its defaults
  smp-unet-r18, smp-dlv3p-r18
                            segmentation_models_pytorch's Unet / DeepLabV3Plus on a ResNet-18 with no
                            weights, in the plain loop of its examples: Adam lr 1e-3, cross-entropy with
                            void ignored, random scale 0.5-2, 352x480 crops, flips, batch 8, until the budget
  seglab-scratch, seglab-lite0
                            seglab's CamVid recipes (configs/camvid_lraspp_scratch.yaml; the Lite0 one
                            starts from ImageNet weights from PyPI) with ``--time`` the budget (the epochs and
                            the schedule fitted to it after each epoch)

The peers are installed in their own virtual environment (never seglab's dependencies):

    python3 -m venv /work/peers && /work/peers/bin/pip install ultralytics segmentation-models-pytorch
    python benchmarks/peers.py --budget 15 --peers-python /work/peers/bin/python [--rows ...]

Merges its rows into benchmarks/results/peers_<budget>min.json (a row run again replaces its old
one; ``--seed N`` rows are their own rows) and prints a Markdown table: val mIoU, per-class IoU,
training images/s, and batch-1 latency of each tool's predict path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMVID = (ROOT / ".." / "shared" / "data" / "camvid").resolve()
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]  # fmt: skip
VOID = 11
ROWS = ("yolo26n-sem", "yolo26s-sem", "smp-unet-r18", "smp-dlv3p-r18", "seglab-scratch", "seglab-lite0")
RECIPES = {
    "seglab-scratch": ROOT / "configs" / "camvid_lraspp_scratch.yaml",
    "seglab-lite0": ROOT / "configs" / "camvid_lraspp_lite0.yaml",
}


def pairs(split: str) -> list[tuple[Path, Path]]:
    """(image, mask) of a CamVid split, from its SegNet list."""
    lines = (CAMVID / f"{split}.txt").read_text().split("\n")
    out = []
    for line in filter(None, (ln.strip() for ln in lines)):
        image, mask = line.split()
        out.append((CAMVID / image, CAMVID / mask))
    return out


# --------------------------------------------------------------------------- the scorer (seglab's venv)


def score(masks: Path) -> dict:
    """mIoU and per-class IoU of the PNG masks in ``masks`` (named by val image stem) against the labels."""
    from PIL import Image

    from seglab.metrics import ConfusionMatrix, metrics_from_confusion

    cm = ConfusionMatrix(len(CLASSES), ignore_index=VOID)
    for image, label in pairs("val"):
        truth = np.asarray(Image.open(label))
        predicted = np.asarray(Image.open(masks / f"{image.stem}.png"))
        if predicted.shape != truth.shape:
            raise SystemExit(f"{masks / image.stem}.png is {predicted.shape}, the label {truth.shape}")
        cm.update(predicted.astype(np.int64), truth.astype(np.int64))
    metrics = metrics_from_confusion(cm.matrix, CLASSES)
    return {
        "miou": 100 * metrics["miou"],
        "per_class": {k: 100 * (v["iou"] or 0) for k, v in metrics["per_class"].items()},
    }


# --------------------------------------------------------------------------- rows in the peers' venv


def row_dir(work: Path, row: str, budget: float, seed: int) -> Path:
    return work / (f"{row}_{budget:g}min" + (f"_seed{seed}" if seed else ""))


def ultralytics_row(model: str, budget: float, out: Path, seed: int) -> dict:
    from ultralytics import YOLO

    data = out / "camvid_yolo"
    for split in ("train", "val"):
        for image, label in pairs(split):
            for kind, src in (("images", image), ("masks", label)):
                link = data / kind / split / src.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(src)
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    (data / "camvid.yaml").write_text(
        f"path: {data}\ntrain: images/train\nval: images/val\nmasks_dir: masks\nnames:\n{names}"
        f"label_mapping:\n  {VOID}: ignore_label\n"
    )
    start = time.perf_counter()
    yolo = YOLO(f"{model}.yaml")
    yolo.train(data=str(data / "camvid.yaml"), imgsz=480, batch=8, device="cpu", pretrained=False, time=budget / 60,
               workers=2, seed=seed, project=str(out), name="train", exist_ok=True)  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    log = [ln.split(",") for ln in (out / "train" / "results.csv").read_text().splitlines()]
    epochs, seconds = len(log) - 1, float(log[-1][log[0].index("time")])  # time: cumulative, val included
    best = YOLO(str(out / "train" / "weights" / "best.pt"))
    result = _predict(out, lambda path: best.predict(str(path), imgsz=480, device="cpu", verbose=False)[0]
                      .semantic_mask.data.cpu().numpy(), minutes)  # fmt: skip
    return {**result, "epochs": epochs, "train_images_per_s": len(pairs("train")) * epochs / seconds}


def smp_row(arch: str, budget: float, out: Path, seed: int) -> dict:
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F
    from PIL import Image

    torch.manual_seed(seed)
    net = {"smp-unet-r18": smp.Unet, "smp-dlv3p-r18": smp.DeepLabV3Plus}[arch](
        "resnet18", encoder_weights=None, classes=len(CLASSES)
    )
    train = [(np.asarray(Image.open(i).convert("RGB")), np.asarray(Image.open(m))) for i, m in pairs("train")]
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    start, images = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < budget * 60:
        batch = [train[i] for i in rng.choice(len(train), 8, replace=False)]
        xs, ys = [], []
        for image, mask in batch:  # scale 0.5-2, crop 352x480 (padded with void), flip
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            y = torch.from_numpy(mask.astype(np.int64))[None, None].float()
            s = rng.uniform(0.5, 2.0)
            size = (round(360 * s), round(480 * s))
            x, y = F.interpolate(x, size, mode="bilinear", align_corners=False), F.interpolate(y, size, mode="nearest")
            ph, pw = max(0, 352 - size[0]), max(0, 480 - size[1])
            x, y = F.pad(x, (0, pw, 0, ph)), F.pad(y, (0, pw, 0, ph), value=VOID)
            top, left = rng.integers(0, x.shape[2] - 352 + 1), rng.integers(0, x.shape[3] - 480 + 1)
            x, y = x[..., top : top + 352, left : left + 480], y[..., top : top + 352, left : left + 480]
            if rng.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            xs.append(x)
            ys.append(y)
        x, y = (torch.cat(xs) - mean) / std, torch.cat(ys)[:, 0].long()
        loss = F.cross_entropy(net(x), y, ignore_index=VOID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(batch)
    minutes = (time.perf_counter() - start) / 60
    net.eval()

    @torch.no_grad()
    def predict(path: Path) -> np.ndarray:
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        x = F.pad((x - mean) / std, (0, 0, 0, 24))  # 360 -> 384: smp's encoders want multiples of 32
        return net(x)[0, :, :360].argmax(0).numpy()

    return {**_predict(out, predict, minutes), "train_images_per_s": images / (minutes * 60)}


def _predict(out: Path, predict, minutes: float) -> dict:
    """Every val image through ``predict`` (path -> (H, W) classes) into out/masks; batch-1 latency."""
    from PIL import Image

    (out / "masks").mkdir(parents=True, exist_ok=True)
    times = []
    for image, _ in pairs("val"):
        start = time.perf_counter()
        mask = predict(image)
        times.append(time.perf_counter() - start)
        Image.fromarray(np.asarray(mask, np.uint8)).save(out / "masks" / f"{image.stem}.png")
    return {"train_minutes": round(minutes, 1), "latency_ms": 1000 * float(np.median(times[5:]))}


# --------------------------------------------------------------------------- seglab rows (its own venv)


def seglab_row(row: str, budget: float, out: Path, seed: int) -> dict:
    run = out / "train"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "seglab", "train", "--config", str(RECIPES[row]), "--time", str(budget),
                    "--seed", str(seed), "--out", str(out), "--name", "train", "--exist-ok"],
                   check=True, cwd=ROOT)  # fmt: skip
    trained = (time.perf_counter() - start) / 60
    import seglab

    model = seglab.load(run / "weights" / "best.pt", device="cpu", amp=True)
    result = _predict(out, lambda path: model.predict(path).mask, trained)
    rows = [ln.split(",") for ln in (run / "metrics.csv").read_text().splitlines()]
    seconds = sum(float(r[-1]) for r in rows[1:])  # epoch time, val included, as Ultralytics' is
    epochs = len(rows) - 1
    curve = [(float(r[rows[0].index("val_miou")]) if r[rows[0].index("val_miou")] else None) for r in rows[1:]]
    return {**result, "epochs": epochs, "train_images_per_s": 367 * epochs / seconds, "val_miou_by_epoch": curve}


def plot(results: dict, work: Path, budget: float, path: Path) -> None:
    """val mIoU against training minutes: every validation of the seglab rows (seglab's val is this
    scorer), and each row's final score at its minutes (the peers validate with their own metrics,
    so only their end point is scored here)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, r in results.items():
        row, _, seed = key.partition(" (seed ")
        metrics = row_dir(work, row, budget, int(seed.rstrip(")") or 0)) / "train" / "metrics.csv"
        if row.startswith("seglab") and metrics.is_file():
            minutes, scores, clock = [], [], 0.0
            for line in csv.DictReader(metrics.open()):
                clock += float(line["epoch_time_s"]) / 60
                if line["val_miou"]:
                    minutes.append(clock)
                    scores.append(100 * float(line["val_miou"]))
            (curve,) = ax.plot(minutes, scores, marker=".", label=f"{key}: {r['miou']:.1f}")
            ax.plot([r["train_minutes"]], [r["miou"]], marker="*", markersize=12, color=curve.get_color())
        else:
            ax.plot(
                [r["train_minutes"]],
                [r["miou"]],
                marker="o",
                markersize=8,
                linestyle="",
                label=f"{key}: {r['miou']:.1f}",
            )
    ax.set(xlabel="training minutes (this CPU, validation included)", ylabel="CamVid val mIoU (one scorer)",
           title=f"CamVid from scratch and from offline ImageNet encoders, {budget:g}-minute budget")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--budget", type=float, default=15, help="training minutes per row")
    parser.add_argument("--seed", type=int, default=0, help="every row's seed (Ultralytics' seed= too)")
    parser.add_argument("--peers-python", default="/work/peers/bin/python", help="the venv with ultralytics and smp")
    parser.add_argument("--work", default=str(ROOT / "runs" / "peers"), help="run folders and predicted masks")
    parser.add_argument("--plot", action="store_true", help="only draw the curve of the results file again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one peer row, run by the peers' interpreter
    args = parser.parse_args()
    work = Path(args.work)
    if args.worker:
        out = row_dir(work, args.worker, args.budget, args.seed)
        row = ultralytics_row if args.worker.startswith("yolo") else smp_row
        (out / "row.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "row.json").write_text(json.dumps(row(args.worker, args.budget, out, args.seed)))
        return

    path = ROOT / "benchmarks" / "results" / f"peers_{args.budget:g}min.json"
    results = json.loads(path.read_text())["rows"] if path.is_file() else {}
    if args.plot:
        plot(results, work, args.budget, path.with_suffix(".png"))
        return
    for row in args.rows:
        key = row if not args.seed else f"{row} (seed {args.seed})"
        out = row_dir(work, row, args.budget, args.seed)
        print(f"== {key}, {args.budget:g} min", flush=True)
        if row.startswith("seglab"):
            measured = seglab_row(row, args.budget, out, args.seed)
        else:
            env = {**os.environ, "PYTHONPATH": ""}
            subprocess.run([args.peers_python, __file__, "--worker", row, "--budget", str(args.budget), "--seed",
                            str(args.seed), "--work", str(work)], check=True, cwd=ROOT, env=env)  # fmt: skip
            measured = json.loads((out / "row.json").read_text())
        results[key] = {**measured, **score(out / "masks")}
        print(json.dumps({key: results[key]}), flush=True)

    print(f"\n| row ({args.budget:g} min) | val mIoU | trained min | train img/s | latency b1 ms | Pole | SignSymbol |")
    print("|---|---|---|---|---|---|---|")
    for row, r in results.items():
        ips = f"{r['train_images_per_s']:.1f}" if "train_images_per_s" in r else "-"
        print(f"| {row} | {r['miou']:.2f} | {r['train_minutes']} | {ips} | {r['latency_ms']:.0f} | "
              f"{r['per_class']['Pole']:.1f} | {r['per_class']['SignSymbol']:.1f} |")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write_result

    write_result(path, budget_min=args.budget, rows=results)
    plot(results, work, args.budget, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
