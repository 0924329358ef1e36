"""Bytes in and out of `seglab serve`: the uploaded image, and the mask as PNG or JSON.

Everything here works on bytes in memory: no upload is ever written to disk and no path is
taken from a request. A problem with the request becomes a :class:`RequestError` carrying the
HTTP status and a message that says what to send instead.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.multipart import FormParser, parse_options_header

FORM_FIELD = "file"
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
    """Parse multipart/form-data in memory (Starlette's forms spool files over 1 MB to disk)."""
    _, params = parse_options_header(content_type)
    if b"boundary" not in params:
        raise RequestError(400, "multipart/form-data without a boundary: let your HTTP client build the form")
    found: list[bytes] = []

    def on_part(part: Any) -> None:  # a File (a part with a filename) or a Field (one without)
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
    except Exception as e:  # python-multipart raises several types for malformed forms
        raise RequestError(400, f"malformed multipart/form-data ({e})") from None
    if not found:
        raise RequestError(400, f"the form has no field '{FORM_FIELD}': send the image as {FORM_FIELD}=@image.png")
    return found[0]


def decode_image(data: bytes, channels: int, max_side: int) -> np.ndarray:
    """Decode an uploaded image to (H, W, channels) uint8, refusing oversized and broken ones.

    The size is checked from the header before any pixel is decoded, so a small file claiming
    a huge image (a decompression bomb) costs nothing. JPEG EXIF orientation is applied, as
    browsers do when they show the image, so the mask lines up with what the user sees.
    """
    if not data:
        raise RequestError(400, f"the request holds no image: send it as the body or the form field '{FORM_FIELD}'")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"the image has too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise RequestError(415, "the data is not an image: send a PNG, JPEG, BMP, TIFF or WebP file") from None
    width, height = image.size
    if max(width, height) > max_side:
        raise RequestError(413, f"the image is {width}x{height}; its longest side may be at most {max_side} pixels")
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
        array = np.asarray(upright.convert("RGB" if channels == 3 else "L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"the image data is corrupt or truncated ({e})") from None
    return array if array.ndim == 3 else array[..., None]


# --------------------------------------------------------------------------- the answer


def mask_png(mask: np.ndarray, colors: Sequence[Sequence[int]]) -> bytes:
    """The (H, W) class-index mask as a palette PNG: pixel value = class index, palette = class colours."""
    from seglab.plots import palette_image

    buffer = io.BytesIO()
    palette_image(mask, colors).save(buffer, format="PNG")
    return buffer.getvalue()


def label_rle(mask: np.ndarray) -> dict[str, Any]:
    """Run-length encoding of the label map in row-major order.

    ``values[i]`` repeated ``counts[i]`` times, concatenated, is the mask read row by row:
    ``np.repeat(values, counts).reshape(height, width)`` decodes it.
    """
    flat = mask.ravel()
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    counts = np.diff(np.r_[starts, flat.size])
    return {"order": "row-major", "size": [int(mask.shape[0]), int(mask.shape[1])],
            "values": flat[starts].tolist(), "counts": counts.tolist()}  # fmt: skip


def mask_summary(mask: np.ndarray, classes: Sequence[str], colors: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The JSON answer: the image size, each class's area, and the mask as run lengths."""
    pixels = np.bincount(mask.ravel(), minlength=len(classes))
    return {
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "classes": [
            {"index": i, "name": name, "color": list(color), "pixels": int(n), "fraction": float(n) / mask.size}
            for i, (name, color, n) in enumerate(zip(classes, colors, pixels, strict=False))
        ],
        "rle": label_rle(mask),
    }
