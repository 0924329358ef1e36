"""By-hand benchmark: seglab's Mask R-CNN against Ultralytics' YOLO26n-seg on the facade instances, scored alike.

Not a test. The facade COCO export (../shared/data/facade_coco/train, 407 images of 512x512, 10
classes) has no val split, so seglab holds out a seeded 10% (``get_split``: ``val_fraction`` 0.1,
the ``--seed``; 41 images at seed 0). Both rows train from scratch on seglab's train images of that
split only, for a wall-clock budget on this machine, one row after another so each has the machine to
itself; both see the held-out images as their val during training (seglab validates on them and keeps
``best.pt`` by their mask AP; Ultralytics keeps its ``best.pt`` by its own fitness on them), and both
``best.pt`` files predict those held-out images through their tool's own predict path. One scorer,
pycocotools' COCOeval (``segm`` and ``bbox``, 100 detections per image), scores every row against
the held-out images' annotations read straight from the COCO JSON at the images' own resolution.
Nobody is scored by their own metric.

Rows (``--rows``):

  yolo26n-seg            Ultralytics' segment task from ``yolo26n-seg.yaml``, ``pretrained=False imgsz=512
                         batch=8 device=cpu workers=2 seed=<--seed>`` and ``time=<budget in hours>`` (it fits
                         the epochs to the time after each epoch and stops mid-epoch when it is spent, a
                         check it makes at optimiser steps: every round(64 / 8) = 8 batches once warm-up is
                         over); everything else its defaults (its augmentation, optimiser, schedule, float32;
                         on a CPU it sets workers=0 itself and loads the data in its main process). Its
                         dataset is written under ``--work``: the images symlinked, one label line per COCO
                         annotation, ``class x1 y1 x2 y2 ...`` with the polygon normalised by the image's
                         width and height, the class seglab's class index minus one (seglab maps the COCO
                         categories sorted by id to 1..10 and drops category 0, the unused Roboflow parent)
  seglab-maskrcnn-lite0  seglab's recipe configs/facade_maskrcnn_lite0.yaml (Mask R-CNN on an ImageNet
                         EfficientNet-Lite0 FPN, the encoder's weights from PyPI, so offline) with
                         ``--time <budget> --seed <--seed> --val-fraction 0.1`` (the epochs and the cosine
                         schedule fitted to the budget; the last epoch cut where the budget ends)

Prediction, the same for both where the tools allow: ``conf`` 0.001 (Ultralytics' own val
threshold; seglab's ``predict(conf=0.001)``, and its torchvision box head's internal
``score_thresh`` lowered from 0.05 to 0.001 too, or 0.05 would be its floor), at most 100 objects per
image (COCO's maxDets: ``max_det=100``; seglab's detector keeps 100), each tool's own duplicate
removal (YOLO26 is end-to-end, ``end2end: True`` in its YAML: its one-to-one head's top scores, no NMS;
torchvision's class-wise NMS at IoU 0.5), masks at the image's resolution
(``retina_masks=True``; seglab pastes its masks at the image's size) thresholded at 0.5.
``YOLO.predict(imgsz=512)`` runs float32; ``seglab.load(best.pt, amp=True)`` runs as trained
(bfloat16 where the CPU has the instructions, float32 where not).

The peers run in their own virtual environment (never seglab's dependencies); it needs no pycocotools:
each row writes its predictions as arrays and the scorer, in seglab's venv, encodes them all alike.

    python3 -m venv /work/peers && /work/peers/bin/pip install ultralytics
    python benchmarks/peers_facade.py --budget 60 --peers-python /work/peers/bin/python [--rows ...]

Merges its rows into benchmarks/results/peers_facade_<budget>min.json (a row run again replaces its
old one; ``--seed N`` rows are their own rows, on seed N's hold-out) and prints a Markdown table: mask
AP, AP50 and AP75, box AP and AP50, minutes trained, epochs (fractional: images trained over the
train images), training images/s (the training loop only, validation excluded: peers.py counts it
in), and the median batch-1 latency of each tool's predict call, image read included: at the scoring
settings above (up to 100 masks an image), and again at conf 0.25, both tools' predict default (seglab's
box head back at its own 0.05 floor), the latency a user sees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data" / "facade_coco").resolve()
ANNOTATIONS = DATA / "train" / "_annotations.coco.json"
RECIPE = ROOT / "configs" / "facade_maskrcnn_lite0.yaml"
ROWS = ("yolo26n-seg", "seglab-maskrcnn-lite0")
VAL_FRACTION = 0.1  # seglab's default hold-out; the recipe does not set it, the row passes it
IMG_SIZE = 512  # the recipe's img_size and Ultralytics' imgsz; every facade image is 512x512
CONF = 0.001  # the lowest score either tool keeps: Ultralytics' val default
PREDICT_CONF = 0.25  # both tools' predict default: the latency a user sees
MAX_DET = 100  # COCO's maxDets


# --------------------------------------------------------------------------- the split (seglab's venv)


def holdout(seed: int) -> dict:
    """seglab's train/hold-out split of the facade data at ``seed`` and its class mapping.

    {"train": [COCO image ids], "test": [...], "classes": [the COCO category id of seglab's class k at k - 1],
    "names": [...]}: seglab's own reader and ``get_split``, the calls its trainer makes."""
    from seglab.data import get_split, resolve_dataset

    spec = resolve_dataset(DATA, task="instance", progress=False)
    train, test = (get_split(spec, s, val_fraction=VAL_FRACTION, seed=seed) for s in ("train", "val"))
    # seglab keeps each annotation's id and replaces its category id by its class index: the pairs give the mapping
    category = {a["id"]: a["category_id"] for a in json.loads(ANNOTATIONS.read_text())["annotations"]}
    index = {category[a["id"]]: a["category_id"] for s in train + test for a in s.annotations or []}
    if sorted(index.values()) != list(range(1, len(spec.classes))):
        raise SystemExit(f"{ANNOTATIONS}: seglab's classes {spec.classes} do not map one to one to categories {index}")
    return {
        "seed": seed,
        "val_fraction": VAL_FRACTION,
        "train": [s.coco_id for s in train],
        "test": [s.coco_id for s in test],
        "classes": [cid for cid, _ in sorted(index.items(), key=lambda kv: kv[1])],
        "names": spec.classes[1:],
    }


def write_yolo(split: dict, data: Path) -> Path:
    """Ultralytics' segment dataset of the split under ``data`` (images symlinked); its data.yaml."""
    coco = json.loads(ANNOTATIONS.read_text())
    images = {im["id"]: im for im in coco["images"]}
    yolo_class = {cid: k for k, cid in enumerate(split["classes"])}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for part, ids in (("train", split["train"]), ("val", split["test"])):
        for folder in ("images", "labels"):
            (data / folder / part).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            im = images[image_id]
            src = ANNOTATIONS.parent / im["file_name"]
            link = data / "images" / part / src.name
            if not link.exists():
                link.symlink_to(src)
            lines = []
            for ann in by_image.get(image_id, []):
                if ann.get("iscrowd"):
                    continue  # none in this export; seglab ignores crowd regions, Ultralytics has no such thing
                for polygon in ann["segmentation"]:  # a polygon list (every annotation here has one polygon)
                    xy = np.asarray(polygon, np.float64).reshape(-1, 2) / [im["width"], im["height"]]
                    points = " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).ravel())
                    lines.append(f"{yolo_class[ann['category_id']]} {points}")
            (data / "labels" / part / f"{src.stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    names = "".join(f"  {k}: {n}\n" for k, n in enumerate(split["names"]))
    (data / "facade.yaml").write_text(f"path: {data}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    (data / "split.json").write_text(json.dumps(split))
    check_round_trip(split, data, coco)
    return data / "facade.yaml"


def check_round_trip(split: dict, data: Path, coco: dict) -> None:
    """The YOLO labels read back: the same objects per class per split as the COCO JSON holds for those
    images, and each polygon's area (denormalised) the JSON polygon's; stops the run if not."""
    images = {im["id"]: im for im in coco["images"]}
    for part, ids in (("train", split["train"]), ("val", split["test"])):
        wanted = set(ids)
        truth = Counter(a["category_id"] for a in coco["annotations"] if a["image_id"] in wanted)
        truth_area = {}
        for a in coco["annotations"]:
            if a["image_id"] in wanted:
                truth_area.setdefault(a["image_id"], []).append(_shoelace(np.reshape(a["segmentation"][0], (-1, 2))))
        found: Counter[int] = Counter()
        worst = 0.0
        for image_id in ids:
            im = images[image_id]
            rows = (data / "labels" / part / f"{Path(im['file_name']).stem}.txt").read_text().split("\n")
            areas = []
            for row in filter(None, rows):
                k, *xy = row.split()
                found[split["classes"][int(k)]] += 1
                areas.append(_shoelace(np.reshape(np.float64(xy), (-1, 2)) * [im["width"], im["height"]]))
            for a, b in zip(areas, truth_area.get(image_id, []), strict=True):
                worst = max(worst, abs(a - b) / max(b, 1.0))
        if found != truth:
            raise SystemExit(f"{data / 'labels' / part}: objects per category {dict(found)}, the JSON {dict(truth)}")
        print(f"yolo labels {part}: {len(ids)} images, {sum(found.values())} objects, per category "
              f"{dict(sorted(found.items()))} as in the JSON; worst polygon area difference {100 * worst:.4f}%",
              flush=True)  # fmt: skip


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --------------------------------------------------------------------------- the scorer (seglab's venv)


def save_predictions(path: Path, boxes, categories, scores, masks) -> None:
    """One image's objects: boxes (N, 4) x1 y1 x2 y2 pixels, COCO category ids, scores, (N, H, W) bool masks."""
    masks = np.asarray(masks, bool)
    np.savez_compressed(path, boxes=np.asarray(boxes, np.float32).reshape(-1, 4), categories=np.asarray(categories,
                        np.int64), scores=np.asarray(scores, np.float32), shape=np.asarray(masks.shape),
                        masks=np.packbits(masks.ravel()))  # fmt: skip


def score(predictions: Path, split: dict) -> dict:
    """COCOeval segm and bbox of the saved predictions against the held-out images' JSON annotations."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = json.loads(ANNOTATIONS.read_text())
    test = set(split["test"])
    held = [a for a in coco["annotations"] if a["image_id"] in test and a["category_id"] in split["classes"]]
    gt = COCO()
    gt.dataset = {
        "images": [im for im in coco["images"] if im["id"] in test],
        # ids from 1: COCOeval takes a match to annotation id 0 (this export's first) for no match
        "annotations": [{**a, "id": i} for i, a in enumerate(held, start=1)],
        "categories": [c for c in coco["categories"] if c["id"] in split["classes"]],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = []
    for image_id in split["test"]:
        p = np.load(predictions / f"{image_id}.npz")
        masks = np.unpackbits(p["masks"], count=int(np.prod(p["shape"]))).reshape(p["shape"])
        h, w = gt.imgs[image_id]["height"], gt.imgs[image_id]["width"]
        if masks.shape[1:] != (h, w):
            raise SystemExit(f"{predictions / str(image_id)}.npz: masks {masks.shape[1:]}, the image {(h, w)}")
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        for (x1, y1, x2, y2), cid, s, rle in zip(p["boxes"].tolist(), p["categories"], p["scores"], rles, strict=True):
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": int(cid), "score": float(s), "segmentation": rle,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})  # fmt: skip
    out: dict = {"num_images": len(test), "num_objects": len(gt.dataset["annotations"])}
    for iou_type, kind in (("segm", "mask"), ("bbox", "box")):
        if not results:
            out[kind] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            continue
        # a mask result without its box: its area is the mask's, as COCO's small/medium/large want
        drop = "bbox" if iou_type == "segm" else "segmentation"
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results]), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[kind] = {name: 100 * float(v) for name, v in zip(("AP", "AP50", "AP75"), ev.stats[:3], strict=True)}
        names = dict(zip(split["classes"], split["names"], strict=True))
        precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall points, categories]
        out[kind]["per_class"] = {
            names[cid]: (100 * float(p[p > -1].mean()) if (p > -1).any() else None)
            for cid, p in zip(ev.params.catIds, np.moveaxis(precision, 2, 0), strict=True)
        }
    return out


# --------------------------------------------------------------------------- the Ultralytics row (peers' venv)


def row_dir(work: Path, row: str, budget: float, seed: int) -> Path:
    return work / (f"{row}_{budget:g}min" + (f"_seed{seed}" if seed else ""))


def ultralytics_row(model: str, budget: float, out: Path, seed: int, data: Path) -> dict:
    from ultralytics import YOLO

    split = json.loads((data / "split.json").read_text())
    seen = {"images": 0, "seconds": 0.0, "batches": 0, "t0": 0.0}

    def epoch_start(trainer) -> None:
        seen["batches"], seen["t0"] = 0, time.perf_counter()

    def batch_end(trainer) -> None:
        seen["batches"] += 1

    def epoch_end(trainer) -> None:  # after the last batch, before validation
        seen["seconds"] += time.perf_counter() - seen["t0"]
        seen["images"] += min(seen["batches"] * trainer.batch_size, len(trainer.train_loader.dataset))

    yolo = YOLO(f"{model}.yaml")
    for event, hook in (("on_train_epoch_start", epoch_start), ("on_train_batch_end", batch_end),
                        ("on_train_epoch_end", epoch_end)):  # fmt: skip
        yolo.add_callback(event, hook)
    start = time.perf_counter()
    yolo.train(data=str(data / "facade.yaml"), imgsz=IMG_SIZE, batch=8, device="cpu", pretrained=False,
               time=budget / 60, workers=2, seed=seed, project=str(out), name="train", exist_ok=True)  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    best = YOLO(str(out / "train" / "weights" / "best.pt"))

    def predict(path: Path, conf: float) -> tuple:
        r = best.predict(str(path), imgsz=IMG_SIZE, conf=conf, max_det=MAX_DET, retina_masks=True, device="cpu",
                         verbose=False)[0]  # fmt: skip
        masks = r.masks.data.cpu().numpy() > 0.5 if r.masks is not None else np.zeros((0, *r.orig_shape), bool)
        cids = [split["classes"][int(k)] for k in r.boxes.cls.tolist()]
        return r.boxes.xyxy.cpu().numpy(), cids, r.boxes.conf.cpu().numpy(), masks

    result = _predict(out, split, predict, minutes)
    epochs = seen["images"] / len(split["train"])
    return {**result, "epochs": round(epochs, 2), "train_images_per_s": seen["images"] / seen["seconds"]}


def _predict(out: Path, split: dict, predict, minutes: float) -> dict:
    """Every held-out image through ``predict`` (path, conf -> boxes, category ids, scores, masks) at CONF
    into out/predictions, then again at PREDICT_CONF; each pass's median batch-1 latency past the first 5 images."""
    coco = json.loads(ANNOTATIONS.read_text())
    files = {im["id"]: ANNOTATIONS.parent / im["file_name"] for im in coco["images"]}
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    latency = {}
    for key, conf in (("latency_ms", CONF), ("latency_conf25_ms", PREDICT_CONF)):
        times = []
        for image_id in split["test"]:
            start = time.perf_counter()
            found = predict(files[image_id], conf)
            times.append(time.perf_counter() - start)
            if conf == CONF:
                save_predictions(out / "predictions" / f"{image_id}.npz", *found)
        latency[key] = 1000 * float(np.median(times[5:] or times))
    return {"train_minutes": round(minutes, 1), **latency}


# --------------------------------------------------------------------------- the seglab row (its own venv)


def seglab_row(budget: float, out: Path, seed: int, split: dict) -> dict:
    run = out / "train"
    command = [sys.executable, "-m", "seglab", "train", "--config", str(RECIPE), "--data", str(DATA), "--time",
               str(budget), "--seed", str(seed), "--val-fraction", str(VAL_FRACTION), "--out", str(out), "--name",
               "train", "--exist-ok"]  # fmt: skip
    start = time.perf_counter()
    log = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # shown as it comes, kept for where the budget cut the last epoch
            print(line, end="", flush=True)
            log.append(line)
    if proc.returncode:
        raise SystemExit(f"seglab train exited with {proc.returncode}: {' '.join(command)}")
    trained = (time.perf_counter() - start) / 60
    import seglab
    from seglab.engine.checkpoint import load_checkpoint

    model = seglab.load(run / "weights" / "best.pt", device="cpu", amp=True)
    held = (model.config.get("val_fraction"), model.config.get("seed"))
    if held != (VAL_FRACTION, seed):
        raise SystemExit(f"{run}: trained with val_fraction, seed = {held}, not the split scored here")
    floor = model.model.roi_heads.score_thresh  # torchvision's box_score_thresh, 0.05: the model's own floor
    inverse = {k: cid for k, cid in enumerate(split["classes"], start=1)}

    def predict(path: Path, conf: float) -> tuple:
        # lowered for CONF only: torchvision runs the mask head on every box past its floor, kept or not
        model.model.roi_heads.score_thresh = min(floor, conf)
        inst = model.predict(path, conf=conf).instances
        return inst.boxes, [inverse[int(k)] for k in inst.labels], inst.scores, inst.masks

    result = _predict(out, split, predict, trained)
    last = load_checkpoint(run / "weights" / "last.pt")
    batch = int(last["config"]["batch"])
    steps_per_epoch = -(-len(split["train"]) // batch)
    epochs, steps = len(last["rows"]), last.get("planned_last_steps") or steps_per_epoch
    cut = re.findall(r"spent at epoch (\d+), step (\d+)", "".join(log))
    if cut:
        steps = int(cut[-1][1])
    done = (epochs - 1) + min(steps * batch, len(split["train"])) / len(split["train"])
    budget_state = last["time_budget"]  # each epoch's training seconds (as if whole), validation not in them
    per_epoch = sum(budget_state["train_s"]) / len(budget_state["train_s"])
    curve = [r.get("val_mask_ap") for r in last["rows"]]
    return {**result, "epochs": round(done, 2), "train_images_per_s": len(split["train"]) / per_epoch,
            "val_mask_ap_by_epoch": curve}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--budget", type=float, default=60, help="training minutes per row")
    parser.add_argument("--seed", type=int, default=0, help="every row's seed and seglab's hold-out's")
    parser.add_argument("--peers-python", default="/work/peers/bin/python", help="the venv with ultralytics")
    parser.add_argument("--work", default=str(ROOT / "runs" / "peers_facade"), help="runs, YOLO data, predictions")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the Ultralytics row, run by the peers' interpreter
    args = parser.parse_args()
    work = Path(args.work)
    data = work / (f"facade_yolo_seed{args.seed}")
    if args.worker:
        out = row_dir(work, args.worker, args.budget, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / "row.json").write_text(json.dumps(ultralytics_row(args.worker, args.budget, out, args.seed, data)))
        return

    split = holdout(args.seed)
    print(f"seglab's split at seed {args.seed}: {len(split['train'])} train, {len(split['test'])} held out", flush=True)
    path = ROOT / "benchmarks" / "results" / f"peers_facade_{args.budget:g}min.json"
    results = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for row in args.rows:
        key = row if not args.seed else f"{row} (seed {args.seed})"
        out = row_dir(work, row, args.budget, args.seed)
        print(f"== {key}, {args.budget:g} min", flush=True)
        if row.startswith("seglab"):
            measured = seglab_row(args.budget, out, args.seed, split)
        else:
            write_yolo(split, data)
            env = {**os.environ, "PYTHONPATH": ""}
            subprocess.run([args.peers_python, __file__, "--worker", row, "--budget", str(args.budget), "--seed",
                            str(args.seed), "--work", str(work)], check=True, cwd=ROOT, env=env)  # fmt: skip
            measured = json.loads((out / "row.json").read_text())
        results[key] = {**measured, **score(out / "predictions", split)}
        print(json.dumps({key: results[key]}), flush=True)

    print(f"\n| row ({args.budget:g} min) | mask AP | mask AP50 | mask AP75 | box AP | box AP50 | trained min | epochs "
          "| train img/s | latency b1 ms (conf 0.001 / 0.25) |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for row, r in results.items():
        m, b, ips = r["mask"], r["box"], r["train_images_per_s"]
        print(f"| {row} | {m['AP']:.2f} | {m['AP50']:.2f} | {m['AP75']:.2f} | {b['AP']:.2f} | {b['AP50']:.2f} "
              f"| {r['train_minutes']} | {r['epochs']} | {ips:.2f} | {r['latency_ms']:.0f} / "
              f"{r['latency_conf25_ms']:.0f} |")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).parent))
    from common import write_result

    write_result(path, budget_min=args.budget, split={k: split[k] for k in ("seed", "val_fraction", "test")},
                 rows=results)  # fmt: skip


if __name__ == "__main__":
    main()
