"""What a person watching a training run sees while an epoch runs.

On a terminal, tqdm's bar: the epoch of the run's epochs, the running loss, the learning rate and
the run's ETA. Without one (nohup, CI, SLURM, ``> train.log``), where tqdm stays silent, a
timestamped line every ``log_interval`` steps or ``log_seconds`` seconds, whichever comes first::

    2026-12-02 04:12:33 epoch 2/10 step 120/400: loss 0.4312, lr 1.00e-03, 23.1 img/s, ETA epoch 2m10s, run 25m
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm


def duration(seconds: float) -> str:
    """3s, 2m10s, 1h05m: the two largest units."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochProgress:
    """Wraps one epoch's loader; call :meth:`update` after each batch with the running means.

    ``past`` is the wall time of the epochs the run has finished (validation included): the
    run's ETA is the rest of this epoch plus their mean for each epoch left (before the first epoch
    ends, this epoch's pace stands in for them)."""

    def __init__(
        self,
        loader: Iterable,
        *,
        epoch: int,
        epochs: int,
        start: int,
        total: int,
        progress: bool,
        log: Callable[[str], Any],
        images_per_step: int,
        every_steps: int,
        every_s: float,
        past: list[float],
    ) -> None:
        self.epoch, self.epochs, self.start, self.total = epoch, epochs, start, total
        self.log, self.images_per_step = log, images_per_step
        self.every_steps, self.every_s, self.past = every_steps, every_s, past
        self.bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{epochs}",
            initial=start,
            total=total,
            disable=None if progress else True,  # None: off without a terminal
            dynamic_ncols=True,
            leave=False,
        )
        self.lines = progress and bool(self.bar.disable) and (every_steps > 0 or every_s > 0)
        self.t0 = self.last_line = time.monotonic()

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def update(self, done: int, values: dict[str, float], lr: float) -> None:
        """After batch ``done`` (counted from the epoch's start) with ``values`` the epoch's means so far."""
        now = time.monotonic()
        steps = done - self.start
        per_step = (now - self.t0) / max(1, steps)
        epoch_left = (self.total - done) * per_step
        per_epoch = sum(self.past) / len(self.past) if self.past else self.total * per_step
        run_left = epoch_left + (self.epochs - self.epoch - 1) * per_epoch
        if not self.lines:
            first = next(iter(values), None)
            shown = f"{first} {values[first]:.4f}, " if first is not None else ""
            self.bar.set_postfix_str(f"{shown}lr {lr:.2e}, run ETA {duration(run_left)}", refresh=False)
            return
        due = (self.every_steps and done % self.every_steps == 0) or (
            self.every_s and now - self.last_line >= self.every_s
        )
        if not due or done == self.total:  # the epoch's own line follows the last step
            return
        self.last_line = now
        terms = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items())
        speed = self.images_per_step / per_step
        self.log(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} epoch {self.epoch + 1}/{self.epochs} step {done}/{self.total}: "
            f"{terms}, lr {lr:.2e}, {speed:.1f} img/s, ETA epoch {duration(epoch_left)}, run {duration(run_left)}"
        )
