"""Reading images and masks into numpy arrays, with errors that name the file.

``read_image`` returns (H, W, C) uint8 whatever the file holds (palette, alpha, 16-bit,
float TIFF); ``read_mask`` returns (H, W) uint8 class indices according to
``DatasetSpec.mask_encoding``. Both decode the whole file (``Image.load()``), so a
truncated file fails here, with its path, rather than as a grey stripe in training.
All label conversions are numpy lookup tables: no Python loop over pixels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import BadSample, SeglabError

TIFF_SUFFIXES = (".tif", ".tiff")

# --------------------------------------------------------------------------- Cityscapes
# labelId -> trainId, from cityscapesScripts/helpers/labels.py; every id not listed -> ignore.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def cityscapes_lut(ignore_index: int) -> np.ndarray:
    """(256,) uint8 table mapping a Cityscapes labelId to its train id (others -> ignore_index)."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


# --------------------------------------------------------------------------- opening files


MAX_PIXELS = 1 << 30  # about a gigapixel: a 20000x20000 scan passes, a decompression bomb does not


@contextlib.contextmanager
def _pixel_limit(pixels: int):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (89 M by default): lift it for one open."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` with PIL, or raise a SeglabError saying why not."""
    fix = f"replace or remove the file, or drop it from the {what} list"
    if not path.is_file():
        raise BadSample(f"cannot read {what} {path}: file not found; check the path or the dataset layout")
    if path.stat().st_size == 0:
        raise BadSample(f"cannot read {what} {path}: the file is empty (0 bytes); {fix}")
    try:
        with _pixel_limit(MAX_PIXELS):
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise BadSample(f"cannot read {what} {path}: more than {MAX_PIXELS:,} pixels; split it into tiles") from None
    except UnidentifiedImageError:
        raise BadSample(f"cannot read {what} {path}: not an image file PIL recognises; {fix}") from None
    except OSError as e:
        raise BadSample(f"cannot read {what} {path}: {e}; {fix}") from None
    try:
        im.load()  # decode now: a truncated file raises here, not later in a worker
    except (OSError, SyntaxError, ValueError) as e:
        reason = "the file is truncated" if "truncated" in str(e) else f"corrupt data ({e})"
        raise BadSample(f"cannot read {what} {path}: {reason}; {fix}") from None
    return im


def _read_tiff(path: Path, what: str) -> np.ndarray:
    """A TIFF that PIL cannot decode (multi-sample float, planar, ...) as (H, W) or (H, W, C)."""
    import tifffile

    try:
        a = np.asarray(tifffile.imread(path))
    except Exception as e:  # tifffile raises many types for bad files
        raise BadSample(f"cannot read {what} {path}: {e}; replace or remove the file") from None
    a = np.squeeze(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise BadSample(
            f"cannot read {what} {path}: array of shape {a.shape} is not a 2-D image with 1, 3 or 4 "
            "channels (a stack or volume?); save one 2-D slice per file"
        )
    return a


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float pixel values to uint8 by the image's own value range.

    Integer images whose values already lie in 0..255 are kept as they are; float images in
    0..1 are multiplied by 255; anything else is stretched linearly from its min..max.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    finite = np.isfinite(a) if a.dtype.kind == "f" else None
    values = a[finite] if finite is not None else a
    if values.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(values.min()), float(values.max())
    if a.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    out = (a.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(a.shape)
    if finite is not None:
        out[~finite] = 0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """Pixels of a decoded PIL image as (H, W) or (H, W, 3) uint8: palette expanded, alpha dropped."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(im.convert("RGB"))  # alpha dropped: masks and photos rarely mean it
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "PA":
        return np.asarray(im.convert("RGB"))
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im, dtype=np.uint8) * 255
    if mode.startswith("I") or mode == "F":
        return _to_uint8(np.asarray(im))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image file as (H, W, channels) uint8 (channels 3 = RGB, 1 = greyscale).

    Palette images are expanded, alpha is dropped, 16-bit and float images are scaled to
    0..255 by their value range, and TIFFs PIL cannot decode are read with tifffile.
    Raises SeglabError naming the file if it is missing, empty, truncated or not an image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        a = _pil_to_array(_open(path, "image"))
    except SeglabError:
        if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file() or path.stat().st_size == 0:
            raise
        a = _to_uint8(_read_tiff(path, "image"))
        if a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        elif a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
    if a.ndim == 2:
        a = a[..., None]
    if channels == 3 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif channels == 1 and a.shape[-1] == 3:
        # ITU-R 601 luma, as PIL's convert("L")
        a = np.rint(a @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None]
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- masks


def read_raw_mask(path: str | Path) -> tuple[np.ndarray, str]:
    """A mask file's values without any colour expansion: (array, PIL mode).

    P-mode files give their palette *indices* (what VOC stores), L/I give their values,
    RGB(A) gives (H, W, 3). TIFF masks PIL cannot decode are read with tifffile.
    """
    path = Path(path)
    try:
        im = _open(path, "mask")
    except SeglabError:
        if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file() or path.stat().st_size == 0:
            raise
        a = _read_tiff(path, "mask")
        return a, "RGB" if a.ndim == 3 else "I"
    mode = im.mode
    if mode in ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB")), "RGB"
    if mode in ("LA", "La", "PA"):
        return np.asarray(im)[..., 0], mode[0]
    if mode == "1":
        return np.asarray(im, dtype=np.uint8) * 255, "L"  # 1-bit masks are 0/255, as PIL shows them
    return np.asarray(im), mode


def _as_index(raw: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """(H, W) uint8 from a single-channel mask (or an RGB one whose channels are equal)."""
    if raw.ndim == 3:
        if raw.shape[-1] == 1 or (
            np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])
        ):
            raw = raw[..., 0]
        else:
            raise SeglabError(
                f"mask {path} is a colour (RGB) image but the dataset's masks are class indices; "
                "set mask_encoding: rgb (and colors: one [r, g, b] per class) in data.yaml"
            )
    if raw.dtype != np.uint8:
        if raw.dtype.kind == "f" or (raw.size and (raw.min() < 0 or raw.max() > 255)):
            hi = raw.max() if raw.size else 0
            raise SeglabError(
                f"mask {path} ({mode}, {raw.dtype}) holds values up to {hi}, outside 0..255; "
                "class-index masks must be 8-bit; for instance-id masks (one integer per object) set "
                "mask_encoding: instance in data.yaml, or train with --task instance"
            )
        raw = raw.astype(np.uint8)
    return raw


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int64 key r << 16 | g << 8 | b, for colour lookups."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def rgb_to_index(
    rgb: np.ndarray, colors: Sequence[Sequence[int]], ignore_index: int, unknown: Counter | None = None
) -> np.ndarray:
    """Map an (H, W, 3) colour mask to (H, W) class indices through ``colors``.

    Pixels whose colour is not in ``colors`` become ``ignore_index``; when ``unknown`` is given,
    their ``(r, g, b) -> pixel count`` are added to it.
    """
    keys = pack_rgb(np.asarray(colors, dtype=np.uint8).reshape(-1, 3))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    packed = pack_rgb(rgb)
    pos = np.searchsorted(sorted_keys, packed).clip(0, len(keys) - 1)
    found = sorted_keys[pos] == packed
    out = np.where(found, order[pos], ignore_index).astype(np.uint8)
    if unknown is not None and not found.all():
        values, counts = np.unique(packed[~found], return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            unknown[((v >> 16) & 255, (v >> 8) & 255, v & 255)] += c
    return out


def decode_coco_segmentation(segmentation: Any, size: tuple[int, int], ann_id: Any = None) -> np.ndarray | None:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> (H, W) uint8 0/1,
    or None when it holds no usable shape."""
    from pycocotools import mask as mask_utils

    h, w = size
    if isinstance(segmentation, list):  # polygons: a list of [x1, y1, x2, y2, ...]
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict) and "counts" in segmentation:  # compressed RLE; pycocotools wants bytes
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        return None
    m = mask_utils.decode(rle)
    if m.shape != (h, w):
        raise SeglabError(
            f"COCO annotation {ann_id} has an RLE of size {m.shape} for an image of size {(h, w)}; "
            "fix the annotation's 'size'"
        )
    return m


def rasterize_coco(annotations: Sequence[dict], size: tuple[int, int], ignore_index: int) -> np.ndarray:
    """Draw COCO annotations into an (H, W) uint8 class mask (0 = background).

    ``category_id`` must already be the class index. Polygons, uncompressed and compressed
    RLE are all accepted; annotations are drawn in order (later over earlier) and crowd
    regions (``iscrowd: 1``) become ``ignore_index``.
    """
    out = np.zeros(size, dtype=np.uint8)
    for ann in annotations:
        m = decode_coco_segmentation(ann.get("segmentation"), size, ann.get("id"))
        if m is not None:
            out[m.astype(bool)] = ignore_index if ann.get("iscrowd") else int(ann["category_id"])
    return out


def read_instance_ids(path: str | Path) -> np.ndarray:
    """An instance-id mask (PNG, 16-bit PNG or TIFF) as (H, W) int64: one id per object, 0 = background."""
    path = Path(path)
    raw, _ = read_raw_mask(path)
    if raw.ndim == 3:
        if raw.shape[-1] != 1 and not (
            np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])
        ):
            raise SeglabError(
                f"instance mask {path} is a colour image; save one integer id per object in a "
                "single-channel PNG or TIFF (0 = background)"
            )
        raw = raw[..., 0]
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise SeglabError(f"instance mask {path} holds fractional values; instance ids must be integers")
    ids = raw.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise SeglabError(f"instance mask {path} holds negative values; ids must be 0 (background) or positive")
    return ids


def class_table(spec: DatasetSpec, path: Path) -> dict[int, int] | None:
    """The class map's {instance id: class index} for mask ``path`` (by file name or stem); None
    without a class map (every object is class 1)."""
    if spec.class_map is None:
        return None
    table = spec.class_map.get(path.name, spec.class_map.get(path.stem))
    if table is None:
        raise SeglabError(f"instance mask {path} is not listed in data.yaml's class_map; add '{path.name}' to it")
    return table


def instances_to_classes(ids: np.ndarray, spec: DatasetSpec, path: Path) -> np.ndarray:
    """Instance ids (H, W) -> class indices (H, W) through ``spec.class_map`` (instance -> semantic).

    Without a class map every object is class 1. An object the map does not list is ignored."""
    table = class_table(spec, path)
    if table is None:
        return (ids > 0).astype(np.int64)
    lut = np.full(int(ids.max()) + 1, spec.ignore_index, dtype=np.int64)
    lut[0] = 0
    for i, c in table.items():
        if i < len(lut):
            lut[i] = c
    return lut[ids]


def read_mask(sample: Sample, spec: DatasetSpec, *, unknown_colors: Counter | None = None) -> np.ndarray:
    """Read ``sample``'s labels as an (H, W) uint8 array of class indices (ignore = spec.ignore_index).

    The conversion follows ``spec.mask_encoding``: ``index`` keeps the stored values (for
    palette PNGs the palette *indices*, as VOC intends); ``rgb`` looks colours up in
    ``spec.colors`` (unknown colours -> ignore, counted into ``unknown_colors`` if given);
    ``binary`` thresholds at 128 to {0, 1}; ``cityscapes`` maps labelIds to train ids;
    ``coco`` rasterises ``sample.annotations``. Values are not range-checked here
    (``seglab data check`` does that).
    """
    encoding = spec.mask_encoding
    if encoding == "coco":
        if sample.size is None:
            raise SeglabError(f"COCO sample {sample.image} has no image size; the annotation file is incomplete")
        return rasterize_coco(sample.annotations or [], sample.size, spec.ignore_index)
    if sample.mask is None:
        raise SeglabError(f"image {sample.image} has no mask file; every training sample needs one")
    path = Path(sample.mask)
    raw, mode = read_raw_mask(path)
    if encoding == "rgb":
        if raw.ndim == 2:
            if mode != "P":
                raise SeglabError(
                    f"mask {path} is single-channel but mask_encoding is rgb; set mask_encoding: index in data.yaml"
                )
            raw = np.asarray(Image.open(path).convert("RGB"))
        return rgb_to_index(raw[..., :3], spec.colors, spec.ignore_index, unknown_colors)
    if encoding == "binary":
        if mode == "P":  # threshold what the palette shows, not the indices
            raw = np.asarray(Image.open(path).convert("L"))
        if raw.ndim == 3:
            raw = raw.max(axis=-1)
        return (raw >= 128).astype(np.uint8)
    if encoding == "instance":
        return instances_to_classes(read_instance_ids(path), spec, path).astype(np.uint8)
    index = _as_index(raw, mode, path)
    if encoding == "cityscapes":
        return cityscapes_lut(spec.ignore_index)[index]
    if encoding != "index":
        raise SeglabError(f"unknown mask_encoding '{encoding}' for {path}; use index, rgb, binary, cityscapes")
    return index
