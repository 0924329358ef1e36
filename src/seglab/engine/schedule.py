"""Optimisers and learning-rate schedules (stepped once per optimiser step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from seglab.config import TrainConfig
from seglab.errors import SeglabError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("poly", "cosine", "step", "constant")


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.scheduler not in SCHEDULERS:
        raise SeglabError(f"--scheduler {cfg.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)
    step_every = max(1, cfg.step_size * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total=total,
            warmup=warmup,
            kind=cfg.scheduler,
            power=cfg.poly_power,
            step_every=step_every,
            gamma=cfg.step_gamma,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
