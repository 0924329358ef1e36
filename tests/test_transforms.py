"""TrainTransform / EvalTransform: image and mask stay aligned, shapes, values, determinism.

The alignment tests paint the image from the mask (``image = PALETTE[mask]``), so after any
geometric op every image pixel says which class the mask should hold there.
"""

from __future__ import annotations

import pytest
import torch

from seglab.data.transforms import EvalTransform, TrainTransform

IGNORE = 255
CLASSES = [0, 1, 2, 3, 5, 7]  # gaps on purpose: an interpolated mask would invent 4 or 6
PALETTE = torch.zeros(256, 3, dtype=torch.uint8)  # no class is black: black means padding
PALETTE[CLASSES] = torch.tensor(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], dtype=torch.uint8
)


def block_mask(height: int, width: int, block: int, seed: int) -> torch.Tensor:
    """[H,W] uint8 of flat block x block squares with random classes from CLASSES."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor(CLASSES, dtype=torch.uint8)
    grid = classes[torch.randint(len(CLASSES), (-(-height // block), -(-width // block)), generator=g)]
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width].contiguous()


def paint(mask: torch.Tensor) -> torch.Tensor:
    """[3,H,W] uint8 image whose colour at each pixel is the palette colour of the mask's class."""
    return PALETTE[mask.long()].permute(2, 0, 1)


def classify(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest palette class of each pixel of a [3,H,W] image, and whether it is a pure colour."""
    colours = PALETTE[CLASSES].int()  # [K,3]
    diff = (image.permute(1, 2, 0).int()[:, :, None, :] - colours).abs().amax(-1)  # [H,W,K]
    dist, k = diff.min(-1)
    return torch.tensor(CLASSES)[k], dist <= 2


def uniform_3x3(mask: torch.Tensor) -> torch.Tensor:
    """True where the 3x3 neighbourhood holds one value (borders: False)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 3, 1, 1)
    lo = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
    out = (hi == lo)[0, 0]
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = False
    return out


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64])
def test_train_transform_keeps_image_and_mask_aligned(mask_dtype: torch.dtype) -> None:
    # long side 80 * U(0.5, 2) = 40..160 against a 64x96 crop: some draws pad, some crop.
    transform = TrainTransform(80, crop_size=(64, 96), scale_range=(0.5, 2.0), hflip=0.5, jitter=0.0)
    torch.manual_seed(0)
    padded_draws = 0
    for draw in range(40):
        height, width = (60, 80) if draw % 2 else (80, 56)  # landscape and portrait
        mask = block_mask(height, width, block=12, seed=draw)
        image, out_mask = transform(paint(mask), mask.to(mask_dtype))

        assert image.shape == (3, 64, 96) and image.dtype == torch.uint8
        assert out_mask.shape == (64, 96) and out_mask.dtype == torch.int64
        # nearest neighbour only: no value that was not a class (or the padding)
        assert set(out_mask.unique().tolist()) <= {*CLASSES, IGNORE}

        # padding is exactly where the image is black, and nowhere else
        ignored = out_mask == IGNORE
        assert torch.equal(ignored, (image == 0).all(0))
        padded_draws += bool(ignored.any())

        valid = ~ignored
        cls, pure = classify(image)
        # every pixel whose colour is an unblended class colour agrees with the mask; a shift
        # of even one pixel between image and mask breaks this along every block edge
        assert torch.equal(cls[valid & pure], out_mask[valid & pure])
        # and away from label edges every pixel is unblended (resampling blends only at edges)
        interior = uniform_3x3(out_mask) & valid
        assert pure[interior].all() and torch.equal(cls[interior], out_mask[interior])
        assert (valid & pure).sum() >= 0.6 * valid.sum()
    assert 5 <= padded_draws <= 35, "the scale range should make some draws pad and some not"


def test_flip_moves_image_and_mask_together() -> None:
    mask = torch.zeros(40, 60, dtype=torch.uint8)
    mask[:, :20] = 3  # class 3 on the left third only
    image = paint(mask)
    common = {"img_size": 60, "crop_size": (40, 60), "scale_range": (1.0, 1.0), "jitter": 0.0}
    kept_image, kept_mask = TrainTransform(**common, hflip=0.0)(image, mask)
    flip_image, flip_mask = TrainTransform(**common, hflip=1.0)(image, mask)
    assert torch.equal(kept_mask, mask.long()) and torch.equal(kept_image, image)
    assert torch.equal(flip_mask, mask.long().flip(-1)) and torch.equal(flip_image, image.flip(-1))


def test_pad_fills_image_with_zero_and_mask_with_ignore() -> None:
    mask = block_mask(60, 80, block=10, seed=1)
    # long side 80 * 0.5 = 40 -> 30x40, padded to the 64x96 crop; the image stays top-left
    transform = TrainTransform(80, crop_size=(64, 96), scale_range=(0.5, 0.5), hflip=0.0, jitter=0.0)
    image, out_mask = transform(paint(mask), mask)
    assert (out_mask[:30, :40] != IGNORE).all()
    assert (out_mask[30:] == IGNORE).all() and (out_mask[:, 40:] == IGNORE).all()
    assert (image[:, 30:] == 0).all() and (image[:, :, 40:] == 0).all()
    assert (image[:, :30, :40].amax(0) > 0).all()


def test_custom_ignore_index_is_used_for_padding() -> None:
    mask = block_mask(20, 20, block=10, seed=2)
    transform = TrainTransform(20, crop_size=(30, 30), scale_range=(1.0, 1.0), hflip=0.0, jitter=0.0,
                               ignore_index=-1)  # fmt: skip
    _, out_mask = transform(paint(mask), mask.long())
    assert torch.equal(out_mask[:20, :20], mask.long())
    assert (out_mask[20:] == -1).all() and (out_mask[:, 20:] == -1).all()


def test_crop_size_defaults_to_img_size_square() -> None:
    mask = block_mask(30, 50, block=10, seed=3)
    image, out_mask = TrainTransform(32)(paint(mask), mask)
    assert image.shape == (3, 32, 32) and out_mask.shape == (32, 32)


def test_jitter_changes_the_image_but_never_the_mask() -> None:
    mask = block_mask(48, 64, block=8, seed=4)
    image = paint(mask)
    plain = TrainTransform(64, crop_size=(48, 64), jitter=0.0)
    jittered = TrainTransform(64, crop_size=(48, 64), jitter=0.5)
    for seed in range(5):
        torch.manual_seed(seed)
        plain_image, plain_mask = plain(image, mask)
        torch.manual_seed(seed)
        jit_image, jit_mask = jittered(image, mask)
        assert torch.equal(plain_mask, jit_mask)  # same geometry, mask untouched by colour
        assert not torch.equal(plain_image, jit_image)


def test_greyscale_image() -> None:
    mask = block_mask(30, 40, block=10, seed=5)
    grey = paint(mask)[:1].contiguous()
    image, out_mask = TrainTransform(40, crop_size=(24, 32), jitter=0.3)(grey, mask)
    assert image.shape == (1, 24, 32) and image.dtype == torch.uint8
    assert out_mask.shape == (24, 32) and out_mask.dtype == torch.int64


def test_train_transform_is_deterministic_under_torch_manual_seed() -> None:
    mask = block_mask(60, 80, block=10, seed=6)
    image = paint(mask)
    transform = TrainTransform(80, crop_size=(48, 64), jitter=0.3)

    def draws(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        return [transform(image, mask) for _ in range(5)]

    first, again, other = draws(0), draws(0), draws(1)
    for (a_img, a_msk), (b_img, b_msk) in zip(first, again, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_msk, b_msk)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    # successive draws differ: the transform is actually random
    assert not torch.equal(first[0][0], first[1][0])


@pytest.mark.parametrize(("shape", "img_size", "expected"), [
    ((60, 80), 40, (30, 40)),  # landscape, shrink
    ((80, 60), 40, (40, 30)),  # portrait
    ((30, 40), 80, (60, 80)),  # enlarge
    ((30, 40), 40, (30, 40)),  # already there
])  # fmt: skip
def test_eval_transform_resizes_image_long_side_and_keeps_mask(shape, img_size, expected) -> None:
    mask = block_mask(*shape, block=10, seed=7).long()
    image, out_mask = EvalTransform(img_size)(paint(mask), mask)
    assert image.shape == (3, *expected) and image.dtype == torch.uint8
    assert out_mask is mask  # labels stay at their own resolution


@pytest.mark.parametrize("img_size", [0, None])
def test_eval_transform_without_size_is_identity(img_size) -> None:
    mask = block_mask(30, 40, block=10, seed=8).long()
    image = paint(mask)
    out_image, out_mask = EvalTransform(img_size)(image, mask)
    assert out_image is image and out_mask is mask


def test_eval_transform_resizes_image_content_not_just_shape() -> None:
    mask = torch.zeros(40, 80, dtype=torch.uint8)
    mask[:, 40:] = 2  # left half class 0, right half class 2
    image, _ = EvalTransform(40)(paint(mask), mask)
    cls, _ = classify(image)
    assert (cls[:, :19] == 0).all() and (cls[:, 21:] == 2).all()


def test_train_transform_never_writes_into_its_input() -> None:
    # With no resize, pad or flip, the crop is a view of the input; jitter must not write there
    # (cached arrays are shared by every epoch and, copy-on-write, by every worker).
    mask = block_mask(40, 60, block=10, seed=9)
    image = paint(mask)
    image_before, mask_before = image.clone(), mask.clone()
    transform = TrainTransform(60, crop_size=(40, 60), scale_range=(1.0, 1.0), hflip=0.0, jitter=0.5)
    for _ in range(10):
        transform(image, mask)
    assert torch.equal(image, image_before) and torch.equal(mask, mask_before)
