"""Datasets as tar shards in WebDataset's format: data larger than one disk, read as a stream, local or over HTTP.

``seglab data pack --data D --out F`` (:func:`pack_dataset`) writes each split as ``<split>-000000.tar``,
``<split>-000001.tar``, ... with :class:`webdataset.ShardWriter`. One sample is ``<key>.<image ext>`` (the
image file's own bytes) and ``<key>.mask.png`` (its labels as class indices, 8-bit greyscale) or, for COCO
data, ``<key>.json`` (``{"size": [h, w], "annotations": [...]}``, category ids already class indices).
``dataset.json`` beside the shards says what they hold -- classes, colours, ignore index, labels, and the
shards of every split with their sample counts -- so a shard set describes itself::

    spec = resolve_dataset("http://host/camvid/val-{000000..000003}.tar")    # or the folder, or its dataset.json
    dataset, loader = shard_loader(spec, "val", EvalTransform(480), batch=4, workers=2)

:class:`ShardDataset` streams one split. Its shards are shared out among the ``world x workers`` readers
(every torchrun rank's DataLoader workers), balanced by sample count and fixed for the run; in training
each reader reads its shards in an order drawn from (seed, epoch) and shuffles their samples through a
buffer, and every reader yields the same number of whole batches (see :meth:`ShardDataset.set_epoch`).

A shard is untrusted input. Each tar member's header is read before its bytes: only regular files named
``<key>.<ext>`` with an expected extension, at most :data:`MAX_MEMBER_BYTES` each, at most one image and
one label file per sample, samples not split up; the stream itself is capped, so a header that lies, or a
server that keeps sending, cannot make a reader hold more. Images and masks are decoded by
``seglab.data.io`` under its pixel limits, a COCO sample's size is checked against its image before a
mask is drawn, and the sample count of every shard is checked against dataset.json (a shard cut short
between two members is still a valid tar). Only local paths and http(s) URLs are opened.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urljoin, urlparse

import braceexpand
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from seglab.config import build_config
from seglab.data.dataset import Transform, as_tensor, build_loader, sample_seed
from seglab.data.formats import MAX_SEMANTIC_CLASSES, SPLIT_ALIASES, get_split, resolve_dataset
from seglab.data.formats.common import IMAGE_SUFFIXES, _validate_config
from seglab.data.io import decode_image, probe_image, rasterize_coco, read_mask
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.errors import BadSample, SeglabError, first_line, short
from seglab.files import atomic_path

INDEX = "dataset.json"  # what a shard folder holds besides its shards
INDEX_FORMAT = "seglab-shards"  # dataset.json's "format"
MAX_INDEX_BYTES = 16 << 20  # dataset.json: a million shards' names and counts
MAX_SHARDS = 1_000_000  # in one --data pattern or one split
MAX_MEMBER_BYTES = 256 << 20  # one file in a shard: an image, its mask or its annotations
HEADER_BYTES = 1 << 20  # tar headers before a member (pax, long names) and tarfile's read-ahead
SHUFFLE_BYTES = 512 << 20  # the most a reader's shuffle buffer holds, whatever the shard's samples weigh
SHUFFLE_SAMPLES = 256  # and the most samples
HTTP_TIMEOUT_S = 60.0
IMAGE_EXTS = frozenset(s.lstrip(".") for s in IMAGE_SUFFIXES)
LABEL_EXTS = {"index": "mask.png", "coco": "json"}  # by the spec's mask_encoding
MEMBER_NAME = re.compile(r"(?P<key>[A-Za-z0-9_-]{1,128})\.(?P<ext>[A-Za-z0-9.]{1,16})")
SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}\.tar")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_FIX = "re-download the shard, or re-pack it with `seglab data pack`"


# --------------------------------------------------------------------------- what a shard set is


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or an http(s) URL
    count: int  # samples, as dataset.json lists them
    offset: int = 0  # index of its first sample in the split's series


@dataclass
class ShardSpec(DatasetSpec):
    """A :class:`DatasetSpec` whose samples live in shards: ``splits`` is empty and ``shards`` lists, per
    split, the shards in series order. ``location`` is the dataset.json it came from."""

    location: str = ""
    shards: dict[str, list[Shard]] = field(default_factory=dict)


@dataclass
class _IndexFile:
    """dataset.json's keys (checked with seglab's config reader, so a misspelt key gets a suggestion)."""

    format: str = ""
    version: int = 0
    classes: list[str] = field(default_factory=list)
    colors: list[list[int]] = field(default_factory=list)
    ignore_index: int = -1
    labels: str = ""  # mask or coco
    source: str = ""  # the layout it was packed from, for the notes
    splits: dict[str, Any] = field(default_factory=dict)  # name -> {"shards": [file names], "counts": [ints]}


@dataclass
class _SplitEntry:
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def is_shard_source(data: str | Path) -> bool:
    """Whether ``--data`` names shards: a URL, a ``.tar`` path or brace pattern, a dataset.json, or a folder
    holding a seglab dataset.json."""
    text = str(data)
    if "://" in text or text.endswith(".tar"):
        return True
    path = Path(text).expanduser()
    if path.name == INDEX and path.is_file():
        return True
    index = path / INDEX
    if not index.is_file() or index.stat().st_size > MAX_INDEX_BYTES:
        return False
    try:
        return json.loads(index.read_bytes()).get("format") == INDEX_FORMAT
    except (ValueError, AttributeError, RecursionError, OSError):
        return False  # someone else's dataset.json: the folder is read as a dataset folder


def resolve_shards(data: str | Path) -> ShardSpec:
    """The :class:`ShardSpec` of ``data``: a shard folder or its dataset.json (local or a URL), a URL of a
    folder ending in ``/``, or shard files as a brace pattern (``.../train-{000000..000009}.tar``), which
    then stand for their split (``train``) in place of the split's listing; other splits come from the
    dataset.json beside them."""
    text = str(data)
    scheme = urlparse(text).scheme if "://" in text else ""
    if scheme == "file":
        text, scheme = urlparse(text).path, ""
    if scheme not in ("", "http", "https"):
        raise SeglabError(f"--data {short(text)}: {scheme}:// is not read; give local paths or http(s) URLs")
    given = _expand(text) if text.endswith(".tar") else None
    if given is not None:
        index = _beside(given[0], INDEX)
    elif scheme:
        index = text + INDEX if text.endswith("/") else text
        if not index.endswith(".json"):
            raise SeglabError(
                f"--data {text}: a shard URL names .tar files (a brace pattern like train-{{000000..000009}}.tar), "
                f"their {INDEX}, or their folder ending in /"
            )
    else:
        path = Path(text).expanduser()
        index = str(path if path.name == INDEX else path / INDEX)
    if not scheme and not Path(index).is_file():
        raise SeglabError(
            f"--data {short(text)}: no {INDEX} at {index}; shards are read with the {INDEX} that "
            "`seglab data pack` writes beside them"
        )
    spec = _read_index(index)
    if given is not None:
        split = _split_of(given, index)
        listed = {_name(s.url): s.count for s in spec.shards.get(split, [])}
        unlisted = [u for u in given if _name(u) not in listed]
        if unlisted:
            raise SeglabError(
                f"--data {short(text)}: {unlisted[0]} is not a shard of split '{split}' in {index} "
                f"({len(listed)} listed); check the pattern's numbers"
            )
        if not scheme and not all(Path(u).is_file() for u in given):
            missing = next(u for u in given if not Path(u).is_file())
            raise SeglabError(f"--data {short(text)}: shard {missing} not found; check the pattern's numbers")
        spec.shards[split] = _series([(u, listed[_name(u)]) for u in given])
        spec.notes.append(f"shards: split '{split}' from the {len(given)} shard(s) of {short(text)}")
    return spec


def _expand(pattern: str) -> list[str]:
    urls = list(itertools.islice(braceexpand.braceexpand(pattern), MAX_SHARDS + 1))
    if len(urls) > MAX_SHARDS:
        raise SeglabError(f"--data {short(pattern)}: more than {MAX_SHARDS:,} shards in the pattern; narrow it")
    return urls


def _beside(location: str, name: str) -> str:
    """``name`` in the folder of ``location`` (a path or a URL)."""
    return urljoin(location, name) if "://" in location else str(Path(location).expanduser().parent / name)


def _split_of(urls: list[str], index: str) -> str:
    """The split a pattern's shards belong to, from their names (``train-000000.tar`` -> train)."""
    splits = {_name(u).rsplit("-", 1)[0] for u in urls}
    if len(splits) != 1 or not all(re.fullmatch(r".+-\d+\.tar", _name(u)) for u in urls):
        raise SeglabError(
            f"--data: the shards ({short(urls[0])}, ...) are not all named <split>-NNNNNN.tar of one split; "
            f"give one split's shards, or their folder or {index} for every split"
        )
    return splits.pop()


def _name(location: str) -> str:
    """The file name of a path or URL."""
    return Path(urlparse(location).path).name


def _series(shards: Iterable[tuple[str, int]]) -> list[Shard]:
    series, offset = [], 0
    for url, count in shards:
        series.append(Shard(url, count, offset))
        offset += count
    return series


def _read_index(location: str) -> ShardSpec:
    """dataset.json at ``location``, every field checked (it is as untrusted as the shards)."""
    with _open(location, "shard index") as stream:
        data = stream.read(MAX_INDEX_BYTES + 1)
    if len(data) > MAX_INDEX_BYTES:
        raise SeglabError(f"{location}: more than {MAX_INDEX_BYTES:,} bytes; not a shard index seglab wrote")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SeglabError(f"{location}: not a JSON shard index ({first_line(e)}); re-pack the dataset") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise SeglabError(
            f'{location}: not a seglab shard index (no "format": "{INDEX_FORMAT}"); '
            "write the shards with `seglab data pack`"
        )
    index = build_config(_IndexFile, raw, location)
    if index.version != 1:
        raise SeglabError(f"{location}: shard index version {index.version}; this seglab reads version 1")
    if not 1 <= len(index.classes) <= MAX_SEMANTIC_CLASSES or index.labels not in ("mask", "coco"):
        raise SeglabError(
            f'{location}: needs 1 to {MAX_SEMANTIC_CLASSES} classes and labels "mask" or "coco"; re-pack it'
        )
    _validate_config(DataConfig(classes=index.classes, colors=index.colors, ignore_index=index.ignore_index), location)
    spec = ShardSpec(
        root=Path(location).parent if "://" not in location else Path(),
        format="shards",
        classes=index.classes,
        colors=[(c[0], c[1], c[2]) for c in index.colors],
        ignore_index=index.ignore_index,
        mask_encoding="coco" if index.labels == "coco" else "index",
        location=location,
    )
    if not isinstance(index.splits, dict) or not index.splits:
        raise SeglabError(f"{location}: 'splits' must map split names to their shards; re-pack the dataset")
    for split, value in index.splits.items():
        where = f"{location}: splits.{short(split)}"
        entry = build_config(_SplitEntry, value if isinstance(value, dict) else {}, where)
        bad = next((n for n in entry.shards if not SHARD_NAME.fullmatch(n)), None)
        if not SPLIT_NAME.fullmatch(split) or bad is not None:
            raise SeglabError(f"{where}: odd split or shard name {short(bad or split)}; shards lie beside {INDEX}")
        if not 0 < len(entry.shards) == len(entry.counts) <= MAX_SHARDS or min(entry.counts) < 0:
            raise SeglabError(f"{where}: needs shards and one sample count (0 or more) each; re-pack the dataset")
        spec.shards[split] = _series((_beside(location, n), c) for n, c in zip(entry.shards, entry.counts, strict=True))
    listed = ", ".join(f"{s} {sum(x.count for x in v)} in {len(v)} shard(s)" for s, v in spec.shards.items())
    spec.notes.append(f"shards: {location} ({index.source or 'a'} dataset packed; {listed})")
    return spec


def _open(location: str, what: str) -> IO[bytes]:
    """A local file or an http(s) response, or one line saying why not."""
    try:
        if "://" in location:
            request = urllib.request.Request(location, headers={"User-Agent": "seglab"})
            return cast(IO[bytes], urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S))  # http(s) only
        return open(Path(location).expanduser(), "rb")
    except urllib.error.HTTPError as e:
        raise SeglabError(f"cannot read {what} {location}: HTTP {e.code} {e.reason}; check the URL") from None
    except urllib.error.URLError as e:
        raise SeglabError(f"cannot reach {what} {location}: {e.reason}; check the URL and that it is served") from None
    except OSError as e:
        raise SeglabError(f"cannot read {what} {location}: {e.strerror or e}; check the path") from None


# --------------------------------------------------------------------------- reading shards


class _Capped:
    """A stream that refuses to hand out more than it was last allowed: tarfile reads a member's headers
    (pax records, long names) into memory at whatever size they claim, before any check can run."""

    def __init__(self, stream: IO[bytes], url: str) -> None:
        self.stream, self.url, self.left = stream, url, 0

    def allow(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(self.left + 1 if n < 0 else min(n, self.left + 1))
        self.left -= len(data)
        if self.left < 0:
            raise SeglabError(
                f"shard {self.url}: a member with its headers runs past {MAX_MEMBER_BYTES + HEADER_BYTES:,} bytes; "
                "a shard from seglab holds images, masks and annotations of at most "
                f"{MAX_MEMBER_BYTES:,} bytes each; {_FIX}"
            )
        return data


def shard_files(shard: Shard, label_ext: str) -> Iterator[dict[str, Any]]:
    """The files of one shard, as webdataset's ``tar_file_expander`` yields them (``{"fname", "data",
    "__url__"}``, for its ``group_by_keys``), each one's tar header checked before its bytes are read.

    webdataset's own expander reads every member whole before anything sees its header, skips members
    that are not files without a word, and appends the stream's repr to error messages; this is the
    same loop over :mod:`tarfile` with the checks first."""
    stream = _Capped(_open(shard.url, "shard"), shard.url)
    key, kinds, seen = "", set[str](), set[str]()  # the current sample's key and kinds of file, every key
    try:
        stream.allow(MAX_MEMBER_BYTES + HEADER_BYTES)
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|") as tar:  # reads the first header
            while True:
                info = tar.next()
                if info is None:
                    break
                name, ext = _check_member(info, shard.url, label_ext)
                if name != key:
                    if name in seen:
                        raise SeglabError(
                            f"shard {shard.url}: the files of sample {name} are not together ({info.name}); {_FIX}"
                        )
                    if len(seen) == shard.count:
                        raise SeglabError(
                            f"shard {shard.url}: holds more than the {shard.count} samples dataset.json lists "
                            f"({info.name}); {_FIX}"
                        )
                    key, kinds = name, set()
                    seen.add(name)
                kind = "image" if ext in IMAGE_EXTS else "label"
                if kind in kinds:
                    raise SeglabError(f"shard {shard.url}: sample {name} has a second {kind} ({info.name}); {_FIX}")
                kinds.add(kind)
                member = tar.extractfile(info)
                assert member is not None  # a regular file (checked)
                yield {"fname": info.name, "data": member.read(), "__url__": shard.url}
                tar.members = []  # type: ignore[attr-defined]  # a streamed TarFile keeps every header otherwise
                stream.allow(MAX_MEMBER_BYTES + HEADER_BYTES)  # for the next headers and member
    except tarfile.TarError as e:
        raise SeglabError(
            f"shard {shard.url}: not a readable tar file ({first_line(e)}); it is truncated or corrupt; {_FIX}"
        ) from None
    except OSError as e:
        raise SeglabError(
            f"cannot read shard {shard.url}: {e.strerror or first_line(e)}; check the path or the server"
        ) from None
    finally:
        stream.stream.close()
    if len(seen) != shard.count:
        raise SeglabError(
            f"shard {shard.url}: holds {len(seen)} samples but dataset.json lists {shard.count}; it is truncated "
            f"or not the shard packed; {_FIX}"
        )


def _check_member(info: tarfile.TarInfo, url: str, label_ext: str) -> tuple[str, str]:
    """(key, extension) of a member a shard may hold, or one line saying why it may not."""
    match = MEMBER_NAME.fullmatch(info.name)
    ext = match["ext"].lower() if match else ""
    if not info.isreg() or match is None or (ext not in IMAGE_EXTS and ext != label_ext):
        what = "a file" if info.isreg() else "not a regular file"
        raise SeglabError(
            f"shard {url}: odd member {short(info.name)} ({what}); a shard holds only files named "
            f"<key>.<image extension> and <key>.{label_ext}; {_FIX}"
        )
    if info.size > MAX_MEMBER_BYTES:
        raise SeglabError(
            f"shard {url}: member {info.name} claims {info.size:,} bytes, more than {MAX_MEMBER_BYTES:,}; {_FIX}"
        )
    return match["key"], ext


def _shuffled(items: Iterable[tuple[int, dict[str, Any]]], rng: random.Random) -> Iterator[tuple[int, dict[str, Any]]]:
    """Items through a shuffle buffer of at most SHUFFLE_SAMPLES samples and SHUFFLE_BYTES bytes (webdataset's
    shuffle counts samples only, and one sample may be MAX_MEMBER_BYTES twice over)."""
    buffer: list[tuple[int, dict[str, Any]]] = []
    held = 0
    for item in items:
        buffer.append(item)
        held += _nbytes(item[1])
        while len(buffer) >= SHUFFLE_SAMPLES or held > SHUFFLE_BYTES:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            held -= _nbytes(out[1])
            yield out
    rng.shuffle(buffer)
    yield from buffer


def _nbytes(raw: dict[str, Any]) -> int:
    return sum(len(v) for k, v in raw.items() if not k.startswith("__"))


def _balance(counts: list[int], readers: int) -> list[list[int]]:
    """Shard indices per reader, largest shards first to the least loaded reader (ties: lowest index), each
    reader's list in series order. Depends only on the counts, so every rank computes the same split."""
    slots: list[list[int]] = [[] for _ in range(readers)]
    load = [0] * readers
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if counts[i]:
            r = min(range(readers), key=load.__getitem__)
            slots[r].append(i)
            load[r] += counts[i]
    return [sorted(s) for s in slots]


class ShardDataset(IterableDataset):
    """One split of a shard set, streamed; items as :class:`~seglab.data.SegmentationDataset` gives them:
    ``{"image": uint8 [C,H,W], "mask": int64 [H,W], "index": int}`` (``index``: position in the split, as
    ``get_split`` lists it), or ``{"bad": message, "index": int}`` for an unreadable sample with ``skip_bad``.

    The split is what :func:`get_split` would give for the same ``val_fraction``, ``seed`` and ``limit``
    (a val held out of train by index, so the folder and its shards hold out the same images). Its
    shards go to ``world x max(1, workers)`` readers (:func:`_balance`); the DataLoader must have
    ``workers`` workers (:func:`shard_loader` makes one). Without ``shuffle`` every sample comes once, in
    series order per reader. With ``shuffle`` each reader reads its shards in an order drawn from
    (seed, epoch, reader) and shuffles samples through a bounded buffer; with ``drop_last`` every reader
    yields the same number of whole batches (the smallest share, cut to whole batches), so all ranks take
    the same number of steps and the DataLoader's round robin over workers gives a fixed batch order.
    Augmentation is seeded per sample by (seed, epoch, index), as the trainer seeds SegmentationDataset.
    """

    def __init__(
        self,
        spec: ShardSpec,
        split: str,
        transform: Transform | None,
        *,
        batch: int,
        workers: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        val_fraction: float = 0.1,
        limit: int | None = None,
        in_channels: int = 3,
        skip_bad: bool = False,
    ) -> None:
        self.spec, self.transform = spec, transform
        self.batch, self.rank = batch, rank
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.in_channels, self.skip_bad = in_channels, skip_bad
        self.label_ext = LABEL_EXTS[spec.mask_encoding]
        self.epoch, self.start_batch = 0, 0
        self.shards, self.position = _split_positions(spec, split, val_fraction=val_fraction, seed=seed, limit=limit)
        kept = np.concatenate([[0], np.cumsum(self.position >= 0)])
        self.kept = [int(kept[s.offset + s.count] - kept[s.offset]) for s in self.shards]  # samples used, per shard
        self.readers = max(1, workers)
        self.slots = _balance(self.kept, world * self.readers)
        shares = [sum(self.kept[i] for i in slot) for slot in self.slots]
        self.share = min(shares) // batch * batch if drop_last else 0  # samples each reader yields per epoch
        if drop_last and self.share == 0:
            raise SeglabError(
                f"{spec.location}: {split} has {sum(self.kept)} samples in {len(self.shards)} shard(s), shared by "
                f"{world} process(es) x {self.readers} worker(s); the smallest share, {min(shares)}, is less than "
                f"--batch {batch}; use a smaller --batch or fewer --workers, or pack smaller shards (--shard-size)"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Read epoch ``epoch`` from this rank's batch ``start_batch`` on (a resumed run). The order
        depends only on (seed, epoch) and the readers, so a run stopped at batch ``k`` and resumed
        with ``set_epoch(epoch, k)`` gets the batches it would have had (``drop_last`` only, which
        training uses; the same ``world`` and ``workers`` as before). The skipped samples are read but
        not decoded. Call before iterating the loader (its workers start with what is set here)."""
        if start_batch and not self.drop_last:
            raise ValueError("set_epoch(epoch, start_batch) resumes a drop_last (training) dataset only")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Samples this rank yields this epoch (from ``start_batch``)."""
        if self.drop_last:
            return (self.readers * self.share // self.batch - self.start_batch) * self.batch
        mine = self.slots[self.rank * self.readers : (self.rank + 1) * self.readers]
        return sum(self.kept[i] for slot in mine for i in slot)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.readers:
            raise RuntimeError(f"ShardDataset was made for {self.readers} reader(s), not {workers} DataLoader workers")
        # the round robin gives worker w this rank's batches j with j % readers == w; resuming at batch
        # start, worker w continues the reader whose next batch is start + w
        slot = (self.start_batch + worker) % self.readers if self.drop_last else worker
        skip = (self.start_batch + worker) // self.readers * self.batch if self.drop_last else 0
        reader = self.rank * self.readers + slot
        shards = [self.shards[i] for i in self.slots[reader]]
        epoch_seed = self.seed * 100_003 + self.epoch  # the trainer's per-epoch augmentation seed
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}")
        if self.shuffle:
            rng.shuffle(shards)
        files = (f for shard in shards for f in itertools.chain(shard_files(shard, self.label_ext), [{}]))
        items = self._numbered(group_by_keys(files), shards)  # {} ends a shard: no sample spans two
        if self.shuffle:
            items = _shuffled(items, rng)
        for position, raw in itertools.islice(items, skip, self.share or None):
            yield self._item(position, raw, epoch_seed)

    def _numbered(self, samples: Iterable[dict[str, Any]], shards: list[Shard]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position in the split, raw sample) of the samples this split uses (shard_files checked the counts)."""
        offsets = {s.url: s.offset for s in shards}
        url, i = "", 0
        for raw in samples:
            if raw["__url__"] != url:
                url, i = raw["__url__"], 0
            position = int(self.position[offsets[url] + i])
            i += 1
            if position >= 0:
                yield position, raw

    def _item(self, position: int, raw: dict[str, Any], epoch_seed: int) -> dict[str, Any]:
        try:
            image_hwc, mask_hw = self._decode(raw)
        except BadSample as e:
            if not self.skip_bad:
                raise
            return {"bad": str(e), "index": position}  # collate_pad drops it and reports it
        image, mask = as_tensor(image_hwc).permute(2, 0, 1), as_tensor(mask_hw)
        if self.transform is not None:
            image, mask = self.transform(image, mask, seed=sample_seed(epoch_seed, position))
        return {"image": image, "mask": mask.long(), "index": position}

    def _decode(self, raw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(image [H,W,C] uint8, mask [H,W] uint8) of a raw sample, or BadSample naming shard and key."""
        where = f"shard {raw['__url__']}, sample {raw['__key__']}"
        image_ext = next((k for k in raw if k in IMAGE_EXTS), None)
        if image_ext is None or self.label_ext not in raw:
            found = ", ".join(k for k in raw if not k.startswith("__"))
            raise BadSample(f"{where}: has only {found}; a sample needs an image and its .{self.label_ext}; {_FIX}")
        try:
            image = decode_image(raw[image_ext], self.in_channels)
            if self.label_ext == "json":
                mask = self._coco_mask(raw["json"], image.shape[:2], where)
            else:
                mode = probe_image(raw["mask.png"]).mode
                if mode != "L":
                    raise BadSample(f"its mask is a {mode} image, not 8-bit greyscale class indices")
                mask = decode_image(raw["mask.png"], 1)[..., 0]
        except BadSample as e:
            raise BadSample(f"{where}: {e}") from None
        if image.shape[:2] != mask.shape:
            raise BadSample(
                f"{where}: the image is {image.shape[1]}x{image.shape[0]} but its mask {mask.shape[1]}x{mask.shape[0]}"
            )
        bad = np.unique(mask[(mask >= self.spec.num_classes) & (mask != self.spec.ignore_index)])
        if bad.size:  # as SegmentationDataset's check_labels: one line here, a device-side assert in the loss
            raise SeglabError(
                f"{where}: label value(s) {', '.join(map(str, bad[:5].tolist()))} outside the "
                f"{self.spec.num_classes} classes and ignore index {self.spec.ignore_index}; {_FIX}"
            )
        return image, mask

    def _coco_mask(self, data: bytes, image_size: tuple[int, ...], where: str) -> np.ndarray:
        """Rasterise a ``<key>.json`` (drawn only once its size is the image's: no allocation on its word)."""
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise BadSample(f"its .json is not JSON ({first_line(e)})") from None
        size = meta.get("size") if isinstance(meta, dict) else None
        anns = meta.get("annotations") if isinstance(meta, dict) else None
        if not isinstance(size, list) or tuple(size) != tuple(image_size):
            raise BadSample(f"its .json gives size {short(size)}, not the image's [{image_size[0]}, {image_size[1]}]")
        classes = range(self.spec.num_classes)
        if not isinstance(anns, list) or not all(
            isinstance(a, dict) and type(a.get("category_id")) is int and a["category_id"] in classes for a in anns
        ):
            raise BadSample(f"its .json needs 'annotations', each with a category_id in 0..{classes.stop - 1}")
        return rasterize_coco(anns, (size[0], size[1]), self.spec.ignore_index)


def _split_positions(
    spec: ShardSpec, split: str, *, val_fraction: float, seed: int, limit: int | None
) -> tuple[list[Shard], np.ndarray]:
    """(the series' shards, position in the split of each of its samples or -1): the split as
    :func:`get_split` would list it, held-out val included, cut to ``limit``."""
    by_index = DatasetSpec(  # get_split on sample numbers: the same hold-out, aliases and messages as for files
        root=cast(Path, spec.location),  # only printed
        format=spec.format,
        classes=spec.classes,
        colors=spec.colors,
        ignore_index=spec.ignore_index,
        mask_encoding=spec.mask_encoding,
        splits={name: cast(list[Sample], range(sum(s.count for s in shards))) for name, shards in spec.shards.items()},
        notes=spec.notes,
    )
    indices = cast(list[int], get_split(by_index, split, val_fraction=val_fraction, seed=seed))[:limit]
    if not indices:
        raise SeglabError(f"{spec.location}: split '{split}' has no samples")
    name = SPLIT_ALIASES.get(split, split)
    shards = spec.shards[name if name in spec.shards else "train"]  # not listed: val held out of train
    position = np.full(sum(s.count for s in shards), -1, dtype=np.int64)
    position[np.asarray(indices, dtype=np.int64)] = np.arange(len(indices))
    return shards, position


def shard_loader(
    spec: ShardSpec,
    split: str,
    transform: Transform | None,
    *,
    batch: int,
    workers: int,
    seed: int = 0,
    **dataset_args: Any,
) -> tuple[ShardDataset, DataLoader]:
    """A :class:`ShardDataset` (``dataset_args``: its keywords, ``rank``, ``world``, ``shuffle``, ...) and the
    DataLoader over it with ``workers`` workers (``build_loader``'s: collate_pad, workers seeded from ``seed``)."""
    dataset = ShardDataset(spec, split, transform, batch=batch, workers=workers, seed=seed, **dataset_args)
    loader = build_loader(
        dataset, batch=batch, shuffle=False, workers=workers, ignore_index=spec.ignore_index, seed=seed
    )
    return dataset, loader


def build_train_data(cfg: Any, spec: ShardSpec, rank: int, world: int) -> tuple[ShardDataset, DataLoader]:
    """The training split of a shard set for a :class:`~seglab.config.TrainConfig`, as the trainer's
    SegmentationDataset + EpochSampler + build_loader would give it: TrainTransform, shuffled, whole
    batches. Call ``dataset.set_epoch(epoch, start_batch)`` before each epoch."""
    from seglab.data.transforms import TrainTransform

    crop = tuple(cfg.crop_size) if cfg.crop_size else (cfg.img_size, cfg.img_size)
    scale = (cfg.scale_range[0], cfg.scale_range[1])
    transform = TrainTransform(cfg.img_size, crop, scale, cfg.hflip, cfg.jitter, spec.ignore_index)
    return shard_loader(spec, "train", transform, shuffle=True, drop_last=True, **_common(cfg, rank, world))


def build_val_data(cfg: Any, spec: ShardSpec, rank: int, world: int) -> tuple[ShardDataset, DataLoader]:
    """The val split (held out of train when there is none) for a TrainConfig: EvalTransform, every sample once."""
    from seglab.data.transforms import EvalTransform

    return shard_loader(spec, "val", EvalTransform(cfg.img_size), **_common(cfg, rank, world))


def _common(cfg: Any, rank: int, world: int) -> dict[str, Any]:
    return dict(
        batch=cfg.batch,
        workers=cfg.workers,
        rank=rank,
        world=world,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        limit=cfg.limit,
        in_channels=cfg.in_channels,
        skip_bad=not cfg.strict_data,
    )


# --------------------------------------------------------------------------- writing shards


def pack_dataset(
    data: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1000,
    max_bytes: int = 1 << 30,
    limit: int | None = None,
    data_cache: str | Path | None = None,
    progress: bool = True,
) -> ShardSpec:
    """Write the dataset at ``data`` (anything ``resolve_dataset`` reads) as shards in the new or empty
    folder ``out``: per split at most ``shard_size`` samples and about ``max_bytes`` per shard (a shard
    ends once it has reached either), ``limit`` samples at most. dataset.json is written last, so a pack
    cut short is not mistaken for a complete one. Returns the spec the shards read back as."""
    import webdataset as wds

    if shard_size < 1 or max_bytes < 1:
        raise SeglabError("data pack: --shard-size and --max-bytes must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SeglabError(f"data pack: --out {out} is not an empty folder; choose a new one")
    spec = resolve_dataset(data, cache_dir=data_cache, progress=progress)
    if isinstance(spec, ShardSpec):
        raise SeglabError(f"data pack: {data} is a shard set already; pack the folder it came from")
    out.mkdir(parents=True, exist_ok=True)
    coco = spec.mask_encoding == "coco"
    splits: dict[str, dict[str, list]] = {}
    for split, samples in spec.splits.items():
        if not samples[:limit] or not SPLIT_NAME.fullmatch(split):
            continue
        counts: dict[str, int] = {}
        pattern = os.path.join(str(out).replace("%", "%%"), f"{split}-%06d.tar")  # ShardWriter fills in %06d
        with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=max_bytes, verbose=0, mtime=0) as writer:
            bar = tqdm(samples[:limit], desc=f"pack {split}", unit="img", disable=None if progress else True)
            for i, sample in enumerate(bar):
                writer.write(_encode(sample, spec, f"{i:07d}", coco))
                name = Path(writer.fname).name
                counts[name] = counts.get(name, 0) + 1
        splits[split] = {"shards": list(counts), "counts": list(counts.values())}
    if not splits:
        raise SeglabError(f"data pack: {data} lists no samples to pack")
    index = {
        "format": INDEX_FORMAT,
        "version": 1,
        "classes": spec.classes,
        "colors": [list(c) for c in spec.colors],
        "ignore_index": spec.ignore_index,
        "labels": "coco" if coco else "mask",
        "source": spec.format,
        "splits": splits,
    }
    with atomic_path(out / INDEX) as partial:
        partial.write_text(json.dumps(index, indent=1) + "\n")
    return resolve_shards(out)


def _encode(sample: Sample, spec: DatasetSpec, key: str, coco: bool) -> dict[str, Any]:
    """One sample as shard members: the image file's bytes as they are, and its labels."""
    ext = sample.image.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise SeglabError(f"data pack: {sample.image}: extension .{ext} is not an image seglab reads")
    item: dict[str, Any] = {"__key__": key, ext: sample.image.read_bytes()}
    if len(item[ext]) > MAX_MEMBER_BYTES:  # a reader would refuse it
        raise SeglabError(f"data pack: {sample.image} is more than {MAX_MEMBER_BYTES:,} bytes; split it into tiles")
    if coco:
        labels = {
            "size": list(sample.size or ()),
            "annotations": sample.annotations or [],
            "file_name": sample.image.name,
        }
        item["json"] = json.dumps(labels).encode()
    else:
        buffer = io.BytesIO()
        Image.fromarray(read_mask(sample, spec)).save(buffer, format="PNG")  # (H, W) uint8: mode L
        item["mask.png"] = buffer.getvalue()
    return item


__all__ = [
    "INDEX",
    "MAX_MEMBER_BYTES",
    "Shard",
    "ShardDataset",
    "ShardSpec",
    "build_train_data",
    "build_val_data",
    "is_shard_source",
    "pack_dataset",
    "resolve_shards",
    "shard_files",
    "shard_loader",
]
