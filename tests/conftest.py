"""Shared fixtures.

Data: ``shared_data`` (the read-only real datasets in ../shared/data, or a skip),
``write_png`` (write an array as a PNG in a given mode) and ``tiny_dataset`` (a 5-image
images/ + masks/ dataset written into tmp_path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"

# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (camvid, isbi2012_membrane, ...), read-only; skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA.resolve()


WritePng = Callable[..., Path]


def _write_png(path: Path, array: np.ndarray, mode: str | None = None, palette: Sequence[int] | None = None) -> Path:
    """Write ``array`` to ``path`` (parents created).

    ``mode`` 'P' stores the values as palette indices (``palette``: flat [r, g, b, ...], grey by
    default); 'I;16' writes 16-bit; otherwise PIL picks L / RGB / RGBA from the array's shape.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if mode == "P":
        h, w = array.shape
        im = Image.frombytes("P", (w, h), array.astype(np.uint8).tobytes())
        im.putpalette(list(palette) if palette is not None else [v for i in range(256) for v in (i, i, i)])
    elif mode == "I;16":
        im = Image.fromarray(array.astype(np.uint16))
    else:
        im = Image.fromarray(array.astype(np.uint8))
        assert mode is None or im.mode == mode, f"array gives mode {im.mode}, not {mode}"
    im.save(path)
    return path


@pytest.fixture
def write_png() -> WritePng:
    """``write_png(path, array, mode=None, palette=None) -> path``: a real PNG on disk."""
    return _write_png


TINY_MASKS = [
    # (H=6, W=8) index masks with classes 0, 1, 2 and ignore 255 at known places
    np.array([[0] * 8] * 3 + [[1] * 8] * 3, dtype=np.uint8),
    np.array([[0] * 4 + [2] * 4] * 6, dtype=np.uint8),
    np.array([[2] * 8] * 5 + [[255] * 8], dtype=np.uint8),
    np.array([[1] * 8] * 6, dtype=np.uint8),
    np.array([[0] * 8] * 6, dtype=np.uint8),
]


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """images/{train,val}/*.png (RGB 8x6) + masks/{train,val}/*.png (L, values 0..2 and 255).

    train: a, b, c (masks TINY_MASKS[0..2]); val: d, e (TINY_MASKS[3..4]); no data.yaml.
    """
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for name, split, mask in zip("abcde", ["train"] * 3 + ["val"] * 2, TINY_MASKS, strict=True):
        _write_png(root / "images" / split / f"{name}.png", rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        _write_png(root / "masks" / split / f"{name}.png", mask, "L")
    return root


# ---------------------------------------------------------------------------------------------- models

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip
CAMVID_COLORS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]  # fmt: skip

MakeCheckpoint = Callable[..., Path]


def random_checkpoint(
    path: Path,
    arch: str,
    encoder: str | None = None,
    *,
    img_size: int = 64,
    crop: list[int] | None = None,
    seed: int = 0,
) -> Path:
    """A seglab checkpoint at ``path`` with random weights and CamVid's 11 classes and colours, in
    seconds (no training); BatchNorm statistics away from the identity, as after training."""
    import torch

    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint
    from seglab.models import MODELS

    torch.manual_seed(seed)
    card = ModelCard(
        arch=arch,
        encoder=encoder or MODELS[arch].default_encoder,
        num_classes=11,
        in_channels=3,
        classes=CAMVID_CLASSES,
        colors=CAMVID_COLORS,
        ignore_index=11,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=img_size,
        crop_size=crop or [img_size * 3 // 4, img_size],
    )
    model = card.build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(path, make_payload(model, card, config={}, metrics=None))
    return path


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> MakeCheckpoint:
    """``make_checkpoint(arch, encoder=None, img_size=64, seed=0) -> best.pt``: see ``random_checkpoint``."""
    from seglab.models import MODELS

    def make(arch: str, encoder: str | None = None, img_size: int = 64, seed: int = 0) -> Path:
        name = f"{arch}-{encoder or MODELS[arch].default_encoder}-{seed}.pt"
        return random_checkpoint(tmp_path / "ckpt" / name, arch, encoder, img_size=img_size, seed=seed)

    return make
