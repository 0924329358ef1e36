"""The torch side of the data: a map-style dataset, a padding collate and a seeded loader.

``SegmentationDataset`` reads with ``seglab.data.io`` (numpy HWC uint8 / HW uint8), wraps the
arrays as tensors without copying, and hands them to a transform from
``seglab.data.transforms``. ``collate_pad`` batches items of different sizes, and
``build_loader`` makes a ``DataLoader`` whose shuffling and per-worker augmentation are fixed
by one seed.
"""

from __future__ import annotations

import functools
import logging
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from seglab.data.io import read_image, read_mask
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import BadSample, SeglabError

logger = logging.getLogger(__name__)

Transform = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (image, mask, seed=None) -> (image, mask)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory.

    PIL-decoded arrays are read-only and torch warns about wrapping them; nothing here writes
    to these tensors (transforms return new ones), so the warning is noise.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class SegmentationDataset(Dataset):
    """Images and masks of one split, as ``{"image", "mask", "index"}`` items.

    Args:
        samples: the split's samples (``formats.get_split``).
        spec: the dataset's spec (mask encoding, colours, ignore index).
        transform: ``(image uint8 [C,H,W], mask uint8 [H,W]) -> (image, mask)``, or None.
        cache: keep the decoded arrays in memory, so each file is decoded once. Call
            :meth:`preload` before the ``DataLoader``'s workers start (``build_loader`` does):
            forked workers then share the cached pages copy-on-write instead of each filling,
            and holding, its own copy.
        in_channels: 3 reads RGB, 1 greyscale.
        skip_bad: an unreadable sample (:class:`BadSample`) becomes ``{"bad": message}``, which
            ``collate_pad`` leaves out and reports, instead of ending the run hours in.

    Item: ``image`` uint8 [C,H,W], ``mask`` int64 [H,W], ``index`` int (position in ``samples``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: DatasetSpec,
        transform: Transform | None,
        *,
        cache: bool = False,
        in_channels: int = 3,
        skip_bad: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.transform = transform
        self.cache = cache
        self.in_channels = in_channels
        self.epoch_seed: int | None = None  # see set_epoch
        self.skip_bad = skip_bad
        # decoded (image HWC uint8, mask HW uint8) per index; filled by preload() or on first read
        self._cache: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (image [H,W,C] uint8, mask [H,W] uint8) of ``samples[index]``, no transform."""
        cached = self._cache[index]
        if cached is not None:
            return cached
        sample = self.samples[index]
        arrays = read_image(sample.image, self.in_channels), read_mask(sample, self.spec)
        if arrays[0].shape[:2] != arrays[1].shape:
            raise BadSample(
                f"image {sample.image} is {arrays[0].shape[1]}x{arrays[0].shape[0]} but its mask "
                f"{sample.mask} is {arrays[1].shape[1]}x{arrays[1].shape[0]}; they must have the same size"
            )
        check_labels(arrays[1], self.spec, sample)
        if self.cache:
            self._cache[index] = arrays
        return arrays

    def set_epoch(self, seed: int | None) -> None:
        """Seed each item's augmentation by (seed, index) instead of the process's RNG stream.

        An item then looks the same whichever worker or rank loads it and whatever was loaded
        before it, which is what makes distributed training match single-process training and
        a mid-epoch resume replay the epoch exactly. Workers started after this call see it.
        """
        self.epoch_seed = seed

    def preload(self, *, progress: bool = True) -> int:
        """Decode every sample into the cache (in this process); returns the bytes held.

        A no-op when ``cache`` is off. Run it before worker processes fork.
        """
        if not self.cache:
            return 0
        missing = [i for i, c in enumerate(self._cache) if c is None]
        for i in tqdm(missing, desc="caching images", unit="img", disable=True if not (progress and missing) else None):
            self.read(i)
        nbytes = self.cached_bytes()
        logger.info(
            "cached %d decoded images and masks in memory: %.1f MiB (shared by forked workers)",
            len(self.samples),
            nbytes / 2**20,
        )
        return nbytes

    def cached_bytes(self) -> int:
        return sum(image.nbytes + mask.nbytes for image, mask in filter(None, self._cache))

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image_hwc, mask_hw = self.read(index)
        except BadSample as e:
            if not self.skip_bad:
                raise
            return {"bad": str(e), "index": int(index)}  # collate_pad drops it and reports it
        image = as_tensor(image_hwc).permute(2, 0, 1)  # [C,H,W] view, channels-last memory
        mask = as_tensor(mask_hw)  # [H,W] uint8; int64 after the transform
        if self.transform is not None and self.epoch_seed is not None:
            image, mask = self.transform(image, mask, seed=sample_seed(self.epoch_seed, index))
        elif self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask.long(), "index": int(index)}


def sample_seed(epoch_seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """One epoch's indices for one rank, optionally from a given batch on.

    The order depends only on ``(seed, epoch)``; rank ``r`` of ``world`` takes every
    ``world``-th index, so the ranks' batch ``j`` together hold exactly the samples of a
    single process's batch ``j`` at ``world`` times the batch size. With ``drop_last`` the
    epoch is cut to whole global batches (every rank gets the same number of batches);
    without it, nothing is padded or repeated, so evaluation scores every sample once.
    """

    def __init__(
        self,
        n: int,
        *,
        batch: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.batch, self.shuffle, self.seed = n, batch, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: self.n // (self.batch * self.world) * self.batch * self.world]
        mine = order[self.rank :: self.world]
        return mine[self.start_batch * self.batch :]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def check_labels(mask: np.ndarray, spec: DatasetSpec, sample: Sample) -> None:
    """Refuse a label that is neither a class nor the ignore index, naming the file.

    Caught here, it is one clear line; caught by the loss, it is a device-side assert.
    """
    if int(mask.max(initial=0)) < spec.num_classes:
        return
    bad = np.unique(mask[(mask >= spec.num_classes) & (mask != spec.ignore_index)])
    if bad.size:
        raise SeglabError(
            f"{sample.mask or sample.image}: label value(s) {', '.join(map(str, bad[:5].tolist()))} outside "
            f"the {spec.num_classes} classes (0..{spec.num_classes - 1}) and ignore index {spec.ignore_index}; "
            "fix the mask or declare the classes in data.yaml (`seglab data check` lists every such file)"
        )


def collate_pad(batch: Sequence[dict[str, Any]], ignore_index: int) -> dict[str, Any]:
    """Stack items of different sizes, padding bottom/right to the largest H and W in the batch.

    Images are padded with 0 and masks with ``ignore_index``, each to its own largest size
    (in evaluation the image is resized but the mask is not, so they can differ). The
    original sizes are kept so predictions can be cropped back.

    Returns ``{"image": uint8 [B,C,H,W], "mask": int64 [B,H',W'], "image_size": [(h, w)],
    "mask_size": [(h, w)], "index": [int], "bad": [str]}``; ``image`` and ``mask`` are None
    when every sample of the batch was unreadable.
    """
    bad = [item["bad"] for item in batch if "bad" in item]
    batch = [item for item in batch if "bad" not in item]
    if not batch:  # every sample of this batch was unreadable
        return {"image": None, "mask": None, "image_size": [], "mask_size": [], "index": [], "bad": bad}
    images = [item["image"] for item in batch]
    masks = [item["mask"] for item in batch]
    image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    mask_sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in masks]

    channels = images[0].shape[0]
    height, width = max(h for h, _ in image_sizes), max(w for _, w in image_sizes)
    image_batch = torch.zeros((len(batch), channels, height, width), dtype=torch.uint8)
    for out, im, (h, w) in zip(image_batch, images, image_sizes, strict=True):
        out[:, :h, :w] = im

    height, width = max(h for h, _ in mask_sizes), max(w for _, w in mask_sizes)
    mask_batch = torch.full((len(batch), height, width), ignore_index, dtype=torch.int64)
    for out, m, (h, w) in zip(mask_batch, masks, mask_sizes, strict=True):
        out[:h, :w] = m

    return {
        "image": image_batch,
        "mask": mask_batch,
        "image_size": image_sizes,
        "mask_size": mask_sizes,
        "index": [int(item["index"]) for item in batch],
        "bad": bad,  # messages of the samples left out (see SegmentationDataset's skip_bad)
    }


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    Each worker's torch seed is ``base_seed + worker_id``, the base drawn from the loader's
    generator, so this makes a user transform that draws from numpy or ``random`` as
    reproducible as seglab's own (which use torch's RNG) and different in every worker.
    (torch >= 1.9 also seeds both itself; this keeps the guarantee explicit and ours.)

    The seed goes through ``SeedSequence`` first: ``np.random.seed(torch.initial_seed())``,
    the usual recipe, would start numpy's MT19937 in the very state torch's CPU generator
    has, and the two would hand out the same raw numbers.
    """
    state = np.random.SeedSequence([torch.initial_seed(), worker_id]).generate_state(4)
    np.random.seed(state)
    random.seed(int.from_bytes(state.tobytes(), "little"))


def build_loader(
    dataset: Dataset,
    *,
    batch: int,
    shuffle: bool,
    workers: int,
    ignore_index: int,
    seed: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A ``DataLoader`` with ``collate_pad``, reproducible from ``seed``.

    The shuffling order and every worker's seed come from a ``torch.Generator`` seeded with
    ``seed``, so the same seed gives the same batches, augmentation included. A cached
    ``SegmentationDataset`` is preloaded here, before the workers fork. A ``sampler`` (such
    as :class:`EpochSampler`) replaces ``shuffle``.
    """
    if isinstance(dataset, SegmentationDataset) and dataset.cache:
        dataset.preload()
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=functools.partial(collate_pad, ignore_index=ignore_index),
        worker_init_fn=seed_worker,
        generator=generator,
        # Workers start afresh each epoch and take their seeds from ``generator``; the trainer
        # reseeds it per epoch, so epoch N's augmentation is the same whether or not the run
        # was resumed. Persistent workers would carry their RNG state across epochs.
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
