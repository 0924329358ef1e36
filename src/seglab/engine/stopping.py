"""Stopping a run on SIGINT/SIGTERM: the loop saves last.pt at the next optimiser step and returns."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any


class TrainingStopped(Exception):
    """Raised inside the loop once a SIGINT/SIGTERM stop has been saved to last.pt."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__(f"stopped at epoch {epoch + 1}, batch {batch}")
        self.epoch, self.batch = epoch, batch


@contextlib.contextmanager
def stop_on_signals(trainer: Any):
    """SIGINT/SIGTERM ask the loop to save last.pt at the next optimiser step and return.

    A second signal is not caught again: it interrupts at once, as the user asked twice."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous: dict[int, Any] = {}

    def request_stop(signum, frame):
        trainer.stop_signal = signum
        for number, handler in previous.items():
            signal.signal(number, handler)

    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, request_stop)
    try:
        yield
    finally:
        for restored, handler in previous.items():
            signal.signal(restored, handler)
