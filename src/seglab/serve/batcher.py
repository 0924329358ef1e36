"""Micro-batching and the memory budget: what the worker thread and the requests in flight may hold.

Requests put an image on the queue and wait on a future. The worker takes the first waiting
image, then up to ``max_batch - 1`` more that arrive within ``batch_wait_s``, and runs images of
the same size (and, for a detector, the same ``conf``) through one forward pass (same input size
means same preprocessed tensor size). How it runs the model is the model's task's
(:mod:`seglab.serve.tasks`): a semantic model's masks, or a detector's objects.
A full queue is refused at once rather than letting latency grow without bound, and so is a
request that the :class:`MemoryBudget` has no room for: waiting costs a refused request nothing.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seglab.errors import first_line
from seglab.serve.tasks import serve_task

log = logging.getLogger("seglab.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` images already: the caller should answer 503 and retry later."""


class WorkerStopped(Exception):
    """The worker thread has died: nothing more will be answered until the server restarts."""


@dataclass(frozen=True)
class Prediction:
    """One image's answer, as its task keeps it, and the forward pass it shared."""

    output: Any  # a semantic model's (H, W) class-index mask, or a detector's InstanceResult
    inference_ms: float  # wall time of the forward pass (and resizing) of the whole group
    batch_size: int  # images in that forward pass

    @property
    def mask(self) -> np.ndarray:
        """A semantic model's mask: uint8, or uint16 for a model of more than 256 classes."""
        return self.output


@dataclass
class _Job:
    image: np.ndarray | None  # (H, W, C) uint8; dropped as soon as the job is done or cancelled
    conf: float | None = None  # a detector's lowest score kept; None for a semantic model
    future: Future[Prediction] = field(default_factory=Future)

    def __post_init__(self) -> None:
        # a request that gave up must not keep its image alive in the queue: its budget is given back
        self.future.add_done_callback(lambda _: setattr(self, "image", None))


@dataclass
class BatchStats:
    """What the worker has done so far, for /health and for tests that check batching happens."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest_batch = max(self.largest_batch, size)


_STOP = None  # the queue item that tells the worker to finish


def warm_up(model: Any) -> None:
    """One forward pass on a blank image of the size a fixed-shape export takes: a model that
    cannot run fails here, before the server takes requests, and the first user does not wait
    for the backend's setup."""
    card = model.card
    h, w = card.crop_size or (card.img_size, card.img_size)
    serve_task(model).predict([np.zeros((h, w, card.in_channels), np.uint8)], None)


class Batcher:
    """The bounded queue and the single worker thread that runs ``model`` (a SegModel or a
    detector, see :func:`seglab.serve.tasks.serve_task`) on what it holds."""

    def __init__(self, model: Any, *, max_batch: int, batch_wait_s: float, queue_size: int) -> None:
        self.task = serve_task(model)
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.stats = BatchStats()
        self.failure: str | None = None  # why the worker died, once it has
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="seglab-serve-worker", daemon=True)

    @property
    def depth(self) -> int:
        """Images waiting for the worker (not counting those in the forward pass now)."""
        return self._queue.qsize()

    @property
    def ready(self) -> bool:
        """The worker is running and taking images."""
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, cancel what still waits, and end the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)  # blocks at most one batch's time when the queue is full
            self._thread.join()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                job.future.cancel()

    def submit(self, image: np.ndarray, conf: float | None = None) -> Future[Prediction]:
        """Queue one (H, W, C) uint8 image (with a detector's ``conf``); raises QueueFull instead
        of waiting for room, and WorkerStopped once the worker has died."""
        if self.failure is not None:
            raise WorkerStopped(self.failure)
        job = _Job(image, conf)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        if self.failure is not None:  # it died while this job was being queued: nobody will take it
            self._fail_waiting()
        return job.future

    def _work(self) -> None:
        try:
            while (first := self._queue.get()) is not _STOP:
                jobs, stop = self._gather(first)
                # a request that timed out while waiting has cancelled its future: skip it
                self._run([job for job in jobs if job.future.set_running_or_notify_cancel()])
                if stop:
                    return
        except BaseException as e:  # whatever kills the worker (SystemExit, a bug here), the server must say so
            self.failure = one_line(e)
            log.error("serve: the inference worker stopped (%s); restart seglab serve", self.failure)
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Answer every queued request now (503) rather than letting each wait for its timeout."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped(self.failure))

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and whatever else arrives within the batch window, up to ``max_batch``;
        True as well when the stop signal came in the meantime."""
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the window, still take what is already waiting
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self, jobs: list[_Job]) -> None:
        """One forward pass per image size and conf; every future gets its answer or the exception."""
        groups: dict[tuple[tuple[int, ...], float | None], list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[() if job.image is None else job.image.shape, job.conf].append(job)
        try:
            for group in groups.values():
                self._run_group(group)
        except BaseException as e:  # the worker is dying: none of these may wait for its timeout
            self.failure = one_line(e)  # first: a client answered below may ask /health at once
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(WorkerStopped(self.failure))
            raise

    def _run_group(self, group: list[_Job]) -> None:
        images = [job.image for job in group if job.image is not None]  # all of them: running jobs keep theirs
        start = time.perf_counter()
        try:
            outputs = self.task.predict(images, group[0].conf)
        except Exception as e:  # the worker must outlive a failing batch; its requests get a 500
            for job in group:
                job.future.set_exception(e)
            return
        finally:
            del images  # the outputs are what is kept (a detector's hold their image, to draw on); the futures'
            # callbacks drop the jobs' images
        elapsed_ms = 1000 * (time.perf_counter() - start)
        self.stats.record(len(group))
        for job, output in zip(group, outputs, strict=True):
            job.future.set_result(Prediction(output, elapsed_ms, len(group)))


# --------------------------------------------------------------------------- the memory budget


class Busy(Exception):
    """The memory budget has no room for this request now: 503, retry shortly."""


class MemoryBudget:
    """The bytes that requests in flight may hold, taken before they are used and given back after.

    Taking never waits: a request that does not fit is refused at once, so a burst costs the
    server no more than ``total`` bytes, whatever the number of clients. When the last request
    gives its share back, the memory freed is handed back to the OS (glibc keeps it otherwise).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._peak = 0  # most held since the last hand-back to the OS
        self._lock = threading.Lock()

    def hold(self) -> Hold:
        return Hold(self)

    def _take(self, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.total:
                return False
            self.held += nbytes
            self._peak = max(self._peak, self.held)
            return True

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            trim = self.held == 0 and self._peak >= TRIM_AFTER
            if trim:
                self._peak = 0
        if trim:  # in its own thread: it may take a few milliseconds, and this may be the event loop
            threading.Thread(target=release_free_memory, name="seglab-serve-trim", daemon=True).start()


TRIM_AFTER = 256 * 2**20  # hand memory back to the OS after a burst that held this much


class Hold:
    """One request's share of the budget: ``take`` more as it is needed, ``close`` gives all back."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.nbytes = budget, 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Take ``nbytes`` more, or raise Busy."""
        if not self.budget._take(nbytes):
            raise Busy
        with self._lock:
            self.nbytes += nbytes

    def give(self, nbytes: int) -> None:
        """Give ``nbytes`` back early (the upload, once it is decoded)."""
        with self._lock:
            nbytes = min(nbytes, self.nbytes)
            self.nbytes -= nbytes
        self.budget._give(nbytes)

    def close(self) -> None:
        self.give(self.nbytes)


def release_free_memory() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap memory to the OS (elsewhere, nothing to do)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _libc_malloc_trim() -> Any:  # the ctypes function, or None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


_malloc_trim = _libc_malloc_trim()


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for one-line log entries."""
    name = type(error).__name__
    return f"{name}: {first_line(error)}" if str(error).strip() else name
