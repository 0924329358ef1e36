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


def run_epochs(trainer: Any, command: str) -> int | None:
    """``trainer._run_epoch(epoch)`` from ``trainer.start_epoch`` to ``trainer.cfg.epochs``, stopping
    cleanly on SIGINT/SIGTERM; returns the signal that stopped it, or None when every epoch ran.

    ``command`` is the CLI command that resumes the run (``train``, ``gen train``), for the messages.
    """
    with stop_on_signals(trainer):
        trainer.log(f"{command}: run folder {trainer.run_dir}")  # from here on, SIGINT/SIGTERM save and stop
        try:
            for epoch in range(trainer.start_epoch, trainer.cfg.epochs):
                trainer._run_epoch(epoch)
        except TrainingStopped as stop:
            trainer.log(
                f"{command}: stopped by signal {trainer.stop_signal} at epoch {stop.epoch + 1}, batch {stop.batch}; "
                f"continue with: seglab {command} --resume {trainer.run_dir / 'weights' / 'last.pt'}"
            )
            return trainer.stop_signal
    return None
