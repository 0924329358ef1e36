"""Evaluation: one confusion matrix over the whole split, at the labels' own resolution."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from seglab.engine.distributed import all_reduce_sum, gather_objects
from seglab.engine.inference import Inferencer, resize_to
from seglab.metrics import ConfusionMatrix, metrics_from_confusion


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    confusion: Tensor  # int64 [K, K], rows = ground truth
    loss: float | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable samples left out (all ranks)


def evaluate(
    inferencer: Inferencer,
    loader: Iterable[dict[str, Any]],
    *,
    num_classes: int,
    ignore_index: int,
    class_names: list[str],
    loss_fn: nn.Module | None = None,
    progress: bool = True,
    desc: str = "val",
) -> EvalResult:
    """Run ``inferencer`` over ``loader`` batches (see ``collate_pad``) and score every pixel.

    Images may have been resized for the model; probabilities are cropped to each image's
    own extent (batches are padded), resized to its mask and only then turned into labels,
    so the metric is the one the labels define. ``loss_fn`` (if given) sees log-probabilities
    at label resolution, which for cross-entropy is the usual val loss.
    """
    cm = ConfusionMatrix(num_classes, ignore_index, device=inferencer.device)
    loss_sum, loss_n, images = 0.0, 0, 0
    batches = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True)
    skipped: list[str] = []
    for batch in batches:
        skipped += batch.get("bad", [])
        if batch["image"] is None:
            continue
        probs = inferencer.probabilities(batch["image"])  # [B,K,H,W] at model resolution
        masks = batch["mask"].to(inferencer.device)
        images += len(batch["mask_size"])
        for i, ((ih, iw), (mh, mw)) in enumerate(zip(batch["image_size"], batch["mask_size"], strict=True)):
            p = resize_to(probs[i : i + 1, :, :ih, :iw], (mh, mw))  # [1,K,mh,mw]
            target = masks[i : i + 1, :mh, :mw]
            cm.update(p.argmax(1), target)
            if loss_fn is not None:
                loss_sum += float(loss_fn(p.clamp_min(1e-8).log(), target))
                loss_n += 1
    # Under torchrun each rank scored its own share of the images: sum the counts. The matrix
    # is integer, so the result equals a single process's exactly.
    all_reduce_sum(cm.matrix)
    totals = [loss_sum, float(loss_n), float(images)]
    loss_totals = all_reduce_sum(torch.tensor(totals, dtype=torch.float64, device=inferencer.device))
    loss_sum, loss_n = float(loss_totals[0]), int(loss_totals[1])
    metrics = {"num_images": int(loss_totals[2]), **metrics_from_confusion(cm.matrix.cpu(), class_names)}
    skipped = gather_objects(skipped)
    return EvalResult(metrics, cm.matrix.cpu(), loss_sum / loss_n if loss_n else None, skipped)
