"""Micro-batching: one worker thread owns the model and serves a bounded queue of images.

Requests put an image on the queue and wait on a future. The worker takes the first waiting
image, then up to ``max_batch - 1`` more that arrive within ``batch_wait_s``, and runs images of
the same size through one forward pass (same input size means same preprocessed tensor size).
A full queue is refused at once rather than letting latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from seglab.api import SegModel


class QueueFull(Exception):
    """The queue holds ``queue_size`` images already: the caller should answer 503 and retry later."""


@dataclass(frozen=True)
class Prediction:
    """One image's answer: its (H, W) uint8 class-index mask and the forward pass it shared."""

    mask: np.ndarray
    inference_ms: float  # wall time of the forward pass (and resizing) of the whole group
    batch_size: int  # images in that forward pass


@dataclass
class _Job:
    image: np.ndarray  # (H, W, C) uint8
    future: Future[Prediction]


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


class Batcher:
    """The bounded queue and the single worker thread that runs ``model`` on what it holds."""

    def __init__(self, model: SegModel, *, max_batch: int, batch_wait_s: float, queue_size: int) -> None:
        self.model = model
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="seglab-serve-worker", daemon=True)
        self._ready = threading.Event()

    @property
    def depth(self) -> int:
        """Images waiting for the worker (not counting those in the forward pass now)."""
        return self._queue.qsize()

    @property
    def ready(self) -> bool:
        """The worker has warmed the model up and is taking images."""
        return self._ready.is_set() and self._thread.is_alive()

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

    def submit(self, image: np.ndarray) -> Future[Prediction]:
        """Queue one (H, W, C) uint8 image; raises QueueFull instead of waiting for room."""
        job = _Job(image, Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def _work(self) -> None:
        self._warm_up()
        self._ready.set()
        while (first := self._queue.get()) is not _STOP:
            jobs, stop = self._gather(first)
            # a request that timed out while waiting has cancelled its future: skip it
            self._run([job for job in jobs if job.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _warm_up(self) -> None:
        """One forward pass before the first request, so its user does not wait for the backend's setup."""
        card = self.model.card
        h, w = card.crop_size or (card.img_size, card.img_size)  # the size a fixed-shape export takes
        list(self.model.iter_predict([np.zeros((h, w, card.in_channels), np.uint8)]))

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
        """One forward pass per image size; every future gets its mask or the exception."""
        groups: dict[tuple[int, ...], list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[job.image.shape].append(job)
        for group in groups.values():
            start = time.perf_counter()
            try:
                results = list(self.model.iter_predict([job.image for job in group], batch=len(group)))
            except Exception as e:  # the worker must outlive a failing batch; its requests get a 500
                for job in group:
                    job.future.set_exception(e)
                continue
            elapsed_ms = 1000 * (time.perf_counter() - start)
            self.stats.record(len(group))
            for job, result in zip(group, results, strict=True):
                job.future.set_result(Prediction(result.mask, elapsed_ms, len(group)))
