"""End to end on real facade images at a small size: train, resume, val, predict, the Python API,
and the one-line errors of the detector tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import seglab
from seglab.cli import main
from seglab.data import get_split, resolve_dataset

TRAIN = ["--img-size", "128", "--batch", "2", "--limit", "4", "--workers", "0", "--no-amp"]


@pytest.fixture(scope="module")
def facade(shared_data: Path) -> Path:
    return shared_data / "facade_coco"


@pytest.fixture(scope="module")
def instance_run(facade: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--task", "instance", "--data", str(facade), "--encoder", "efficientnet_lite0", "--epochs", "1"]
    assert main([*args, *TRAIN, "--seed", "5", "--out", str(out), "--name", "mask"]) == 0
    return out / "mask"


def test_train_writes_the_run_folder(instance_run: Path):
    names = {p.name for p in instance_run.iterdir()}
    assert names >= {"config.yaml", "metrics.csv", "curves.png", "weights"}
    # what a person looks at: the training images with their objects, val labels beside predictions,
    # AP per class, the confusion matrix (a background row and column), all of it in report.html
    pictures = {"train_batches.jpg", "val_predictions.jpg", "per_class.png", "confusion_matrix.png"}
    assert names >= {*pictures, "report.html"}
    report = (instance_run / "report.html").read_text()
    assert all(f'src="{p}"' in report for p in pictures) and "mask AP" in report and ">window<" in report
    assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard
    rows = list(csv.DictReader((instance_run / "metrics.csv").open()))
    assert len(rows) == 1
    assert float(rows[0]["loss_mask"]) > 0 and rows[0]["val_mask_ap"] != "" and rows[0]["val_box_ap"] != ""
    best = torch.load(instance_run / "weights" / "best.pt", weights_only=False)
    assert best["card"]["task"] == "instance" and best["card"]["arch"] == "maskrcnn"
    assert best["card"]["classes"][1:3] == ["balcony-fence", "car"]
    assert set(best["metrics"]) >= {"box", "mask"}


def test_resume_continues_the_run(instance_run: Path):
    assert main(["train", "--resume", str(instance_run / "weights" / "last.pt"), "--epochs", "2"]) == 0
    rows = list(csv.DictReader((instance_run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_val_writes_ap_and_coco_results_for_the_original_file(instance_run: Path, facade: Path, tmp_path: Path, capsys):
    from pycocotools.coco import COCO

    weights = instance_run / "weights" / "best.pt"
    assert main(["val", "--weights", str(weights), "--limit", "3", "--workers", "0", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mask AP" in printed and "window" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for kind in ("box", "mask"):
        assert set(metrics[kind]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
        assert 0 <= metrics[kind]["AP50"] <= 1
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results, "an untrained detector still proposes something at score >= 0.05"
    # scored on the images training held out (seed 5), not on another seed's hold-out
    spec = resolve_dataset(facade, task="instance")
    held_out = {s.coco_id for s in get_split(spec, "val", seed=5)[:3]}
    assert held_out != {s.coco_id for s in get_split(spec, "val", seed=0)[:3]}
    assert {r["image_id"] for r in results} <= held_out and metrics["num_images"] == 3
    # the results refer to the images of the user's own annotation file, and pycocotools accepts them
    gt = COCO(str(facade / "train" / "_annotations.coco.json"))
    dt = gt.loadRes(results)
    assert set(dt.getImgIds()) <= set(gt.getImgIds())
    # and the pictures of the 3 images scored, with report.html
    assert {"val_predictions.jpg", "per_class.png", "confusion_matrix.png", "report.html"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert "report.html" in printed.splitlines()[-1]


def test_predict_saves_overlays_masks_labels_and_coco_json(instance_run: Path, facade: Path, tmp_path: Path):
    images = sorted((facade / "train").glob("*.jpg"))[:2]
    src = tmp_path / "src"
    src.mkdir()
    for image in images:
        (src / image.name).symlink_to(image)
    out = tmp_path / "pred"
    weights = str(instance_run / "weights" / "best.pt")
    assert main(["predict", "--weights", weights, "--source", str(src), "--conf", "0", "--out", str(out)]) == 0
    for image in images:
        assert (out / "overlays" / f"{image.stem}.png").is_file()
        assert (out / "masks" / f"{image.stem}.png").is_file()
        objects = json.loads((out / "labels" / f"{image.stem}.json").read_text())
        assert all(set(o) >= {"class", "score", "box", "mask"} for o in objects)
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} <= {i.name for i in images}


def test_python_api_result(instance_run: Path, facade: Path):
    model = seglab.load(instance_run / "weights" / "best.pt")
    image = sorted((facade / "train").glob("*.jpg"))[0]
    r = model.predict(image, conf=0.0)
    inst = r.instances
    n = len(inst)
    assert n > 0 and inst.boxes.shape == (n, 4) and inst.masks.shape == (n, 512, 512)
    assert inst.scores.shape == (n,) and (np.diff(inst.scores) <= 0).all()  # best first
    assert inst.names[0] == model.classes[inst.labels[0]]
    drawn = r.plot()
    assert drawn.shape == (512, 512, 3) and drawn.dtype == np.uint8 and not np.array_equal(drawn, r.image)
    semantic = r.semantic()
    assert semantic.shape == (512, 512) and set(np.unique(semantic)) <= set(range(len(model.classes)))
    assert not len(model.predict(image, conf=1.0).instances)


def test_detect_task_trains_faster_rcnn(facade: Path, tmp_path: Path):
    args = ["train", "--task", "detect", "--data", str(facade), "--encoder", "mobilenet_v3_large", "--epochs", "1"]
    assert main([*args, *TRAIN, "--out", str(tmp_path), "--name", "boxes"]) == 0
    model = seglab.load(tmp_path / "boxes" / "weights" / "best.pt")
    assert model.task == "detect" and model.card.arch == "fasterrcnn"
    metrics = json.loads(
        json.dumps(torch.load(tmp_path / "boxes" / "weights" / "best.pt", weights_only=False)["metrics"])
    )
    assert "box" in metrics and "mask" not in metrics
    r = model.predict(sorted((facade / "train").glob("*.jpg"))[0], conf=0.0)
    assert r.instances.masks is None and r.plot().shape == (512, 512, 3)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--task", "instance", "--model", "unet"], "--task instance trains --model maskrcnn"),
        (["--task", "instance", "--encoder-weights", "coco"], "--encoder-weights coco"),
        (["--task", "instanse"], "did you mean 'instance'"),
        (["--task", "detect", "--encoder", "resnet5O"], "resnet5O"),
    ],
)
def test_bad_flags_are_one_line(facade: Path, tmp_path: Path, capsys, flags: list[str], says: str):
    extra = ["--encoder", "efficientnet_lite0"] if "--encoder" not in flags else []
    code = main(["train", "--data", str(facade), *flags, *extra, *TRAIN, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and says in err, err
    assert not any(tmp_path.iterdir()), "a rejected run writes nothing"


@pytest.mark.parametrize("command", [["prune"], ["quantize"]])  # export: tests/test_detector_export.py
def test_semantic_only_commands_refuse_a_detector(instance_run: Path, tmp_path: Path, capsys, command: list[str]):
    weights = instance_run / "weights" / "best.pt"
    out = tmp_path / ("x.onnx" if command[0] != "prune" else "x")
    assert main([command[0], "--weights", str(weights), *command[1:], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "semantic" in err and "maskrcnn" in err
    assert not out.exists()
