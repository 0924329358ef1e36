"""Pairs for the generators: every image and its label map resized to one size, kept in memory.

A generator trains on a fixed size (``[H, W]`` from ``--img-size``, the long side, and the first
image's aspect ratio), so items can be stacked without padding. Images are resized with
antialiasing, label maps by nearest neighbour; both are decoded once and cached, resized (CamVid
at 180x240: 60 MiB for 367 pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from seglab.data import DatasetSpec, Sample, read_image, read_mask
from seglab.data.dataset import as_tensor
from seglab.data.io import read_raw_mask, rgb_to_index
from seglab.errors import SeglabError


def generation_size(first_image: Path, long_side: int) -> list[int]:
    """[H, W] with the given long side and the image's aspect ratio, both multiples of 4."""
    h, w = read_image(first_image).shape[:2]
    scale = long_side / max(h, w)
    return [max(4, round(h * scale / 4) * 4), max(4, round(w * scale / 4) * 4)]


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], bilinear with antialiasing."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[H, W] class indices -> [h, w], nearest neighbour (no invented classes at boundaries)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest")[0, 0].to(labels.dtype)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1], what the generators make."""
    return images.float().div(127.5).sub(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 [B, 3, H, W]."""
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class PairDataset(Dataset):
    """``{"image": uint8 [3, H, W], "labels": uint8 [H, W], "index"}`` at one size, decoded once;
    flipped together with probability ``hflip``, drawn from (epoch seed, index) only."""

    def __init__(self, samples: Sequence[Sample], spec: DatasetSpec, size: Sequence[int], hflip: float = 0.0) -> None:
        self.samples, self.spec, self.size, self.hflip = list(samples), spec, list(size), hflip
        self._cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.samples)
        self.epoch_seed = 0

    def set_epoch(self, seed: int) -> None:
        self.epoch_seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def preload(self, progress: bool = True) -> None:
        for i in tqdm(range(len(self)), desc="reading pairs", unit="img", disable=None if progress else True):
            self.read(i)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache[index]
        if cached is None:
            sample = self.samples[index]
            image = as_tensor(read_image(sample.image)).permute(2, 0, 1).contiguous()
            labels = as_tensor(read_mask(sample, self.spec))
            if image.shape[-2:] != labels.shape:
                raise SeglabError(f"image {sample.image} and its mask {sample.mask} differ in size; fix the pair")
            cached = self._cache[index] = (resize_image(image, self.size), resize_labels(labels, self.size))
        return cached

    def __getitem__(self, index: int) -> dict:
        image, labels = self.read(index)
        if self.hflip:
            g = torch.Generator().manual_seed(self.epoch_seed * 1_000_003 + index)
            if torch.rand(1, generator=g).item() < self.hflip:
                image, labels = image.flip(-1), labels.flip(-1)
        return {"image": image, "labels": labels, "index": index}


def read_label_map(path: Path, num_classes: int, ignore_index: int, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """A mask file as [H, W] class indices: index PNG/TIFF as is, an RGB mask through the class colours.

    Values that are not a class become ``ignore_index``."""
    raw, _ = read_raw_mask(path)
    if raw.ndim == 3 and not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2])):
        labels = rgb_to_index(raw[..., :3], [tuple(c) for c in colors], ignore_index)
    else:  # class indices, possibly saved as grey RGB
        labels = raw[..., 0] if raw.ndim == 3 else raw
    labels = labels.astype(np.int64)
    labels[(labels < 0) | (labels >= num_classes)] = ignore_index
    return labels.astype(np.uint8 if ignore_index < 256 else np.int32)
