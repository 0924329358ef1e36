"""Semantic segmentation in the training loop: a class per pixel, cross-entropy-like losses, mIoU.

The run folder's metrics.csv has train_loss, val_loss, val_miou and val_pixel_accuracy per epoch;
best.pt holds the weights of the best val mIoU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from seglab.data import (
    EpochSampler,
    EvalTransform,
    SegmentationDataset,
    ShardSpec,
    TrainTransform,
    build_loader,
    build_train_data,
    build_val_data,
    collate_pad,
    resolve_dataset,
    train_val_splits,
)
from seglab.engine.checkpoint import ModelCard, build_from, card_from_dict, make_payload
from seglab.engine.distributed import gather_objects
from seglab.engine.evaluator import evaluate
from seglab.engine.inference import AMP_DTYPES, Inferencer, amp_dtype, amp_on, autocast, normalize
from seglab.engine.predictor import SegResult
from seglab.engine.report import EXAMPLES
from seglab.engine.schedule import Plan, build_optimizer, build_scheduler
from seglab.engine.trainer import Step, Task
from seglab.errors import SeglabError
from seglab.losses import build_loss
from seglab.models import SegmentationModel, build_model


def check_names(cfg) -> None:
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
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise SeglabError(f"{flag} {value!r}{did_you_mean(value, allowed)}: choose one of {', '.join(allowed)}")


def check_sync_bn(cfg, device: torch.device) -> None:
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


def single_model(cfg, model: nn.Module, plan: Plan) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
    """The optimiser and schedule of a task that trains one network from TrainConfig's flags."""
    optimizer = build_optimizer(model, cfg)
    return {"model": (optimizer, build_scheduler(optimizer, cfg, plan))}


class SemanticTask(Task):
    fields = ("train_loss", "val_loss", "val_miou", "val_pixel_accuracy")
    score = "val_miou"

    @classmethod
    def build_model(cls, card: ModelCard) -> nn.Module:
        return build_model(
            card.arch, num_classes=card.num_classes, in_channels=card.in_channels, encoder=card.encoder,
            encoder_weights=None,
        )  # fmt: skip

    @classmethod
    def predictor(cls, model: nn.Module, card: ModelCard, **kwargs: Any) -> Any:
        from seglab.semantic.predictor import SegModel

        return SegModel(model, card, **kwargs)

    @classmethod
    def exported(cls, path: Any, *, device: str = "auto") -> Any:
        from seglab.deploy.runtime import load_exported
        from seglab.engine.inference import resolve_device
        from seglab.semantic.predictor import SegModel

        module, card, meta = load_exported(path, resolve_device(device))
        backend = {"onnx": "onnxruntime"}.get(meta["format"], meta["format"])
        config = {"data": meta.get("data")}
        return SegModel(module, card, device=device, metrics=meta.get("metrics"), config=config, backend=backend)

    def check(self) -> None:
        check_names(self.cfg)
        check_sync_bn(self.cfg, self.device)

    def setup(self, checkpoint: dict[str, Any] | None, model: nn.Module | None) -> None:
        cfg = self.cfg
        if model is None and checkpoint is not None and {"layers", "module", "qat"} & checkpoint.keys():
            # resuming the fine-tune of a pruned model: the recipe narrowed to the saved layer widths
            model = build_from(card_from_dict(checkpoint["card"], cfg.resume or ""), checkpoint, cfg.resume or "")
        from seglab.deploy.pt2e import QATModel

        # a model given to train on: pruned (card.build() alone cannot rebuild it: save its layer widths
        # too) or a quantisation-aware graph (its checkpoints say so: only seglab quantize reads them)
        self.qat = isinstance(model, QATModel)
        self.pruned = model is not None and not self.qat

        # ---- data
        self.train_set: Any
        self.val_set: Any
        spec = self.spec = resolve_dataset(cfg.data, cache_dir=cfg.data_cache, progress=self.trainer.progress)
        if isinstance(spec, ShardSpec):  # streamed: each rank and worker reads shards of its own
            if cfg.class_weights not in (None, "none"):
                raise SeglabError(
                    f"--class-weights {cfg.class_weights}: not computed from shards yet; train without it"
                )
            rank, world = self.dist.rank, self.dist.world
            self.train_set, self.train_loader = build_train_data(cfg, spec, rank, world)
            self.val_set, self.val_loader = build_val_data(cfg, spec, rank, world)
            train: list = []
        else:
            train = self._folder_data(spec)
        for note in spec.notes:  # after the splits: a held-out val is one of them
            self.log(f"data: {note}")
        self.bad: list[str] = []  # unreadable training samples since the last report
        self.bad_seen: set[str] = set()  # those already named in the log
        self.bad_count = {"train": 0, "val": 0}

        # ---- model and loss
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
        self.model = cast(SegmentationModel, model.to(self.device))
        crop = tuple(cfg.crop_size) if cfg.crop_size else (cfg.img_size, cfg.img_size)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fp32_layers = self._float32_depthwise(crop, checkpoint)
        if self.dist.enabled and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.models = {"model": self.model}
        self.loss_fn = build_loss(
            cfg.loss,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            class_weights=self._class_weights(train),
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

    def _folder_data(self, spec) -> list:
        """The train and val datasets and loaders of files on disk; the training samples."""
        cfg = self.cfg
        train, val = train_val_splits(spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit)
        crop = tuple(cfg.crop_size) if cfg.crop_size else (cfg.img_size, cfg.img_size)
        scale = (cfg.scale_range[0], cfg.scale_range[1])
        train_tf = TrainTransform(cfg.img_size, crop, scale, cfg.hflip, cfg.jitter, spec.ignore_index)
        common = dict(cache=cfg.cache, in_channels=cfg.in_channels, skip_bad=not cfg.strict_data)
        self.train_set = SegmentationDataset(train, spec, train_tf, **common)  # type: ignore[arg-type]
        self.val_set = SegmentationDataset(val, spec, EvalTransform(cfg.img_size), **common)  # type: ignore[arg-type]
        if cfg.cache:
            self.train_set.preload()
            self.val_set.preload()
        self.train_loader = self.epoch_loader(self.train_set, partial(collate_pad, ignore_index=spec.ignore_index))
        val_sampler = EpochSampler(len(val), batch=cfg.batch, shuffle=False, rank=self.dist.rank, world=self.dist.world)
        self.val_loader = build_loader(
            self.val_set, sampler=val_sampler, batch=cfg.batch, shuffle=False, workers=cfg.workers,
            ignore_index=spec.ignore_index, seed=cfg.seed,
        )  # fmt: skip
        return train

    def set_epoch(self, epoch: int, start: int) -> None:
        if isinstance(self.spec, ShardSpec):  # the shards know where batch `start` of `epoch` is
            self.train_set.set_epoch(epoch, start)
        else:
            super().set_epoch(epoch, start)

    def optimizers(self, plan: Plan) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
        return single_model(self.cfg, self.model, plan)

    def summary(self) -> str:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"{cfg.model} ({self.model.encoder_name}, {n_params:.2f}M params) on {self.device}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {self.spec.num_classes} classes, "
            f"{self.amp()}; lr {cfg.lr:g} as given (not scaled with the batch)"
        )

    def step(self, batch: dict[str, Any], nets: dict[str, nn.Module]) -> Step:
        cfg = self.cfg
        self.bad += batch["bad"]
        if batch["image"] is None:  # every image of the batch was unreadable
            if not self.dist.enabled:
                return
            batch = self._blank_batch()  # every rank must join this step's gradient all-reduce
        x = self.network_inputs(batch)
        y = batch["mask"].to(self.device, non_blocking=True)  # [B,H,W] int64
        with autocast(self.device, cfg.amp, cfg.amp_dtype):
            logits = nets["model"](x)  # [B,K,H,W]
        loss = self.loss_fn(logits.float(), y)
        yield "model", loss, {"train_loss": loss.item()}

    def network_inputs(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if batch["image"] is None:
            return None
        x = normalize(batch["image"].to(self.device, non_blocking=True), self.model.mean, self.model.std)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _blank_batch(self) -> dict[str, Any]:
        """One all-ignore image: its loss is 0 and its gradients are zero."""
        h, w = self.card.crop_size
        return {
            "image": torch.zeros(1, self.cfg.in_channels, h, w, dtype=torch.uint8),
            "mask": torch.full((1, h, w), self.spec.ignore_index, dtype=torch.int64),
        }

    def validate(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
        model.eval()
        cfg = self.cfg
        inferencer = Inferencer(
            model,
            self.model.mean,
            self.model.std,
            self.device,
            amp=cfg.amp,
            amp_dtype=cfg.amp_dtype,
            channels_last=cfg.channels_last,
        )
        result = evaluate(
            inferencer,
            self.val_loader,
            num_classes=self.spec.num_classes,
            ignore_index=self.spec.ignore_index,
            class_names=self.spec.classes,
            loss_fn=self.loss_fn,
            progress=self.trainer.progress,
        )
        self._report_bad(gather_objects(self.bad), "train")
        self.bad = []
        self._report_bad(result.skipped, "val")
        if result.metrics["miou"] is None:
            raise SeglabError(
                f"{cfg.data}: the val split has no labelled pixels (all are ignore index "
                f"{self.spec.ignore_index}); check its masks with `seglab data check`"
            )
        self.last_eval = result
        values = {
            "val_loss": result.loss if result.loss is not None else "",
            "val_miou": result.metrics["miou"],
            "val_pixel_accuracy": result.metrics["pixel_accuracy"],
        }
        return values, result.metrics

    def examples(self) -> list[Any]:
        if isinstance(self.spec, ShardSpec):
            return []
        spec, out = self.spec, []
        for i in range(min(EXAMPLES, len(self.train_set))):
            item = self.train_set[i]
            if "image" in item:  # not an unreadable sample
                image, mask = item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy()
                path = self.train_set.samples[i].image
                out.append(SegResult(image, mask, spec.classes, spec.colors, path=path, unlabelled=spec.ignore_index))
        return out

    def evaluation(self, model: nn.Module) -> tuple[Any, Sequence[Any], Any, Any]:
        # a copy: the predictor puts its model in channels-last eval mode, and training goes on with this one
        predictor = self.predictor(copy.deepcopy(model), self.card, device=str(self.device))
        samples = [] if isinstance(self.spec, ShardSpec) else self.val_set.samples
        return predictor, samples, self.spec, predictor.scores(self.last_eval)

    def _report_bad(self, bad: list[str], split: str) -> None:
        """Name each unreadable sample once per run; count them in every epoch."""
        self.bad_count[split] = len(bad)
        for message in bad:
            if message not in self.bad_seen:
                self.bad_seen.add(message)
                self.log(f"data: skipped ({split}): {message}")

    def epoch_line(self, row: dict[str, Any]) -> str:
        skipped = ""
        if sum(self.bad_count.values()):
            skipped = f", {self.bad_count['train']} train / {self.bad_count['val']} val unreadable images skipped"
        return (
            f"train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val mIoU "
            f"{100 * row['val_miou']:.2f}, pixel acc {100 * row['val_pixel_accuracy']:.2f} "
            f"({row['epoch_time_s']} s{skipped})"
        )

    def done_line(self, best: float, weights: Path) -> str:
        return f"done; best val mIoU {100 * best:.2f}; weights in {weights}"

    @property
    def resume_command(self) -> str:
        return f"quantize --weights {self.models['model'].source} --qat" if self.qat else self.command

    def payload(self, model: nn.Module) -> dict[str, Any]:
        return make_payload(model, self.card, pruned=self.pruned, **({"qat": True} if self.qat else {}))

    def state(self) -> dict[str, Any]:
        return {"fp32_layers": self.fp32_layers}

    # ------------------------------------------------------------------ helpers
    def _float32_depthwise(self, crop: tuple[int, ...], checkpoint: dict[str, Any] | None) -> list[str]:
        """Under bfloat16 autocast on the CPU, the depthwise convolutions that are faster in
        float32 run in float32 (see engine/fastpath.py). Measured once per run; a resumed run
        and every rank use the same layers, so the numerics do not change mid-run. Two fresh
        runs may choose differently; --deterministic keeps every layer in bfloat16."""
        cfg = self.cfg
        on = amp_on(self.device, cfg.amp, cfg.amp_dtype)
        if not (on and self.device.type == "cpu" and amp_dtype(self.device, cfg.amp_dtype) == torch.bfloat16):
            return []
        from seglab.engine.fastpath import depthwise_convs, run_in_float32, tune_depthwise

        saved = (checkpoint or {}).get("task_state") or {}
        if "fp32_layers" in saved:
            chosen = list(saved["fp32_layers"])
        elif cfg.deterministic:  # a timing decides the layers, and timings vary: all stay bfloat16
            chosen = []
        else:
            example = torch.zeros(cfg.batch, cfg.in_channels, *crop).contiguous(
                memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format
            )
            chosen = tune_depthwise(self.model, example)
        names = list(depthwise_convs(self.model))
        if self.dist.enabled:  # rank 0 decides for everyone
            from seglab.engine.distributed import all_reduce_sum

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
        from seglab.losses import class_weights_from_counts

        counts, image_counts = class_pixel_counts(samples, self.spec)
        weights = class_weights_from_counts(counts, method, image_counts=image_counts)
        shown = ", ".join(f"{n} {w:.2f}" for n, w in zip(self.spec.classes, weights, strict=True))
        self.log(f"loss: {method} class weights from {len(samples)} train masks: {shown}")
        return torch.as_tensor(weights, dtype=torch.float32, device=self.device)
