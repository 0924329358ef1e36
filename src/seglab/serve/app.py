"""The FastAPI application of `seglab serve`: /predict, /health, /model and the page at /.

``create_app(model, settings)`` builds it around any :class:`seglab.api.SegModel`, so tests can
run it in-process as well as behind uvicorn. Requests are decoded on the thread pool and queued
for the one worker thread that owns the model (:mod:`seglab.serve.batcher`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from seglab.api import SegModel
from seglab.serve.batcher import Batcher, Prediction, QueueFull
from seglab.serve.codec import RequestError, decode_image, image_bytes, mask_png, mask_summary

# The page may only use itself: inline script and style, images from the user's own file.
PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:"


@dataclass(frozen=True)
class ServeSettings:
    """The limits of one server; each is a `seglab serve` flag."""

    max_upload_mb: float = 10
    max_side: int = 4096
    max_batch: int = 8
    batch_wait_ms: float = 5
    queue_size: int = 64
    timeout: float = 30

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def create_app(model: SegModel, settings: ServeSettings) -> FastAPI:
    """The application; its worker thread starts and stops with the app's lifespan."""
    batcher = Batcher(
        model, max_batch=settings.max_batch, batch_wait_s=settings.batch_wait_ms / 1000, queue_size=settings.queue_size
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    # no /docs or /redoc: their pages load scripts from a CDN, and the server may have no internet
    app = FastAPI(title="seglab serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    page = resources.files("seglab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status, headers=error.headers)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok" if batcher.ready else "starting",
            "model_loaded": batcher.ready,
            "queue_depth": batcher.depth,
            "queue_size": settings.queue_size,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest_batch,
        }

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        return describe(model)

    @app.post("/predict")
    async def predict(request: Request, response_format: str | None = Query(None, alias="format")) -> Response:
        """An image in (multipart field ``file`` or the raw body), its mask out as PNG or JSON."""
        arrived = time.monotonic()
        as_json = wants_json(response_format, request.headers.get("accept", ""))
        body = await read_body(request, settings.max_upload_bytes)
        data = image_bytes(body, request.headers.get("content-type"))
        image = await run_in_threadpool(decode_image, data, model.card.in_channels, settings.max_side)
        prediction = await infer(batcher, image, arrived + settings.timeout, settings)
        headers = {"X-Inference-Ms": f"{prediction.inference_ms:.1f}", "X-Batch-Size": str(prediction.batch_size)}
        if as_json:
            content = await run_in_threadpool(json_answer, prediction, model)
            return Response(content, media_type="application/json", headers=headers)
        png = await run_in_threadpool(mask_png, prediction.mask, model.card.colors)
        return Response(png, media_type="image/png", headers=headers)

    return app


def describe(model: SegModel) -> dict[str, Any]:
    """What a client needs to show and check results: classes, colours and preprocessing."""
    card = model.card
    return {
        "arch": card.arch,
        "encoder": card.encoder,
        "backend": model.backend,
        "device": str(model.device),
        "num_classes": card.num_classes,
        "in_channels": card.in_channels,
        "img_size": card.img_size,
        "crop_size": card.crop_size,
        "mean": card.mean,
        "std": card.std,
        "classes": [
            {"index": i, "name": name, "color": list(color)}
            for i, (name, color) in enumerate(zip(card.classes, card.colors, strict=True))
        ],
    }


def wants_json(response_format: str | None, accept: str) -> bool:
    """``?format=json|png`` decides; without it, an Accept header asking for JSON does."""
    if response_format is None:
        return "application/json" in accept
    if response_format not in ("json", "png"):
        raise RequestError(400, f"format={response_format}: use format=png (the default) or format=json")
    return response_format == "json"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Content-Length is checked before reading, and the bytes are counted while reading, so a
    chunked upload or one that lies about its length is stopped at the limit too: no more than
    ``limit`` bytes are ever kept."""
    chunks = request.stream()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await linger(request, chunks, 2 * limit)
        raise too_large(limit)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            await linger(request, chunks, 2 * limit - len(body))  # at most twice the limit read in all
            raise too_large(limit)
    return bytes(body)


async def linger(request: Request, chunks: AsyncIterator[bytes], allowance: int) -> None:
    """Read and drop up to ``allowance`` more bytes before refusing an upload, as nginx's lingering
    close does: a client that sends its whole body before reading the answer (most do) then gets
    the 413 rather than a reset connection. One waiting for ``100-continue`` is answered at once."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return
    dropped = 0
    async for chunk in chunks:
        dropped += len(chunk)
        if dropped > allowance:
            return


def too_large(limit: int) -> RequestError:
    """413, closing the connection so that a client still sending is not read any further."""
    message = f"the upload is larger than {limit / 2**20:g} MB (the server's --max-upload-mb)"
    return RequestError(413, message, {"Connection": "close"})


async def infer(batcher: Batcher, image: np.ndarray, deadline: float, settings: ServeSettings) -> Prediction:
    """Queue the image and wait for its mask until ``deadline`` (time.monotonic)."""
    try:
        future = batcher.submit(image)
    except QueueFull:
        raise RequestError(
            503, f"the server is busy ({settings.queue_size} requests waiting); retry shortly", {"Retry-After": "1"}
        ) from None
    try:  # on timeout wait_for cancels the future, so the worker skips the image if it has not begun it
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(deadline - time.monotonic(), 0))
    except TimeoutError:
        raise RequestError(504, f"no result within {settings.timeout:g} s (the server's --timeout)") from None
    except Exception as e:
        raise RequestError(500, f"inference failed: {type(e).__name__}: {e}") from None


def json_answer(prediction: Prediction, model: SegModel) -> bytes:
    summary = mask_summary(prediction.mask, model.card.classes, model.card.colors)
    summary.update(inference_ms=round(prediction.inference_ms, 2), batch_size=prediction.batch_size)
    return json.dumps(summary).encode()
