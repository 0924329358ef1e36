"""Stopping on SIGINT/SIGTERM at a safe point: a training loop saves last.pt at the next optimiser
step and returns; an export finishes its current native step, removes its temporary file and stops.

Acting on a signal the moment it arrives is what goes wrong: a KeyboardInterrupt raised inside
torch.onnx's C++ ended in tracebacks and once in a segfault, and SIGTERM's default action kills the
process before it can remove what it was writing. So the signal is recorded, and the code asks at
the points where stopping is safe. A second signal is not deferred again: it acts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command at a safe point; nothing half-written was left.

    A KeyboardInterrupt, so that callers treat it as the user stopping the program; ``signum`` says
    which signal, for the exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class DeferredSignals:
    """Inside this, SIGINT and SIGTERM are recorded (and ``on_signal`` called) instead of acted on;
    ``check()`` raises ``Interrupted`` where stopping is safe. A second signal acts at once, with the
    handler there was before; an ignored signal stays ignored (nohup). Outside the main thread,
    where handlers cannot be installed, signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self.previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)  # now with the handler there was before: KeyboardInterrupt, or the end
            return
        self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def _restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc: object) -> None:
        self._restore()


class TrainingStopped(Exception):
    """Raised inside the loop once a SIGINT/SIGTERM stop has been saved to last.pt."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__(f"stopped at epoch {epoch + 1}, batch {batch}")
        self.epoch, self.batch = epoch, batch


def stop_on_signals(trainer: Any) -> DeferredSignals:
    """SIGINT/SIGTERM set ``trainer.stop_signal``: the loop saves last.pt at the next optimiser step
    and returns. A second signal interrupts at once, as the user asked twice."""
    return DeferredSignals(on_signal=lambda signum: setattr(trainer, "stop_signal", signum))
