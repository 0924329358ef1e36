"""Shards: `seglab data pack`, reading them locally and over HTTP, the rank/worker split, resume, hostile shards.

Real data: a CamVid subset and the facade COCO set from ../shared/data (skipped when absent); a real
http.server on 127.0.0.1; real DataLoader workers. The model is a random-weight checkpoint with CamVid's
classes: a one-epoch trained one predicts a single class everywhere, so equal metrics would not show that
each image met its own mask.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_checkpoint
from seglab.cli import main
from seglab.data import EvalTransform, SegmentationDataset, TrainTransform, get_split, resolve_dataset, shard_loader
from seglab.data.shards import ShardSpec
from seglab.errors import SeglabError

LIMIT = 12  # CamVid samples per split: 4 shards of 3


@pytest.fixture(scope="module")
def camvid(shared_data) -> Path:
    return shared_data / "camvid"


@pytest.fixture(scope="module")
def packed(camvid, tmp_path_factory) -> Path:
    """CamVid's first 12 train and 12 val samples in shards of 3, under <root>/camvid."""
    out = tmp_path_factory.mktemp("shards") / "camvid"
    assert (
        main(["data", "pack", "--data", str(camvid), "--out", str(out), "--limit", str(LIMIT), "--shard-size", "3"])
        == 0
    )
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # not onto the stderr the one-line checks read
        pass


@pytest.fixture(scope="module")
def serve() -> Iterator:
    """``serve(folder) -> base URL``: a real HTTP server on 127.0.0.1 per folder, stopped after the module."""
    servers = []

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("model") / "best.pt", "fcn", img_size=64)


def val(weights: Path, data: str, out: Path, *extra: str) -> dict:
    """The figures of metrics.json (not where they came from: data, weights and --limit differ)."""
    assert main(["val", "--weights", str(weights), "--data", data, "--out", str(out), *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in ("data", "weights", "limit")}


def one_line_error(capsys, args: list[str], *fragments: str) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seglab: error:") and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def test_pack_writes_webdataset_shards_that_read_back_as_the_folder(packed, camvid):
    index = json.loads((packed / "dataset.json").read_text())
    assert index["classes"][0] == "Sky" and index["ignore_index"] == 11 and index["labels"] == "mask"
    assert index["splits"]["val"] == {"shards": [f"val-00000{i}.tar" for i in range(4)], "counts": [3, 3, 3, 3]}
    import webdataset as wds  # anyone's WebDataset reader sees image + mask pairs

    keys = [
        sorted(k for k in s if not k.startswith("__"))
        for s in wds.WebDataset(str(packed / "val-000000.tar"), shardshuffle=False)
    ]
    assert keys == [["mask.png", "png"]] * 3

    spec = resolve_dataset(packed)
    assert isinstance(spec, ShardSpec) and spec.classes == resolve_dataset(camvid).classes
    folder = resolve_dataset(camvid)
    for split in ("train", "val"):
        reference = SegmentationDataset(get_split(folder, split)[:LIMIT], folder, EvalTransform(64))
        dataset, _ = shard_loader(spec, split, EvalTransform(64), batch=1, workers=0)
        items = list(dataset)
        assert [item["index"] for item in items] == list(range(LIMIT))
        for item in items:
            expected = reference[item["index"]]
            assert torch.equal(item["image"], expected["image"]) and torch.equal(item["mask"], expected["mask"])


def test_val_over_http_gives_the_folders_metrics(packed, camvid, weights, serve, tmp_path):
    base = serve(packed.parent)
    pattern = f"{base}/camvid/val-{{000000..000003}}.tar"
    from_http = val(weights, pattern, tmp_path / "http", "--workers", "2")
    from_folder = val(weights, str(camvid), tmp_path / "folder", "--limit", str(LIMIT), "--workers", "0")
    assert from_http == from_folder
    predicted = [name for name, c in from_http["per_class"].items() if c["precision"] is not None]
    assert len(predicted) >= 3, predicted  # the model tells images apart: equal metrics mean equal pairs
    # the folder URL reads dataset.json and gives the same; a pattern of two shards stands for the split
    assert val(weights, f"{base}/camvid/", tmp_path / "url", "--workers", "0") == from_http
    part = resolve_dataset(f"{base}/camvid/val-{{000000..000001}}.tar")
    assert [s.url for s in part.shards["val"]] == [f"{base}/camvid/val-00000{i}.tar" for i in range(2)]
    assert [item["index"] for item in shard_loader(part, "val", EvalTransform(32), batch=1, workers=0)[0]] == [
        *range(6)
    ]


def test_facade_coco_shards_hold_out_the_folders_val(shared_data, tmp_path):
    """COCO data packs as <key>.json annotations; with no val split, both hold out the same 10% of train."""
    folder = resolve_dataset(shared_data / "facade_coco")
    out = tmp_path / "facade"
    assert (
        main(["data", "pack", "--data", str(shared_data / "facade_coco"), "--out", str(out), "--shard-size", "64"]) == 0
    )
    spec = resolve_dataset(out)
    assert spec.mask_encoding == "coco" and [s.count for s in spec.shards["train"]] == [64] * 6 + [23]
    held = get_split(folder, "val", val_fraction=0.1, seed=5)
    reference = SegmentationDataset(held, folder, EvalTransform(128))
    _, loader = shard_loader(spec, "val", EvalTransform(128), batch=4, workers=2, seed=5)
    items = sorted((item for batch in loader for item in _items(batch)), key=lambda item: item["index"])
    assert len(items) == len(held) == 41
    for item in items:
        expected = reference[item["index"]]
        assert torch.equal(item["image"], expected["image"]) and torch.equal(item["mask"], expected["mask"])
    assert len(shard_loader(spec, "train", None, batch=1, workers=0, seed=5)[0]) == 407 - 41


def _items(batch: dict) -> Iterator[dict]:
    for i, index in enumerate(batch["index"]):
        h, w = batch["mask_size"][i]
        ih, iw = batch["image_size"][i]
        yield {"index": index, "image": batch["image"][i, :, :ih, :iw], "mask": batch["mask"][i, :h, :w]}


def test_ranks_and_workers_read_every_sample_once(packed):
    spec = resolve_dataset(packed)
    seen = []
    for rank in (0, 1):
        dataset, loader = shard_loader(spec, "val", EvalTransform(32), batch=2, workers=2, rank=rank, world=2)
        mine = [i for batch in loader for i in batch["index"]]
        assert len(mine) == len(dataset) == 6  # 4 readers, a shard of 3 each
        seen += mine
    assert sorted(seen) == list(range(LIMIT))
    # training: shuffled, and every rank takes the same number of whole batches
    batches = {}
    for rank in (0, 1):
        dataset, loader = shard_loader(
            spec, "train", None, batch=1, workers=2, rank=rank, world=2, shuffle=True, drop_last=True, seed=1
        )
        dataset.set_epoch(3)
        batches[rank] = [b["index"][0] for b in loader]
        assert len(batches[rank]) == len(loader) == 6
    assert sorted(batches[0] + batches[1]) == list(range(LIMIT))


def test_set_epoch_resumes_at_the_right_sample(packed):
    spec = resolve_dataset(packed)
    transform = TrainTransform(48, (32, 32), ignore_index=11)
    dataset, loader = shard_loader(spec, "train", transform, batch=2, workers=2, shuffle=True, drop_last=True, seed=4)
    dataset.set_epoch(2)
    epoch = list(loader)
    order = [b["index"] for b in epoch]
    assert len(order) == 6 and sorted(i for batch in order for i in batch) == list(range(LIMIT))
    for start in (1, 2, 5):
        dataset.set_epoch(2, start)
        resumed = list(loader)
        assert [b["index"] for b in resumed] == order[start:] and len(loader) == 6 - start
        assert torch.equal(resumed[0]["image"], epoch[start]["image"])  # augmentation follows the sample
    dataset.set_epoch(3)
    assert len(loader) == 6 and [b["index"] for b in loader] != order  # each epoch its own order


# --------------------------------------------------------------------------- hostile shards


def _tar(path: Path, members: list[tuple[str, bytes]], kind: bytes = tarfile.REGTYPE) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def hostile(packed, tmp_path) -> Path:
    """A copy of the packed set to damage: val-000000.tar is the one each case replaces."""
    copy = tmp_path / "hostile"
    shutil.copytree(packed, copy)
    return copy


def _cut(size: int):
    def damage(shard: Path) -> None:
        shard.write_bytes(shard.read_bytes()[:size])

    return damage


def _cut_after(members: int):
    """Cut between two members: still a valid tar, one sample short (only the count shows it)."""

    def damage(shard: Path) -> None:
        with tarfile.open(shard) as tar:
            offset = tar.getmembers()[members].offset
        shard.write_bytes(shard.read_bytes()[:offset])

    return damage


def _replace(*members: tuple[str, bytes], kind: bytes = tarfile.REGTYPE):
    return lambda shard: _tar(shard, list(members), kind)


def _huge_header(shard: Path) -> None:
    """A header claiming a 10 GB member, and no data: refused on its header, nothing read."""
    info = tarfile.TarInfo("0000000.png")
    info.size = 10 << 30
    shard.write_bytes(info.tobuf())


GOOD = _png(np.zeros((4, 6, 3), np.uint8))
MASK = _png(np.zeros((4, 6), np.uint8))


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        pytest.param(_cut(300_000), ["val-000000.tar: not a readable tar file", "truncated"], id="cut-mid-member"),
        pytest.param(_cut_after(4), ["val-000000.tar: holds 2 samples but dataset.json lists 3"], id="cut-between"),
        pytest.param(_replace(("../../0000000.png", GOOD)), ["odd member '../../0000000.png'"], id="climbing-name"),
        pytest.param(_replace(("0000000.exe", GOOD)), ["val-000000.tar: odd member '0000000.exe'"], id="odd-extension"),
        pytest.param(
            _replace(("0000000.png", b""), kind=tarfile.SYMTYPE), ["odd member", "not a regular file"], id="symlink"
        ),
        pytest.param(
            _huge_header, ["val-000000.tar: member 0000000.png claims 10,737,418,240 bytes"], id="10-GB-header"
        ),
        pytest.param(
            _replace(*[(f"000000{i}.png", GOOD) for i in range(4)]),
            ["holds more than the 3 samples"],
            id="extra-sample",
        ),
        pytest.param(
            _replace(("0000000.png", GOOD), ("0000000.jpg", GOOD)),
            ["sample 0000000 has a second image"],
            id="two-images",
        ),
        pytest.param(
            _replace(("0000000.png", GOOD), ("0000001.png", GOOD), ("0000000.mask.png", MASK)),
            ["the files of sample 0000000 are not together"],
            id="split-sample",
        ),
    ],
)
def test_a_hostile_shard_is_one_line_naming_it(hostile, weights, tmp_path, capsys, damage, fragments):
    damage(hostile / "val-000000.tar")
    workers = "2" if "not a readable tar file" in fragments[0] else "0"  # once from a DataLoader worker: one line too
    args = [
        "val",
        "--weights",
        str(weights),
        "--data",
        str(hostile),
        "--out",
        str(tmp_path / "v"),
        "--workers",
        workers,
    ]
    one_line_error(capsys, args, *fragments)


def test_hostile_samples_are_bounded_and_named(hostile, weights, tmp_path, capsys):
    """A PNG whose header claims 60000 x 60000 pixels is refused before decoding (skipped, or one line
    with --strict-data); a label outside the classes stops the run, as from a folder."""
    header = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    header[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width and height
    header[29:33] = zlib.crc32(header[12:29]).to_bytes(4, "big")  # and its checksum
    bomb = bytes(header)
    members = [("0000000.png", bomb), ("0000000.mask.png", MASK), ("0000001.png", GOOD), ("0000001.mask.png", MASK)]
    _tar(
        hostile / "val-000000.tar",
        [*members, ("0000002.png", GOOD), ("0000002.mask.png", _png(np.full((4, 6), 99, np.uint8)))],
    )
    args = ["val", "--weights", str(weights), "--data", str(hostile), "--workers", "0"]
    one_line_error(
        capsys, [*args, "--out", str(tmp_path / "a"), "--strict-data"], "val-000000.tar, sample 0000000", "pixels"
    )
    one_line_error(
        capsys, [*args, "--out", str(tmp_path / "b")], "sample 0000002: label value(s) 99 outside the 11 classes"
    )
    index = json.loads((hostile / "dataset.json").read_text())
    index["splits"]["val"]["counts"][0] = 2
    (hostile / "dataset.json").write_text(json.dumps(index))
    _tar(hostile / "val-000000.tar", members)
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    assert "val: skipped an unreadable sample: shard " in capsys.readouterr().out


def test_a_hostile_index_or_source_is_one_line(hostile, weights, tmp_path, capsys):
    args = ["val", "--weights", str(weights), "--out", str(tmp_path / "v"), "--data"]
    one_line_error(capsys, [*args, "pipe:rm -rf x.tar"], "pipe:rm -rf x.tar")  # a path, never a command
    one_line_error(capsys, [*args, "s3://bucket/train-000000.tar"], "s3:// is not read")
    one_line_error(capsys, [*args, str(hostile / "val-{000007..000009}.tar")], "val-000007.tar is not a shard of")
    index = json.loads((hostile / "dataset.json").read_text())
    (hostile / "dataset.json").write_text(json.dumps({**index, "classez": []}))
    one_line_error(capsys, [*args, str(hostile)], "dataset.json: unknown key 'classez' (did you mean 'classes'?)")
    index["splits"]["val"]["shards"][0] = "../../etc/val-000000.tar"
    (hostile / "dataset.json").write_text(json.dumps(index))
    one_line_error(capsys, [*args, str(hostile)], "splits.'val': odd split or shard name '../../etc/val-000000.tar'")


def test_member_cap_holds_against_a_stream_that_lies(hostile, monkeypatch):
    """The size check reads the header; the capped stream holds even when tarfile reads headers (here a
    pax record) at whatever size they claim."""
    import seglab.data.shards as shards

    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 1000)
    monkeypatch.setattr(shards, "HEADER_BYTES", 20_000)  # more than tarfile's 10 KB read-ahead
    with tarfile.open(hostile / "val-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("0000000.png")
        info.pax_headers = {"comment": "x" * 100_000}
        info.size = len(GOOD)
        tar.addfile(info, io.BytesIO(GOOD))
    spec = resolve_dataset(hostile)
    with pytest.raises(SeglabError, match=r"val-000000.tar: a member with its headers runs past 21,000 bytes"):
        list(shard_loader(spec, "val", None, batch=1, workers=0)[0])


def test_torchrun_trains_from_http_shards_and_scores_as_on_the_folder(packed, camvid, serve, tmp_path, capsys):
    """Two ranks with a worker each train from the shards over HTTP (each reads shards of its own);
    the weights then score the same on the shards as on the folder they were packed from."""
    import subprocess
    import sys

    base = serve(packed.parent)
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "seglab",
             "train", "--data", f"{base}/camvid/train-{{000000..000003}}.tar", "--model", "fcn", "--img-size", "48",
             "--epochs", "1", "--batch", "1", "--workers", "1", "--name", "shards"]  # fmt: skip
    proc = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "epoch 1/1:" in proc.stdout and "batch 1 x 2 process(es)" in proc.stdout
    weights = tmp_path / "runs/train/shards/weights/last.pt"
    on_shards = val(weights, f"{base}/camvid/val-{{000000..000003}}.tar", tmp_path / "a", "--workers", "0")
    on_folder = val(weights, str(camvid), tmp_path / "b", "--workers", "0", "--limit", str(LIMIT))
    assert on_shards == on_folder


def test_pack_refuses_in_one_line(packed, camvid, tmp_path, capsys):
    one_line_error(capsys, ["data", "pack", "--data", str(camvid), "--out", str(packed)], "is not an empty folder")
    one_line_error(capsys, ["data", "pack", "--data", str(packed), "--out", str(tmp_path / "x")], "a shard set already")


def test_build_train_data_gives_the_trainers_batches(packed):
    """What a training loop calls: TrainConfig in, crops of --crop-size in whole batches, val held out."""
    from seglab.config import load_train_config
    from seglab.data import build_train_data, build_val_data

    cfg = load_train_config(data=str(packed), batch=2, workers=2, img_size=48, crop_size=[32, 40], seed=3)
    spec = resolve_dataset(cfg.data)
    train_set, train_loader = build_train_data(cfg, spec, 0, 1)
    train_set.set_epoch(0)
    batches = list(train_loader)
    assert len(batches) == len(train_loader) == 6 and all(b["image"].shape == (2, 3, 32, 40) for b in batches)
    _, val_loader = build_val_data(cfg, spec, 0, 1)
    assert sorted(i for b in val_loader for i in b["index"]) == list(range(LIMIT))


def test_a_coco_sample_claiming_a_huge_size_draws_nothing(packed, tmp_path):
    """<key>.json's size must be the decoded image's before a mask is drawn at it."""
    folder = tmp_path / "coco"
    folder.mkdir()
    index = json.loads((packed / "dataset.json").read_text())
    index.update(labels="coco", splits={"val": {"shards": ["val-000000.tar"], "counts": [2]}})
    (folder / "dataset.json").write_text(json.dumps(index))
    polygon = {"segmentation": [[0, 0, 5, 0, 5, 3]], "category_id": 2, "iscrowd": 0}
    members = [("0000000.png", GOOD), ("0000000.json", json.dumps({"size": [4, 6], "annotations": [polygon]}).encode())]
    members += [
        ("0000001.png", GOOD),
        ("0000001.json", json.dumps({"size": [60000, 60000], "annotations": []}).encode()),
    ]
    _tar(folder / "val-000000.tar", members)
    dataset, _ = shard_loader(resolve_dataset(folder), "val", None, batch=1, workers=0, skip_bad=True)
    first, second = list(dataset)
    assert first["mask"].shape == (4, 6) and int((first["mask"] == 2).sum()) > 0
    assert "sample 0000001: its .json gives size [60000, 60000], not the image's [4, 6]" in second["bad"]
