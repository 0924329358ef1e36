"""Training and evaluation transforms that move an image and its mask together.

Both are plain callables ``(image uint8 [C,H,W], mask [H,W]) -> (image, mask)`` on torch tensors,
as the dataset hands them on. Inside, the work is done by albumentations on the same memory
seen as HWC numpy (no copy when the tensor came from ``torch.from_numpy(hwc).permute(2, 0, 1)``):
one ``A.Compose`` gets the image and the mask together, so every geometric op uses the same
drawn parameters for both; the image is resampled bilinearly (area averaging when shrinking, the
antialiased equivalent) and the mask always with nearest neighbour, so labels are never blended
into values that are not classes.

Randomness comes from torch's global RNG only: each call draws one seed with ``torch.randint``
and hands albumentations a fresh generator made from it. So ``torch.manual_seed`` in the main
process and the per-worker seeds a ``DataLoader`` gives (see ``dataset.seed_worker``) make a run
reproducible, and forked workers never repeat each other's augmentations (albumentations'
own ``Compose(seed=None)`` state would be copied into every worker).

Why albumentations and not torchvision.transforms.v2 — measured with
``benchmarks/transforms_speed.py``: the same pipeline (long side 480 * U(0.5, 2), pad and crop
360x480, flip, jitter 0.2 / hue 0.05) on 100 CamVid train pairs, one thread, median of 3,
torch 2.15 / torchvision 0.29.2 / albumentations 2.0.8 / OpenCV 5.0, AVX-512 CPU:

    mode            torchvision v2   albumentations   albu / tv
    pre-decoded       60.8 img/s      341.3 img/s       5.6x
    decode PIL        48.5 img/s      131.8 img/s       2.7x
    decode native     52.5 img/s      144.8 img/s       2.8x

(benchmarks/results/transforms_speed.json; a 2-core host shared with other jobs, load ~3.5, so
absolute numbers move between runs: over three runs albumentations was 5.6-7.0x faster
pre-decoded and 2.1-2.9x with decoding included, torchvision never closer.)

The gap is far above the 15% that would have made us keep torchvision for one fewer dependency.
It is the colour jitter: torchvision converts uint8 to float for every adjustment and does hue
through a float RGB->HSV->RGB round trip (about 18 of its 20 ms per image, hue alone 11 ms);
albumentations does brightness/contrast with 256-entry lookup tables and hue with OpenCV's
uint8 HSV conversion (0.8 ms for all four). The geometric part costs about the same in both
(1.5-1.7 ms), so the whole pipeline is albumentations: one library, one random stream, one
resampler for train and eval. At 60 images/s a single worker could not keep a GPU busy.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

# albumentations asks PyPI for a newer version on import (a 2 s timeout when offline); a training
# toolkit must not make network calls it was not asked to make. setdefault keeps a user's choice.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A
import cv2


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 [C,H,W] tensor -> [H,W,C] numpy; a view when the tensor is channels-last in memory."""
    if image.ndim != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image [C,H,W], got {image.dtype} {tuple(image.shape)}")
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """[H,W,C] numpy -> [C,H,W] tensor view (channels-last memory, as torch's uint8 resize likes)."""
    if image.ndim == 2:  # some OpenCV paths drop a single channel
        image = image[:, :, None]
    return torch.from_numpy(image).permute(2, 0, 1)


def _mask_to_numpy(mask: torch.Tensor, ignore_index: int) -> np.ndarray:
    # uint8 masks stay uint8 (what read_mask gives; cheapest); anything else goes as int32,
    # which OpenCV resizes and pads (it has no int64). Class indices and ignore fit easily.
    if mask.dtype == torch.uint8 and 0 <= ignore_index <= 255:
        return np.ascontiguousarray(mask.numpy())
    return np.ascontiguousarray(mask.to(torch.int32).numpy())


class TrainTransform:
    """Random scale, pad, crop, horizontal flip and colour jitter for training.

    Steps, in order:

    1. resize so the long side is ``img_size * s``, ``s ~ U(scale_range)`` (drawn as a uniform
       integer number of pixels in ``[img_size * lo, img_size * hi]``);
    2. pad bottom/right up to ``crop_size`` where smaller (image with 0, mask with ``ignore_index``);
    3. crop ``crop_size`` (h, w) at a uniformly random position;
    4. flip left-right with probability ``hflip``;
    5. jitter brightness, contrast and saturation by factors in ``[1 - jitter, 1 + jitter]`` and
       hue by up to ``±jitter / 4`` (image only; ``jitter=0`` turns it off).

    Input: image uint8 [C,H,W] (C = 1 or 3), mask uint8 or int64 [H,W] of the same H, W.
    Output: image uint8 [C,h,w], mask int64 [h,w], (h, w) = ``crop_size``.
    """

    def __init__(
        self,
        img_size: int,
        crop_size: int | Sequence[int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        jitter: float = 0.2,
        ignore_index: int = 255,
    ) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if crop_size is None:
            crop_size = (img_size, img_size)
        elif isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.img_size = img_size
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (lo, hi)
        self.hflip = float(hflip)
        self.jitter = float(jitter)
        self.hue = min(self.jitter / 4, 0.5)
        self.ignore_index = int(ignore_index)

        long_sides = list(range(max(1, round(img_size * lo)), max(1, round(img_size * hi)) + 1))
        crop_h, crop_w = self.crop_size
        steps: list[A.BasicTransform] = [
            # One resize, straight to the drawn long side (a choice from a list is uniform).
            A.LongestMaxSize(
                max_size=long_sides,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST_EXACT,  # pixel-centre nearest, like PIL's
                area_for_downscale="image",  # INTER_AREA when shrinking: no aliasing
            ),
            A.PadIfNeeded(
                min_height=crop_h,
                min_width=crop_w,
                position="top_left",  # the image stays top-left: padding goes bottom/right
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=self.ignore_index,
            ),
            A.RandomCrop(height=crop_h, width=crop_w),
            A.HorizontalFlip(p=self.hflip),
        ]
        if self.jitter > 0:
            j = self.jitter
            steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=self.hue, p=1.0))
        self.pipeline = A.Compose(steps)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(img_size={self.img_size}, crop_size={self.crop_size}, "
            f"scale_range={self.scale_range}, hflip={self.hflip}, jitter={self.jitter}, "
            f"ignore_index={self.ignore_index})"
        )

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``seed`` fixes this call's draws (the trainer passes one per sample and epoch);
        without it one is drawn from torch's global RNG."""
        if image.shape[-2:] != mask.shape[-2:] or mask.ndim != 2:
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} do not match")
        # One shared generator pair for the whole pipeline.
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()))
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.pipeline(image=_to_hwc(image), mask=_mask_to_numpy(mask, self.ignore_index))
        return _to_chw(out["image"]), torch.from_numpy(out["mask"]).long()


class EvalTransform:
    """Resize the image so its long side is ``img_size``; the mask is returned unchanged.

    Metrics are computed at the labels' own resolution, so predictions are resized back to
    the mask's size rather than the mask to the image's. ``img_size`` 0 or None: no resize.
    The image is resampled as in training (bilinear, area averaging when shrinking).
    """

    def __init__(self, img_size: int | None) -> None:
        self.img_size = img_size or 0
        self.resize = (
            A.LongestMaxSize(max_size=self.img_size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")
            if self.img_size
            else None
        )

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size})"

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resize_image(image), mask  # deterministic: seed is accepted and unused

    def resize_image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [C,H,W] -> uint8 [C,h,w] with the long side img_size (prediction uses this too)."""
        if self.resize is not None and max(image.shape[-2:]) != self.img_size:
            image = _to_chw(self.resize(image=_to_hwc(image))["image"])
        return image
