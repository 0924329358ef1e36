"""Reading images and masks into numpy arrays, with errors that name the file.

``read_image`` returns (H, W, C) uint8 whatever the file holds (palette, alpha, 16-bit,
float TIFF); ``read_mask`` returns (H, W) uint8 class indices according to
``DatasetSpec.mask_encoding``. Both decode the whole file (``Image.load()``), so a
truncated file fails here, with its path, rather than as a grey stripe in training.
All label conversions are numpy lookup tables: no Python loop over pixels.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import BadSample, SeglabError, first_line

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


# --------------------------------------------------------------------------- decoding images, from files or bytes

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF and BigTIFF, either byte order
# Image.MAX_IMAGE_PIXELS is PIL's one global limit: lifted for one Image.open at a time, since
# `seglab serve` decodes in many threads at once (the limits below are checked instead)
_OPEN_LOCK = threading.Lock()
_FIX = "replace or remove the file, or drop it from the image list"


class UnreadableImage(BadSample):
    """An image that cannot be decoded. ``problem`` says how, for callers that answer each way
    differently (`seglab serve`: "format" is 415, "size" 413, the rest 400): "missing", "empty",
    "format" (no reader recognises the data), "size" (over ``max_side`` / ``max_pixels``) or "corrupt"."""

    def __init__(
        self, message: str, problem: str = "corrupt", reason: str = "", size: tuple[int, int] | None = None
    ) -> None:  # defaults: a DataLoader worker's exception is rebuilt in the main process from its message
        super().__init__(message)
        self.problem, self.reason, self.size = problem, reason, size  # size: (width, height) when known


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read before any pixel is decoded."""

    width: int
    height: int
    mode: str  # PIL's mode ("RGB", "P", "I;16", "F", ...), or "tiff" for a TIFF only tifffile reads
    samples: int  # values per pixel as stored


ImageSource = bytes | str | Path  # the encoded file's bytes, or its path


def probe_image(source: ImageSource, *, max_side: int | None = None, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """The image's size and mode from its header alone; UnreadableImage if it cannot be read or is
    over ``max_side`` (longest side) or ``max_pixels``. Costs no more than reading the header."""
    image, header = _open_header(source, max_side, max_pixels)
    if image is not None:
        image.close()
    return header


def decode_image(
    source: ImageSource, channels: int = 3, *, max_side: int | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decode an image file (its path or its bytes) to (H, W, channels) uint8: the one decoder of
    ``read_image`` (so train, val and predict) and of `seglab serve`, so all see the same pixels.

    The size limits are checked from the header, before any pixel is decoded (a decompression
    bomb costs nothing). Palette images are expanded, alpha is dropped, 16-bit and float images
    are scaled to 0..255 by their value range, TIFFs PIL cannot decode are read with tifffile, and
    the EXIF orientation is applied: the image comes out upright, as viewers and browsers show it.
    A file that cannot be decoded, whatever the reason, is one UnreadableImage naming it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image, _ = _open_header(source, max_side, max_pixels)
    if image is None:
        a = _tiff_pixels(source)
    else:
        try:
            a = _pil_pixels(image, source)
        except UnreadableImage:
            if not _is_tiff(source):
                raise
            a = _tiff_pixels(source)  # a TIFF PIL opens but cannot decode (multi-sample float, ...)
        finally:
            image.close()
    if a.ndim == 2:
        a = a[..., None]
    if channels == 3 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif channels == 1 and a.shape[-1] == 3:
        # ITU-R 601 luma, as PIL's convert("L")
        a = np.rint(a @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None]
    return np.ascontiguousarray(a)


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read an image file as (H, W, channels) uint8 (channels 3 = RGB, 1 = greyscale), upright by
    its EXIF orientation; see :func:`decode_image`. Raises SeglabError naming the file if it is
    missing, empty, truncated, not an image or over MAX_PIXELS."""
    return decode_image(Path(path), channels)


def _unreadable(
    source: ImageSource, problem: str, reason: str, fix: str, size: tuple[int, int] | None = None
) -> UnreadableImage:
    name = "image data" if isinstance(source, bytes) else f"image {source}"
    return UnreadableImage(f"cannot read {name}: {reason}; {fix}", problem, reason, size)


def _is_tiff(source: ImageSource) -> bool:
    if isinstance(source, bytes):
        return source[:4] in TIFF_MAGIC
    with open(source, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _open_header(source: ImageSource, max_side: int | None, max_pixels: int) -> tuple[Image.Image | None, ImageHeader]:
    """(the opened but not decoded PIL image, or None for a TIFF only tifffile reads; its header)."""
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            raise _unreadable(source, "missing", "file not found", "check the path or the dataset layout")
    if (len(source) if isinstance(source, bytes) else source.stat().st_size) == 0:
        raise _unreadable(source, "empty", "the file is empty (0 bytes)", _FIX)
    image = _pil_open(source)
    if image is None:
        header = _tiff_header(source)
    else:
        header = ImageHeader(image.width, image.height, image.mode, len(image.getbands()))
    try:
        _check_size(source, header, max_side, max_pixels)
    except UnreadableImage:
        if image is not None:
            image.close()
        raise
    return image, header


def _pil_open(source: bytes | Path) -> Image.Image | None:
    """PIL's image, its header read and no pixel decoded; None for a TIFF PIL cannot identify."""
    try:
        with _OPEN_LOCK:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=_formats())
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except UnidentifiedImageError:
        if not _is_tiff(source):
            raise _unreadable(source, "format", "not an image file PIL recognises", _FIX) from None
        return None
    except MemoryError:
        raise
    except Exception as e:  # each of PIL's format plugins fails in its own way on damaged headers
        raise _unreadable(source, "corrupt", _damage(e), _FIX) from None


def _formats() -> list[str]:
    """Every format PIL reads except EPS, whose decoder runs Ghostscript on the file: an image
    from a stranger (an upload to `seglab serve`, a downloaded dataset) must not run a program."""
    Image.init()
    return [name for name in Image.ID if name != "EPS"]


def _check_size(source: ImageSource, header: ImageHeader, max_side: int | None, max_pixels: int) -> None:
    size = (header.width, header.height)
    if min(size) < 1:
        raise _unreadable(source, "corrupt", f"its header says {size[0]}x{size[1]} pixels", _FIX, size)
    if size[0] * size[1] > max_pixels:
        raise _unreadable(source, "size", f"more than {max_pixels:,} pixels", "split it into tiles", size)
    if max_side is not None and max(size) > max_side:
        reason = f"{size[0]}x{size[1]} pixels; its longest side may be at most {max_side}"
        raise _unreadable(source, "size", reason, "resize it", size)


def _pil_pixels(image: Image.Image, source: ImageSource) -> np.ndarray:
    """Decode all of ``image`` now (a truncated file fails here, not later in a worker), upright."""
    try:
        image.load()
        try:  # an orientation PIL cannot parse is ignored, as browsers ignore it
            ImageOps.exif_transpose(image, in_place=True)
        except MemoryError:
            raise
        except Exception:
            pass
        return _pil_to_array(image)
    except MemoryError:
        raise
    except Exception as e:  # OSError, SyntaxError, ValueError, KeyError, struct.error, ... by format
        raise _unreadable(source, "corrupt", _damage(e), _FIX) from None


def _tiff_file(source: ImageSource) -> Any:  # a tifffile.TiffFile
    import tifffile

    return tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source)


def _tiff_header(source: ImageSource) -> ImageHeader:
    try:
        with _tiff_file(source) as tiff:
            page = tiff.pages.first
            return ImageHeader(int(page.imagewidth), int(page.imagelength), "tiff", int(page.samplesperpixel))
    except MemoryError:
        raise
    except Exception as e:  # tifffile raises many types for bad files
        raise _unreadable(source, "corrupt", first_line(e), "replace or remove the file") from None


def _tiff_pixels(source: ImageSource) -> np.ndarray:
    """A TIFF that PIL cannot decode (multi-sample float, planar, ...) as (H, W) or (H, W, 3) uint8."""
    try:
        with _tiff_file(source) as tiff:
            page, series = tiff.pages.first, tiff.series[0]
            shape = tuple(series.shape)
            one_page = series.size <= page.imagewidth * page.imagelength * page.samplesperpixel
            a = np.squeeze(series.asarray()) if one_page else None  # a stack is refused unread
    except MemoryError:
        raise
    except Exception as e:  # tifffile raises many types for bad files
        raise _unreadable(source, "corrupt", first_line(e), "replace or remove the file") from None
    if a is not None and a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if a is None or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise _unreadable(
            source,
            "corrupt",
            f"array of shape {shape if a is None else a.shape} is not a 2-D image with 1, 3 or 4 channels "
            "(a stack or volume?)",
            "save one 2-D slice per file",
        )
    a = _to_uint8(a)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def _damage(error: Exception) -> str:
    return "the file is truncated" if "truncated" in str(error).lower() else f"corrupt data ({first_line(error)})"


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


MAX_OUTLINE = 100  # a polygon's outline may be this many times the image's width + height (see _polygon)


def decode_coco_segmentation(segmentation: Any, size: tuple[int, int], ann_id: Any = None) -> np.ndarray | None:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> (H, W) uint8 0/1,
    or None when it holds no usable shape.

    Annotation files come from strangers, and pycocotools trusts them: a far-away polygon point
    makes it allocate without bound (or segfault), an RLE's own ``size`` sets what it allocates, and
    counts that do not add up to the image leave garbage in the mask. So every shape is checked
    first, and a bad one is a :class:`BadSample` naming the annotation.
    """
    from pycocotools import mask as mask_utils

    h, w = size
    where = f"COCO annotation {ann_id}"
    _check_mask_size(size, where)
    try:
        if isinstance(segmentation, list):  # polygons: a list of [x1, y1, x2, y2, ...]
            polys = [xy for xy in (_polygon(p, size, where) for p in segmentation) if xy is not None]
            if not polys:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            counts = _rle_counts(segmentation, size, where)
            if isinstance(counts, list):  # uncompressed RLE
                rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            else:  # compressed RLE; pycocotools wants bytes
                rle = {"size": [h, w], "counts": counts}
        else:
            return None
        return mask_utils.decode(rle)
    except (ValueError, TypeError, OverflowError) as e:  # what the checks above did not foresee
        raise BadSample(f"{where}: pycocotools cannot decode its segmentation ({e}); fix or re-export it") from None


def _check_mask_size(size: tuple[int, int], where: str) -> None:
    h, w = size
    if h < 1 or w < 1 or h * w > MAX_PIXELS:
        raise BadSample(f"{where}: a {w}x{h} mask is not drawn (at most {MAX_PIXELS:,} pixels); fix the image's size")


def _polygon(points: Any, size: tuple[int, int], where: str) -> list[float] | None:
    """One polygon's coordinates, checked: numbers, finite, within one image size of the image, and an
    outline at most MAX_OUTLINE times (width + height) long (pycocotools allocates 5 points per pixel
    of outline). None for fewer than 3 points (no area)."""
    try:
        flat = np.asarray(points, dtype=np.float64) if isinstance(points, list) else None
    except (TypeError, ValueError):  # a string or a nested list among the numbers
        flat = None
    if flat is None or flat.ndim != 1:
        raise BadSample(f"{where}: a polygon must be a list of numbers [x1, y1, x2, y2, ...]; fix the annotation")
    if len(flat) < 6:
        return None
    h, w = size
    xy = flat[: len(flat) // 2 * 2].reshape(-1, 2)
    if not np.isfinite(xy).all() or (np.abs(xy - (w / 2, h / 2)) > (1.5 * w, 1.5 * h)).any():
        raise BadSample(
            f"{where}: a polygon point lies far outside its {w}x{h} image (or is not finite); fix the annotation"
        )
    outline = np.abs(np.diff(xy, axis=0, append=xy[:1])).max(axis=1).sum()
    if outline > MAX_OUTLINE * (h + w):
        raise BadSample(
            f"{where}: a polygon's outline is {outline:,.0f} pixels long, more than {MAX_OUTLINE} times its "
            f"{w}x{h} image's width + height; fix the annotation"
        )
    return xy.ravel().tolist()


def _rle_counts(rle: dict[str, Any], size: tuple[int, int], where: str) -> list[int] | bytes:
    """An RLE's counts (a list, or compressed bytes), once its size is the image's and its runs cover
    exactly the image's pixels."""
    h, w = size
    if rle.get("size") != [h, w]:
        raise BadSample(
            f"{where} has an RLE of size {rle.get('size')} for an image of size {[h, w]}; fix the annotation's 'size'"
        )
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode()
    if isinstance(counts, list):
        runs = counts if all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) else None
    else:
        runs = _compressed_runs(counts) if isinstance(counts, bytes) else None
    if runs is None or sum(runs) != h * w:
        covered = "malformed counts" if runs is None else f"counts covering {sum(runs):,} pixels"
        raise BadSample(
            f"{where} has an RLE with {covered} for a {w}x{h} image ({h * w:,} pixels); fix or re-export it"
        )
    return counts


def _compressed_runs(s: bytes) -> list[int] | None:
    """The run lengths in a compressed COCO RLE string (pycocotools' rleFrString), or None if it is
    malformed: a character outside '0'..'o', a number cut short or longer than 7 characters, a negative run."""
    runs: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            if p == len(s) or k == 7 or not 48 <= s[p] <= 111:
                return None
            c = s[p] - 48  # 5 bits of the number, a "more follows" bit and, last, a sign bit
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]  # from the fourth on, each run is stored as the difference to the one two before
        if x < 0:
            return None
        runs.append(x)
    return runs


def rasterize_coco(annotations: Sequence[dict], size: tuple[int, int], ignore_index: int) -> np.ndarray:
    """Draw COCO annotations into an (H, W) uint8 class mask (0 = background).

    ``category_id`` must already be the class index. Polygons, uncompressed and compressed
    RLE are all accepted; annotations are drawn in order (later over earlier) and crowd
    regions (``iscrowd: 1``) become ``ignore_index``.
    """
    _check_mask_size(size, "COCO annotations")
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
        try:
            return rasterize_coco(sample.annotations or [], sample.size, spec.ignore_index)
        except BadSample as e:
            raise BadSample(f"the annotations of {sample.image}: {e}") from None
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
