"""SegmentationDataset, collate_pad and build_loader on a tiny folder written here."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data.dataset import SegmentationDataset, build_loader, collate_pad, seed_worker
from seglab.data.spec import DatasetSpec, Sample
from seglab.data.transforms import EvalTransform, TrainTransform
from seglab.errors import SeglabError

IGNORE = 255
SIZES = [(20, 30), (24, 18), (16, 16), (30, 40), (22, 26), (18, 34)]  # (h, w), all different


def write_dataset(root: Path) -> tuple[list[Sample], DatasetSpec, list[np.ndarray], list[np.ndarray]]:
    """RGB PNG images and L-mode index masks (classes 0..2 and ignore), plus their arrays."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    samples, images, masks = [], [], []
    for i, (h, w) in enumerate(SIZES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 2, IGNORE], dtype=np.uint8), (h, w))
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")
        samples.append(Sample(image=root / "images" / f"{i}.png", mask=root / "masks" / f"{i}.png"))
        images.append(image)
        masks.append(mask)
    spec = DatasetSpec(
        root=root,
        format="pairs",
        classes=["a", "b", "c"],
        colors=[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        ignore_index=IGNORE,
        mask_encoding="index",
        splits={"train": samples},
    )
    return samples, spec, images, masks


@pytest.fixture
def tiny(tmp_path: Path):
    return write_dataset(tmp_path)


def test_items_have_documented_dtypes_shapes_and_content(tiny) -> None:
    samples, spec, images, masks = tiny
    ds = SegmentationDataset(samples, spec, transform=None)
    assert len(ds) == len(SIZES)
    for i, (h, w) in enumerate(SIZES):
        item = ds[i]
        assert set(item) == {"image", "mask", "index"}
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, h, w)
        assert item["mask"].dtype == torch.int64 and item["mask"].shape == (h, w)
        assert item["index"] == i and isinstance(item["index"], int)
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), images[i])
        assert np.array_equal(item["mask"].numpy(), masks[i])


def test_greyscale_reading(tiny) -> None:
    samples, spec, _, _ = tiny
    item = SegmentationDataset(samples, spec, transform=None, in_channels=1)[0]
    assert item["image"].shape == (1, *SIZES[0]) and item["image"].dtype == torch.uint8


def test_transforms_are_applied(tiny) -> None:
    samples, spec, _, masks = tiny
    train = SegmentationDataset(samples, spec, TrainTransform(24, crop_size=(12, 16)))
    item = train[3]
    assert item["image"].shape == (3, 12, 16) and item["mask"].shape == (12, 16)
    assert item["mask"].dtype == torch.int64

    val = SegmentationDataset(samples, spec, EvalTransform(20))
    item = val[3]  # 30x40 -> long side 20: image 15x20, mask at its own 30x40
    assert item["image"].shape == (3, 15, 20)
    assert np.array_equal(item["mask"].numpy(), masks[3]) and item["mask"].dtype == torch.int64


def test_cache_decodes_once_and_gives_identical_items(tiny, caplog) -> None:
    samples, spec, images, masks = tiny
    ds = SegmentationDataset(samples, spec, transform=None, cache=True)
    with caplog.at_level(logging.INFO, logger="seglab.data.dataset"):
        nbytes = ds.preload(progress=False)
    assert nbytes == sum(im.nbytes + m.nbytes for im, m in zip(images, masks, strict=True))
    assert "MiB" in caplog.text  # the memory the cache holds is logged
    before = [ds[i] for i in range(len(ds))]

    for sample in samples:  # nothing left to read: every item must come from memory
        sample.image.unlink()
        sample.mask.unlink()

    for i, item in enumerate(before):
        again = ds[i]
        assert torch.equal(again["image"], item["image"]) and torch.equal(again["mask"], item["mask"])
        assert np.array_equal(again["image"].permute(1, 2, 0).numpy(), images[i])
    # and without the cache the same files are really gone
    with pytest.raises(SeglabError):
        SegmentationDataset(samples, spec, transform=None)[0]


def test_without_cache_nothing_is_kept(tiny) -> None:
    samples, spec, _, _ = tiny
    ds = SegmentationDataset(samples, spec, transform=None)
    ds[0]
    assert ds.preload(progress=False) == 0 and ds.cached_bytes() == 0


def test_collate_pad_pads_images_with_zero_and_masks_with_ignore() -> None:
    items = [
        {"image": torch.full((3, 4, 5), 7, dtype=torch.uint8), "mask": torch.full((8, 10), 1), "index": 3},
        {"image": torch.full((3, 6, 2), 9, dtype=torch.uint8), "mask": torch.full((6, 2), 2), "index": 0},
    ]
    out = collate_pad(items, ignore_index=IGNORE)
    assert out["image"].shape == (2, 3, 6, 5) and out["image"].dtype == torch.uint8
    assert out["mask"].shape == (2, 8, 10) and out["mask"].dtype == torch.int64
    assert out["image_size"] == [(4, 5), (6, 2)]
    assert out["mask_size"] == [(8, 10), (6, 2)]
    assert out["index"] == [3, 0]

    assert (out["image"][0, :, :4, :5] == 7).all() and (out["image"][0, :, 4:] == 0).all()
    assert (out["image"][1, :, :6, :2] == 9).all() and (out["image"][1, :, :, 2:] == 0).all()
    assert (out["mask"][0] == 1).all()  # the largest mask: no padding
    assert (out["mask"][1, :6, :2] == 2).all()
    assert (out["mask"][1, 6:] == IGNORE).all() and (out["mask"][1, :, 2:] == IGNORE).all()


def test_collate_pad_of_equal_sizes_is_a_stack() -> None:
    items = [{"image": torch.randint(0, 255, (1, 3, 3), dtype=torch.uint8),
              "mask": torch.randint(0, 3, (3, 3)), "index": i} for i in range(3)]  # fmt: skip
    out = collate_pad(items, ignore_index=-1)
    assert torch.equal(out["image"], torch.stack([it["image"] for it in items]))
    assert torch.equal(out["mask"], torch.stack([it["mask"] for it in items]))


def test_loader_with_workers_is_reproducible_from_its_seed(tiny) -> None:
    samples, spec, _, _ = tiny
    ds = SegmentationDataset(samples, spec, TrainTransform(24, crop_size=(12, 16), jitter=0.2))

    def run(seed: int) -> list[dict]:
        loader = build_loader(ds, batch=2, shuffle=True, workers=2, ignore_index=IGNORE, seed=seed)
        # fresh workers per epoch: their seeds come from the generator the trainer reseeds per epoch
        assert not loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
        return [b for _ in range(2) for b in loader]  # two epochs

    first, again, other = run(7), run(7), run(8)
    assert len(first) == 2 * 3
    for a, b in zip(first, again, strict=True):
        assert a["index"] == b["index"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any(
        a["index"] != b["index"] or not torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True)
    )
    # the second epoch draws new augmentations, it does not replay the first
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first[:3], first[3:], strict=True))


def test_workers_do_not_repeat_each_others_augmentations(tmp_path: Path) -> None:
    # Six copies of one image: any two equal outputs would mean two workers drew the same numbers.
    samples, spec, _, _ = write_dataset(tmp_path)
    same = [samples[3]] * 6
    ds = SegmentationDataset(same, spec, TrainTransform(24, crop_size=(12, 16), jitter=0.2))
    loader = build_loader(ds, batch=1, shuffle=False, workers=2, ignore_index=IGNORE, seed=0)
    images = [b["image"][0] for b in loader]
    assert len(images) == 6
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(images[i], images[j])


def test_cached_dataset_in_workers(tiny) -> None:
    samples, spec, images, _ = tiny
    ds = SegmentationDataset(samples, spec, transform=None, cache=True)
    loader = build_loader(ds, batch=3, shuffle=False, workers=2, ignore_index=IGNORE, seed=0)
    assert ds.cached_bytes() > 0  # build_loader preloaded in this process, before the fork
    for sample in samples:
        sample.image.unlink()
    got = list(loader)
    h, w = SIZES[0]
    assert np.array_equal(got[0]["image"][0, :, :h, :w].permute(1, 2, 0).numpy(), images[0])
    assert [i for b in got for i in b["index"]] == list(range(len(SIZES)))


def numpy_noise(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A user transform that draws from numpy's global RNG (must be module level to pickle)."""
    return image, torch.full(mask.shape, int(np.random.randint(0, 2**31)))


def test_seed_worker_seeds_numpy_per_worker_and_from_the_loader_seed(tiny) -> None:
    samples, spec, _, _ = tiny
    ds = SegmentationDataset(samples, spec, numpy_noise)

    def draws(seed: int) -> list[int]:
        loader = build_loader(ds, batch=1, shuffle=False, workers=2, ignore_index=IGNORE, seed=seed)
        return [int(b["mask"][0, 0, 0]) for b in loader]

    first = draws(3)
    assert len(set(first)) == len(first)  # no two workers share numpy's state
    assert draws(3) == first


def test_seed_worker_follows_torch_seed_without_copying_its_stream() -> None:
    def after(seed: int) -> tuple[list[int], list[int], float]:
        torch.manual_seed(seed)
        torch_draws = torch.randint(2**31, (8,)).tolist()
        torch.manual_seed(seed)
        seed_worker(0)
        return torch_draws, np.random.randint(2**31, size=8).tolist(), random.random()

    torch_draws, numpy_draws, py_draw = after(5)
    assert after(5) == (torch_draws, numpy_draws, py_draw)
    assert after(6)[1:] != (numpy_draws, py_draw)
    # np.random.seed(torch.initial_seed()) would replay torch's own MT19937 numbers
    assert not set(torch_draws) & set(numpy_draws)


def test_reseeding_the_generator_replays_an_epoch_with_workers(tiny) -> None:
    """What exact --resume relies on: epoch N's batches depend only on the seed given for epoch N."""
    samples, spec, _, _ = tiny
    ds = SegmentationDataset(samples, spec, TrainTransform(24, crop_size=(12, 16), jitter=0.2))
    loader = build_loader(ds, batch=2, shuffle=True, workers=2, ignore_index=IGNORE, seed=0)
    loader.generator.manual_seed(11)
    list(loader)  # an earlier epoch, advancing every RNG involved
    loader.generator.manual_seed(12)
    straight = list(loader)
    resumed = build_loader(ds, batch=2, shuffle=True, workers=2, ignore_index=IGNORE, seed=0)
    resumed.generator.manual_seed(12)
    for a, b in zip(straight, list(resumed), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
