"""Predicting with a semantic model: ``seglab.load(best.pt)`` gives a :class:`SegModel`.

model = seglab.load("runs/train/exp/weights/best.pt")
r = model.predict("street.png"); r.mask; r.overlay(); r.save("out/")
metrics = model.evaluate("path/to/data", split="val")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from seglab.data.io import MAX_PIXELS
from seglab.engine.checkpoint import ModelCard
from seglab.engine.evaluator import EvalResult, evaluate
from seglab.engine.inference import Inferencer, amp_on, resized_labels, resolve_device
from seglab.engine.predictor import Predictor, SegResult, expand_source, read_batches
from seglab.errors import SeglabError

TTA_SCALES = (0.75, 1.0, 1.25)
WHOLE_IMAGE_MAX_SIDE = 8192  # whole-image prediction holds the model's activations for all of the image


class SegModel(Predictor):
    """A trained model with everything it needs to predict: classes, colours, preprocessing."""

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        *,
        device: str = "auto",
        amp: bool = False,
        metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        backend: str = "pytorch",
    ) -> None:
        self.device = resolve_device(device)
        self.backend = backend  # pytorch, or the runtime of an exported file (onnxruntime, torchscript, ...)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.card, self.amp, self.metrics = card, amp, metrics
        self.config = config or {}  # the training config, when the checkpoint came from seglab train
        if amp and self.device.type == "cpu":  # the CPU fast path (README: CPU fast path)
            from seglab.engine.fastpath import fold_batchnorm, tune_depthwise

            fold_batchnorm(self.model)  # so self.model no longer loads a training state_dict
            if amp_on(self.device, amp):  # bfloat16 kernels: which depthwise layers stay float32
                h, w = card.crop_size or [card.img_size, card.img_size]
                tune_depthwise(self.model, torch.zeros(1, card.in_channels, h, w), backward=False)

    def inferencer(self, *, tta: bool = False, slide: bool = False, overlap: float = 1 / 3) -> Inferencer:
        crop = self.card.crop_size or [self.card.img_size, self.card.img_size]
        window = (crop[0], crop[1])
        return Inferencer(
            self.model,
            self.card.mean,
            self.card.std,
            self.device,
            amp=self.amp,
            mode="slide" if slide else "whole",
            window=window,
            overlap=overlap,
            flip=tta,
            scales=TTA_SCALES if tta else (1.0,),
        )

    def predict(
        self,
        source: str | Path | np.ndarray | Sequence[str | Path | np.ndarray],
        *,
        tta: bool = False,
        slide: bool = False,
        img_size: int | None = None,
        batch: int = 1,
        save_conf: bool = False,
    ) -> SegResult | list[SegResult]:
        """Predict one image (a path or an (H, W, C) uint8 array) or many (a folder or a list).

        The image is resized so its long side is the training ``img_size`` (or ``img_size``),
        and the mask comes back at the image's own size. ``batch`` images of the same size
        share a forward pass (faster per image on both CPU and GPU). ``save_conf`` also
        fills ``SegResult.confidence``, the probability of each pixel's class (a softmax more),
        which ``SegResult.save(out, save_conf=True)`` writes.
        """
        sources, single = expand_source(source)
        results = list(
            self.iter_predict(sources, tta=tta, slide=slide, img_size=img_size, batch=batch, save_conf=save_conf)
        )
        return results[0] if single else results

    def iter_predict(
        self,
        sources: Sequence[str | Path | np.ndarray],
        *,
        tta: bool = False,
        slide: bool = False,
        img_size: int | None = None,
        batch: int = 1,
        save_conf: bool = False,
    ) -> Iterator[SegResult]:
        """Results one at a time, in order; images are read only ``batch`` at a time."""
        from seglab.data import EvalTransform

        if batch < 1:
            raise SeglabError(f"predict: --batch {batch}: use 1 or more")
        check_img_size(img_size, slide)
        inferencer = self.inferencer(tta=tta, slide=slide)
        resize = EvalTransform(self.card.img_size if img_size is None else img_size)
        for pending in read_batches(sources, batch, self.card.in_channels):
            with out_of_memory(pending, slide):
                yield from self._predict_batch(pending, inferencer, resize, slide, save_conf)

    def _predict_batch(
        self, items, inferencer: Inferencer, resize, slide: bool, confidence: bool
    ) -> Iterator[SegResult]:
        from seglab.data.dataset import as_tensor

        sizes = [image.shape[:2] for image, _ in items]
        for (_, path), (h, w) in zip(items, sizes, strict=True):
            scale = resize.img_size / max(h, w) if resize.img_size else 1.0
            if h * w * scale * scale > MAX_PIXELS:  # an upscaled copy that could not fit in memory
                raise SeglabError(
                    f"predict: --img-size {resize.img_size} makes {path or 'the image'} ({w}x{h}) "
                    f"{round(w * scale)}x{round(h * scale)}, more than {MAX_PIXELS:,} pixels; use a smaller --img-size"
                )
        xs = [resize.resize_image(as_tensor(image).permute(2, 0, 1)) for image, _ in items]  # [C,h,w], no copy
        if slide:  # any size in bounded memory: labels, not [K,H,W] probabilities
            for (image, path), x, (h, w) in zip(items, xs, sizes, strict=True):
                mask, conf = inferencer.stream_labels(x[None])
                if mask.shape != (h, w):
                    mask = TF.resize(mask[None], [h, w], interpolation=TF.InterpolationMode.NEAREST)[0]
                    conf = TF.resize(conf[None].float(), [h, w])[0].half()
                yield self._result(image, path, mask, conf if confidence else None)
            return
        same_size = len({tuple(x.shape) for x in xs}) == 1
        groups = [list(range(len(items)))] if same_size else [[i] for i in range(len(items))]
        for group in groups:
            batch = torch.stack([xs[i] for i in group])
            if confidence or inferencer.flip or len(inferencer.scales) > 1:
                scores = inferencer.probabilities(batch)  # [B,K,h,w]
            else:  # the argmax of the logits is the argmax of the softmax: skip the softmax
                scores = inferencer.logits(batch)
            for j, i in enumerate(group):  # the argmax at the image's size, in bands of rows: bounded memory
                mask, best = resized_labels(scores[j], sizes[i], confidence=confidence)
                yield self._result(items[i][0], items[i][1], mask, best)

    def _result(self, image: np.ndarray, path: Path | None, mask: torch.Tensor, conf: torch.Tensor | None) -> SegResult:
        card = self.card
        conf_array = conf.float().cpu().numpy() if conf is not None else None
        labels = mask.cpu().numpy().astype(np.uint8 if card.num_classes <= 256 else np.uint16, copy=False)
        return SegResult(image, labels, card.classes, card.colors, conf_array, path)

    def evaluate(
        self,
        data: str | Path,
        *,
        split: str = "val",
        tta: bool = False,
        slide: bool = False,
        batch: int = 4,
        workers: int = 2,
        limit: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        progress: bool = True,
        data_cache: str | Path | None = None,
        strict_data: bool = False,
    ) -> EvalResult:
        """Score the model on a split (of a folder or a shard set): one confusion matrix over every
        labelled pixel.

        Under torchrun each rank scores every world-th image (or its share of the shards) and the
        counts are summed, so the metrics equal a single process's exactly."""
        from seglab.data import (
            EpochSampler,
            EvalTransform,
            SegmentationDataset,
            ShardSpec,
            build_loader,
            get_split,
            resolve_dataset,
            shard_loader,
        )
        from seglab.engine.distributed import init_distributed

        card = self.card
        spec = resolve_dataset(data, cache_dir=data_cache, progress=progress)
        if spec.num_classes != card.num_classes:
            raise SeglabError(
                f"{data} has {spec.num_classes} classes but the model was trained on {card.num_classes} "
                f"({', '.join(card.classes)}); evaluate on data with the same classes"
            )
        dist = init_distributed(self.device.type)
        transform = EvalTransform(card.img_size)
        common = dict(batch=batch, workers=workers, seed=seed)
        if isinstance(spec, ShardSpec):
            _, loader = shard_loader(
                spec, split, transform, rank=dist.rank, world=dist.world, val_fraction=val_fraction, limit=limit,
                in_channels=card.in_channels, skip_bad=not strict_data, **common,
            )  # fmt: skip
        else:
            samples = get_split(spec, split, val_fraction=val_fraction, seed=seed)[:limit]
            skip_bad = not strict_data
            dataset = SegmentationDataset(samples, spec, transform, in_channels=card.in_channels, skip_bad=skip_bad)
            sampler = EpochSampler(len(dataset), batch=batch, shuffle=False, rank=dist.rank, world=dist.world)
            loader = build_loader(
                dataset, sampler=sampler, shuffle=False, ignore_index=spec.ignore_index, drop_last=False, **common
            )
        return evaluate(
            self.inferencer(tta=tta, slide=slide),
            loader,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            class_names=card.classes,
            progress=progress,
            desc=f"val {split}",
        )

    def truth(self, sample: Any, spec: Any) -> SegResult:
        from seglab.data import read_image, read_mask

        image = read_image(sample.image, self.card.in_channels)
        mask = read_mask(sample, spec)
        if mask.shape != image.shape[:2]:  # a label at another resolution, drawn at the image's
            mask = TF.resize(torch.from_numpy(mask)[None], list(image.shape[:2]), TF.InterpolationMode.NEAREST)[
                0
            ].numpy()
        card = self.card
        return SegResult(image, mask, card.classes, card.colors, path=sample.image, unlabelled=spec.ignore_index)

    def scores(self, evaluation: EvalResult) -> Any:
        from seglab.engine.report import Scores

        m, card = evaluation.metrics, self.card
        rows = [
            (name, tuple(color), [c["iou"], c["dice"], c["precision"], c["recall"]])
            for (name, c), color in zip(m["per_class"].items(), card.colors, strict=True)
        ]
        headline = {"mIoU": m["miou"], "pixel accuracy": m["pixel_accuracy"], "mean Dice": m["mdice"]}
        return Scores(
            headline, ["IoU", "Dice", "precision", "recall"], rows, evaluation.confusion.numpy(), card.classes
        )


def check_img_size(img_size: int | None, slide: bool) -> None:
    """Sizes that the prediction path can hold in memory: --img-size 0 (the image's own size) only
    with the sliding window, whose memory does not grow with the image; at most
    WHOLE_IMAGE_MAX_SIDE on the long side for a whole-image forward pass."""
    if img_size is None:
        return
    if img_size < 0 or 0 < img_size < 16:
        raise SeglabError(f"predict: --img-size {img_size}: use 16 or more (or 0 with --slide for full resolution)")
    if img_size == 0 and not slide:
        raise SeglabError("predict: --img-size 0 predicts at full resolution, which needs --slide (bounded memory)")
    if img_size > WHOLE_IMAGE_MAX_SIDE and not slide:
        raise SeglabError(
            f"predict: --img-size {img_size}: a whole-image forward pass is capped at {WHOLE_IMAGE_MAX_SIDE} px "
            "on the long side; add --slide for larger sizes"
        )


@contextmanager
def out_of_memory(items: Sequence[tuple[np.ndarray, Path | None]], slide: bool) -> Iterator[None]:
    """Running out of memory on an image is one line naming it and the bounded-memory way to predict it."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in ("can't allocate memory", "out of memory")):
            raise
        image, path = items[0]
        name = str(path) if path else "an image"
        fix = "use a smaller --img-size" if slide else "predict it with --slide --img-size 0 (bounded memory)"
        raise SeglabError(
            f"predict: out of memory on {name} ({image.shape[1]}x{image.shape[0]}, batch of {len(items)}); {fix}"
        ) from None
