"""The hostile-input catalogue (README, Troubleshooting) end to end: each case, its message, its exit status."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def seglab(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seglab", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglab: error:") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def train_tiny(data: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """One epoch of a small FCN at 40 px: weights at cwd/runs/train/exp/weights/best.pt."""
    return seglab(
        "train",
        "--data",
        data,
        "--model",
        "fcn",
        "--epochs",
        "1",
        "--batch",
        "2",
        "--img-size",
        "40",
        "--workers",
        "0",
        *extra,
        cwd=cwd,
    )


def folders_dataset(root: Path, n: int = 6, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1 + i % 2
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            image[mask == 1] += 150
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
    return root


def test_sixteen_bit_palette_rgba_and_grey_images_train_and_predict(tmp_path):
    data = folders_dataset(tmp_path / "modes")
    images = sorted((data / "images" / "train").glob("*.png"))
    rgb = np.asarray(Image.open(images[0]))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(images[0])  # palette image
    Image.fromarray(rgb).convert("RGBA").save(images[1])  # alpha channel
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(images[2])  # 16-bit greyscale (I;16)
    Image.fromarray(rgb).convert("L").save(images[3])  # 8-bit greyscale
    assert {Image.open(p).mode for p in images[:4]} == {"P", "RGBA", "I;16", "L"}
    proc = train_tiny(data, tmp_path, "--strict-data")
    assert proc.returncode == 0, proc.stderr
    weights = tmp_path / "runs/train/exp/weights/best.pt"
    proc = seglab("predict", "--weights", weights, "--source", images[2], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "runs/predict/exp/masks" / f"{images[2].stem}.png").size == (40, 40)


def test_images_without_masks_and_masks_without_images(tmp_path):
    data = folders_dataset(tmp_path / "partners")
    (data / "masks" / "train" / "2.png").unlink()
    (data / "images" / "val" / "4.png").unlink()
    line = one_line_error(seglab("train", "--data", data, cwd=tmp_path), "2.png", "4.png")
    assert "without" in line or "no mask" in line or "missing" in line
    check = seglab("data", "check", data, cwd=tmp_path)
    assert check.returncode == 2 and "2.png" in check.stdout and "4.png" in check.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 1-epoch FCN run in <root>/runs/train/exp, and its data in <root>/d."""
    root = tmp_path_factory.mktemp("tiny_run")
    assert train_tiny(folders_dataset(root / "d", n=4), root).returncode == 0
    return root


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty (0 bytes)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "cannot read image"),
        (b"<html>not an image</html>", "not an image file"),
    ],
)
def test_broken_png_files_in_predict(tiny_run, tmp_path, content, reason):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    one_line_error(
        seglab("predict", "--weights", tiny_run / "runs/train/exp/weights/best.pt", "--source", bad, cwd=tmp_path),
        "bad.png",
        reason,
    )
    assert not (tmp_path / "runs/predict").exists() or not any((tmp_path / "runs/predict").rglob("*.png"))


# VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec, so a child of a pytest process grown to
# 4 GB over the suite reported 4 GB before it had done anything (CI, 2026-12-02)
PEAK_RSS = """
import runpy, sys
sys.argv = ["seglab", *sys.argv[1:]]
try:
    runpy.run_module("seglab", run_name="__main__")
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"peak-rss-kb {peak}", file=sys.stderr)
"""


def _big_image_predict(tmp_path: Path, side: int, monkeypatch) -> int:
    """Predict one side x side image with --slide at full resolution; returns its peak RSS in bytes."""
    data = folders_dataset(tmp_path / "d", n=4, size=64)
    assert (
        seglab(
            "train",
            "--data",
            data,
            "--model",
            "lraspp",
            "--encoder",
            "mobilenet_v3_small",
            "--epochs",
            "1",
            "--batch",
            "2",
            "--img-size",
            "128",
            "--workers",
            "0",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    tile = np.asarray(Image.open(data / "images" / "val" / "0.png").resize((500, 500)))
    big = tmp_path / "big.png"
    Image.fromarray(np.tile(tile, (side // 500, side // 500, 1))).save(big, compress_level=1)
    args = [
        "predict",
        "--weights",
        tmp_path / "runs/train/exp/weights/best.pt",
        "--source",
        big,
        "--slide",
        "--img-size",
        "0",
        "--out",
        tmp_path / "out",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the test reads the 20000 x 20000 result back
    with Image.open(tmp_path / "out" / "masks" / "big.png") as mask:
        assert mask.size == (side, side) and mask.mode == "P"
    return int(proc.stderr.split("peak-rss-kb")[-1].split()[0]) * 1024


def test_large_image_predict_slides_at_full_resolution(tmp_path, monkeypatch):
    """3000 x 3000 at full resolution through the streaming sliding window (the default suite's size)."""
    peak = _big_image_predict(tmp_path, 3000, monkeypatch)
    assert peak < 3 * 2**30


@pytest.mark.slow
def test_20000_pixel_image_predict_in_bounded_memory(tmp_path, monkeypatch):
    """20000 x 20000 RGB (1.2 GB decoded): class scores for the whole image would need 4 bytes per class
    per pixel (6.4 GB for these 4 classes, 17.6 GB for 11) on top of a float copy of the input (4.8 GB);
    the streaming window holds one band, so the peak stays near the image and its outputs."""
    peak = _big_image_predict(tmp_path, 20000, monkeypatch)
    print(f"peak RSS {peak / 2**30:.2f} GiB")
    assert peak < 8 * 2**30, f"peak RSS {peak / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------------- issue 14


def test_resume_of_a_file_outside_its_run_folder_writes_a_new_run(tiny_run, tmp_path):
    """`--resume Downloads/last.pt` used to treat Downloads/.. as the run: it overwrote config.yaml
    there, wrote weights beside it, and died with KeyError: 'epoch' on an unrelated metrics.csv."""
    home = tmp_path / "home"
    (home / "Downloads").mkdir(parents=True)
    shutil.copy(tiny_run / "runs/train/exp/weights/last.pt", home / "Downloads/last.pt")
    (home / "config.yaml").write_text("theme: dark\n")
    (home / "metrics.csv").write_text("date,steps\n2026-11-30,9000\n")
    proc = seglab("train", "--resume", home / "Downloads/last.pt", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "continuing in a new run folder" in proc.stdout
    assert (home / "config.yaml").read_text() == "theme: dark\n"
    assert (home / "metrics.csv").read_text() == "date,steps\n2026-11-30,9000\n"
    assert sorted(p.name for p in home.iterdir()) == ["Downloads", "config.yaml", "metrics.csv"]
    new = tmp_path / "runs/train/exp"  # the run's own --out and --name, relative to where it runs
    rows = (new / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]  # epoch 1 came with the checkpoint
    assert (new / "weights/last.pt").is_file() and (new / "config.yaml").is_file()


def resume_here(last: Path, cwd: Path, monkeypatch, **flags) -> str:
    """``seglab train --resume last`` in this process, from ``cwd``; returns what it logged."""
    import seglab as api

    monkeypatch.chdir(cwd)
    lines: list[str] = []
    api.train(resume=str(last), epochs=2, progress=False, log=lambda *a, **k: lines.append(" ".join(map(str, a))),
              **flags)  # fmt: skip
    return "\n".join(lines)


def test_resume_in_a_run_folder_of_another_run_writes_a_new_run(tiny_run, tmp_path, monkeypatch):
    other = tmp_path / "runs/train/other"
    (other / "weights").mkdir(parents=True)
    shutil.copy(tiny_run / "runs/train/exp/weights/last.pt", other / "weights/last.pt")
    (other / "config.yaml").write_text("model: unet\nepochs: 300\n")  # somebody else's run
    log = resume_here(other / "weights/last.pt", tmp_path, monkeypatch)
    assert "continuing in a new run folder" in log
    assert (other / "config.yaml").read_text() == "model: unet\nepochs: 300\n"
    assert sorted(p.name for p in (other / "weights").iterdir()) == ["last.pt"]


def test_resume_with_out_and_name_forks_the_run(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "runs/train/exp"
    shutil.copytree(tiny_run / "runs/train/exp", run)
    resume_here(run / "weights/last.pt", tmp_path, monkeypatch, out=str(tmp_path / "forks"), name="longer")
    assert (tmp_path / "forks/longer/weights/last.pt").is_file()
    assert len((run / "metrics.csv").read_text().splitlines()) == 2, "the original run is left as it was"


def test_fallback_to_last_prev_keeps_the_good_backup(tiny_run, tmp_path, monkeypatch):
    """A corrupt last.pt is moved aside, so the next save cannot rotate it over the good last.prev.pt."""
    from seglab.engine.checkpoint import load_checkpoint

    run = tmp_path / "runs/train/exp"
    shutil.copytree(tiny_run / "runs/train/exp", run)
    weights = run / "weights"
    shutil.copy(weights / "last.pt", weights / "last.prev.pt")
    weights.joinpath("last.pt").write_bytes(weights.joinpath("last.pt").read_bytes()[:5000])  # truncated
    log = resume_here(weights / "last.pt", tmp_path, monkeypatch)
    assert "falling back to the previous checkpoint" in log and "is now last.corrupt.pt" in log, log
    assert load_checkpoint(weights / "last.pt")["epoch"] == 2, "resumed in its own folder"
    assert load_checkpoint(weights / "last.prev.pt")["epoch"] == 1, "the good backup is kept"
    assert (weights / "last.corrupt.pt").stat().st_size == 5000, "the damaged file is moved aside, not lost"


def in_process_error(capsys, *args) -> str:
    """``seglab *args`` in this process (for refusals that come before any work): exit 2 and one line."""
    from seglab.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("seglab: error:"), (code, err)
    return err[0]


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ""])
def test_run_names_stay_inside_out(tiny_run, tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    data, best = tiny_run / "d", tiny_run / "runs/train/exp/weights/best.pt"
    assert "single folder name" in in_process_error(capsys, "train", "--data", data, "--name", name)
    assert "single folder name" in in_process_error(capsys, "predict", "--weights", best, "--source",
                                                    data / "images/val/0.png", "--name", name)  # fmt: skip
    assert "single folder name" in in_process_error(capsys, "gen", "train", "--data", data, "--name", name)
    assert not list(tmp_path.iterdir()), "nothing written: runs/train/../../escaped would be tmp_path/escaped"


def test_run_names_in_a_real_subprocess(tiny_run, tmp_path):
    one_line_error(train_tiny(tiny_run / "d", tmp_path, "--name", "../../escaped"), "single folder name")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_sync_bn_without_torchrun_on_a_cpu_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = in_process_error(capsys, "train", "--data", tiny_run / "d", "--model", "fcn", "--sync-bn", "--device", "cpu")
    assert "--sync-bn needs CUDA" in line and not (tmp_path / "runs").exists()


def test_predictions_of_images_sharing_a_stem_are_all_kept(tiny_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb = np.asarray(Image.open(tiny_run / "d/images/val/0.png"))
    Image.fromarray(rgb).save(folder / "photo.png")
    Image.fromarray(rgb[::-1]).save(folder / "photo.jpg")
    Image.fromarray(rgb[:, ::-1]).save(folder / "photo.tif")
    Image.fromarray(rgb).save(folder / "street.png")
    proc = seglab("predict", "--weights", tiny_run / "runs/train/exp/weights/best.pt", "--source", folder,
                  "--out", tmp_path / "out", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    masks = sorted(p.name for p in (tmp_path / "out/masks").iterdir())
    assert masks == ["photo.jpg.png", "photo.png.png", "photo.tif.png", "street.png"]
    from seglab.engine.predictor import output_names
    from seglab.errors import SeglabError

    with pytest.raises(SeglabError, match=r"under one name, x\.png"):
        output_names([Path("a/x.png"), Path("b/x.png")])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--img-size", "100000"], "capped at 8192 px"),
        (["--img-size", "-5"], "use 16 or more"),
        (["--img-size", "0"], "needs --slide"),
        (["--slide", "--img-size", "100000"], "more than 1,073,741,824 pixels"),
    ],
)
def test_predict_sizes_that_cannot_fit_are_refused(tiny_run, tmp_path, capsys, flags, fragment):
    """`--img-size 100000` on one 480x360 image was killed by the kernel at 19 GB; -5 was accepted."""
    line = in_process_error(capsys, "predict", "--weights", tiny_run / "runs/train/exp/weights/best.pt", "--source",
                            tiny_run / "d/images/val/0.png", "--out", tmp_path / "out", *flags)  # fmt: skip
    assert "--img-size" in line and fragment in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def _peak_rss(args: list, cwd: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.split("peak-rss-kb")[-1].split()[0]) * 1024


def test_default_predict_on_a_large_image_never_holds_full_size_class_scores(make_checkpoint, tmp_path):
    """The default path upsampled float scores of every class to the image's size (11 classes x 6000 x
    6000 x 4 bytes = 1.6 GB, and as much again for the argmax): now the argmax is taken in bands. What a
    6000 x 6000 image costs over a 600 x 600 one (torch and the model, 0.9-1.4 GB here, cancel out):
    2.0 GB before (58 bytes a pixel), 0.54 GB after (16: the image, its mask and the overlay); the test
    uses 4000 x 4000 (16 megapixels: 0.87 GB before)."""
    weights = make_checkpoint("lraspp", "mobilenet_v3_small", img_size=64)
    tile = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8))
    peaks = {}
    for side in (400, 4000):
        image = tmp_path / f"{side}.png"
        tile.resize((side, side), Image.Resampling.NEAREST).save(image, compress_level=1)
        args = ["predict", "--weights", weights, "--source", image, "--out", tmp_path / "out"]
        peaks[side] = _peak_rss(args, tmp_path)
    extra = peaks[4000] - peaks[400]
    print(f"peak RSS {peaks[400] / 2**30:.2f} / {peaks[4000] / 2**30:.2f} GiB, {extra / 16e6:.1f} bytes a pixel")
    assert extra < 0.5 * 2**30, f"a 16-megapixel image costs {extra / 2**30:.2f} GiB more than a small one"
    with Image.open(tmp_path / "out/masks/4000.png") as mask:
        assert mask.size == (4000, 4000)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_diverged_epoch_never_becomes_best_pt(tiny_run, tmp_path, mode):
    """`--lr 1e12 --optimizer sgd` on CamVid kept a finite train loss (6e18) while BatchNorm's running
    variance overflowed: val loss NaN, exit 0, and a best.pt that predicts class 0 everywhere. Here a
    real run's second epoch ends with that overflow (the one thing injected)."""
    from torch import nn

    from seglab.config import load_train_config
    from seglab.engine.checkpoint import load_checkpoint, non_finite
    from seglab.engine.trainer import Trainer
    from seglab.errors import SeglabError
    from seglab.semantic.task import SemanticTask

    cfg = load_train_config(data=str(tiny_run / "d"), model="fcn", epochs=3, batch=2, img_size=40, workers=0,
                            out=str(tmp_path), name="run", nonfinite=mode)  # fmt: skip
    trainer = Trainer(cfg, SemanticTask, progress=False, log=print)
    epoch_of = trainer.train_epoch

    def overflowing(epoch: int) -> dict[str, float]:
        losses = epoch_of(epoch)
        if epoch == 1:
            norm = next(m for m in trainer.shipped.modules() if isinstance(m, nn.BatchNorm2d))
            norm.running_var.fill_(float("inf"))  # what a diverging step leaves behind
            trainer.best_score = -1.0  # any finite score would beat it: only finiteness keeps epoch 2 out
        return losses

    trainer.train_epoch = overflowing  # type: ignore[method-assign]
    weights = tmp_path / "run/weights"
    if mode == "stop":
        with pytest.raises(SeglabError, match=r"diverged at epoch 2: .*non-finite .*keep the last good epoch"):
            trainer.fit()
        assert load_checkpoint(weights / "last.pt")["epoch"] == 1, "last.pt keeps the last good epoch"
    else:
        trainer.fit()
    best = load_checkpoint(weights / "best.pt")
    assert best["epoch"] == 1
    model = __import__("seglab").load(weights / "best.pt").model
    assert not non_finite(model)


INSPECT = """
import sys
from pathlib import Path
from seglab.engine.checkpoint import load_checkpoint
weights = Path(sys.argv[1]) / "exp" / "weights"
print("files:", " ".join(sorted(p.name for p in weights.iterdir())))
last, best = (load_checkpoint(weights / name)["epoch"] for name in ("last.pt", "best.pt"))
print("last-epoch:", last, "best-epoch:", best)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs in a private mount namespace")
def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tiny_run, tmp_path):
    """Training onto a small tmpfs: the first epoch's checkpoints fit (17.6 MB), the second's last.pt
    does not. It used to end in a RuntimeError traceback (exit 1); now: one line, exit 2, the previous
    last.pt and best.pt intact and no temporary file left."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a private mount namespace) is not permitted here")
    out = tmp_path / "small_disk"
    out.mkdir()
    train = [sys.executable, "-m", "seglab", "train", "--data", tiny_run / "d", "--model", "lraspp", "--encoder",
             "mobilenet_v3_small", "--epochs", "3", "--batch", "2", "--img-size", "40", "--workers", "0",
             "--out", out, "--no-plots"]  # fmt: skip
    quoted = " ".join(f"'{a}'" for a in train)
    script = (
        f"mount -t tmpfs -o size=24m tmpfs '{out}' || exit 99; {quoted}; echo seglab-exit $?; "
        f"'{sys.executable}' -c '{INSPECT}' '{out}'"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert "seglab-exit 2" in proc.stdout, proc.stdout[-1500:] + proc.stderr[-1500:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("seglab")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "last.pt: No space left on device; free some space or choose another --out" in lines[0], lines[0]
    assert "files: best.pt last.pt" in proc.stdout, proc.stdout  # no .tmp left, nothing half-written
    assert "last-epoch: 1 best-epoch: 1" in proc.stdout, proc.stdout


def test_a_model_of_300_classes_predicts_16_bit_masks_that_do_not_wrap(tmp_path):
    """Class indices past 255 used to wrap mod 256 (class 299 saved as 43)."""
    import torch

    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint

    card = ModelCard(arch="fcn", encoder="resnet18", num_classes=300, in_channels=3,
                     classes=[f"c{i}" for i in range(300)], colors=[(i % 256, i // 256, 7) for i in range(300)],
                     ignore_index=300, mean=[0.5] * 3, std=[0.25] * 3, img_size=48, crop_size=[48, 48])  # fmt: skip
    model = card.build().eval()
    with torch.no_grad():
        for m in model.modules():  # every class scorer prefers class 299
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == 300 and m.bias is not None:
                m.bias[299] = 1000.0
    weights = tmp_path / "wide.pt"
    save_checkpoint(weights, make_payload(model, card, config={}, metrics=None))
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    proc = seglab("predict", "--weights", weights, "--source", image, "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out/masks/street.png") as mask:
        assert mask.mode in ("I;16", "I") and mask.size == (40, 30)
        assert np.asarray(mask).max() == 299 and np.asarray(mask).min() == 299
    import seglab as api

    result = api.load(weights).predict(str(image))
    assert result.mask.dtype == np.uint16 and int(result.mask.max()) == 299
    assert result.overlay().shape == (30, 40, 3)
