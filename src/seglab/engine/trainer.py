"""The training loop, one for every task: run folder, seeding, samplers, DDP, gradient accumulation,
clipping, EMA, optimisers and schedules, ``--nonfinite stop|skip``, SIGINT/SIGTERM, mid-epoch
checkpoints with every RNG, exact resume, metrics.csv, TensorBoard, curves, progress and log lines.

A task (``seglab/tasks.py`` names the module of each) brings only what differs: its data and
networks, one training step that yields ``(network, loss, logged values)`` for each network it
updates, validation, and what its checkpoints ship. Read ``Trainer.fit`` top to bottom.
A run lives in ``<out>/<name>/``:

    config.yaml       the resolved config
    metrics.csv       one row per epoch: the task's losses and val metrics
    curves.png        losses, val scores (a star on the best epoch) and learning rate per epoch
    report.html       the last validation's figures and pictures (seglab.engine.report names them)
    events.out.tfevents.*  TensorBoard
    weights/last.pt   everything needed to --resume (and the shipped weights, so val/predict take it)
    weights/best.pt   the weights with the best val score (the task names the file and the score)
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from seglab.config import RunConfig, build_config, to_dict
from seglab.data.dataset import EpochSampler, seed_worker
from seglab.engine.averaging import WeightAverage
from seglab.engine.checkpoint import (
    load_checkpoint,
    non_finite,
    read_resumable,
    restore_rng,
    rng_state,
    save_checkpoint,
    training_state,
)
from seglab.engine.distributed import DistInfo, all_reduce_sum, broadcast_buffers, gather_objects, init_distributed
from seglab.engine.inference import amp_dtype, amp_on, resolve_device
from seglab.engine.progress import EpochProgress, duration
from seglab.engine.report import write_examples, write_pictures, write_report
from seglab.engine.runs import RESUME_OVERRIDES, next_run_dir, restore_rows, resume_run_dir, write_csv
from seglab.engine.schedule import Plan, TimeBudget
from seglab.engine.stopping import TrainingStopped, stop_on_signals
from seglab.errors import SeglabError
from seglab.plots import SCORES, plot_curves

Step = Generator[tuple[str, torch.Tensor, dict[str, float]], None, None]  # (network, loss to minimise, values to log)


class Task:
    """What one kind of model brings to the loop. ``setup`` fills ``models`` (the first is the one
    that ships: EMA'd, saved as ``best``, checked for divergence) and ``train_loader`` (its sampler and
    dataset have ``set_epoch``); the rest are called by the loop as named."""

    command = "train"  # the command that resumes a run, for the messages
    fields: tuple[str, ...] = ()  # metrics.csv columns between epoch and lr: train losses, then val metrics
    score: str | None = None  # the row key (higher is better) that picks best.pt; None: every good epoch ships
    best = "best.pt"  # the file the shipped weights go to
    curves: ClassVar[dict[str, Any]] = {}  # plot_curves keywords (losses, scores, title)

    @property
    def resume_command(self) -> str:
        """The command that continues a stopped run, given ``--resume last.pt``."""
        return self.command

    @classmethod
    def build_model(cls, card: Any) -> nn.Module:
        """The untrained network a checkpoint's model card describes (its weights are loaded after)."""
        raise NotImplementedError

    @classmethod
    def predictor(cls, model: nn.Module, card: Any, **kwargs: Any) -> Any:
        """What ``seglab.load`` returns for this task's checkpoints: a predictor whose ``predict``
        gives :class:`seglab.engine.predictor.Result` objects."""
        raise NotImplementedError

    @classmethod
    def exported(cls, path: Any, *, device: str = "auto") -> Any:
        """The predictor of an export of this task's model (.onnx, .torchscript, .pt2)."""
        raise SeglabError(f"{path}: seglab exports no models of this kind")

    def __init__(self, cfg: Any, trainer: Trainer) -> None:
        self.cfg, self.trainer = cfg, trainer
        self.models: dict[str, nn.Module] = {}
        self.train_loader: Any = None

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def dist(self) -> DistInfo:
        return self.trainer.dist

    def log(self, *args: Any) -> None:
        self.trainer.log(*args)

    def epoch_loader(self, dataset: Any, collate_fn: Any = None) -> DataLoader:
        """The training loader: this rank's share of one shuffled order per (seed, epoch), whole batches."""
        cfg, dist = self.cfg, self.dist
        sampler = EpochSampler(
            len(dataset), batch=cfg.batch, shuffle=True, seed=cfg.seed, rank=dist.rank, world=dist.world,
            drop_last=True,
        )  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=cfg.batch,
            sampler=sampler,
            num_workers=cfg.workers,
            collate_fn=collate_fn,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
            # workers start afresh each epoch, with the dataset's set_epoch seed: persistent ones would
            # keep the first epoch's copy of the dataset, and its augmentation, for every epoch
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def set_epoch(self, epoch: int, start: int) -> None:
        """Put the training data at batch ``start`` of ``epoch``: the order depends only on (seed, epoch),
        and so does each sample's augmentation."""
        self.train_loader.sampler.set_epoch(epoch, start)
        self.train_loader.dataset.set_epoch(self.cfg.seed * 100_003 + epoch)

    def check(self) -> None:
        """Refuse a config this task cannot train, before any data is read."""

    def setup(self, checkpoint: dict[str, Any] | None, model: nn.Module | None) -> None:
        raise NotImplementedError

    def optimizers(self, plan: Plan) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
        """An (optimiser, per-step scheduler) for each network in ``models`` that trains; a schedule
        reads ``plan.total`` as it steps (``--time`` changes it after each epoch)."""
        raise NotImplementedError

    def step(self, batch: Any, nets: dict[str, nn.Module]) -> Step:
        """One training step. ``nets`` are the networks as the loop runs them (DDP under torchrun);
        ``self.models`` the bare ones (for a network used but not updated in a phase)."""
        raise NotImplementedError

    def network_inputs(self, batch: Any) -> Any:
        """What the shipped network is called with for a batch of ``train_loader``, as in training
        (``--swa`` recomputes the average's BatchNorm statistics from these); None: nothing to use."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(row values, the metrics best.pt carries) of the shipped ``model`` on the val split, the
        same on every rank (each rank scores its share; the task reduces them)."""
        raise NotImplementedError

    def payload(self, model: nn.Module) -> dict[str, Any]:
        """What a checkpoint of the shipped ``model`` holds for prediction: its card and weights."""
        raise NotImplementedError

    def summary(self) -> str:
        """The first log line: what trains on what."""
        return ""

    def amp(self) -> str:
        """'amp bfloat16', 'amp float16' or 'amp off', for the summary: one wording for every task."""
        cfg = self.cfg
        if amp_on(self.device, cfg.amp, cfg.amp_dtype):
            return f"amp {str(amp_dtype(self.device, cfg.amp_dtype)).removeprefix('torch.')}"
        if cfg.amp:
            return (
                "amp off: this CPU has no bfloat16 instructions, so float32 is the faster precision here "
                "(--amp-dtype bfloat16 forces it)"
            )
        return "amp off"

    def epoch_line(self, row: dict[str, Any]) -> str:
        shown = ", ".join(f"{k} {row[k]}" for k in self.fields if row.get(k, "") != "")
        return f"{shown} ({row['epoch_time_s']} s)"

    def done_line(self, best: float, weights: Path) -> str:
        return f"done; weights in {weights}"

    def examples(self) -> list[Any]:
        """A few augmented training samples as results with their labels (train_batches.jpg); none here."""
        return []

    def evaluation(self, model: nn.Module) -> tuple[Any, Sequence[Any], Any, Any] | None:
        """What the last validation's pictures and report.html are drawn from: (the shipped ``model`` as a
        predictor, the val samples, the dataset spec, the validation's Scores); None: no report."""
        return None

    def after_epoch(self, run_dir: Path, epoch: int, model: nn.Module) -> None:
        """Files of the task's own after an epoch (main rank only), such as sample grids of ``model``."""

    def state(self) -> dict[str, Any]:
        """Task state a resumed run needs back (plain data)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def auto_resume(schema: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with ``--resume auto`` made a path: ``<out>/<name>/weights/last.pt`` when there is
    one, else no resume and ``exist_ok`` (start ``<out>/<name>`` itself, so a restart finds it).
    Under ``torchrun --max-restarts N`` auto is the default: a restarted worker resumes by itself."""
    resume = overrides.get("resume")
    if resume is None and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        resume = "auto"
    if resume != "auto":
        return overrides
    out, name = overrides.get("out") or schema.out, overrides.get("name") or schema.name
    last = Path(out) / name / "weights" / "last.pt"
    if last.is_file() or last.with_name("last.prev.pt").is_file():
        return {**overrides, "resume": str(last)}
    return {**overrides, "resume": None, "exist_ok": True}


def resume_config(schema: type, overrides: dict[str, Any], *, log=print) -> tuple[Any, dict[str, Any]]:
    """(the config, the checkpoint) of the run ``overrides["resume"]`` continues.

    A resumed run keeps its own settings; only where it runs, for how long and where it writes may
    change. A flag that repeats the run's own value is fine (an elastic restart repeats them all)."""
    trust = bool(overrides.get("trust_weights"))
    ckpt, path = read_resumable(overrides["resume"], trust=trust, key="train", log=log)
    if not isinstance(ckpt.get("config"), dict):
        raise SeglabError(f"{path} holds no training config; resume from a weights/last.pt that seglab wrote")
    saved = {**ckpt["config"], "resume": str(path)}
    changed = sorted(
        k
        for k, v in overrides.items()
        if v is not None and k not in (*RESUME_OVERRIDES, "resume") and not _same_value(k, v, saved.get(k))
    )
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise SeglabError(
            f"--resume continues a run with its own settings; {flags} cannot change "
            "(only --epochs, --time, --device, --workers, --out and --name can)"
        )
    saved.update({k: overrides[k] for k in RESUME_OVERRIDES if overrides.get(k) is not None})
    return build_config(schema, saved, str(path)), ckpt


def _same_value(key: str, given: Any, saved: Any) -> bool:
    if key == "data" and isinstance(given, str) and isinstance(saved, str) and Path(given).exists():
        return Path(given).resolve() == Path(saved).resolve()  # the run saved its data folder absolute
    if isinstance(given, tuple):
        given = list(given)
    return bool(given == saved)


class Trainer:
    """Train ``cfg`` with ``task`` (a :class:`Task` class), or go on training ``model`` when one is
    given (a pruned model being fine-tuned)."""

    def __init__(
        self,
        cfg: RunConfig,
        task: type[Task],
        *,
        progress: bool = True,
        log=print,
        checkpoint: dict[str, Any] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.progress, self.log = progress, log
        if cfg.resume and checkpoint is None:
            checkpoint = load_checkpoint(cfg.resume, trust=cfg.trust_weights)
        if cfg.data and Path(cfg.data).exists():  # val, predict and sample find the data from any folder
            cfg = replace(cfg, data=str(Path(cfg.data).absolute()))  # as typed: a symlink stays one
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.task = task(cfg, self)
        self.task.check()  # a wrong name fails before the dataset is read
        self.dist = init_distributed(self.device.type, cfg.dist_timeout)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:  # one rank speaks, one rank writes
            self.progress, self.log = False, lambda *args, **kwargs: None
        seed_everything(cfg.seed, cfg.deterministic)

        # ---- data and networks (the task's), the loop's wrappers around them
        self.task.setup(checkpoint, model)
        self.models = self.task.models
        self.shipped = next(iter(self.models.values()))
        self.nets: dict[str, nn.Module] = dict(self.models)  # what the step calls: DDP around each under torchrun
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.nets = {k: nn.parallel.DistributedDataParallel(m, device_ids=ids) for k, m in self.models.items()}
        loader = self.task.train_loader
        if len(loader) == 0:
            most = max(1, len(loader.dataset) // self.dist.world)
            raise SeglabError(
                f"--batch {cfg.batch} x {self.dist.world} process(es) is more than the {len(loader.dataset)} "
                f"training images; use --batch {most} or fewer"
            )
        # the run's length: --epochs, or what --time holds (refitted after each epoch; the schedules follow)
        self.plan = Plan(math.ceil(len(loader) / cfg.accumulate), cfg.epochs)
        self.parts = self.task.optimizers(self.plan)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
        fp16 = cfg.amp and amp_dtype(self.device, cfg.amp_dtype) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16 and self.device.type == "cuda")
        self.ema = None
        if cfg.ema:
            self.ema = AveragedModel(self.shipped, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.swa = None
        if cfg.swa:
            if type(self.task).network_inputs is Task.network_inputs:
                raise SeglabError(
                    "--swa recomputes the average's BatchNorm statistics from the training batches, which this kind "
                    "of model does not offer yet; train without --swa, or with --ema"
                )
            self.swa = WeightAverage(self.shipped, cfg, self.plan, [o for o, _ in self.parts.values()])

        # ---- run folder and state
        self.start_epoch, self.start_batch, self.best_score = 0, 0, -1.0  # scores are 0..1
        self.partial: tuple[dict[str, float], int] = ({}, 0)  # a mid-epoch resume's sums so far
        self.skipped_steps = 0  # non-finite losses skipped (--nonfinite skip)
        self.epoch_steps = 0  # optimiser steps of the epoch under way (or just trained)
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM
        self.rows: list[dict[str, Any]] = []
        self.budget = TimeBudget(cfg.time) if cfg.time else None
        if cfg.resume:
            assert checkpoint is not None
            self.run_dir, _ = resume_run_dir(cfg.resume, checkpoint["config"], out=cfg.out, name=cfg.name, log=self.log)
            with training_state(cfg.resume):
                self._load_state(checkpoint)
            where = f", batch {self.start_batch + 1}" if self.start_batch else ""
            self.log(f"resume: continuing {self.run_dir} from epoch {self.start_epoch + 1}/{self.plan.epochs}{where}")
        else:
            self.run_dir = next_run_dir(cfg.out, cfg.name, cfg.exist_ok)
        self.tb = None
        if self.dist.is_main:
            (self.run_dir / "weights").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self._write_csv()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir))

    @property
    def fields(self) -> list[str]:
        return ["epoch", *self.task.fields, "lr", "epoch_time_s"]

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, world = self.cfg, self.dist.world
        self.log(f"{self.task.command}: {self.task.summary()}")
        self.log(
            f"{self.task.command}: effective batch {cfg.batch * world * cfg.accumulate} = batch {cfg.batch} x "
            f"{world} process(es) x accumulate {cfg.accumulate}"
        )
        if self.budget is not None:
            self.budget.t0 = time.perf_counter()  # the clock starts with training
            self.log(
                f"{self.task.command}: --time {cfg.time:g} min: the epochs are fitted to the time after each one "
                f"(first guess {self.plan.epochs})"
            )
        stopped = self._run_epochs()
        if self.budget is not None and stopped is None:
            used = duration(self.budget.elapsed())
            self.log(f"{self.task.command}: {len(self.rows)} epochs in {used} of --time {cfg.time:g} min")
        if self.tb is not None:
            self.tb.close()
        # the ranks leave together: one that exits while the main rank still writes its pictures tears
        # the gloo group down under it (the other rank aborts: SIGABRT at exit, seen in CI)
        all_reduce_sum(torch.zeros(1, device=self.device))
        if stopped is None:
            self.log(f"{self.task.command}: {self.task.done_line(self.best_score, self.run_dir / 'weights')}")
        return {"run_dir": self.run_dir, "best": self.best_score, "rows": self.rows, "stopped": stopped}

    def _run_epochs(self) -> int | None:
        """Every epoch left, stopping cleanly on SIGINT/SIGTERM; the signal that stopped it, or None."""
        command = self.task.command
        with stop_on_signals(self):
            self.log(f"{command}: run folder {self.run_dir}")  # from here on, SIGINT/SIGTERM save and stop
            if self.cfg.plots and self.dist.is_main and not (self.start_epoch or self.start_batch):
                self._draw_examples()
            try:
                epoch = self.start_epoch
                while epoch < self.plan.epochs:
                    self._run_epoch(epoch)
                    epoch += 1
            except TrainingStopped as stop:
                self.log(
                    f"{command}: stopped by signal {self.stop_signal} at epoch {stop.epoch + 1}, batch {stop.batch}; "
                    f"continue with: seglab {self.task.resume_command} --resume {self.run_dir / 'weights' / 'last.pt'}"
                )
                return self.stop_signal
        return None

    def _run_epoch(self, epoch: int) -> None:
        """Train one epoch, validate, log, save."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.swa is not None:
            self.swa.begin_epoch(epoch)
        train = self.train_epoch(epoch)
        if self.swa is not None:
            self.swa.end_epoch(self.shipped, lambda: self._network_inputs(epoch), self.device)
        trained = time.perf_counter()
        if self.budget is not None:
            self._fit_to_time(epoch, trained - t0)
        values: dict[str, Any] = {}
        metrics = None
        validated = (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == self.plan.epochs
        for model in {*self.models.values(), self._shipped_model()}:
            broadcast_buffers(model)  # every rank validates and saves rank 0's model
        if validated:
            values, metrics = self.task.validate(self._shipped_model())
        row: dict[str, Any] = dict.fromkeys(self.fields, "")
        row.update({k: round(v, 5) for k, v in train.items()})
        row.update({k: round(v, 5) if isinstance(v, float) else v for k, v in values.items()})
        row.update(epoch=epoch + 1, lr=f"{next(iter(self.parts.values()))[0].param_groups[0]['lr']:.3e}")
        row["epoch_time_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        usable = self._check_finite(epoch, {**train, **values})
        score = self.task.score
        if score is None:
            improved = usable
        else:
            improved = usable and row[score] != "" and row[score] > self.best_score
            if improved:
                self.best_score = row[score]
        self._save_epoch(epoch, row, metrics, improved)
        if self.budget is not None:  # what validating (or only saving) cost, for the next fit
            after = time.perf_counter() - trained
            if validated:
                self.budget.val_s.append(after)
            else:
                self.budget.train_s[-1] += after
        skipped = f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else ""
        if validated:
            self.log(f"epoch {epoch + 1}/{self.plan.epochs}: {self.task.epoch_line(row)}{skipped}")
        else:  # a line for every epoch: a log that goes quiet for --val-interval epochs looks like a hang
            shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in train.items())
            later = min(self.plan.epochs, (epoch // cfg.val_interval + 1) * cfg.val_interval)
            self.log(
                f"epoch {epoch + 1}/{self.plan.epochs}: {shown} ({row['epoch_time_s']} s; val at epoch {later})"
                f"{skipped}"
            )

    def _network_inputs(self, epoch: int) -> Generator[Any, None, None]:
        """Epoch ``epoch``'s training batches again, as the shipped network takes them (SWA's BatchNorm pass)."""
        self.task.set_epoch(epoch, 0)
        for batch in self.task.train_loader:
            x = self.task.network_inputs(batch)
            if x is not None:
                yield x

    def _fit_to_time(self, epoch: int, seconds: float) -> None:
        """--time: the run's length after epoch ``epoch`` trained in ``seconds``, as rank 0 sees it."""
        assert self.budget is not None
        plan = self.plan
        if not (epoch == self.start_epoch and self.start_batch) and self.epoch_steps:  # a resumed part is no measure
            self.budget.train_s.append(seconds * plan.steps_per_epoch / self.epoch_steps)  # a whole epoch's time
        if not self.budget.train_s:
            return
        before = (plan.epochs, plan.last_epoch_steps)
        if self.dist.is_main:
            self.budget.fit(plan, epoch + 1, self.cfg.val_interval)
        mine = [float(plan.epochs), float(plan.last_epoch_steps)] if self.dist.is_main else [0.0, 0.0]
        agreed = all_reduce_sum(torch.tensor(mine, device=self.device)).tolist()  # rank 0's plan, on every rank
        plan.epochs, plan.last_epoch_steps = int(agreed[0]), int(agreed[1])
        if (plan.epochs, plan.last_epoch_steps) != before:
            val = f" (+{duration(self.budget.val_s[-1])} to validate)" if self.budget.val_s else ""
            self.log(
                f"{self.task.command}: --time {self.cfg.time:g} min: {duration(self.budget.elapsed())} used, an epoch "
                f"trains in {duration(self.budget.train_s[-1])}{val}; {plan.describe()} in all"
            )

    def _out_of_time(self) -> bool:
        """--time is spent (rank 0's clock): the epoch under way is cut short and is the last."""
        if self.budget is None:
            return False
        over = 1.0 if self.dist.is_main and self.budget.over() else 0.0
        return bool(all_reduce_sum(torch.tensor([over], device=self.device)).item() > 0)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; the mean of each logged value over every rank's steps."""
        cfg = self.cfg
        for model in self.models.values():
            model.train()
        loader = self.task.train_loader
        start = self.start_batch if epoch == self.start_epoch else 0  # > 0 only when resuming mid-epoch
        self.task.set_epoch(epoch, start)
        sums, count = self.partial if start else ({}, 0)
        sums = dict(sums)
        past = [float(r["epoch_time_s"]) for r in self.rows if r.get("epoch_time_s") not in (None, "")]
        last = self.plan.last_epoch_steps if epoch + 1 == self.plan.epochs else 0  # a budget's part-epoch
        bar = EpochProgress(
            loader, epoch=epoch, epochs=self.plan.epochs, start=start,
            total=min(start + len(loader), last * cfg.accumulate) if last else start + len(loader),
            progress=self.progress, log=self.log, images_per_step=cfg.batch * self.dist.world,
            every_steps=cfg.log_interval, every_s=cfg.log_seconds, past=past,
        )  # fmt: skip
        for _, optimizer_scheduler in self.parts.items():
            optimizer_scheduler[0].zero_grad(set_to_none=True)
        self.epoch_steps = math.ceil(start / cfg.accumulate)
        for i, batch in enumerate(bar, start=start):
            boundary = (i + 1) % cfg.accumulate == 0 or i + 1 == start + len(loader)
            logged = self._step(batch, epoch, i, boundary)
            if logged is None:
                continue
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if boundary:
                self._finish_step()
                self.epoch_steps += 1
                if self._stop_requested():
                    self._save_state(self.run_dir / "weights" / "last.pt", epoch, i + 1, (sums, count))
                    raise TrainingStopped(epoch, i + 1)
                if self._out_of_time():
                    self.log(f"{self.task.command}: --time {cfg.time:g} min spent at epoch {epoch + 1}, step {i + 1}")
                    break
                if self.epoch_steps == last:
                    break
            lr = next(iter(self.parts.values()))[0].param_groups[0]["lr"]
            bar.update(i + 1, {k: v / count for k, v in sums.items()}, lr)
        names = sorted(sums)  # the same names on every rank: each step logs the same values
        values = [*(sums[k] for k in names), float(count)]
        totals = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).cpu()
        n = float(totals[-1])
        if not n:  # every step was skipped
            return dict.fromkeys(self.task.fields[:1], math.nan)
        return {k: float(v) / n for k, v in zip(names, totals[:-1].tolist(), strict=True)}

    def _step(self, batch: Any, epoch: int, i: int, boundary: bool) -> dict[str, float] | None:
        """Run the task's step: backward for each loss it yields, the optimiser of that network at an
        accumulation boundary. None when the step was skipped (a non-finite loss, no usable images)."""
        # DDP averages gradients across ranks on backward; between accumulation steps it need not
        sync = contextlib.ExitStack()
        if self.dist.enabled and not boundary:
            for net in self.nets.values():
                sync.enter_context(net.no_sync())  # type: ignore[operator]
        # --nonfinite skip: the forward pass of a step that is then skipped has already moved BatchNorm's
        # running statistics (to NaN, when it diverged); this copy puts them back
        buffers = [b for m in self.models.values() for b in m.buffers()]
        statistics = [b.detach().clone() for b in buffers] if self.cfg.nonfinite == "skip" else []
        logged: dict[str, float] = {}
        with sync:
            phases = self.task.step(batch, self.nets)
            for part, loss, values in phases:
                if not self._finite(loss, epoch, i):
                    phases.close()
                    for optimizer, _ in self.parts.values():
                        optimizer.zero_grad(set_to_none=True)  # drop this step's gradients entirely
                    with torch.no_grad():
                        for buffer, saved in zip(buffers, statistics, strict=True):
                            buffer.copy_(saved)
                    return None
                self.scaler.scale(loss / self.cfg.accumulate).backward()
                logged.update(values)
                if boundary:
                    self._optimizer_step(part)
        return logged or None

    def _optimizer_step(self, part: str) -> None:
        optimizer = self.parts[part][0]
        if self.cfg.grad_clip:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.models[part].parameters(), self.cfg.grad_clip)
        self.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)

    def _finish_step(self) -> None:
        """After every network's optimiser has stepped: the loss scale, the schedules, the average."""
        self.scaler.update()
        if self.swa is None or not self.swa.step():  # from --swa-start on, SWALR sets the rate
            for _, scheduler in self.parts.values():
                scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.shipped)

    def _finite(self, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """False (and counted) for a non-finite loss in skip mode; stops the run in stop mode.

        Under torchrun the ranks agree: if any rank's loss is not finite, every rank skips."""
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device))
        if bad.item() == 0:
            return True
        if self.cfg.nonfinite == "skip":
            self.skipped_steps += 1
            self.log(
                f"train: non-finite loss at epoch {epoch + 1}, step {step + 1}: step skipped "
                f"({self.skipped_steps} so far)"
            )
            return False
        raise SeglabError(
            f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; lower --lr, set --grad-clip, "
            "train without --amp, or pass --nonfinite skip to skip such steps"
        )

    def _stop_requested(self) -> bool:
        """SIGINT/SIGTERM asks for a stop; under torchrun all ranks stop at the same step."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)
        return all_reduce_sum(flag).item() > 0

    # ------------------------------------------------------------------ after an epoch
    def _check_finite(self, epoch: int, values: dict[str, Any]) -> bool:
        """A diverged epoch (non-finite losses, weights or BatchNorm statistics) never becomes best.pt:
        it stops the run (``--nonfinite stop``; last.pt and best.pt keep the last good epoch) or is
        logged and left out of the choice of best.pt (``--nonfinite skip``)."""
        what = [f"{k} {v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        bad = non_finite(self._shipped_model())
        if bad:
            what.append(f"{len(bad)} weights or statistics non-finite (e.g. {bad[0]})")
        if not what:
            return True
        message = f"the run diverged at epoch {epoch + 1}: {', '.join(what)}"
        if self.cfg.nonfinite == "skip":
            self.log(f"train: {message}; not a candidate for {self.task.best} (--nonfinite skip)")
            return False
        raise SeglabError(
            f"{message}; weights/last.pt and {self.task.best} keep the last good epoch. Lower --lr, set "
            "--grad-clip, or pass --nonfinite skip"
        )

    def _save_epoch(self, epoch: int, row: dict[str, Any], metrics: dict[str, Any] | None, improved: bool) -> None:
        """The files after an epoch, written by the main rank: metrics.csv, TensorBoard, checkpoints, curves."""
        weights = self.run_dir / "weights"
        self._save_state(weights / "last.pt", epoch + 1, 0, None, metrics)
        if self.cfg.save_period and (epoch + 1) % self.cfg.save_period == 0:
            self._save_state(weights / f"epoch{epoch + 1}.pt", epoch + 1, 0, None, metrics)  # resumable too
        if not self.dist.is_main:
            return
        self._write_csv()
        for key, value in row.items():
            if key not in ("epoch", "lr", "epoch_time_s") and isinstance(value, int | float) and self.tb is not None:
                self.tb.add_scalar(key, value, epoch + 1)
        if improved:
            lean = {"config": to_dict(self.cfg), "epoch": epoch + 1, "metrics": metrics}
            save_checkpoint(weights / self.task.best, {**self.task.payload(self._shipped_model()), **lean})
        if self.cfg.plots:
            plot_curves(self.rows, self.run_dir / "curves.png", **self.task.curves, best=self.task.score)
            if metrics is not None:
                self._write_report(epoch)
        self.task.after_epoch(self.run_dir, epoch, self._shipped_model())

    def _draw_examples(self) -> None:
        """train_batches.jpg, before the first step; the random generators are left as they were, so
        that a run draws the same augmentations with plots on or off."""
        state = rng_state()
        examples = self.task.examples()
        restore_rng(state)
        if examples:
            write_examples(self.run_dir / "train_batches.jpg", examples)

    def _write_report(self, epoch: int) -> None:
        """The val pictures and report.html of the validation just done (see seglab.engine.report)."""
        view = self.task.evaluation(self._shipped_model())
        if view is None:
            return
        from seglab import __version__

        predictor, samples, spec, scores = view
        write_pictures(self.run_dir, predictor, samples, spec, scores)
        facts = {
            "run": str(self.run_dir),
            "model": self.task.summary(),
            "data": str(self.cfg.data),
            "epoch": f"{epoch + 1} of {self.plan.epochs} (the figures are this epoch's)",
        }
        score = self.task.score
        if score is not None and self.best_score >= 0:
            best = next(r["epoch"] for r in self.rows if r[score] == self.best_score)
            name = self.task.curves.get("scores", SCORES).get(score, score)
            facts["best"] = f"{name} {100 * self.best_score:.2f} at epoch {best} (weights/{self.task.best})"
        facts["seglab"] = __version__
        write_report(self.run_dir, title=f"seglab {self.task.command}: {self.run_dir.name}", facts=facts, scores=scores)

    def _shipped_model(self) -> nn.Module:
        """The weights that are evaluated and saved for use: the EMA ones when EMA is on, the SWA
        average once it has begun."""
        if self.swa is not None and self.swa.model is not None:
            return self.swa.model
        return self.ema.module if self.ema is not None else self.shipped

    # ------------------------------------------------------------------ state
    def _save_state(
        self,
        path: Path,
        epochs_done: int,
        batch_in_epoch: int,
        partial: tuple[dict[str, float], int] | None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """A resumable checkpoint after ``epochs_done`` whole epochs and ``batch_in_epoch`` more batches.
        Every rank calls it (each rank's random generators are saved); the main rank writes it."""
        rng = gather_objects([rng_state()])  # a rank's dropout and noise draws are its own
        if not self.dist.is_main:
            return
        train = {
            name: {"model": self.models[name].state_dict(), "optimizer": opt.state_dict(), "scheduler": s.state_dict()}
            for name, (opt, s) in self.parts.items()
        }
        state = {
            "config": to_dict(self.cfg),
            "epoch": epochs_done,
            "batch_in_epoch": batch_in_epoch,
            "partial": list(partial) if partial else None,
            "metrics": metrics,
            "best_score": self.best_score,
            "skipped_steps": self.skipped_steps,
            "train": train,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "task_state": self.task.state(),
            "rng": rng,
            "rows": self.rows,
            "planned_epochs": self.plan.epochs,
            "planned_last_steps": self.plan.last_epoch_steps,
            "time_budget": self.budget.state() if self.budget is not None else None,
        }
        save_checkpoint(path, {**self.task.payload(self._shipped_model()), **state}, keep_previous=True)

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        for name, (optimizer, scheduler) in self.parts.items():
            saved = ckpt["train"][name]
            self.models[name].load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if self.swa is not None and ckpt.get("swa") is not None:
            self.swa.load_state_dict(ckpt["swa"])
        self.task.load_state(ckpt.get("task_state") or {})
        states = ckpt["rng"]  # one per rank; a run resumed on fewer or more ranks starts theirs from rank 0's
        restore_rng(states[self.dist.rank] if self.dist.rank < len(states) else states[0])
        self.start_epoch, self.best_score = ckpt["epoch"], ckpt["best_score"]
        self.start_batch = ckpt.get("batch_in_epoch", 0)
        sums, count = ckpt.get("partial") or ({}, 0)
        self.partial = (dict(sums), int(count))
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.rows = restore_rows(ckpt, self.run_dir, self.start_epoch)
        if self.budget is not None:  # the minutes so far count, and the epochs measured so far
            self.budget.load_state(ckpt.get("time_budget") or {})
            self.plan.epochs = int(ckpt.get("planned_epochs") or self.plan.epochs)
            last = int(ckpt.get("planned_last_steps") or 0)
            self.plan.last_epoch_steps = min(max(0, last), self.plan.steps_per_epoch)
            if self.plan.epochs <= self.start_epoch and self.budget.train_s:  # a finished run given more minutes
                self.budget.fit(self.plan, self.start_epoch, self.cfg.val_interval)

    def _write_csv(self) -> None:
        write_csv(self.run_dir / "metrics.csv", self.fields, self.rows)
