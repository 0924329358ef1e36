"""Bytes in and out of `seglab serve`: the uploaded image, and the answer (a semantic model's mask,
or a detector's objects) as PNG or JSON.

Everything here works on bytes in memory: no upload is ever written to disk and no path is
taken from a request. A problem with the request becomes a :class:`RequestError` carrying the
HTTP status and a message that says what to send instead.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from python_multipart.multipart import FormParser, parse_options_header

from seglab.data.io import ImageHeader, UnreadableImage, decode_image, probe_image

if TYPE_CHECKING:
    from seglab.instance.predictor import InstanceResult

FORM_FIELD = "file"
FORM_PARTS = 8  # the page and `curl -F` send one; more is refused before the rest is parsed
RAW_TYPES = ("application/octet-stream",)  # besides image/*


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, the message goes back as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers


# --------------------------------------------------------------------------- the upload


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image inside a request body: the multipart field ``file``, or the whole raw body."""
    media_type = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return _form_file(body, content_type or "")
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        return body
    raise RequestError(
        415,
        f"Content-Type {media_type} is not an image: send image/* or application/octet-stream, "
        f"or a multipart/form-data field '{FORM_FIELD}'",
    )


def _form_file(body: bytes, content_type: str) -> bytes:
    """Parse multipart/form-data in memory (Starlette's forms spool files over 1 MB to disk).

    At most FORM_PARTS parts are read: a form of thousands of tiny fields is refused after a few
    hundred bytes instead of costing seconds of parsing."""
    _, params = parse_options_header(content_type)
    if b"boundary" not in params:
        raise RequestError(400, "multipart/form-data without a boundary: let your HTTP client build the form")
    found: list[bytes] = []
    parts = 0

    def on_part(part: Any) -> None:  # a File (a part with a filename) or a Field (one without)
        nonlocal parts
        parts += 1
        if parts > FORM_PARTS:
            raise RequestError(
                400, f"the form has more than {FORM_PARTS} parts: send the image alone, as the field '{FORM_FIELD}'"
            )
        if part.field_name == FORM_FIELD.encode():
            found.append(part.file_object.getvalue() if hasattr(part, "file_object") else part.value or b"")

    parser = FormParser(
        "multipart/form-data",
        on_part,
        on_part,
        boundary=params[b"boundary"],
        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1},  # the body is bounded already: keep it in memory
    )
    try:
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart raises several types for malformed forms
        raise RequestError(400, f"malformed multipart/form-data ({str(e)[:200]})") from None
    if not found:
        raise RequestError(400, f"the form has no field '{FORM_FIELD}': send the image as {FORM_FIELD}=@image.png")
    return found[0]


def probe_upload(data: bytes, max_side: int) -> ImageHeader:
    """The uploaded image's size and mode from its header, before any pixel is decoded."""
    try:
        return probe_image(data, max_side=max_side)
    except UnreadableImage as e:
        raise _refusal(e, max_side) from None


def decode_upload(data: bytes, channels: int, max_side: int) -> np.ndarray:
    """Decode an uploaded image to (H, W, channels) uint8 with the decoder `seglab predict` uses
    (so the same file gives the same mask both ways); a broken one is refused, never a 500."""
    try:
        return decode_image(data, channels, max_side=max_side)
    except UnreadableImage as e:
        raise _refusal(e, max_side) from None


def _refusal(error: UnreadableImage, max_side: int) -> RequestError:
    if error.problem == "empty":
        return RequestError(400, f"the request holds no image: send it as the body or the form field '{FORM_FIELD}'")
    if error.problem == "format":
        return RequestError(415, "the data is not an image: send a PNG, JPEG, BMP, TIFF or WebP file")
    if error.problem == "size":
        width, height = error.size or (0, 0)
        if max(width, height) > max_side:
            return RequestError(
                413, f"the image is {width}x{height}; its longest side may be at most {max_side} pixels (--max-side)"
            )
        return RequestError(413, f"the image is {width}x{height}: {error.reason}")
    return RequestError(400, f"the image data is corrupt or truncated ({error.reason}); send the whole file")


# --------------------------------------------------------------------------- the answer


def mask_png(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> bytes:
    """The (H, W) class-index mask as a PNG whose pixel values are the class indices: a palette PNG
    (palette = class colours) up to 256 classes, a 16-bit greyscale one beyond (palettes hold 256)."""
    from seglab.plots import palette_image

    buffer = io.BytesIO()
    if len(colors) > 256 or mask.dtype != np.uint8:
        Image.fromarray(mask.astype(np.uint16, copy=False)).save(buffer, format="PNG")
    else:
        palette_image(mask, colors).save(buffer, format="PNG")
    return buffer.getvalue()


def image_png(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image (a detector's drawn objects) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def instances_json(result: InstanceResult, **extra: Any) -> bytes:
    """A detector's JSON answer: the image size, each class's object count (``classes``, background
    left out), the objects, then ``extra``.

    ``instances`` is what `seglab predict` writes to labels/*.json (``InstanceResult.objects``):
    ``class``, ``label`` (the class index), ``score``, ``box`` [x1, y1, x2, y2] in the image's
    pixels and, for Mask R-CNN, ``mask`` as COCO RLE (``pycocotools.mask.decode`` reads it)."""
    counts = np.bincount(result.instances.labels, minlength=len(result.classes))
    answer = {
        "width": int(result.image.shape[1]),
        "height": int(result.image.shape[0]),
        "classes": [
            {"index": i, "name": name, "color": list(color), "count": int(n)}
            for i, (name, color, n) in enumerate(zip(result.classes, result.colors, counts, strict=False))
            if i > 0
        ],
        "instances": result.objects(),
        **extra,
    }
    return json.dumps(answer).encode()


def mask_json(mask: np.ndarray, classes: Sequence[str], colors: Sequence[Sequence[int]], **extra: Any) -> bytes:
    """The JSON answer: the image size, each class's area, the mask as run lengths (``rle``), then ``extra``.

    ``rle`` is the label map read row by row: ``values[i]`` repeated ``counts[i]`` times, so
    ``np.repeat(values, counts).reshape(height, width)`` decodes it."""
    pixels = np.bincount(mask.ravel(), minlength=len(classes))
    head = {
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "classes": [
            {"index": i, "name": name, "color": list(color), "pixels": int(n), "fraction": float(n) / mask.size}
            for i, (name, color, n) in enumerate(zip(classes, colors, pixels, strict=False))
        ],
    }
    values, counts = run_lengths_text(mask)
    rle = f', "rle": {{"order": "row-major", "size": [{mask.shape[0]}, {mask.shape[1]}], "values": ['
    tail = [f", {json.dumps(key)}: {json.dumps(value)}".encode() for key, value in extra.items()]
    pieces = [json.dumps(head)[:-1].encode(), rle.encode(), *values, b'], "counts": [', *counts, b"]}", *tail, b"}"]
    return b"".join(pieces)


def run_lengths_text(mask: np.ndarray, step: int = 1 << 18) -> tuple[list[bytes], list[bytes]]:
    """The row-major runs of ``mask`` as comma-separated text, in pieces: (values, counts).

    Computed ``step`` pixels at a time, the run that may go on into the next slice held back, so
    no array or list of all the runs is ever made: a mask with a run per pixel costs a few bytes
    a pixel as text, where whole-mask arrays and Python lists of its runs would cost tens."""
    flat = mask.ravel()
    values: list[bytes] = []
    counts: list[bytes] = []
    last_value, last_count = -1, 0  # the held-back run; -1: none yet
    for i in range(0, flat.size, step):
        piece = flat[i : i + step]
        starts = np.flatnonzero(np.r_[True, piece[1:] != piece[:-1]])
        run_values, run_counts = piece[starts].tolist(), np.diff(np.r_[starts, piece.size]).tolist()
        if run_values[0] == last_value:
            run_counts[0] += last_count
        elif last_count:
            run_values.insert(0, last_value)
            run_counts.insert(0, last_count)
        last_value, last_count = run_values.pop(), run_counts.pop()
        if run_values:
            values.append(",".join(map(str, run_values)).encode() + b",")
            counts.append(",".join(map(str, run_counts)).encode() + b",")
    values.append(str(last_value).encode())
    counts.append(str(last_count).encode())
    return values, counts
