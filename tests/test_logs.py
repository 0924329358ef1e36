"""What a person reads during and after a run (issue 16): the log without a terminal, one wording
for amp, one name for the score threshold and one for confidence maps, `data check --data`, the
key=value hint, `--version`, and predict's line per image."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seglab.data.synthetic import make_shapes_dataset
from test_hostile import one_line_error

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
TIME = r"(\d+h\d\dm|\d+m\d\ds|\d+s)"


def seglab(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m seglab ...` with stdout and stderr to pipes: not a terminal, as under nohup or CI."""
    return subprocess.run(
        [sys.executable, "-m", "seglab", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=4, size=40, seed=1)


@pytest.fixture(scope="module")
def weights(shapes: Path, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("run")
    proc = seglab("train", "--data", shapes, "--model", "fcn", "--img-size", "40", "--epochs", "1", "--batch", "4",
                  "--workers", "0", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return cwd / "runs/train/exp/weights/best.pt"


# ---------------------------------------------------------------------------------------------- 1. the log


def test_without_a_terminal_the_log_has_timestamped_step_lines_and_a_line_every_epoch(shapes, tmp_path):
    proc = seglab("train", "--data", shapes, "--model", "fcn", "--img-size", "40", "--epochs", "3", "--batch", "2",
                  "--workers", "0", "--val-interval", "2", "--log-interval", "3", "--log-seconds", "0",
                  cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    step = re.compile(
        rf"{STAMP} epoch (\d)/3 step (\d+)/8: train loss \d+\.\d{{4}}, lr \d\.\d\de-\d\d, \d+\.\d img/s, "
        rf"ETA epoch {TIME}, run {TIME}"
    )
    steps = [(int(m[1]), int(m[2])) for m in map(step.fullmatch, lines) if m]
    assert steps == [(e, s) for e in (1, 2, 3) for s in (3, 6)], lines  # every 3rd of 8 steps, per epoch
    epochs = [line for line in lines if re.match(r"epoch \d/3: ", line)]
    assert len(epochs) == 3, lines  # epoch 1 did not validate and still has its line
    assert re.fullmatch(r"epoch 1/3: train loss \d+\.\d{4} \(\d+\.\d s; val at epoch 2\)", epochs[0]), epochs[0]
    assert "val mIoU" in epochs[1] and "val mIoU" in epochs[2]
    assert any("amp off" in line for line in lines[:4]), lines[:4]


def test_log_interval_0_and_log_seconds_0_leave_only_the_epoch_lines(shapes, tmp_path):
    proc = seglab("train", "--data", shapes, "--model", "fcn", "--img-size", "40", "--epochs", "1", "--batch", "2",
                  "--workers", "0", "--log-interval", "0", "--log-seconds", "0", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not re.search(rf"^{STAMP} epoch", proc.stdout, re.M) and "epoch 1/1: " in proc.stdout


@pytest.mark.parametrize("task", ["semantic", "instance", "generate"])
def test_every_task_says_amp_the_same_way(task, shapes, tmp_path, shared_data):
    """The start line said `amp on` for detectors and `amp bfloat16` for semantic models."""
    from seglab.config import load_train_config
    from seglab.engine.trainer import Trainer
    from seglab.gen.trainer import load_gen_config
    from seglab.tasks import get_task

    common = dict(data=str(shapes), epochs=1, batch=2, workers=0, amp=True, out=str(tmp_path), device="cpu")
    if task == "generate":
        cfg, _ = load_gen_config(model="vae", img_size=32, width=8, z_dim=8, **common)
    elif task == "instance":
        facade = str(shared_data / "facade_coco")
        cfg = load_train_config(
            **{**common, "data": facade}, task=task, img_size=64, encoder="efficientnet_lite0", limit=4
        )
    else:
        cfg = load_train_config(**common, model="fcn", img_size=40)
    summary = Trainer(cfg, get_task(task), progress=False, log=lambda *a: None).task.summary()
    from seglab.engine.inference import cpu_has_bfloat16

    said = "amp bfloat16" if cpu_has_bfloat16() else "amp off: this CPU has no bfloat16 instructions"
    assert said in summary and "amp on" not in summary, summary


def test_amp_on_a_cpu_without_bfloat16_instructions_is_float32_unless_a_precision_is_named():
    """bfloat16 autocast on an AVX2 CPU was 10-14x slower than float32 (emulated kernels)."""
    from seglab.engine.inference import amp_on, autocast, cpu_has_bfloat16

    cpu = torch.device("cpu")
    assert amp_on(cpu, True) is cpu_has_bfloat16()
    assert amp_on(cpu, True, "bfloat16") and not amp_on(cpu, False, "bfloat16")
    assert amp_on(torch.device("cuda"), True)  # CUDA autocasts whatever the CPU
    with autocast(cpu, True):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if cpu_has_bfloat16() else torch.float32)
    with autocast(cpu, True, "bfloat16"):
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- 2. names


def test_conf_is_the_detectors_threshold_and_save_conf_saves_confidence_maps(weights, shapes, tmp_path):
    image = next((shapes / "images" / "val").iterdir())
    refused = seglab("predict", "--weights", weights, "--source", image, "--conf", "0.3", cwd=tmp_path)
    one_line_error(refused, "--conf is a detector's score threshold", "--save-conf")
    bare = seglab("predict", "--weights", weights, "--source", image, "--conf", cwd=tmp_path)
    one_line_error(bare, "--conf", "e.g. --conf 0.25", "--save-conf saves confidence maps")
    saved = seglab(
        "predict", "--weights", weights, "--source", image, "--save-conf", "--out", tmp_path / "p", cwd=tmp_path
    )
    assert saved.returncode == 0, saved.stderr
    assert (tmp_path / "p" / "confidence" / f"{image.stem}.png").is_file()

    import seglab as api

    result = api.load(weights).predict(image, save_conf=True)
    assert result.confidence is not None and result.confidence.shape == result.mask.shape
    assert set(result.save(tmp_path / "api", save_conf=True)) == {"mask", "overlay", "confidence"}


def test_data_check_takes_path_or_data_and_key_value_gets_the_flag_form(shapes, tmp_path):
    positional = seglab("data", "check", shapes, cwd=tmp_path)
    flag = seglab("data", "check", "--data", shapes, cwd=tmp_path)
    assert positional.returncode == flag.returncode == 0, flag.stderr
    same = [re.sub(r"checked in \d+\.\d s", "", p.stdout) for p in (positional, flag)]  # the time may differ
    assert same[0] == same[1] and "train" in flag.stdout
    one_line_error(seglab("data", "check", cwd=tmp_path), "data check PATH (or --data PATH)")
    one_line_error(seglab("data", "check", shapes, "--data", tmp_path, cwd=tmp_path), "give the dataset once")
    one_line_error(seglab("train", f"data={shapes}", cwd=tmp_path), f"seglab takes --data {shapes}")
    one_line_error(seglab("train", "img_size=64", cwd=tmp_path), "seglab takes --img-size 64")


def test_version():
    from seglab import __version__

    proc = subprocess.run([sys.executable, "-m", "seglab", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"seglab {__version__}"


# ---------------------------------------------------------------------------------------------- 3. predict lines


def test_predict_prints_a_line_per_image_and_a_summary(weights, shapes, tmp_path):
    proc = seglab(
        "predict", "--weights", weights, "--source", shapes / "images" / "val", "--out", tmp_path, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = sorted(p.name for p in (shapes / "images" / "val").iterdir())
    per_image = [re.fullmatch(r"(\S+) 40x40: ((\w+ \d+%, ){0,2}\w+ \d+%), (\d+) ms", line) for line in lines[:4]]
    assert all(per_image) and [m[1] for m in per_image] == names, lines
    assert re.fullmatch(r"predict: 4 images in \d+\.\d s \(\d+ ms per image, saving included\)", lines[4]), lines
    assert lines[5].startswith("predict: 4 images; masks in")


def test_a_detector_that_finds_nothing_says_so_and_what_to_try(tmp_path, shared_data):
    from test_serve_detector import random_detector

    image = sorted((shared_data / "facade_coco" / "train").glob("*.jpg"))[0]
    detector = random_detector(tmp_path, "instance")
    proc = seglab("predict", "--weights", detector, "--source", image, "--conf", "0.99", "--out", tmp_path / "o1",
                  cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"{image.name} 512x512: no objects, \d+ ms", lines[0]), lines
    assert "0 objects scoring 0.99 or more" in lines[1]
    assert lines[2] == "predict: found nothing scoring 0.99 or more in any image; try a lower --conf " \
                       "(e.g. --conf 0.198) or train longer"  # fmt: skip
    found = seglab("predict", "--weights", detector, "--source", image, "--conf", "0.3", "--out", tmp_path / "o2",
                   cwd=tmp_path)  # fmt: skip
    first = found.stdout.splitlines()[0]
    assert re.fullmatch(rf"{image.name} 512x512: (\d+ [\w-]+, )*\d+ [\w-]+, \d+ ms", first), first
    assert "found nothing" not in found.stdout


def test_a_predictor_and_a_result_print_in_one_short_line(weights, shapes):
    import seglab as api

    model = api.load(weights)
    assert re.fullmatch(
        r"SegModel\(semantic, fcn on \w+, \d+ classes \[[\w, ]+\], img_size 40, pytorch on cpu\)", repr(model)
    ), repr(model)
    result = model.predict(next((shapes / "images" / "val").iterdir()))
    assert re.fullmatch(r"SegResult\(semantic, \S+\.png, 40x40: (\w+ \d+%, ){0,2}\w+ \d+%\)", repr(result)), repr(
        result
    )


def test_val_says_what_it_measured_and_warns_when_val_images_are_training_images(weights, shapes, tmp_path):
    import json
    import shutil

    proc = seglab(
        "val", "--weights", weights, "--data", shapes, "--workers", "0", "--out", tmp_path / "v1", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "val: 4 val images: mIoU" in proc.stdout and "warning" not in proc.stdout
    metrics = json.loads((tmp_path / "v1" / "metrics.json").read_text())
    from seglab import __version__

    assert {k: metrics[k] for k in ("data", "split", "num_images", "img_size", "tta", "slide", "seglab_version")} == {
        "data": str(shapes), "split": "val", "num_images": 4, "img_size": 40, "tta": False, "slide": False,
        "seglab_version": __version__,
    }  # fmt: skip
    assert metrics["weights"] == str(weights) and "miou" in metrics

    leaky = tmp_path / "leaky"
    shutil.copytree(shapes, leaky)
    train_image = sorted((leaky / "images" / "train").iterdir())[3]
    val_image = sorted((leaky / "images" / "val").iterdir())[0]
    shutil.copy(train_image, val_image)  # the same bytes under another name
    proc = seglab(
        "val", "--weights", weights, "--data", leaky, "--workers", "0", "--out", tmp_path / "v2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    warning = next(line for line in proc.stdout.splitlines() if "warning" in line)
    assert warning == (
        f"val: warning: 1 of the 4 val images are also training images ({val_image} is {train_image}); "
        "these scores overstate how the model does on images it has not seen"
    )


# ---------------------------------------------------------------------------------------------- 5. files


def test_weights_have_the_users_permissions_and_the_log_names_the_data_as_typed(shapes, tmp_path):
    import os

    link = tmp_path / "streets"
    link.symlink_to(shapes)
    proc = seglab("train", "--data", "streets", "--model", "fcn", "--img-size", "40", "--epochs", "1", "--batch", "4",
                  "--workers", "0", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(shapes) not in proc.stdout and str(link) in proc.stdout, proc.stdout
    run = tmp_path / "runs/train/exp"
    assert f"data: {link}\n" in (run / "config.yaml").read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("weights/best.pt", "weights/last.pt", "metrics.csv", "curves.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------- 4. pictures


def test_curves_have_whole_epochs_a_fitting_loss_axis_lr_and_pixel_accuracy_and_a_star_on_the_best(tmp_path):
    from seglab.instance.task import InstanceTask
    from seglab.plots import plot_curves

    rows = [{"epoch": e, "train_loss": 1.5 / e, "val_loss": 1.6 / e, "val_miou": [0.2, 0.4, 0.5, 0.45][e - 1],
             "val_pixel_accuracy": 0.6 + 0.05 * e, "lr": f"{1e-3 / e:.3e}"} for e in range(1, 5)]  # fmt: skip
    fig = plot_curves(rows, tmp_path / "semantic.png", best="val_miou")
    loss, score, lr = fig.axes
    assert loss.get_yscale() == "linear" and loss.get_ylim()[0] == 0  # 1.5 .. 0.375: no log scale needed
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = [line.get_label() for line in score.get_lines()]
    assert labels == ["mIoU", "best: 50.0 at epoch 3", "pixel accuracy"]
    star = score.get_lines()[1]
    assert list(star.get_xdata()) == [3] and list(star.get_ydata()) == [50.0] and star.get_marker() == "*"
    assert list(lr.get_lines()[0].get_ydata()) == [pytest.approx(1e-3 / e, rel=1e-3) for e in range(1, 5)]

    rows = [{"epoch": e, "train_loss": 3 / e, "loss_classifier": 1 / e, "loss_box_reg": 0.8 / e, "loss_mask": 0.7 / e,
             "loss_objectness": 0.3 / e**2, "loss_rpn_box_reg": 0.2 / e, "val_box_ap": 0.03 * e,
             "val_box_ap50": 0.06 * e, "val_mask_ap": 0.028 * e, "val_mask_ap50": 0.055 * e, "lr": "1.000e-02"}
            for e in range(1, 6)]  # fmt: skip
    fig = plot_curves(rows, tmp_path / "detector.png", **InstanceTask.curves, best="val_mask_ap")
    loss, score, _ = fig.axes
    assert loss.get_yscale() == "log"  # 3.0 .. 0.012 spans 250x
    assert [line.get_label() for line in loss.get_lines()] == [
        "total", "classifier", "box reg", "mask", "objectness", "rpn box reg"
    ]  # fmt: skip
    assert score.get_ylim() == (0, pytest.approx(30 * 1.15 + 1))  # AP axis fits the APs, not 0-100
    assert (tmp_path / "semantic.png").stat().st_size > 10_000 and (tmp_path / "detector.png").is_file()


def test_semantic_overlays_leave_background_unpainted_and_carry_a_legend(tmp_path):
    import numpy as np

    from seglab.engine.predictor import SegResult
    from seglab.errors import SeglabError

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), np.uint8)
    mask[60:, 80:] = 1  # a quarter of membrane, the rest background
    result = SegResult(image, mask, ["background", "membrane"], [(0, 0, 0), (255, 0, 0)])
    drawn = result.overlay(legend=False)
    assert np.array_equal(drawn[mask == 0], image[mask == 0])  # the image as it is
    assert np.abs(drawn[mask == 1].astype(int) - (image[mask == 1] * 0.5 + [127.5, 0, 0])).max() <= 1
    everything = result.overlay(legend=False, unpainted=["none"])
    assert np.abs(everything[mask == 0].astype(int) - image[mask == 0] * 0.5).max() <= 1  # black at 50%
    with_legend = result.overlay()
    corner = (with_legend[:30, :100] != drawn[:30, :100]).any(-1)
    assert corner.mean() > 0.5 and np.array_equal(with_legend[60:, :], drawn[60:, :])  # a box at the top left only
    assert (with_legend[:30, :100] == [255, 0, 0]).all(-1).sum() > 20  # with the membrane's swatch
    with pytest.raises(SeglabError, match=r"--unpainted membrain: not a class of this model .*'membrane'"):
        result.overlay(unpainted=["membrain"])


def test_confidence_maps_are_coloured_with_a_scale(tmp_path):
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    from seglab.engine.predictor import SegResult

    confidence = np.tile(np.linspace(0, 1, 100, dtype=np.float32), (80, 1))
    result = SegResult(np.zeros((80, 100, 3), np.uint8), np.zeros((80, 100), np.uint8), ["a"], [(0, 0, 0)], confidence)
    saved = np.asarray(Image.open(result.save(tmp_path, save_conf=True)["confidence"]))
    assert saved.shape[0] == 80 and saved.shape[1] > 100 + 12  # the map, then its scale
    viridis = (colormaps["viridis"]([0.0, 1.0])[:, :3] * 255).round()
    assert np.abs(saved[40, 0] - viridis[0]).max() <= 1 and np.abs(saved[40, 99] - viridis[1]).max() <= 1
    assert np.abs(saved[0, 104] - viridis[1]).max() <= 1 and np.abs(saved[79, 104] - viridis[0]).max() <= 1


def test_instance_overlays_colour_each_class_outline_masks_and_tag_labels():
    import numpy as np

    from seglab.instance.predictor import Detections, InstanceResult

    image = np.full((200, 300, 3), 100, np.uint8)
    masks = np.zeros((2, 200, 300), bool)
    masks[0, 50:150, 40:140] = True
    masks[1, 60:160, 120:260] = True  # overlapping the first
    boxes = np.array([[40, 50, 140, 150], [120, 60, 260, 160]], np.float32)
    colors = [(0, 0, 0), (230, 25, 75), (60, 180, 75)]
    instances = Detections(boxes, np.array([1, 2]), np.array([0.9, 0.8], np.float32), masks, ["window", "car"])
    drawn = InstanceResult(image, instances, ["background", "window", "car"], colors).plot()
    assert (drawn[100, 60] == np.rint(image[100, 60] * 0.5 + np.array(colors[1]) * 0.5)).all()  # window's tint
    assert (drawn[150, 230] == np.rint(image[150, 230] * 0.5 + np.array(colors[2]) * 0.5)).all()  # car's
    assert (drawn[100, 259] == colors[2]).all()  # the car mask's outline in solid colour
    tag = drawn[30:50, 40:100]  # the window's "window 0.90" tag above its box: its colour and its text
    assert (tag == colors[1]).all(-1).mean() > 0.4 and (tag == (255, 255, 255)).all(-1).any()
