"""The hostile-input catalogue (README, Troubleshooting) end to end: each case, its message, its exit status."""

from __future__ import annotations

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
    assert check.returncode == 1 and "2.png" in check.stdout and "4.png" in check.stdout


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty (0 bytes)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "cannot read image"),
        (b"<html>not an image</html>", "not an image file"),
    ],
)
def test_broken_png_files_in_predict(tmp_path, content, reason):
    data = folders_dataset(tmp_path / "d", n=2)
    assert train_tiny(data, tmp_path).returncode == 0
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    one_line_error(
        seglab("predict", "--weights", tmp_path / "runs/train/exp/weights/best.pt", "--source", bad, cwd=tmp_path),
        "bad.png",
        reason,
    )
    assert not (tmp_path / "runs/predict").exists() or not any((tmp_path / "runs/predict").rglob("*.png"))


PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["seglab", *sys.argv[1:]]
try:
    runpy.run_module("seglab", run_name="__main__")
finally:
    print(f"peak-rss-kb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
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
