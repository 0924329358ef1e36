"""The training loop: data, model, optimiser, schedule, validation, checkpoints, logs.

Read ``Trainer.fit`` top to bottom; everything else is a small helper it calls.
A run lives in ``runs/train/<name>/``:

    config.yaml       the resolved config
    metrics.csv       one row per epoch
    curves.png        loss and mIoU per epoch
    events.out.tfevents.*  TensorBoard
    weights/last.pt   everything needed to --resume
    weights/best.pt   the weights with the best val mIoU, with their metrics
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from seglab.config import TrainConfig, to_dict
from seglab.data import (
    EpochSampler,
    EvalTransform,
    SegmentationDataset,
    TrainTransform,
    build_loader,
    resolve_dataset,
    train_val_splits,
)
from seglab.engine.checkpoint import (
    ModelCard,
    build_from,
    card_from_dict,
    load_checkpoint,
    make_payload,
    non_finite,
    restore_rng,
    rng_state,
    save_checkpoint,
    training_state,
)
from seglab.engine.distributed import all_reduce_sum, init_distributed
from seglab.engine.evaluator import EvalResult, evaluate
from seglab.engine.inference import AMP_DTYPES, Inferencer, amp_dtype, autocast, normalize, resolve_device
from seglab.engine.runs import next_run_dir, restore_rows, resume_run_dir, write_csv
from seglab.engine.schedule import build_optimizer, build_scheduler
from seglab.engine.stopping import TrainingStopped, run_epochs
from seglab.errors import SeglabError
from seglab.losses import build_loss
from seglab.models import SegmentationModel, build_model
from seglab.plots import plot_curves

CSV_FIELDS = ["epoch", "train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "lr", "epoch_time_s"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def check_names(cfg: TrainConfig) -> None:
    """Every name in the config must be registered; say which flag is wrong and what was meant."""
    from seglab.engine.schedule import OPTIMIZERS, SCHEDULERS
    from seglab.losses import CLASS_WEIGHT_METHODS, LOSSES
    from seglab.models import ENCODERS, MODELS
    from seglab.registry import did_you_mean

    arch = MODELS.get_or_raise(cfg.model, flag="--model")
    encoder = cfg.encoder or arch.default_encoder
    if not encoder.startswith("timm:"):
        ENCODERS.get_or_raise(encoder, flag="--encoder")
    LOSSES.get_or_raise(cfg.loss, flag="--loss")
    choices = {
        "--optimizer": (cfg.optimizer, OPTIMIZERS),
        "--scheduler": (cfg.scheduler, SCHEDULERS),
        "--class-weights": (cfg.class_weights or "none", ("none", *CLASS_WEIGHT_METHODS)),
        "--encoder-weights": (cfg.encoder_weights or "none", ("none", "imagenet")),
        "--amp-dtype": (cfg.amp_dtype, AMP_DTYPES),
        "--nonfinite": (cfg.nonfinite, ("stop", "skip")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise SeglabError(f"{flag} {value!r}{did_you_mean(value, allowed)}: choose one of {', '.join(allowed)}")


def check_sync_bn(cfg: TrainConfig, device: torch.device) -> None:
    """--sync-bn means something only on CUDA under torchrun: refuse it anywhere else, as PyTorch would."""
    if not cfg.sync_bn:
        return
    if device.type != "cuda":
        raise SeglabError(
            "--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop --sync-bn for CPU training"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun's variable, as engine/distributed.py reads it
        raise SeglabError(
            "--sync-bn synchronises BatchNorm across torchrun processes, and this run has one; "
            "start it with torchrun or drop --sync-bn"
        )


class Trainer:
    """Train ``cfg.model`` from scratch, or go on training ``model`` when one is given (a pruned
    model being fine-tuned: its checkpoints then carry the module itself, see checkpoint.py)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        progress: bool = True,
        log=print,
        checkpoint: dict[str, Any] | None = None,
        model: SegmentationModel | None = None,
    ) -> None:
        self.progress, self.log = progress, log
        # the checkpoint api.resume_config already read, else read it here
        resume_ckpt = checkpoint
        if resume_ckpt is None and cfg.resume:
            resume_ckpt = load_checkpoint(cfg.resume, trust=cfg.trust_weights)
        if model is None and resume_ckpt is not None and ("layers" in resume_ckpt or "module" in resume_ckpt):
            # resuming the fine-tune of a pruned model: the recipe narrowed to the saved layer widths
            card = card_from_dict(resume_ckpt["card"], cfg.resume or "")
            model = cast(SegmentationModel, build_from(card, resume_ckpt, cfg.resume or ""))
        self.pruned = model is not None  # card.build() alone cannot rebuild it: save its layer widths too
        if cfg.data and Path(cfg.data).exists():  # val and predict find the data from any folder
            cfg = replace(cfg, data=str(Path(cfg.data).resolve()))
        self.cfg = cfg
        check_names(cfg)  # fail on a misspelt name before the dataset is read
        self.device = resolve_device(cfg.device)
        check_sync_bn(cfg, self.device)
        self.dist = init_distributed(self.device.type, cfg.dist_timeout)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:  # one rank speaks, one rank writes
            self.progress, self.log = False, lambda *args, **kwargs: None
        seed_everything(cfg.seed, cfg.deterministic)

        # ---- data
        spec = resolve_dataset(cfg.data, cache_dir=cfg.data_cache, progress=self.progress)
        self.spec = spec
        train_samples, val_samples = train_val_splits(
            spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit
        )
        crop = tuple(cfg.crop_size) if cfg.crop_size else (cfg.img_size, cfg.img_size)
        train_tf = TrainTransform(
            cfg.img_size, crop, (cfg.scale_range[0], cfg.scale_range[1]), cfg.hflip, cfg.jitter, spec.ignore_index
        )
        skip_bad = not cfg.strict_data
        self.train_set = SegmentationDataset(
            train_samples, spec, train_tf, cache=cfg.cache, in_channels=cfg.in_channels, skip_bad=skip_bad
        )
        self.val_set = SegmentationDataset(
            val_samples,
            spec,
            EvalTransform(cfg.img_size),
            cache=cfg.cache,
            in_channels=cfg.in_channels,
            skip_bad=skip_bad,
        )
        for note in spec.notes:
            self.log(f"data: {note}")
        if cfg.cache:
            self.train_set.preload()
            self.val_set.preload()
        rank, world = self.dist.rank, self.dist.world
        self.train_sampler = EpochSampler(
            len(self.train_set), batch=cfg.batch, shuffle=True, seed=cfg.seed, rank=rank, world=world, drop_last=True
        )
        val_sampler = EpochSampler(len(self.val_set), batch=cfg.batch, shuffle=False, rank=rank, world=world)
        loader_args: dict[str, Any] = dict(
            batch=cfg.batch, shuffle=False, workers=cfg.workers, ignore_index=spec.ignore_index, seed=cfg.seed
        )
        self.train_loader = build_loader(self.train_set, sampler=self.train_sampler, drop_last=True, **loader_args)
        self.val_loader = build_loader(self.val_set, sampler=val_sampler, **loader_args)
        if len(self.train_loader) == 0:
            most = max(1, len(train_samples) // world)
            raise SeglabError(
                f"--batch {cfg.batch} x {world} process(es) is more than the {len(train_samples)} training "
                f"images; use --batch {most} or fewer"
            )

        # ---- model, loss, optimiser, schedule
        if model is None:
            model = build_model(
                cfg.model,
                num_classes=spec.num_classes,
                in_channels=cfg.in_channels,
                encoder=cfg.encoder,
                encoder_weights=cfg.encoder_weights,
            )
        elif getattr(model, "num_classes", spec.num_classes) != spec.num_classes:
            raise SeglabError(
                f"the model predicts {model.num_classes} classes and {cfg.data} has {spec.num_classes}; "
                "fine-tune on the data it was trained on (--data)"
            )
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fp32_layers = self._float32_depthwise(crop, resume_ckpt)
        self.net: nn.Module = self.model  # what the training step calls: the model, or DDP around it
        if self.dist.enabled:
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        weights = self._class_weights(train_samples)
        self.loss_fn = build_loss(
            cfg.loss, num_classes=spec.num_classes, ignore_index=spec.ignore_index, class_weights=weights
        )
        self.optimizer = build_optimizer(self.model, cfg)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.accumulate)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
        fp16 = cfg.amp and amp_dtype(self.device, cfg.amp_dtype) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16 and self.device.type == "cuda")
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema
            else None
        )
        self.card = ModelCard(
            arch=cfg.model,
            encoder=self.model.encoder_name,
            num_classes=spec.num_classes,
            in_channels=cfg.in_channels,
            classes=spec.classes,
            colors=list(spec.colors),
            ignore_index=spec.ignore_index,
            mean=list(self.model.mean),
            std=list(self.model.std),
            img_size=cfg.img_size,
            crop_size=list(crop),
        )

        # ---- run folder and state
        self.start_epoch, self.best_miou = 0, -1.0
        self.start_batch, self.partial_loss = 0, (0.0, 0)  # mid-epoch resume
        self.skipped_steps = 0  # non-finite losses skipped (--nonfinite skip)
        self.bad_seen: set[str] = set()  # unreadable samples already named in the log
        self.bad_count = {"train": 0, "val": 0}  # unreadable samples skipped this epoch
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM
        self.rows: list[dict[str, Any]] = []
        if cfg.resume:
            assert resume_ckpt is not None
            saved = resume_ckpt["config"]
            self.run_dir, _ = resume_run_dir(cfg.resume, saved, out=cfg.out, name=cfg.name, log=self.log)
            self._restore(resume_ckpt)
        else:
            self.run_dir = next_run_dir(cfg.out, cfg.name, cfg.exist_ok)
        self.tb = None
        if self.dist.is_main:
            (self.run_dir / "weights").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self._write_csv()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, world = self.cfg, self.dist.world
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.log(
            f"train: {cfg.model} ({self.model.encoder_name}, {n_params:.2f}M params) on {self.device}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {self.spec.num_classes} classes, "
            f"amp {str(amp_dtype(self.device, cfg.amp_dtype)).removeprefix('torch.') if cfg.amp else 'off'}"
        )
        self.log(
            f"train: effective batch {cfg.batch * world * cfg.accumulate} = batch {cfg.batch} x {world} "
            f"process(es) x accumulate {cfg.accumulate}; lr {cfg.lr:g} as given (not scaled with the batch)"
        )
        stopped = run_epochs(self, "train")
        if self.tb is not None:
            self.tb.close()
        if stopped is None:
            self.log(f"train: done; best val mIoU {100 * self.best_miou:.2f}; weights in {self.run_dir / 'weights'}")
        return {"run_dir": self.run_dir, "best_miou": self.best_miou, "rows": self.rows, "stopped": stopped}

    def _run_epoch(self, epoch: int) -> None:
        """Train one epoch, validate, log, save."""
        cfg = self.cfg
        t0 = time.perf_counter()
        train_loss = self.train_epoch(epoch)
        result = None
        if (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs:
            result = self._validate()
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(result.loss, 5) if result and result.loss is not None else "",
            "val_miou": round(result.metrics["miou"], 5) if result else "",
            "val_pixel_accuracy": round(result.metrics["pixel_accuracy"], 5) if result else "",
            "lr": f"{self.optimizer.param_groups[0]['lr']:.3e}",
            "epoch_time_s": round(time.perf_counter() - t0, 1),
        }
        self.rows.append(row)
        usable = self._check_finite(epoch, train_loss, result)
        self._end_epoch(epoch, result if usable else None, row)
        skipped = f", {self.skipped_steps} non-finite steps skipped" if self.skipped_steps else ""
        if sum(self.bad_count.values()):
            skipped += f", {self.bad_count['train']} train / {self.bad_count['val']} val unreadable images skipped"
        if result:
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss "
                f"{result.loss:.4f}, val mIoU {100 * result.metrics['miou']:.2f}, pixel acc "
                f"{100 * result.metrics['pixel_accuracy']:.2f} ({row['epoch_time_s']} s{skipped})"
            )

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training split (from the resumed batch, if any); returns the mean loss."""
        cfg, net = self.cfg, self.net
        net.train()
        start = self.start_batch if epoch == self.start_epoch else 0  # > 0 only when resuming mid-epoch
        self.train_sampler.set_epoch(epoch, start)  # the order depends only on (seed, epoch)
        self.train_set.set_epoch(cfg.seed * 100_003 + epoch)  # so does each sample's augmentation
        total, count = self.partial_loss if start else (0.0, 0)
        bar = epoch_bar(self.train_loader, epoch, cfg.epochs, start, self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        bad: list[str] = []
        for i, batch in enumerate(bar, start=start):
            bad += batch["bad"]
            if batch["image"] is None:
                if not self.dist.enabled:
                    continue
                batch = self._blank_batch()  # every rank must join this step's gradient all-reduce
            x = normalize(batch["image"].to(self.device, non_blocking=True), self.model.mean, self.model.std)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["mask"].to(self.device, non_blocking=True)  # [B,H,W] int64
            boundary = (i + 1) % cfg.accumulate == 0 or i + 1 == start + len(self.train_loader)
            # DDP averages gradients across ranks on backward; between accumulation steps it need not.
            sync = contextlib.nullcontext() if boundary or not self.dist.enabled else net.no_sync()  # type: ignore[operator]
            # --nonfinite skip: the forward pass of a step that is then skipped has already moved
            # BatchNorm's running statistics (to NaN, when it diverged); this copy puts them back
            statistics = [b.detach().clone() for b in self.model.buffers()] if cfg.nonfinite == "skip" else []
            with sync:
                with autocast(self.device, cfg.amp, cfg.amp_dtype):
                    logits = net(x)  # [B,K,H,W]
                loss = self.loss_fn(logits.float(), y)
                if not self._finite(loss, epoch, i):
                    self.optimizer.zero_grad(set_to_none=True)  # drop this step's gradients entirely
                    with torch.no_grad():
                        for buffer, saved in zip(self.model.buffers(), statistics, strict=True):
                            buffer.copy_(saved)
                    continue
                self.scaler.scale(loss / cfg.accumulate).backward()
            total += loss.item()
            count += 1
            if boundary:
                self._optimizer_step()
                if self._stop_requested():
                    self._save_state(self.run_dir / "weights" / "last.pt", epoch, i + 1, (total, count))
                    raise TrainingStopped(epoch, i + 1)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        totals = all_reduce_sum(
            torch.tensor([total, float(count), float(len(bad))], dtype=torch.float64, device=self.device)
        )
        self._report_bad(bad, int(totals[2]), "train")
        return float(totals[0]) / float(totals[1]) if totals[1] else math.nan  # nan: every step was skipped

    def _blank_batch(self) -> dict[str, Any]:
        """One all-ignore image: its loss is 0 and its gradients are zero."""
        h, w = self.card.crop_size
        return {
            "image": torch.zeros(1, self.cfg.in_channels, h, w, dtype=torch.uint8),
            "mask": torch.full((1, h, w), self.spec.ignore_index, dtype=torch.int64),
        }

    def _report_bad(self, bad: list[str], total: int, split: str) -> None:
        """Name each unreadable sample once per run; count them in every epoch."""
        self.bad_count[split] = total
        for message in bad:
            if message not in self.bad_seen:
                self.bad_seen.add(message)
                self.log(f"data: skipped ({split}): {message}")  # the mean over every rank's batches

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

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _validate(self) -> EvalResult:
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        inferencer = Inferencer(
            model,
            self.model.mean,
            self.model.std,
            self.device,
            amp=self.cfg.amp,
            amp_dtype=self.cfg.amp_dtype,
            channels_last=self.cfg.channels_last,
        )
        result = evaluate(
            inferencer,
            self.val_loader,
            num_classes=self.spec.num_classes,
            ignore_index=self.spec.ignore_index,
            class_names=self.spec.classes,
            loss_fn=self.loss_fn,
            progress=self.progress,
        )
        self._report_bad(result.skipped, len(result.skipped), "val")
        if result.metrics["miou"] is None:
            raise SeglabError(
                f"{self.cfg.data}: the val split has no labelled pixels (all are ignore index "
                f"{self.spec.ignore_index}); check its masks with `seglab data check`"
            )
        return result

    # ------------------------------------------------------------------ helpers
    def _float32_depthwise(self, crop: tuple[int, ...], resume_ckpt: dict[str, Any] | None) -> list[str]:
        """Under bfloat16 autocast on the CPU, the depthwise convolutions that are faster in
        float32 run in float32 (see engine/fastpath.py). Measured once per run; a resumed run
        and every rank use the same layers, so the numerics do not change mid-run. Two fresh
        runs may choose differently; --deterministic keeps every layer in bfloat16."""
        cfg = self.cfg
        if not (cfg.amp and self.device.type == "cpu" and amp_dtype(self.device, cfg.amp_dtype) == torch.bfloat16):
            return []
        from seglab.engine.fastpath import depthwise_convs, run_in_float32, tune_depthwise

        if resume_ckpt is not None and "fp32_layers" in resume_ckpt:
            chosen = list(resume_ckpt["fp32_layers"])
        elif cfg.deterministic:  # a timing decides the layers, and timings vary: all stay bfloat16
            chosen = []
        else:
            example = torch.zeros(cfg.batch, cfg.in_channels, *crop).contiguous(
                memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format
            )
            chosen = tune_depthwise(self.model, example)
        names = list(depthwise_convs(self.model))
        if self.dist.enabled:  # rank 0 decides for everyone
            flags = torch.tensor([float(n in chosen and self.dist.is_main) for n in names])
            chosen = [n for n, f in zip(names, all_reduce_sum(flags).tolist(), strict=True) if f > 0]
        run_in_float32(self.model, chosen)
        if names:
            self.log(f"amp: {len(chosen)} of {len(names)} depthwise convolutions run in float32 (faster on this CPU)")
        return chosen

    def _class_weights(self, samples) -> torch.Tensor | None:
        method = self.cfg.class_weights
        if not method or method == "none":
            return None
        from seglab.data import class_pixel_counts
        from seglab.losses import CLASS_WEIGHT_METHODS, class_weights_from_counts

        if method not in CLASS_WEIGHT_METHODS:
            raise SeglabError(f"--class-weights {method!r}: choose one of none, {', '.join(CLASS_WEIGHT_METHODS)}")
        counts, image_counts = class_pixel_counts(samples, self.spec)
        weights = class_weights_from_counts(counts, method, image_counts=image_counts)
        shown = ", ".join(f"{n} {w:.2f}" for n, w in zip(self.spec.classes, weights, strict=True))
        self.log(f"loss: {method} class weights from {len(samples)} train masks: {shown}")
        return torch.as_tensor(weights, dtype=torch.float32, device=self.device)

    def _check_finite(self, epoch: int, train_loss: float, result: EvalResult | None) -> bool:
        """A diverged epoch (non-finite losses, weights or BatchNorm statistics) never becomes best.pt:
        it stops the run (``--nonfinite stop``; last.pt and best.pt keep the last good epoch) or is
        logged and left out of the choice of best.pt (``--nonfinite skip``)."""
        what = [f"train loss {train_loss}"] if not math.isfinite(train_loss) else []
        if result is not None and result.loss is not None and not math.isfinite(result.loss):
            what.append(f"val loss {result.loss}")
        bad = non_finite(self._shipped_model())
        if bad:
            what.append(f"{len(bad)} weights or statistics non-finite (e.g. {bad[0]})")
        if not what:
            return True
        message = f"the run diverged at epoch {epoch + 1}: {', '.join(what)}"
        if self.cfg.nonfinite == "skip":
            self.log(f"train: {message}; not a candidate for best.pt (--nonfinite skip)")
            return False
        raise SeglabError(
            f"{message}; weights/last.pt and best.pt keep the last good epoch. Lower --lr, set --grad-clip, "
            "or pass --nonfinite skip"
        )

    def _end_epoch(self, epoch: int, result: EvalResult | None, row: dict[str, Any]) -> None:
        """Bookkeeping after an epoch: best mIoU everywhere; files on the main rank only."""
        improved = result is not None and (result.metrics["miou"] or 0.0) > self.best_miou
        if result is not None and improved:
            self.best_miou = result.metrics["miou"]
        if not self.dist.is_main:
            return
        self._write_csv()
        for key in ("train_loss", "val_loss", "val_miou"):
            if row[key] != "" and self.tb is not None:
                self.tb.add_scalar(key, row[key], epoch + 1)
        weights = self.run_dir / "weights"
        self._save_state(weights / "last.pt", epoch + 1, 0, None, result)
        if self.cfg.save_period and (epoch + 1) % self.cfg.save_period == 0:
            self._save_state(weights / f"epoch{epoch + 1}.pt", epoch + 1, 0, None, result)  # resumable too
        if improved:
            lean = {"config": to_dict(self.cfg), "epoch": epoch + 1, "metrics": result.metrics if result else None}
            save_checkpoint(
                weights / "best.pt",
                make_payload(self._shipped_model(), self.card, pruned=self.pruned, **lean),
            )
        if self.cfg.plots:
            plot_curves(self.rows, self.run_dir / "curves.png")

    def _shipped_model(self) -> nn.Module:
        """The weights that are evaluated and saved for use: the EMA ones when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def _save_state(
        self,
        path: Path,
        epochs_done: int,
        batch_in_epoch: int,
        partial_loss: tuple[float, int] | None,
        result: EvalResult | None = None,
    ) -> None:
        """A resumable checkpoint after ``epochs_done`` whole epochs and ``batch_in_epoch`` more batches."""
        if not self.dist.is_main:
            return
        state = {
            "config": to_dict(self.cfg),
            "epoch": epochs_done,
            "batch_in_epoch": batch_in_epoch,
            "partial_loss": partial_loss,
            "metrics": result.metrics if result else None,
            "best_miou": self.best_miou,
            "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_model": self.model.state_dict(),
            "fp32_layers": self.fp32_layers,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "rows": self.rows,
        }
        payload = make_payload(self._shipped_model(), self.card, pruned=self.pruned, **state)
        save_checkpoint(path, payload, keep_previous=True)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        with training_state(self.cfg.resume):
            self._load_state(ckpt)
        where = f", batch {self.start_batch + 1}" if self.start_batch else ""
        self.log(f"resume: continuing {self.run_dir} from epoch {self.start_epoch + 1}/{self.cfg.epochs}{where}")

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["train_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        restore_rng(ckpt["rng"])
        self.start_epoch, self.best_miou = ckpt["epoch"], ckpt["best_miou"]
        self.start_batch = ckpt.get("batch_in_epoch", 0)
        self.partial_loss = tuple(ckpt.get("partial_loss") or (0.0, 0))
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.rows = restore_rows(ckpt, self.run_dir, self.start_epoch)

    def _write_csv(self) -> None:
        write_csv(self.run_dir / "metrics.csv", CSV_FIELDS, self.rows)


def epoch_bar(loader, epoch: int, epochs: int, start: int, progress: bool) -> tqdm:
    """The progress bar of one training epoch, starting at batch ``start`` when resuming mid-epoch."""
    return tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{epochs}",
        initial=start,
        total=start + len(loader),
        disable=None if progress else True,
        dynamic_ncols=True,
        leave=False,
    )
