"""Detectors leave the lab: `seglab export` of Mask R-CNN / Faster R-CNN to ONNX and TorchScript,
checked against eager PyTorch on real facade images, and `seglab val` / `predict` running the export
(ONNX Runtime, TorchScript) with the checkpoint's outputs; exports that lie are one line, exit 2.

The models are untrained (random weights, 128 px): every image gets torchvision's 100 detections
at scores near 0.09, which is plenty to compare object by object."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seglab
from seglab.cli import main
from seglab.deploy.export import export
from seglab.instance.runtime import ExportedDetector
from test_hostile import in_process_error, one_line_error
from test_hostile import seglab as seglab_cli

TASKS = {"maskrcnn": "instance", "fasterrcnn": "detect"}


def random_detector(path: Path, arch: str, facade: Path, *, seed: int = 0) -> Path:
    """A Mask R-CNN / Faster R-CNN checkpoint (EfficientNet-Lite0 pyramid, 128 px) with random weights,
    the facade classes, and a config that names the facade data and its hold-out, as training writes."""
    from seglab.data import resolve_dataset
    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint

    task = TASKS[arch]
    spec = resolve_dataset(facade, progress=False, task=task)
    torch.manual_seed(seed)
    card = ModelCard(
        arch=arch,
        encoder="efficientnet_lite0",
        num_classes=spec.num_classes,
        in_channels=3,
        classes=spec.classes,
        colors=list(spec.colors),
        ignore_index=spec.ignore_index,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=128,
        crop_size=[128, 128],
        task=task,
    )
    config = {"task": task, "data": str(facade), "val_fraction": 0.1, "seed": 0}
    save_checkpoint(path, make_payload(card.build().eval(), card, config=config))
    return path


@pytest.fixture(scope="module")
def facade(shared_data: Path) -> Path:
    return shared_data / "facade_coco"


@pytest.fixture(scope="module")
def mask_onnx(facade: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a random Mask R-CNN checkpoint, its ONNX export), the export checked on 2 facade images."""
    root = tmp_path_factory.mktemp("mask")
    weights = random_detector(root / "mask.pt", "maskrcnn", facade)
    assert main(["export", "--weights", str(weights), "--format", "onnx", "--check-images", "2"]) == 0
    return weights, root / "mask.onnx"


@pytest.fixture(scope="module")
def images(facade: Path, tmp_path_factory) -> Path:
    """Two facade images of the held-out split, in a folder of their own."""
    from seglab.data import get_split, resolve_dataset

    folder = tmp_path_factory.mktemp("images")
    for sample in get_split(resolve_dataset(facade, progress=False, task="instance"), "val")[:2]:
        shutil.copy(sample.image, folder / Path(sample.image).name)
    return folder


# ------------------------------------------------------------------------------- export and its check


def test_onnx_export_matches_pytorch_on_facade_images(mask_onnx, facade):
    onnx_file = mask_onnx[1]
    parity = json.loads((onnx_file.parent / "mask.onnx.parity.json").read_text())
    assert parity["passed"] and parity["images"] == 2 and parity["source"] == "facade_coco images"
    assert parity["objects"] == 200 and parity["matched"] >= 196, parity  # 100 detections per image
    assert parity["max_box_diff"] <= 1.0 and parity["mask_iou"] >= 0.98, parity
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["mask.onnx", "mask.onnx.parity.json", "mask.pt"]
    model = ExportedDetector(onnx_file, device="cpu")  # the card travelled in the metadata
    assert model.card == seglab.load(mask_onnx[0], device="cpu").card and model.backend == "onnxruntime"
    assert model.config == {"data": str(facade), "val_fraction": 0.1, "seed": 0}  # what `seglab val` scores


def test_parity_check_fails_for_an_export_of_other_weights(mask_onnx, facade, tmp_path):
    """The check compares objects, not just that the file runs: another model's export fails it."""
    from seglab.engine.checkpoint import load_model
    from seglab.instance.export import _parity_images, check_detector_parity

    other = random_detector(tmp_path / "other.pt", "maskrcnn", facade, seed=1)
    model, card, ckpt = load_model(other)
    images, source = _parity_images(card, ckpt, None, 1)
    parity = check_detector_parity(model, card, mask_onnx[1], images, source)
    assert not parity.passed and parity.matched < 0.5 * parity.objects, parity.format()


def test_detector_export_refuses_what_it_cannot_do(mask_onnx, tmp_path, capsys):
    weights = mask_onnx[0]
    pt2 = in_process_error(
        capsys, "export", "--weights", weights, "--format", "torch-export", "--out", tmp_path / "m.pt2"
    )
    assert "onnx or torchscript" in pt2 and "maskrcnn" in pt2
    half = in_process_error(
        capsys, "export", "--weights", weights, "--format", "onnx", "--half", "--out", tmp_path / "m.onnx"
    )
    assert "--half" in half and "semantic" in half
    int8 = in_process_error(capsys, "quantize", "--weights", mask_onnx[1], "--out", tmp_path / "m.int8.onnx")
    assert "int8" in int8 and "maskrcnn" in int8
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- val and predict run the export


def test_val_on_the_onnx_gives_the_checkpoints_detections(mask_onnx, tmp_path):
    weights, onnx_file = mask_onnx
    results = {}
    for name, file in (("pt", weights), ("onnx", onnx_file)):
        out = tmp_path / name
        assert main(["val", "--weights", str(file), "--limit", "2", "--workers", "0", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = json.loads((out / "predictions.json").read_text()), metrics
    (pt, pt_metrics), (ort, ort_metrics) = results["pt"], results["onnx"]
    assert pt_metrics["num_images"] == ort_metrics["num_images"] == 2  # the same held-out images
    assert len(pt) == len(ort) == 200
    assert [r["image_id"] for r in pt] == [r["image_id"] for r in ort]
    boxes = [np.array([r["bbox"] for r in results]) for results in (pt, ort)]
    assert np.abs(boxes[0] - boxes[1]).max() <= 0.05
    same_masks = sum(p["segmentation"] == o["segmentation"] for p, o in zip(pt, ort, strict=True))
    assert same_masks >= 0.7 * len(pt)  # the rest differ by a pixel or so at the 0.5 edge
    for kind in ("box", "mask"):
        assert abs(pt_metrics[kind]["AP50"] - ort_metrics[kind]["AP50"]) <= 0.005


def test_predict_on_the_onnx_writes_the_checkpoints_files(mask_onnx, images, tmp_path):
    weights, onnx_file = mask_onnx
    for name, file in (("pt", weights), ("onnx", onnx_file)):
        args = ["predict", "--weights", str(file), "--source", str(images), "--conf", "0.05"]
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    files = {
        name: sorted(str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).rglob("*.*"))
        for name in ("pt", "onnx")
    }
    assert files["pt"] == files["onnx"] and len(files["pt"]) == 7  # 2 x (overlay, mask, labels) + predictions.json
    for label_file in (tmp_path / "pt" / "labels").iterdir():
        pt, ort = (json.loads((tmp_path / n / "labels" / label_file.name).read_text()) for n in ("pt", "onnx"))
        assert [o["class"] for o in pt] == [o["class"] for o in ort] and len(pt) == 100
        assert np.abs(np.array([o["box"] for o in pt]) - np.array([o["box"] for o in ort])).max() <= 0.05
    for mask_file in (tmp_path / "pt" / "masks").iterdir():
        pt_ids, ort_ids = (np.array(Image.open(tmp_path / n / "masks" / mask_file.name)) for n in ("pt", "onnx"))
        assert (pt_ids == ort_ids).mean() > 0.99


def test_exported_detector_predicts_what_the_checkpoint_does(mask_onnx, images):
    weights, onnx_file = mask_onnx
    image = sorted(images.iterdir())[0]
    expected = seglab.load(weights, device="cpu").predict(image, conf=0.05)
    loaded = seglab.load(onnx_file, device="cpu")  # seglab.load asks the card's task for its export predictor
    assert isinstance(loaded, ExportedDetector) and loaded.backend == "onnxruntime"
    got = loaded.predict(image, conf=0.05)
    assert type(got) is type(expected) and got.classes == expected.classes and got.colors == expected.colors
    assert got.instances.names == expected.instances.names
    assert np.abs(got.instances.boxes - expected.instances.boxes).max() < 0.01
    assert np.abs(got.instances.scores - expected.instances.scores).max() < 1e-4
    assert (got.instances.masks == expected.instances.masks).mean() > 0.999


def test_serve_runs_the_onnx_and_answers_the_checkpoints_objects(mask_onnx, images, tmp_path):
    """`seglab serve --weights detector.onnx`: ONNX Runtime behind the server, JSON objects as the
    checkpoint finds them, and the drawn PNG."""
    from test_serve import png_bytes, start_server, stop_server
    from test_serve_detector import decode_mask

    weights, onnx_file = mask_onnx
    photo = np.asarray(Image.open(sorted(images.iterdir())[0]).convert("RGB"))
    server = start_server(onnx_file, tmp_path / "serve.log")
    try:
        model = server.request("GET", "/model").json()
        answer = server.predict(png_bytes(photo), "?format=json&conf=0.05")
        drawn = server.predict(png_bytes(photo), "?conf=0.05")
    finally:
        stop_server(server)
    assert (model["task"], model["arch"]) == ("instance", "maskrcnn")
    assert answer.status == 200 and drawn.status == 200, answer.body[:300]
    assert drawn.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(drawn.body)).size == photo.shape[1::-1]
    got = answer.json()["instances"]
    expected = seglab.load(weights, device="cpu").predict(photo, conf=0.05).objects()
    assert len(got) == len(expected) == 100
    assert [o["class"] for o in got] == [o["class"] for o in expected]
    assert np.abs(np.array([o["box"] for o in got]) - np.array([o["box"] for o in expected])).max() <= 0.05
    assert np.abs(np.array([o["score"] for o in got]) - np.array([o["score"] for o in expected])).max() < 1e-4
    agree = [(decode_mask(a["mask"]) == decode_mask(b["mask"])).mean() for a, b in zip(got, expected, strict=True)]
    assert min(agree) > 0.99


# ------------------------------------------------------------------- exports that lie are refused


def with_card(onnx_file: Path, target: Path, change) -> Path:
    """A copy of ``onnx_file`` whose seglab metadata went through ``change(meta) -> meta or text``."""
    import onnx

    proto = onnx.load(str(onnx_file))
    entry = next(p for p in proto.metadata_props if p.key == "seglab")
    changed = change(json.loads(entry.value))
    entry.value = changed if isinstance(changed, str) else json.dumps(changed)
    onnx.save(proto, str(target))
    return target


def fewer_classes(meta: dict) -> dict:
    card = meta["card"]
    card.update(num_classes=3, classes=card["classes"][:3], colors=card["colors"][:3])
    return meta


def boxes_only(meta: dict) -> dict:
    meta["card"].update(task="detect", arch="fasterrcnn")
    return meta


def semantic_shape(meta: dict) -> dict:
    meta["input_shape"] = [1, 3, "height", "width"]
    return meta


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda meta: "{not json", "not valid JSON"),
        (fewer_classes, "labels"),  # the graph's labels reach past the classes the card lists
        (boxes_only, "gives boxes, labels, scores, masks"),  # a Mask R-CNN graph under a Faster R-CNN card
        (semantic_shape, "input_shape"),
    ],
)
def test_an_onnx_whose_card_lies_is_refused_in_one_line(mask_onnx, images, tmp_path, capsys, change, says):
    hostile = with_card(mask_onnx[1], tmp_path / "hostile.onnx", change)
    args = ["--weights", hostile, "--out", tmp_path / "out"]
    message = in_process_error(capsys, "predict", *args, "--source", images, "--conf", "0.05")
    assert "hostile.onnx" in message and says in message, message
    assert not (tmp_path / "out").exists()


def test_a_hostile_onnx_exits_2_from_the_command_line(mask_onnx, tmp_path):
    hostile = with_card(mask_onnx[1], tmp_path / "hostile.onnx", semantic_shape)
    one_line_error(
        seglab_cli("val", "--weights", hostile, "--limit", "1", "--workers", "0", cwd=tmp_path), "hostile.onnx"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.onnx"], "nothing written"


# ------------------------------------------------------------- the other formats and Faster R-CNN


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, fmt", [("maskrcnn", "torchscript"), ("fasterrcnn", "onnx"), ("fasterrcnn", "torchscript")]
)
def test_every_detector_exports_to_both_formats_and_runs(facade, images, tmp_path, arch, fmt):
    weights = random_detector(tmp_path / f"{arch}.pt", arch, facade)
    result = export(weights, format=fmt, check_images=2)
    assert result.parity.passed and result.parity.matched >= 0.98 * result.parity.objects > 0
    assert result.parity.max_box_diff <= 1.0
    assert (result.parity.mask_iou is None) == (arch == "fasterrcnn")
    image = sorted(images.iterdir())[0]
    expected = seglab.load(weights, device="cpu").predict(image, conf=0.05)
    model = ExportedDetector(result.path, device="cpu")
    assert model.backend == {"onnx": "onnxruntime"}.get(fmt, fmt)
    got = model.predict(image, conf=0.05)
    assert got.instances.names == expected.instances.names
    assert np.abs(got.instances.boxes - expected.instances.boxes).max() < 0.01
    assert (got.instances.masks is None) == (arch == "fasterrcnn")
    out = tmp_path / "val"
    assert main(["val", "--weights", str(result.path), "--limit", "1", "--workers", "0", "--out", str(out)]) == 0
    assert len(json.loads((out / "predictions.json").read_text())) == 100


@pytest.mark.slow
def test_an_export_that_fails_its_check_writes_nothing(mask_onnx, tmp_path, monkeypatch, capsys):
    """The parity verdict decides: with a tolerance nothing meets, the export is refused and removed."""
    import seglab.instance.export as detector_export

    monkeypatch.setattr(detector_export, "TOLERANCE", (1.0, -1.0, 1.0))  # no box can be within -1 px
    out = tmp_path / "m.onnx"
    message = in_process_error(
        capsys, "export", "--weights", mask_onnx[0], "--format", "onnx", "--check-images", "1", "--out", out
    )
    assert "does not reproduce the model" in message and "FAILED" in message
    assert not any(tmp_path.iterdir()), "no file, no temporary left behind"
