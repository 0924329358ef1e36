"""Structured channel pruning: remove whole channels until a FLOP target is met, then fine-tune.

Unlike ``torch.nn.utils.prune``, which only masks weights to zero, this makes every pruned layer
narrower, so the model is smaller and faster on any runtime. torch-pruning's DependencyGraph
finds which channels must go together: a conv's output, the BatchNorm after it, the next conv's
input, the depthwise conv whose groups follow them, every branch of a residual sum and the slice
of a concatenation. Each step removes the same fraction of every layer's channels (the ones with
the smallest L2 norm over their whole group), and steps repeat until the multiply-adds at the
training crop have fallen by the asked-for fraction. The classifier's outputs (one per class) and
the image's input channels are never pruned.

>>> from seglab.deploy.prune import prune_checkpoint
>>> best = prune_checkpoint("runs/train/exp/weights/best.pt", flops=0.3, epochs=10)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seglab.config import TrainConfig, build_config, validate
from seglab.engine.checkpoint import ModelCard, load_model, make_payload, require_semantic, save_checkpoint
from seglab.errors import SeglabError
from seglab.models.base import SegmentationModel
from seglab.models.encoders import probe

STEP = 0.02  # fraction of every layer's channels removed per step
MAX_RATIO = 0.9  # never remove more than this fraction of a layer's channels
FINETUNE_WARMUP = 0.2  # epochs of learning-rate warm-up in the fine-tune (a fresh optimiser)
FINETUNE_LR_SCALE = 0.5  # fine-tune lr = the training run's x this; x0.25 recovered less (README: Prune)

# Architectures whose channels are coupled in a way the dependency graph cannot see, by registered name.
UNPRUNABLE = {
    "segnet": (
        "its decoder puts values back with the encoder's max-pooling indices, which tie each decoder "
        "channel to an encoder channel outside the autograd graph, so pruning would pair them wrongly"
    ),
}


@dataclass
class PruneResult:
    """A pruned model and what it costs before and after: multiply-adds per image of ``input_size``
    (H, W; one multiply-add is 2 FLOPs) and parameters."""

    model: SegmentationModel
    input_size: tuple[int, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int

    @property
    def flops_removed(self) -> float:
        return 1 - self.macs_after / self.macs_before

    def summary(self) -> str:
        h, w = self.input_size
        return (
            f"{2 * self.macs_before / 1e9:.2f} -> {2 * self.macs_after / 1e9:.2f} GFLOPs at {h}x{w} "
            f"({100 * self.flops_removed:.1f}% fewer), {self.params_before / 1e6:.2f}M -> "
            f"{self.params_after / 1e6:.2f}M parameters, in {self.steps} steps"
        )


def prune(
    model: SegmentationModel,
    *,
    flops: float,
    input_size: tuple[int, int],
    global_pruning: bool = False,
    round_to: int | None = None,
    step: float = STEP,
) -> PruneResult:
    """A copy of ``model`` with channels removed until its multiply-adds on one ``input_size``
    (H, W) image have fallen by at least ``flops`` (0.3: 30% fewer). ``model`` is left as it is.

    Uniform by default (every layer loses the same fraction); ``global_pruning`` ranks channels
    across layers instead. ``round_to`` keeps channel counts multiples of it. Each step removes
    ``step`` of every layer's channels (coarser: faster, overshoots more). Raises SeglabError
    for an architecture in :data:`UNPRUNABLE` or one the dependency graph cannot handle.
    """
    import torch_pruning as tp

    if not 0 < flops < 1:
        raise SeglabError(f"flops={flops}: the fraction of FLOPs to remove must be between 0 and 1, e.g. 0.3")
    arch, num_classes, in_channels = model.arch, model.num_classes, model.in_channels
    if arch in UNPRUNABLE:
        raise SeglabError(f"{arch} cannot be pruned: {UNPRUNABLE[arch]}; prune another architecture")
    model = copy.deepcopy(model).cpu().eval()  # eval: tracing must not move BatchNorm statistics
    example = torch.zeros(1, in_channels, *input_size)  # [1, C, H, W]
    macs_before, params_before = tp.utils.count_ops_and_params(model, example)
    target = (1 - flops) * macs_before
    # Every conv that writes num_classes channels: the classifier (FCN sums three, LR-ASPP two).
    # A hidden layer that happens to be as wide is spared too, which costs a little, never breaks.
    classifiers = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    steps = round(MAX_RATIO / step)
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=MAX_RATIO,
            iterative_steps=steps,  # step k removes k/steps x MAX_RATIO of each layer's channels
            ignored_layers=classifiers,
            global_pruning=global_pruning,
            round_to=round_to,
        )
        macs, params, done = macs_before, params_before, 0
        while macs > target and done < steps:
            pruner.step()
            macs, params = tp.utils.count_ops_and_params(model, example)
            done += 1
        with torch.no_grad():
            logits = model(example)  # [1, K, H, W] if the graph was understood
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise SeglabError(f"{arch} cannot be pruned: torch-pruning failed ({type(e).__name__}: {e})") from e
    if macs > target:
        raise SeglabError(
            f"{arch}: removing {100 * MAX_RATIO:.0f}% of every layer's channels removes only "
            f"{100 * (1 - macs / macs_before):.0f}% of its FLOPs; ask for less (--flops)"
        )
    if logits.shape != (1, num_classes, *input_size):  # a guard on the dependency graph
        raise SeglabError(f"{arch} cannot be pruned: the pruned model returns {tuple(logits.shape)}")
    model.encoder.out_channels, model.encoder.strides = probe(model.encoder, in_channels)  # what it now returns
    return PruneResult(model, input_size, int(macs_before), int(macs), int(params_before), int(params), done)


def finetune_config(ckpt: dict[str, Any], card: ModelCard, command: str = "prune", **overrides: Any) -> TrainConfig:
    """The checkpoint's own training config (data, crop, augmentation, loss, optimiser, ...) for a
    short fine-tune: a fresh run (no resume, no --time: the epochs are the fine-tune's) with a short
    warm-up, ``overrides`` on top (None: keep)."""
    values: dict[str, Any] = dict(ckpt.get("config") or {})
    values.update(  # what the card says wins: a checkpoint without a config still describes its model
        model=card.arch,
        encoder=card.encoder,
        in_channels=card.in_channels,
        img_size=card.img_size,
        crop_size=card.crop_size or None,
        encoder_weights=None,  # the weights come from the checkpoint
        warmup_epochs=FINETUNE_WARMUP,
        resume=None,
        time=None,
        save_period=0,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = build_config(TrainConfig, values, command)
    validate(cfg)
    return cfg


def prune_checkpoint(
    weights: str | Path,
    *,
    flops: float = 0.3,
    data: str | None = None,
    epochs: int = 10,
    lr: float | None = None,
    batch: int | None = None,
    workers: int | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    device: str = "auto",
    report: bool = True,
    limit: int | None = None,
    global_pruning: bool = False,
    progress: bool = True,
    trust: bool = False,
    log: Callable[..., Any] = print,
) -> Path:
    """Prune the model in ``weights`` by ``flops``, fine-tune it for ``epochs`` on its own training
    data and recipe, and (with ``report``) measure it against the original. Returns the pruned
    ``<out>/weights/best.pt``, which loads like any checkpoint (``seglab.load``, val, predict, export).

    ``lr`` defaults to the training run's learning rate x ``FINETUNE_LR_SCALE``; ``epochs=0`` saves
    the pruned model without fine-tuning. ``out`` defaults to ``runs/prune/<name>``, numbered.
    """
    from seglab.engine.runs import next_run_dir
    from seglab.engine.trainer import Trainer
    from seglab.semantic.task import SemanticTask

    checks = [
        (0 < flops < 1, f"--flops {flops}: the fraction of FLOPs to remove, between 0 and 1 (e.g. 0.3)"),
        (epochs >= 0, f"--epochs {epochs}: use 0 (no fine-tune) or more"),
        (lr is None or lr > 0, f"--lr {lr}: the learning rate must be positive"),
        (batch is None or batch >= 1, f"--batch {batch}: use 1 or more"),
        (workers is None or workers >= 0, f"--workers {workers}: use 0 or more"),
        (limit is None or limit >= 1, f"--limit {limit}: use 1 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise SeglabError(f"prune: {message}")
    model, card, ckpt = load_model(weights, trust=trust)
    require_semantic(card, weights, "prune")
    if not isinstance(model, SegmentationModel):
        raise SeglabError(f"prune: {weights} holds a {type(model).__name__}, not a seglab model")
    trained = ckpt.get("config") or {}
    data = data or trained.get("data")
    if not data:
        raise SeglabError(f"prune: {weights} does not say which data it was trained on; pass --data")
    name = name or trained.get("name") or "exp"
    run_dir = Path(out) if out else next_run_dir("runs/prune", name, exist_ok=False)
    cfg = finetune_config(
        ckpt,
        card,
        data=data,
        epochs=max(epochs, 1),
        lr=lr or float(trained.get("lr", TrainConfig.lr)) * FINETUNE_LR_SCALE,
        batch=batch,
        workers=workers,
        device=device,
        out=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
    )

    crop = card.crop_size or [card.img_size, card.img_size]
    t0 = time.perf_counter()
    pruned = prune(model, flops=flops, input_size=(crop[0], crop[1]), global_pruning=global_pruning)
    log(f"prune: {card.arch} ({card.encoder}) {pruned.summary()} ({time.perf_counter() - t0:.0f} s)")

    best = run_dir / "weights" / "best.pt"
    if epochs == 0:
        save_checkpoint(best, make_payload(pruned.model, card, pruned=True, config=trained, metrics=None))
        log(f"prune: no fine-tune (--epochs 0); wrote {best}")
    else:
        log(f"prune: fine-tuning {epochs} epoch(s) at lr {cfg.lr:g} on {cfg.data}")
        Trainer(cfg, SemanticTask, progress=progress, log=log, model=pruned.model).fit()
    if report:
        _report(Path(weights), best, run_dir, data=data, limit=limit, data_cache=cfg.data_cache, log=log)
    return best


def _report(
    original: Path, pruned: Path, run_dir: Path, *, data: str, limit: int | None, data_cache: str | None, log
) -> None:
    """Size, GFLOPs, latency, throughput and val mIoU of both models, measured in one run."""
    from seglab.deploy.report import measure, write_report

    rows = measure({"float": original, "pruned": pruned}, data, limit=limit, data_cache=data_cache, log=log)
    path = write_report(rows, run_dir, title=f"seglab prune: {original} -> {pruned}")
    log(f"prune: report in {path}")
