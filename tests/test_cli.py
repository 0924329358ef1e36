"""The real command line, in subprocesses, on real CamVid images and on generated data."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data.synthetic import make_shapes_dataset


def seglab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seglab", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one line on stderr starting 'seglab: error:', no traceback, naming what is wrong."""
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("seglab: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=6, size=48, seed=1)


@pytest.fixture
def broken_copy(tmp_path, shapes):
    """A copy of the shapes dataset that a test may damage."""
    import shutil

    return Path(shutil.copytree(shapes, tmp_path / "broken"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes) -> Path:
    """One tiny run, shared by the tests that need weights."""
    work = tmp_path_factory.mktemp("run")
    proc = seglab(
        "train",
        "--data",
        shapes,
        "--model",
        "unet",
        "--encoder",
        "resnet18",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--img-size",
        "48",
        "--workers",
        "0",
        "--name",
        "tiny",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    return work / "runs" / "train" / "tiny" / "weights" / "best.pt"


def test_end_to_end_on_camvid(tmp_path, shared_data):
    """train 1 epoch on 8 CamVid images at a small size, then val and predict, through the CLI."""
    camvid = shared_data / "camvid"
    proc = seglab(
        "train",
        "--data",
        camvid,
        "--model",
        "lraspp",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--img-size",
        "96",
        "--limit",
        "8",
        "--workers",
        "0",
        "--amp",
        "--name",
        "e2e",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "train" / "e2e"
    for name in ("weights/best.pt", "weights/last.pt", "config.yaml", "metrics.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 1 and {"epoch", "train_loss", "val_loss", "val_miou", "lr"} <= set(rows[0])
    assert 0 <= float(rows[0]["val_miou"]) <= 1

    proc = seglab("val", "--weights", run / "weights/best.pt", "--limit", "4", "--workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Sky" in proc.stdout and "mIoU" in proc.stdout
    metrics = json.loads((tmp_path / "runs/val/exp/metrics.json").read_text())
    assert {"miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "per_class"} <= set(metrics)
    assert set(metrics["per_class"]) == {
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    }
    assert (tmp_path / "runs/val/exp/confusion_matrix.png").is_file()

    image = camvid / "val" / sorted(p.name for p in (camvid / "val").iterdir())[0]
    proc = seglab("predict", "--weights", run / "weights/best.pt", "--source", image, "--save-conf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]  # one line per image: name, size, the classes it covers most, time
    assert re.fullmatch(rf"{image.name} 480x360: ([\w-]+ \d+%, ){{0,2}}[\w-]+ \d+%, \d+ ms", line), line
    mask = Image.open(tmp_path / "runs/predict/exp/masks" / f"{image.stem}.png")
    assert mask.mode == "P" and mask.size == (480, 360)
    assert np.asarray(mask).max() <= 10
    assert (tmp_path / "runs/predict/exp/overlays" / f"{image.stem}.jpg").is_file()
    assert (tmp_path / "runs/predict/exp/confidence" / f"{image.stem}.png").is_file()


def test_config_file_and_flags_share_one_schema(tmp_path, shapes):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {shapes}\nmodel: fcn\nepochs: 1\nbatch: 4\nimg_size: 48\nworkers: 0\n")
    proc = seglab("train", "--config", cfg, "--name", "fromyaml", "--lr", "0.002", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import yaml

    resolved = yaml.safe_load((tmp_path / "runs/train/fromyaml/config.yaml").read_text())
    assert resolved["model"] == "fcn" and resolved["lr"] == 0.002 and resolved["img_size"] == 48


def test_predict_folder_and_python_api(tmp_path, trained, shapes):
    import seglab as sl

    proc = seglab("predict", "--weights", trained, "--source", shapes / "images" / "val", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "runs/predict/exp/masks").glob("*.png"))) == 6
    proc = seglab("predict", "--weights", trained, "--source", shapes / "images" / "val", "--out", "mine", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "mine/masks").glob("*.png"))) == 6  # --out DIR is used as given

    model = sl.load(trained)
    first = sorted((shapes / "images" / "val").glob("*.png"))[0]
    r = model.predict(first)
    cli_mask = np.asarray(Image.open(tmp_path / "runs/predict/exp/masks" / f"{first.stem}.png"))
    assert np.array_equal(r.mask, cli_mask)  # the CLI and the API share one code path
    assert r.overlay().shape == (*r.mask.shape, 3)
    saved = r.save(tmp_path / "api")
    assert saved["mask"].is_file() and saved["overlay"].is_file()
    plain = model.evaluate(shapes, split="val", workers=0, progress=False).metrics
    assert 0 <= plain["miou"] <= 1
    proc = seglab("val", "--weights", trained, "--tta", "--slide", "--workers", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tta = json.loads((tmp_path / "runs/val/exp/metrics.json").read_text())
    assert tta["num_pixels"] == plain["num_pixels"]  # the same pixels scored, by another inference path


def test_resume_continues_to_identical_weights(tmp_path, shapes):
    """Two epochs straight, and one epoch then --resume, end with the same weights and rows."""
    import shutil

    common = [
        "--data",
        shapes,
        "--model",
        "unet",
        "--epochs",
        "2",
        "--batch",
        "4",
        "--img-size",
        "48",
        "--workers",
        "0",
        "--save-period",
        "1",
        "--seed",
        "3",
    ]
    assert seglab("train", *common, "--name", "straight", cwd=tmp_path).returncode == 0
    straight = tmp_path / "runs/train/straight"
    # A run that stopped after epoch 1: its config, its epoch-1 checkpoint and its first metrics row.
    stopped = tmp_path / "runs/train/stopped"
    (stopped / "weights").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", stopped / "config.yaml")
    shutil.copy(straight / "weights/epoch1.pt", stopped / "weights/last.pt")
    lines = (straight / "metrics.csv").read_text().splitlines()
    (stopped / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")

    proc = seglab("train", "--resume", stopped / "weights/last.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resume" in proc.stdout
    a = torch.load(straight / "weights/last.pt", weights_only=False)
    b = torch.load(stopped / "weights/last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows_a = list(csv.DictReader((straight / "metrics.csv").open()))
    rows_b = list(csv.DictReader((stopped / "metrics.csv").open()))
    assert [r["val_miou"] for r in rows_a] == [r["val_miou"] for r in rows_b]


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_missing_data_path(tmp_path):
    assert_user_error(seglab("train", "--data", tmp_path / "nope", cwd=tmp_path), "nope")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(seglab("train", "--data", tmp_path / "empty", cwd=tmp_path), "empty")


def test_unknown_model_suggests(tmp_path, shapes):
    assert_user_error(seglab("train", "--data", shapes, "--model", "unett", cwd=tmp_path), "unett", "unet")


def test_unknown_encoder_suggests(tmp_path, shapes):
    assert_user_error(seglab("train", "--data", shapes, "--encoder", "resnet19", cwd=tmp_path), "resnet19")


def test_misspelt_flag_suggests(tmp_path, shapes):
    assert_user_error(seglab("train", "--data", shapes, "--epoch", "3", cwd=tmp_path), "--epoch", "--epochs")


def test_wrong_flag_type(tmp_path, shapes):
    assert_user_error(seglab("train", "--data", shapes, "--epochs", "many", cwd=tmp_path), "--epochs", "many")


def test_help_and_flag_errors_do_not_wait_for_torch():
    # Building the parser (every command's flags, gen's included) and failing on a flag must not
    # import torch: it costs seconds on every `--help` and every typo.
    code = (
        "import sys\n"
        "from seglab.cli import main\n"
        "assert main(['gen', 'train', '--epochs', 'many']) == 2\n"
        "assert main(['train', '--epoch', '3']) == 2\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'albumentations') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("seglab: error:") == 2, proc.stderr


def test_unknown_config_key_suggests(tmp_path, shapes):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"data: {shapes}\nlearning_rate: 0.1\n")
    assert_user_error(seglab("train", "--config", cfg, cwd=tmp_path), "learning_rate", "bad.yaml")


def test_config_wrong_type(tmp_path, shapes):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"data: {shapes}\nepochs: [1, 2]\n")
    assert_user_error(seglab("train", "--config", cfg, cwd=tmp_path), "epochs")


def test_unreadable_image_in_training_is_skipped_and_named_or_fatal_with_strict_data(tmp_path, broken_copy):
    broken = broken_copy
    train_victim = sorted((broken / "images" / "train").glob("*.png"))[0]
    train_victim.write_bytes(b"not a png at all")
    val_victim = sorted((broken / "masks" / "val").glob("*.png"))[0]
    val_victim.write_bytes(val_victim.read_bytes()[:60])  # truncated
    args = ["train", "--data", broken, "--epochs", "1", "--batch", "4", "--img-size", "48", "--workers", "2"]
    proc = seglab(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped (train): cannot read image {train_victim}" in proc.stdout
    assert f"skipped (val): cannot read mask {val_victim}: the file is truncated" in proc.stdout
    assert "1 train / 1 val unreadable images skipped" in proc.stdout
    assert_user_error(seglab(*args, "--strict-data", cwd=tmp_path), train_victim.name)


def test_image_and_mask_of_different_sizes(tmp_path, broken_copy):
    victim = sorted((broken_copy / "masks" / "train").glob("*.png"))[0]
    Image.open(victim).crop((0, 0, 40, 30)).save(victim)
    args = ["train", "--data", broken_copy, "--epochs", "1", "--batch", "4", "--img-size", "48", "--workers", "0"]
    assert_user_error(seglab(*args, "--strict-data", cwd=tmp_path), victim.name, "same size")
    proc = seglab(*args, cwd=tmp_path)
    assert proc.returncode == 0 and "48x48 but its mask" in proc.stdout, proc.stdout + proc.stderr


def test_label_out_of_range_in_training(tmp_path, broken_copy):
    broken = broken_copy
    victim = sorted((broken / "masks" / "train").glob("*.png"))[0]
    mask = np.asarray(Image.open(victim)).copy()
    mask[:4, :4] = 9  # the shapes dataset has fewer classes than 9
    Image.fromarray(mask).save(victim)
    proc = seglab(
        "train",
        "--data",
        broken,
        "--epochs",
        "1",
        "--batch",
        "4",
        "--img-size",
        "48",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert_user_error(proc, victim.name, "9")


def test_weights_not_a_checkpoint(tmp_path, shapes):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"\x00" * 100)
    assert_user_error(seglab("val", "--weights", fake, "--data", shapes, cwd=tmp_path), "fake.pt")


def test_truncated_checkpoint(tmp_path, trained, shapes):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[:5000])
    assert_user_error(
        seglab("predict", "--weights", cut, "--source", shapes / "images" / "val", cwd=tmp_path), "cut.pt"
    )
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_weights_from_another_model(tmp_path, trained, shapes):
    ckpt = torch.load(trained, weights_only=False)
    card = ckpt["card"]  # a card that is consistent in itself, for 3 classes more than the weights have
    card.update(num_classes=card["num_classes"] + 3, classes=[*card["classes"], "x", "y", "z"])
    card.update(colors=[*card["colors"], (1, 2, 3), (4, 5, 6), (7, 8, 9)])
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    assert_user_error(seglab("val", "--weights", other, "--data", shapes, cwd=tmp_path), "other.pt", "do not match")


def test_val_on_data_with_other_classes(tmp_path, trained, shared_data):
    assert_user_error(seglab("val", "--weights", trained, "--data", shared_data / "camvid", cwd=tmp_path), "classes")


def test_batched_prediction_equals_one_at_a_time(tmp_path, trained, shapes):
    import seglab as sl

    model = sl.load(trained)
    paths = sorted((shapes / "images" / "val").glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images[2] = images[2][:40, :30]  # a different size in the middle: that batch runs image by image
    one = [r.mask for r in model.predict(images)]
    for batch in (2, 4):
        batched = model.predict(images, batch=batch)
        assert len(batched) == len(images)
        for a, b in zip(one, batched, strict=True):
            assert a.shape == b.mask.shape
            assert (a == b.mask).mean() > 0.999  # batched convolutions may round differently
    proc = seglab("predict", "--weights", trained, "--source", paths[0].parent, "--batch", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "runs/predict/exp/masks").glob("*.png"))) == len(paths)
    assert_user_error(
        seglab("predict", "--weights", trained, "--source", paths[0], "--batch", "0", cwd=tmp_path), "--batch"
    )


def test_the_fast_path_predicts_what_float32_predicts(trained, shapes):
    import seglab as sl

    exact, fast = sl.load(trained, device="cpu"), sl.load(trained, device="cpu", amp=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())  # folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.model.modules())
    paths = sorted((shapes / "images" / "val").glob("*.png"))
    for a, b in zip(exact.predict(paths, save_conf=True), fast.predict(paths, batch=3), strict=True):
        assert (a.mask == b.mask).mean() > 0.98
        assert a.confidence is not None and b.confidence is None  # no softmax unless asked
    m_exact = exact.evaluate(shapes, workers=0, progress=False).metrics["miou"]
    m_fast = fast.evaluate(shapes, workers=0, progress=False).metrics["miou"]
    assert abs(m_exact - m_fast) < 0.02


def test_predict_missing_source(tmp_path, trained):
    assert_user_error(
        seglab("predict", "--weights", trained, "--source", tmp_path / "none.png", cwd=tmp_path), "none.png"
    )
    assert not (tmp_path / "runs").exists()


def test_data_check_exit_status(tmp_path, shapes, broken_copy):
    proc = seglab("data", "check", shapes, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = broken_copy
    victim = sorted((broken / "masks" / "val").glob("*.png"))[0]
    victim.unlink()
    proc = seglab("data", "check", broken, cwd=tmp_path)
    assert proc.returncode == 2
    assert victim.stem in proc.stdout


def test_models_lists_every_architecture(tmp_path):
    proc = seglab("models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in (
        "fcn",
        "unet",
        "segnet",
        "deeplabv3",
        "deeplabv3plus",
        "lraspp",
        "resnet18",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_lite0",
    ):
        assert name in proc.stdout, name


def test_resume_refuses_changed_settings(tmp_path, trained):
    last = trained.parent / "last.pt"
    assert_user_error(seglab("train", "--resume", last, "--lr", "0.5", cwd=tmp_path), "--lr", "--epochs")
    assert_user_error(seglab("train", "--resume", trained, cwd=tmp_path), "best.pt", "last.pt")


def test_read_only_output_folder(tmp_path, trained, shapes):
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses new folders even to root
        out = Path("/sys/seglab-out")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    proc = seglab("predict", "--weights", trained, "--source", shapes / "images" / "val", "--out", out, cwd=tmp_path)
    assert_user_error(proc, "cannot write", "--out")


def test_output_folder_is_a_file(tmp_path, trained, shapes):
    (tmp_path / "taken").write_text("a file, not a folder")
    proc = seglab(
        "predict",
        "--weights",
        trained,
        "--source",
        shapes / "images" / "val",
        "--out",
        tmp_path / "taken",
        cwd=tmp_path,
    )
    assert_user_error(proc, "cannot write", "taken")


@pytest.fixture
def full_folder(tmp_path):
    """A 4 KiB tmpfs: the first file fills it."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_output_folder(tmp_path, trained, shapes, full_folder):
    proc = seglab(
        "predict", "--weights", trained, "--source", shapes / "images" / "val", "--out", full_folder, cwd=tmp_path
    )
    assert_user_error(proc, "No space left on device", "free some space")
    leftovers = [p for p in full_folder.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []  # no half-written temporary files
