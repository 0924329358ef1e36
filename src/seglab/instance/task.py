"""Detectors in the training loop (``--task instance``: Mask R-CNN, ``--task detect``: Faster R-CNN).

torchvision's detector computes its own losses (``model(images, targets) -> {name: loss}``) and
takes lists of images at their own sizes; it is scored with COCO box and mask AP. The run folder
is the semantic one, with these columns in metrics.csv: the loss parts, box and mask AP per epoch;
best.pt holds the weights of the best val mask AP (box AP for detect).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from seglab.data import resolve_dataset, train_val_splits
from seglab.engine.checkpoint import ModelCard, make_payload
from seglab.engine.inference import amp_dtype, amp_on
from seglab.engine.report import EXAMPLES
from seglab.engine.schedule import Plan
from seglab.engine.trainer import Step, Task
from seglab.errors import SeglabError
from seglab.instance.data import InstanceDataset, Instances, collate_instances, train_transform
from seglab.instance.evaluate import evaluate_detector
from seglab.instance.models import DEFAULT_BACKBONE, DetectorSpec, build_detector, mixed_precision
from seglab.instance.predictor import labelled
from seglab.semantic.task import check_sync_bn, single_model

LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


class InstanceTask(Task):
    fields = ("train_loss", *LOSSES, "val_box_ap", "val_box_ap50", "val_mask_ap", "val_mask_ap50")
    curves: ClassVar[dict[str, Any]] = {
        "losses": {"train_loss": "total", **{k: k.removeprefix("loss_").replace("_", " ") for k in LOSSES}},
        "scores": {
            "val_box_ap": "box AP",
            "val_box_ap50": "box AP50",
            "val_mask_ap": "mask AP",
            "val_mask_ap50": "mask AP50",
        },
        "title": "val AP (%)",
    }

    @classmethod
    def build_model(cls, card: ModelCard) -> nn.Module:
        spec = DetectorSpec(card.arch, card.encoder, card.num_classes, card.weights, card.img_size)
        return build_detector(spec, download=False)

    @classmethod
    def predictor(cls, model: nn.Module, card: ModelCard, **kwargs: Any) -> Any:
        from seglab.instance.predictor import DetectorModel

        return DetectorModel(model, card, **kwargs)

    @classmethod
    def exported(cls, path: Any, *, device: str = "auto") -> Any:
        from seglab.instance.runtime import ExportedDetector

        return ExportedDetector(path, device=device)

    def __init__(self, cfg, trainer) -> None:
        super().__init__(cfg, trainer)
        self.kind = "mask" if cfg.model == "maskrcnn" else "box"
        self.score = f"val_{self.kind}_ap"

    def check(self) -> None:
        cfg = self.cfg
        expected = {"instance": "maskrcnn", "detect": "fasterrcnn"}[cfg.task]
        if cfg.model != expected:
            raise SeglabError(f"--task {cfg.task} trains --model {expected}, not {cfg.model!r}; drop --model or use it")
        if cfg.in_channels != 3:
            raise SeglabError("--task instance/detect takes RGB images; drop --in-channels (greyscale is read as RGB)")
        check_sync_bn(cfg, self.device)

    def setup(self, checkpoint: dict[str, Any] | None, model: nn.Module | None) -> None:
        cfg = self.cfg
        spec = self.spec = resolve_dataset(
            cfg.data, cache_dir=cfg.data_cache, progress=self.trainer.progress, task=cfg.task
        )
        train, val = train_val_splits(spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit)
        for note in spec.notes:
            self.log(f"data: {note}")
        scale = (cfg.scale_range[0], cfg.scale_range[1])
        self.train_set = InstanceDataset(train, spec, train_transform(cfg.img_size, scale, cfg.hflip, cfg.jitter))
        self.val_set = InstanceDataset(val, spec, keep_crowd=True)
        self.train_loader = self.epoch_loader(self.train_set, collate_instances)
        backbone = cfg.encoder or DEFAULT_BACKBONE
        self.model = build_detector(
            DetectorSpec(cfg.model, backbone, spec.num_classes, cfg.encoder_weights, cfg.img_size)
        ).to(self.device)
        if amp_on(self.device, cfg.amp, cfg.amp_dtype):
            mixed_precision(self.model, self.device.type, amp_dtype(self.device, cfg.amp_dtype))
        if self.dist.enabled and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.models = {"model": self.model}
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

    def optimizers(self, plan: Plan) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
        return single_model(self.cfg, self.model, plan)

    def summary(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"{self.cfg.model} ({self.card.encoder}-FPN, {n_params:.2f}M params) on {self.device}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images, {self.spec.num_classes - 1} classes, "
            f"{self.amp()}"
        )

    def step(self, batch: Any, nets: dict[str, nn.Module]) -> Step:
        images, targets = batch
        xs = [im.to(self.device, non_blocking=True).float().div_(255) for im in images]  # [C,H,W] 0..1
        ts = [_to_device(t, self.device) for t in targets]
        parts = nets["model"](xs, ts)  # {loss_classifier, loss_box_reg, [loss_mask], loss_objectness, loss_rpn_box_reg}
        loss = sum(parts.values())
        yield "model", loss, {"train_loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    def validate(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
        self.last_eval = evaluate_detector(
            model, self.val_set, device=self.device, workers=self.cfg.workers, progress=self.trainer.progress
        )
        metrics = self.last_eval.metrics
        values: dict[str, Any] = {}
        for kind in ("box", "mask"):
            if kind in metrics:
                values[f"val_{kind}_ap"] = metrics[kind]["AP"] or 0.0
                values[f"val_{kind}_ap50"] = metrics[kind]["AP50"] or 0.0
        return values, metrics

    def examples(self) -> list[Any]:
        out = []
        for i in range(min(EXAMPLES, len(self.train_set))):
            try:
                image, target = self.train_set[i]
            except SeglabError:  # an unreadable sample: training names it when it meets it
                continue
            inst = Instances.of_target(target)
            out.append(labelled(image.permute(1, 2, 0).numpy(), inst, self.card, self.train_set.samples[i].image))
        return out

    def evaluation(self, model: nn.Module) -> tuple[Any, Sequence[Any], Any, Any]:
        predictor = self.predictor(model, self.card, device=str(self.device))
        return predictor, self.val_set.samples, self.spec, predictor.scores(self.last_eval)

    def epoch_line(self, row: dict[str, Any]) -> str:
        shown = ", ".join(f"{k} AP {100 * row[f'val_{k}_ap']:.2f}" for k in ("box", "mask") if row[f"val_{k}_ap"] != "")
        return f"train loss {row['train_loss']:.4f}, val {shown} ({row['epoch_time_s']} s)"

    def done_line(self, best: float, weights: Path) -> str:
        return f"done; best val {self.kind} AP {100 * best:.2f}; weights in {weights}"

    def payload(self, model: nn.Module) -> dict[str, Any]:
        return make_payload(model, self.card)
