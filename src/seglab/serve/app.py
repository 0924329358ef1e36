"""The FastAPI application of `seglab serve`: /predict, /health, /model and the page at /.

``create_app(model, settings)`` builds it around a :class:`seglab.api.SegModel` or a detector
(what differs is in :mod:`seglab.serve.tasks`), so tests can run it in-process as well as behind
uvicorn. Forms are parsed and images decoded on the thread pool, never on the event loop, and
queued for the one worker thread that owns the model (:mod:`seglab.serve.batcher`). What requests
in flight hold is bounded by the memory budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from seglab.data.io import ImageHeader
from seglab.serve.batcher import (
    Batcher,
    Busy,
    Hold,
    MemoryBudget,
    Prediction,
    QueueFull,
    WorkerStopped,
    one_line,
)
from seglab.serve.codec import RequestError, decode_upload, image_bytes, probe_upload
from seglab.serve.tasks import DetectorTask, SemanticTask

log = logging.getLogger("seglab.serve")

# The page may only use itself: inline script and style, images from the user's own file.
PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:"

# What one image may cost at its peak, per pixel, from its header to its answer: PIL's buffer,
# the array and the conversions of decode_image, then the mask and the PNG or JSON answer
# (a Mask R-CNN's object masks come on top: tasks.BYTES_PER_OBJECT_PIXEL).
# Measured peaks: 8-bit images 14 bytes a pixel (43 when a greyscale model takes a colour
# image: luma in float64); 16-bit, 32-bit and float ones (scaled to 8 bits in float64) 40;
# TIFFs only tifffile reads about 33 per stored value (102 for float RGB); a JSON answer 11.
BYTES_PER_PIXEL = 20
BYTES_PER_WIDE_PIXEL = 48
BYTES_PER_TIFF_VALUE = 36
GREY_MODES = ("1", "L", "LA", "La")  # 8-bit modes decoded to one channel: no luma conversion
UPLOAD_COPIES = 2  # the body as it arrives and joined; a form's image part is one more below
INFERENCE_FAILED = "inference failed on the server; its log says why"
REQUEST_FAILED = "the server failed on this request; its log says why"


@dataclass(frozen=True)
class ServeSettings:
    """The limits of one server; each is a `seglab serve` flag."""

    max_upload_mb: float = 10
    max_side: int = 4096
    max_batch: int = 8
    batch_wait_ms: float = 5
    queue_size: int = 64
    timeout: float = 30
    memory_budget_mb: float = 2048
    body_timeout: float = 60
    allowed_hosts: tuple[str, ...] | None = None  # the Host names answered ("host" or "host:port"); None: any

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)


def create_app(model: Any, settings: ServeSettings) -> FastAPI:
    """The application; its worker thread starts and stops with the app's lifespan."""
    batcher = Batcher(
        model, max_batch=settings.max_batch, batch_wait_s=settings.batch_wait_ms / 1000, queue_size=settings.queue_size
    )
    task = batcher.task
    budget = MemoryBudget(settings.memory_budget_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    # no /docs or /redoc: their pages load scripts from a CDN, and the server may have no internet
    app = FastAPI(title="seglab serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(SameOrigin, allowed=settings.allowed_hosts)
    page = resources.files("seglab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status, headers=error.headers)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        """200 while the worker takes images; 503 once it has died (the server must be restarted)."""
        stats = batcher.stats
        answer = {
            "status": "ok" if batcher.ready else "failed",
            "model_loaded": batcher.ready,
            "queue_depth": batcher.depth,
            "queue_size": settings.queue_size,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest_batch,
            "memory_held_mb": round(budget.held / 2**20, 1),
            "memory_budget_mb": settings.memory_budget_mb,
        }
        if batcher.failure is not None:
            answer["error"] = f"the inference worker stopped ({batcher.failure}); restart seglab serve"
        return JSONResponse(answer, status_code=200 if batcher.ready else 503)

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        return describe(model)

    @app.post("/predict")
    async def predict(
        request: Request,
        response_format: str | None = Query(None, alias="format"),
        conf: str | None = Query(None),
    ) -> Response:
        """An image in (multipart field ``file`` or the raw body); out, as PNG or JSON, its mask
        (semantic) or the objects scoring at least ``conf`` (a detector)."""
        as_json = wants_json(response_format, request.headers.get("accept", ""))
        threshold = task.conf(conf)
        hold = budget.hold()
        future: Future[Prediction] | None = None
        try:
            body = await read_body(request, settings, hold)
            image = await run_in_threadpool(admit, body, request.headers.get("content-type"), hold, task, settings)
            hold.give(UPLOAD_COPIES * len(body))  # the upload is decoded: only the image counts from here on
            del body
            future = submit(batcher, image, threshold, settings)
            del image
            prediction = await wait(future, settings)
            headers = {"X-Inference-Ms": f"{prediction.inference_ms:.1f}", "X-Batch-Size": str(prediction.batch_size)}
            if as_json:
                content = await run_in_threadpool(json_answer, prediction, task, threshold)
                return Response(content, media_type="application/json", headers=headers)
            png = await run_in_threadpool(task.png, prediction.output)
            return Response(png, media_type="image/png", headers=headers)
        except RequestError:
            raise
        except Exception as e:  # a bug here: the detail goes to the log, never to the client
            log.error("serve: POST /predict failed (%s)", one_line(e))
            raise RequestError(500, REQUEST_FAILED) from None
        finally:
            release(hold, future)

    return app


def describe(model: Any) -> dict[str, Any]:
    """What a client needs to show and check results: the task (semantic, instance or detect),
    classes, colours and preprocessing."""
    card = model.card
    return {
        "task": card.task,
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


# --------------------------------------------------------------------------- the upload


async def read_body(request: Request, settings: ServeSettings, hold: Hold) -> bytes:
    """The request body, refused as soon as it is known to exceed the upload limit (413), to take
    longer than ``--body-timeout`` (408), or not to fit the memory budget (503).

    Content-Length is checked before reading, and the bytes are counted while reading, so a
    chunked upload or one that lies about its length is stopped at the limit too: no more than
    the limit is ever kept. A client that goes away mid-upload ends the request quietly."""
    limit = settings.max_upload_bytes
    chunks = request.stream()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await linger(request, chunks, 2 * limit)
        raise too_large(limit)
    deadline = time.monotonic() + settings.body_timeout
    pieces: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), max(deadline - time.monotonic(), 0))
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > limit:
                await linger(request, chunks, 2 * limit - size)  # at most twice the limit read in all
                raise too_large(limit)
            try:
                hold.take(UPLOAD_COPIES * len(chunk))
            except Busy:
                await linger(request, chunks, 2 * limit - size)
                raise busy(settings, "uploads and images in flight fill", close=True) from None
            pieces.append(chunk)
    except TimeoutError:
        message = f"the upload did not arrive within {settings.body_timeout:g} s (the server's --body-timeout)"
        raise RequestError(408, message, {"Connection": "close"}) from None
    except ClientDisconnect:
        log.debug("serve: a client disconnected mid-upload")
        raise RequestError(400, "the client disconnected before the upload was complete") from None
    return b"".join(pieces)


async def linger(request: Request, chunks: AsyncIterator[bytes], allowance: int) -> None:
    """Read and drop up to ``allowance`` more bytes before refusing an upload, as nginx's lingering
    close does: a client that sends its whole body before reading the answer (most do) then gets
    the refusal rather than a reset connection. One waiting for ``100-continue`` is answered at once."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return
    dropped = 0
    try:
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > allowance:
                return
    except ClientDisconnect:
        return


def too_large(limit: int) -> RequestError:
    """413, closing the connection so that a client still sending is not read any further."""
    message = f"the upload is larger than {limit / 2**20:g} MB (the server's --max-upload-mb)"
    return RequestError(413, message, {"Connection": "close"})


def busy(settings: ServeSettings, what: str, close: bool = False) -> RequestError:
    """503 with Retry-After; ``close`` when the rest of the upload is not read."""
    message = f"the server is busy ({what} its --memory-budget-mb of {settings.memory_budget_mb:g} MB); retry shortly"
    return RequestError(503, message, {"Retry-After": "1", **({"Connection": "close"} if close else {})})


def admit(
    body: bytes, content_type: str | None, hold: Hold, task: SemanticTask | DetectorTask, settings: ServeSettings
) -> np.ndarray:
    """On the thread pool: the form parsed, the image's header read, its memory taken from the
    budget (or 503/413 before a pixel is decoded), then the image decoded."""
    data = image_bytes(body, content_type)
    header = probe_upload(data, settings.max_side)
    form_copy = len(data) if data is not body else 0  # a form's image part is a copy of that part of the body
    channels = task.model.card.in_channels
    objects = header.width * header.height * task.object_bytes_per_pixel()
    cost = image_cost(header, channels) + objects + form_copy
    if cost + hold.nbytes > hold.budget.total:
        need = (cost + hold.nbytes) / 2**20
        raise RequestError(
            413,
            f"the image is {header.width}x{header.height} ({header.mode}): answering it takes about {need:.0f} MB, "
            f"more than the server's --memory-budget-mb of {settings.memory_budget_mb:g}; send a smaller image",
        )
    try:
        hold.take(cost)
    except Busy:
        raise busy(settings, "images in flight fill") from None
    return decode_upload(data, channels, settings.max_side)


def image_cost(header: ImageHeader, channels: int) -> int:
    """The bytes an image may hold at its peak between its header and its answer (see BYTES_PER_PIXEL)."""
    pixels = header.width * header.height
    if header.mode == "tiff":
        return pixels * (BYTES_PER_WIDE_PIXEL + BYTES_PER_TIFF_VALUE * max(header.samples - 1, 0))
    if header.mode.startswith(("I", "F")):  # I;16, I;16B, I (32-bit), F (float)
        return pixels * BYTES_PER_WIDE_PIXEL
    if channels == 1 and header.mode not in GREY_MODES:
        return pixels * BYTES_PER_WIDE_PIXEL
    return pixels * BYTES_PER_PIXEL


# --------------------------------------------------------------------------- inference


def submit(batcher: Batcher, image: np.ndarray, conf: float | None, settings: ServeSettings) -> Future[Prediction]:
    try:
        return batcher.submit(image, conf)
    except QueueFull:
        raise RequestError(
            503, f"the server is busy ({settings.queue_size} requests waiting); retry shortly", {"Retry-After": "1"}
        ) from None
    except WorkerStopped:
        raise worker_stopped() from None


async def wait(future: Future[Prediction], settings: ServeSettings) -> Prediction:
    """The image's answer, once the worker has it, for at most ``--timeout`` seconds."""
    try:  # on timeout wait_for cancels the future, so the worker skips the image if it has not begun it
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=settings.timeout)
    except TimeoutError:
        raise RequestError(504, f"no result within {settings.timeout:g} s (the server's --timeout)") from None
    except WorkerStopped:
        raise worker_stopped() from None
    except Exception as e:  # the model failed: its message may hold the server's paths, so it goes to the log
        log.error("serve: inference failed (%s)", one_line(e))
        raise RequestError(500, INFERENCE_FAILED) from None


def worker_stopped() -> RequestError:
    return RequestError(503, "the server's inference worker has stopped; its log says why: restart seglab serve")


def release(hold: Hold, future: Future[Prediction] | None) -> None:
    """Give the request's memory back, or, while the worker is still running its image (the
    request timed out mid-batch), once the worker is done with it."""
    if future is None or future.done() or future.cancel():
        hold.close()
    else:
        future.add_done_callback(lambda _: hold.close())


def json_answer(prediction: Prediction, task: SemanticTask | DetectorTask, conf: float | None) -> bytes:
    extra = {"inference_ms": round(prediction.inference_ms, 2), "batch_size": prediction.batch_size}
    return task.json(prediction.output, **extra, **({} if conf is None else {"conf": conf}))


# --------------------------------------------------------------------------- Host and Origin


class SameOrigin:
    """Answer only requests for this server's own names (421 otherwise) that no other site's
    page sent (403): a DNS-rebinding page reaches 127.0.0.1 under its own name, and any page
    can post to it, but neither may use the model.

    ``allowed`` holds ``host`` (any port) or ``host:port`` entries, IPv6 in brackets; None
    answers any Host (a server on 0.0.0.0 cannot know its names). Origin is checked always."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] | None) -> None:
        self.app = app
        self.allowed = None if allowed is None else [split_host(entry) for entry in allowed]
        self.names = ", ".join(allowed or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(dict(scope["headers"]))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        host = headers.get(b"host", b"").decode("latin-1")
        name, port = split_host(host)
        if self.allowed is not None and not any(name == n and (p is None or port == p) for n, p in self.allowed):
            detail = (
                f"Host {host[:100]!r} is not a name of this server ({self.names}): "
                "open it by one of those, or add the name to --allowed-hosts"
            )
            return JSONResponse({"detail": detail}, status_code=421, headers={"Connection": "close"})
        origin = headers.get(b"origin")
        if origin is not None and urlsplit(origin.decode("latin-1")).netloc.lower() != host.lower():
            detail = (
                f"requests from another site's page (Origin {origin.decode('latin-1')[:100]!r}) are refused: "
                "use the server's own page, or call it from a program"
            )
            return JSONResponse({"detail": detail}, status_code=403, headers={"Connection": "close"})
        return None


def split_host(host: str) -> tuple[str, int | None]:
    """``"name:port"`` -> ("name", port); ``"[::1]:80"`` -> ("[::1]", 80); no port -> (name, None)."""
    host = host.strip().lower()
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit() or (":" in name and not name.endswith("]")):  # "::1" is no host:port
        return host, None
    return name, int(port)
