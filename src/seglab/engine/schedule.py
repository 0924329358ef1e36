"""Optimisers and learning-rate schedules (stepped once per optimiser step)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seglab.config import TrainConfig
from seglab.errors import SeglabError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("poly", "cosine", "step", "constant")


@dataclass
class Plan:
    """How long the run is, in optimiser steps. Schedules read it as they step, so a ``--time`` budget
    can stretch or shorten the run after each epoch and the learning rate still ends where it should."""

    steps_per_epoch: int
    epochs: int
    last_epoch_steps: int = 0  # > 0: the last epoch ends after this many steps (what a budget has left)

    @property
    def total(self) -> int:
        return (self.epochs - 1) * self.steps_per_epoch + (self.last_epoch_steps or self.steps_per_epoch)

    def describe(self) -> str:
        if not self.last_epoch_steps:
            return f"{self.epochs} epochs"
        return f"{self.epochs} epochs, the last one {self.last_epoch_steps} of its {self.steps_per_epoch} steps"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; norm layers and biases get no weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise SeglabError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(
    step: int, *, total: int, warmup: int, kind: str, power: float = 0.9, step_every: int = 1, gamma: float = 0.1
) -> float:
    """The multiplier of the base learning rate after ``step`` optimiser steps.

    Linear warm-up from 1% over ``warmup`` steps, then: poly ``(1 - t)^power``, cosine
    ``(1 + cos(pi t)) / 2`` with t the progress after warm-up, step ``gamma^(step // step_every)``,
    or constant.
    """
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "poly":
        return (1 - t) ** power
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if kind == "step":
        return gamma ** (step // step_every)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, plan: Plan):
    if cfg.scheduler not in SCHEDULERS:
        raise SeglabError(f"--scheduler {cfg.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    per_epoch = plan.steps_per_epoch
    step_every = max(1, cfg.step_size * per_epoch)

    def factor(step: int) -> float:  # a function, not an object: the scheduler's state stays plain data
        total = plan.total
        return lr_factor(
            step,
            total=total,
            warmup=min(int(cfg.warmup_epochs * per_epoch), total // 2),
            kind=cfg.scheduler,
            power=cfg.poly_power,
            step_every=step_every,
            gamma=cfg.step_gamma,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TimeBudget:
    """``--time``: how many epochs the minutes left still hold, from what the epochs so far took.

    The clock starts when training starts (the data is read by then) and counts validation, the
    pictures and the checkpoints; a resumed run goes on with the minutes its earlier sessions left."""

    def __init__(self, minutes: float, used_s: float = 0.0) -> None:
        self.seconds, self.used_s, self.t0 = 60.0 * minutes, used_s, time.perf_counter()
        self.train_s: list[float] = []  # each epoch's training (and an unvalidated epoch's saving)
        self.val_s: list[float] = []  # each validation's cost: scoring, pictures, checkpoints

    def state(self) -> dict[str, Any]:
        return {"used_s": self.elapsed(), "train_s": list(self.train_s), "val_s": list(self.val_s)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.used_s = float(state.get("used_s", 0.0))
        self.train_s = [float(v) for v in state.get("train_s", [])]
        self.val_s = [float(v) for v in state.get("val_s", [])]

    def elapsed(self) -> float:
        return self.used_s + time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() >= self.seconds

    def fit(self, plan: Plan, done: int, val_interval: int, min_part: float = 0.25) -> None:
        """Set ``plan`` to the whole epochs that fit (see ``epochs``) and, where the minutes left after
        them hold at least ``min_part`` of an epoch and its validation, a last epoch cut to the steps
        that fit: the whole budget is used and the schedule still ends with it."""
        plan.epochs, plan.last_epoch_steps = self.epochs(done, val_interval), 0
        train, val = self._means()
        spare = self.seconds - self.elapsed() - self._cost(done, plan.epochs - done, train, val, val_interval)
        part = (spare - val) / train if train > 0 else 0.0
        if min_part <= part < 1:
            plan.epochs += 1
            plan.last_epoch_steps = max(1, math.floor(part * plan.steps_per_epoch))

    def _means(self) -> tuple[float, float]:
        """Mean seconds of an epoch's training and of a validation (0 before the first one)."""
        val = sum(self.val_s) / len(self.val_s) if self.val_s else 0.0
        return sum(self.train_s) / len(self.train_s), val

    @staticmethod
    def _cost(done: int, more: int, train: float, val: float, val_interval: int) -> float:
        end = done + more
        validations = sum(1 for e in range(done, end + 1) if e % val_interval == 0 or e == end)
        return more * train + validations * val

    def epochs(self, done: int, val_interval: int) -> int:
        """The run's length: the ``done`` epochs (the last one trained, not yet validated) and as many
        more as fit in what is left, each validation counted, the last epoch's always."""
        train, val = self._means()
        left = self.seconds - self.elapsed()
        more = 0
        while self._cost(done, more + 1, train, val, val_interval) <= left:
            more += 1
        return done + more
