"""Training a detector (``--task instance`` / ``--task detect``): the semantic trainer's run folder,
checkpoints, schedule, resume and signals, around torchvision's own loss computation.

A detector computes its losses itself (``model(images, targets) -> {name: loss}``), scores with
box/mask AP instead of mIoU, and takes lists of images, so its loop is its own; everything
around the loop is shared with ``engine/trainer.py``. The run folder is the same:

    config.yaml, metrics.csv (loss parts, box and mask AP per epoch), curves.png, events.out.tfevents.*,
    weights/last.pt (resumable), weights/best.pt (best val mask AP, or box AP for detect)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from seglab.config import TrainConfig, to_dict
from seglab.data import EpochSampler, resolve_dataset, train_val_splits
from seglab.engine.checkpoint import (
    ModelCard,
    make_payload,
    non_finite,
    restore_rng,
    rng_state,
    save_checkpoint,
    training_state,
)
from seglab.engine.inference import amp_dtype, resolve_device
from seglab.engine.runs import next_run_dir, restore_rows, resume_run_dir, write_csv
from seglab.engine.schedule import build_optimizer, build_scheduler
from seglab.engine.stopping import TrainingStopped, run_epochs
from seglab.engine.trainer import check_sync_bn, epoch_bar, seed_everything
from seglab.errors import SeglabError
from seglab.instance.data import InstanceDataset, collate_instances, train_transform
from seglab.instance.evaluate import evaluate_detector
from seglab.instance.models import DEFAULT_BACKBONE, DetectorSpec, build_detector, mixed_precision
from seglab.plots import plot_curves

CSV_FIELDS = [
    "epoch", "train_loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
    "val_box_ap", "val_box_ap50", "val_mask_ap", "val_mask_ap50", "lr", "epoch_time_s",
]  # fmt: skip


def _check(cfg: TrainConfig) -> None:
    expected = {"instance": "maskrcnn", "detect": "fasterrcnn"}[cfg.task]
    if cfg.model != expected:
        raise SeglabError(f"--task {cfg.task} trains --model {expected}, not {cfg.model!r}; drop --model or use it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's variable, as engine/distributed.py reads it
        raise SeglabError("--task instance/detect trains in one process so far; run seglab train without torchrun")
    if cfg.in_channels != 3:
        raise SeglabError("--task instance/detect takes RGB images; drop --in-channels (greyscale is read as RGB)")


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


class InstanceTrainer:
    """Train torchvision's Mask R-CNN / Faster R-CNN on a dataset, the seglab way."""

    def __init__(
        self, cfg: TrainConfig, *, progress: bool = True, log=print, checkpoint: dict[str, Any] | None = None
    ) -> None:
        _check(cfg)
        self.cfg, self.progress, self.log = cfg, progress, log
        if cfg.data and Path(cfg.data).exists():
            cfg = self.cfg = replace(cfg, data=str(Path(cfg.data).resolve()))  # val finds it from anywhere
        self.device = resolve_device(cfg.device)
        check_sync_bn(cfg, self.device)
        seed_everything(cfg.seed, cfg.deterministic)

        # ---- data
        spec = self.spec = resolve_dataset(cfg.data, cache_dir=cfg.data_cache, progress=progress, task=cfg.task)
        train, val = train_val_splits(spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit)
        for note in spec.notes:
            self.log(f"data: {note}")
        scale = (cfg.scale_range[0], cfg.scale_range[1])
        self.train_set = InstanceDataset(train, spec, train_transform(cfg.img_size, scale, cfg.hflip, cfg.jitter))
        self.val_set = InstanceDataset(val, spec, keep_crowd=True)
        if len(train) < cfg.batch:
            raise SeglabError(f"--batch {cfg.batch} is more than the {len(train)} training images; lower --batch")
        self.sampler = EpochSampler(
            len(train), batch=cfg.batch, shuffle=True, seed=cfg.seed, rank=0, world=1, drop_last=True
        )
        self.loader = DataLoader(
            self.train_set,
            batch_size=cfg.batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            collate_fn=collate_instances,
            drop_last=True,
            persistent_workers=cfg.workers > 0,
        )

        # ---- model, optimiser, schedule
        backbone = cfg.encoder or DEFAULT_BACKBONE
        self.model = build_detector(
            DetectorSpec(cfg.model, backbone, spec.num_classes, cfg.encoder_weights, cfg.img_size)
        ).to(self.device)
        fp16 = False
        if cfg.amp:
            dtype = amp_dtype(self.device, cfg.amp_dtype)
            mixed_precision(self.model, self.device.type, dtype)
            fp16 = dtype == torch.float16
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16 and self.device.type == "cuda")
        self.optimizer = build_optimizer(self.model, cfg)
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.accumulate)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        transform = self.model.transform  # torchvision's GeneralizedRCNNTransform holds the normalisation
        self.card = ModelCard(
            arch=cfg.model,
            encoder=backbone,
            num_classes=spec.num_classes,
            in_channels=3,
            classes=spec.classes,
            colors=list(spec.colors),
            ignore_index=spec.ignore_index,
            mean=list(transform.image_mean),
            std=list(transform.image_std),
            img_size=cfg.img_size,
            crop_size=[cfg.img_size, cfg.img_size],
            task=cfg.task,
            weights=cfg.encoder_weights,
        )
        self.score_key = "mask" if cfg.model == "maskrcnn" else "box"

        # ---- run folder and state
        self.start_epoch, self.start_batch, self.best_ap = 0, 0, -1.0
        self.rows: list[dict[str, Any]] = []
        self.stop_signal: int | None = None
        if cfg.resume:
            assert checkpoint is not None
            saved = checkpoint["config"]
            self.run_dir, _ = resume_run_dir(cfg.resume, saved, out=cfg.out, name=cfg.name, log=log)
            self._restore(checkpoint)
        else:
            self.run_dir = next_run_dir(cfg.out, cfg.name, cfg.exist_ok)
        (self.run_dir / "weights").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._write_csv()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.log(
            f"train: {cfg.model} ({self.card.encoder}-FPN, {n_params:.2f}M params) on {self.device}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {self.spec.num_classes - 1} classes, "
            f"amp {'on' if cfg.amp else 'off'}"
        )
        stopped = run_epochs(self, "train")
        self.tb.close()
        if stopped is None:
            self.log(
                f"train: done; best val {self.score_key} AP {100 * self.best_ap:.2f}; "
                f"weights in {self.run_dir / 'weights'}"
            )
        return {"run_dir": self.run_dir, "best_ap": self.best_ap, "rows": self.rows, "stopped": stopped}

    def _run_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        losses = self.train_epoch(epoch)
        metrics = None
        if (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs:
            metrics = self.validate()
        row: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
        row.update({k: round(v, 5) for k, v in losses.items()})
        row.update(epoch=epoch + 1, lr=f"{self.optimizer.param_groups[0]['lr']:.3e}")
        for kind in ("box", "mask"):
            if metrics and kind in metrics:
                row[f"val_{kind}_ap"] = round(metrics[kind]["AP"] or 0.0, 5)
                row[f"val_{kind}_ap50"] = round(metrics[kind]["AP50"] or 0.0, 5)
        row["epoch_time_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        for key, value in row.items():
            if key not in ("epoch", "lr", "epoch_time_s") and value != "":
                self.tb.add_scalar(key, value, epoch + 1)
        score: float | None = (metrics[self.score_key]["AP"] or 0.0) if metrics else None
        bad = non_finite(self.model)
        if bad:  # a diverged detector scores AP 0, and would otherwise become best.pt at epoch 1
            message = f"the run diverged at epoch {epoch + 1}: {len(bad)} weights or statistics non-finite ({bad[0]})"
            if cfg.nonfinite != "skip":
                raise SeglabError(f"{message}; weights/last.pt and best.pt keep the last good epoch. Lower --lr")
            self.log(f"train: {message}; not a candidate for best.pt (--nonfinite skip)")
            score = None
        improved = score is not None and score > self.best_ap
        if score is not None and improved:
            self.best_ap = score
        self._write_csv()
        weights = self.run_dir / "weights"
        self._save_state(weights / "last.pt", epoch + 1, 0, metrics)
        if cfg.save_period and (epoch + 1) % cfg.save_period == 0:
            self._save_state(weights / f"epoch{epoch + 1}.pt", epoch + 1, 0, metrics)
        if improved:
            lean = make_payload(self.model, self.card, config=to_dict(cfg), epoch=epoch + 1, metrics=metrics)
            save_checkpoint(weights / "best.pt", lean)
        if cfg.plots:
            scores = {f"val_{k}_ap": f"{k} AP" for k in ("box", "mask") if row[f"val_{k}_ap"] != ""}
            plot_curves(self.rows, self.run_dir / "curves.png", scores=scores, title="val AP (%)")
        if metrics:
            shown = ", ".join(f"{k} AP {100 * (metrics[k]['AP'] or 0):.2f}" for k in ("box", "mask") if k in metrics)
            loss = losses["train_loss"]
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, val {shown} ({row['epoch_time_s']} s)")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; returns the mean total loss and the mean of each part."""
        cfg, model = self.cfg, self.model
        model.train()
        start = self.start_batch if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, start)
        self.train_set.set_epoch(cfg.seed * 100_003 + epoch)
        sums: dict[str, float] = {}
        count = 0
        bar = epoch_bar(self.loader, epoch, cfg.epochs, start, self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, targets) in enumerate(bar, start=start):
            xs = [im.to(self.device, non_blocking=True).float().div_(255) for im in images]  # [C,H,W] 0..1
            ts = [_to_device(t, self.device) for t in targets]
            parts = model(xs, ts)  # {loss_classifier, loss_box_reg, [loss_mask], loss_objectness, loss_rpn_box_reg}
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                if cfg.nonfinite == "skip":
                    self.log(f"train: non-finite loss at epoch {epoch + 1}, step {i + 1}: step skipped")
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                raise SeglabError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; lower --lr, set "
                    "--grad-clip, or pass --nonfinite skip"
                )
            self.scaler.scale(loss / cfg.accumulate).backward()
            count += 1
            sums["train_loss"] = sums.get("train_loss", 0.0) + loss.item()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            if (i + 1) % cfg.accumulate == 0 or i + 1 == start + len(self.loader):
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                if self.stop_signal is not None:
                    self._save_state(self.run_dir / "weights" / "last.pt", epoch, i + 1, None)
                    raise TrainingStopped(epoch, i + 1)
            bar.set_postfix(loss=f"{sums['train_loss'] / count:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        return {k: v / max(count, 1) for k, v in sums.items()}

    def validate(self) -> dict[str, Any]:
        return evaluate_detector(
            self.model,
            self.val_set,
            device=self.device,
            workers=self.cfg.workers,
            progress=self.progress,
        ).metrics

    # ------------------------------------------------------------------ state
    def _save_state(self, path: Path, epochs_done: int, batch: int, metrics: dict[str, Any] | None) -> None:
        state = {
            "config": to_dict(self.cfg),
            "epoch": epochs_done,
            "batch_in_epoch": batch,
            "metrics": metrics,
            "best_ap": self.best_ap,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "rows": self.rows,
        }
        save_checkpoint(path, make_payload(self.model, self.card, **state), keep_previous=True)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        with training_state(self.cfg.resume):
            self._load_state(ckpt)
        self.log(f"resume: continuing {self.run_dir} from epoch {self.start_epoch + 1}/{self.cfg.epochs}")

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        self.start_epoch, self.start_batch, self.best_ap = ckpt["epoch"], ckpt.get("batch_in_epoch", 0), ckpt["best_ap"]
        self.rows = restore_rows(ckpt, self.run_dir, self.start_epoch)

    def _write_csv(self) -> None:
        write_csv(self.run_dir / "metrics.csv", CSV_FIELDS, self.rows)
