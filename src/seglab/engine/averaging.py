"""``--swa``: stochastic weight averaging (Izmailov et al., 2018) with ``torch.optim.swa_utils``.

From epoch ``--swa-start`` on, SWALR anneals each optimiser's learning rate to ``--swa-lr`` over
one epoch and holds it there (instead of the run's schedule), and after each of those epochs the
weights join an equal average (``AveragedModel``). BatchNorm's statistics of an average are not
the average of statistics, so ``update_bn`` recomputes them with a pass over the training data,
as the network sees it in training, before the average is validated or saved. From the first
average on, the average is the model the run validates, ships and exports.

EMA (``--ema``) is the per-step alternative; a run has one or the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from seglab.engine.inference import autocast
from seglab.engine.schedule import Plan


class WeightAverage:
    """The average of ``model`` and the SWALR schedules of ``optimizers``, for one run."""

    def __init__(self, model: nn.Module, cfg: Any, plan: Plan, optimizers: list[torch.optim.Optimizer]) -> None:
        self.average = AveragedModel(model)  # an equal average; buffers come from update_bn
        self.cfg, self.plan, self.optimizers = cfg, plan, optimizers
        self.schedulers: list[SWALR] = []  # built when averaging starts: SWALR sets the rate it builds with

    @property
    def start(self) -> int:
        """The first epoch (1-based) trained at the SWA rate: --swa-start, or the last quarter of the run."""
        return self.cfg.swa_start or math.floor(0.75 * self.plan.epochs) + 1

    @property
    def model(self) -> nn.Module | None:
        """The averaged network, once it holds an average; None before."""
        return self.average.module if int(self.average.n_averaged) > 0 else None

    def begin_epoch(self, epoch: int) -> None:
        """Switch to the SWA rate at the start of epoch ``start`` (``epoch`` counts from 0)."""
        if epoch + 1 >= self.start and not self.schedulers:
            self.schedulers = [self._scheduler(o) for o in self.optimizers]

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> SWALR:
        rates = [group["lr"] for group in optimizer.param_groups]
        scheduler = SWALR(
            optimizer, swa_lr=self.cfg.swa_lr or 0.1 * self.cfg.lr, anneal_epochs=self.plan.steps_per_epoch,
            anneal_strategy="cos",
        )  # fmt: skip
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate  # as it was: the anneal starts from here at the next step
        return scheduler

    def step(self) -> bool:
        """Step the SWA schedules after an optimiser step; False while the run's own schedule rules."""
        for scheduler in self.schedulers:
            scheduler.step()
        return bool(self.schedulers)

    def end_epoch(self, model: nn.Module, inputs: Callable[[], Iterable[Any]], device: torch.device) -> None:
        """After an epoch at the SWA rate: ``model`` joins the average, whose BatchNorm statistics are
        then recomputed from ``inputs()`` (the training batches as the network takes them)."""
        if not self.schedulers:
            return
        self.average.update_parameters(model)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.average.modules()):
            with autocast(device, self.cfg.amp, self.cfg.amp_dtype):
                update_bn(([x] for x in inputs()), self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.average.state_dict(), "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["model"])
        if state["schedulers"]:
            self.schedulers = [self._scheduler(o) for o in self.optimizers]
            for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
                scheduler.load_state_dict(saved)
