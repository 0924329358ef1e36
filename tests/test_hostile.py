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
    proc = seglab(
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
        "--strict-data",
        cwd=tmp_path,
    )
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
    assert (
        seglab(
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
            cwd=tmp_path,
        ).returncode
        == 0
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    one_line_error(
        seglab("predict", "--weights", tmp_path / "runs/train/exp/weights/best.pt", "--source", bad, cwd=tmp_path),
        "bad.png",
        reason,
    )
    assert not (tmp_path / "runs/predict").exists() or not any((tmp_path / "runs/predict").rglob("*.png"))
