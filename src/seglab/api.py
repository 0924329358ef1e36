"""The Python API. The command line calls exactly these functions.

import seglab
run = seglab.train(data="path/to/data", model="unet", epochs=20)
model = seglab.load(run.best)
r = model.predict("street.png"); r.mask; r.overlay(); r.save("out/")
metrics = model.evaluate("path/to/data", split="val")
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from seglab.config import TrainConfig, build_config, load_train_config
from seglab.data.io import MAX_PIXELS
from seglab.engine.checkpoint import ModelCard, load_model
from seglab.engine.evaluator import EvalResult, evaluate
from seglab.engine.inference import Inferencer, resized_labels, resolve_device
from seglab.engine.predictor import Result, expand_source
from seglab.errors import SeglabError
from seglab.files import atomic_path

TTA_SCALES = (0.75, 1.0, 1.25)
WHOLE_IMAGE_MAX_SIDE = 8192  # whole-image prediction holds the model's activations for all of the image


@dataclass
class TrainRun:
    run_dir: Path
    best_miou: float  # semantic runs; -1 for detectors
    rows: list[dict[str, Any]]
    stopped: int | None = None  # the signal that stopped the run early (its last.pt resumes it)
    best_ap: float | None = None  # instance / detect runs: the best val mask AP (box AP for detect)

    @property
    def best(self) -> Path:
        return self.run_dir / "weights" / "best.pt"

    @property
    def last(self) -> Path:
        return self.run_dir / "weights" / "last.pt"


def train(config: str | None = None, *, progress: bool = True, log=print, **overrides: Any) -> TrainRun:
    """Train a model; keyword arguments are the fields of :class:`seglab.config.TrainConfig`."""
    from seglab.engine.trainer import Trainer

    checkpoint = None
    if overrides.get("resume"):
        cfg, checkpoint = resume_config(overrides, log=log)
    else:
        cfg = load_train_config(config, **overrides)
    if cfg.task != "semantic":
        from seglab.instance.trainer import InstanceTrainer

        out = InstanceTrainer(cfg, progress=progress, log=log, checkpoint=checkpoint).fit()
        return TrainRun(out["run_dir"], -1.0, out["rows"], out["stopped"], best_ap=out["best_ap"])
    out = Trainer(cfg, progress=progress, log=log, checkpoint=checkpoint).fit()
    return TrainRun(out["run_dir"], out["best_miou"], out["rows"], out["stopped"])


def resume_config(overrides: dict[str, Any], *, log=print) -> tuple[TrainConfig, dict[str, Any]]:
    """A resumed run keeps its own settings; only where it runs, for how long and where it writes may change."""
    from seglab.engine.checkpoint import read_resumable
    from seglab.engine.runs import RESUME_OVERRIDES

    trust = bool(overrides.get("trust_weights"))
    ckpt, path = read_resumable(overrides["resume"], trust=trust, key="optimizer", log=log)
    changed = sorted(k for k, v in overrides.items() if v is not None and k not in (*RESUME_OVERRIDES, "resume"))
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise SeglabError(
            f"--resume continues a run with its own settings; {flags} cannot change "
            f"(only --epochs, --device, --workers, --out and --name can)"
        )
    if not isinstance(ckpt.get("config"), dict):
        raise SeglabError(f"{path} holds no training config; resume from a weights/last.pt that seglab train wrote")
    saved = {**ckpt["config"], "resume": str(path)}
    saved.update({k: overrides[k] for k in RESUME_OVERRIDES if overrides.get(k) is not None})
    return build_config(TrainConfig, saved, str(path)), ckpt


def load(weights: str | Path, *, device: str = "auto", amp: bool = False, trust: bool = False) -> Any:
    """Load a seglab checkpoint (``best.pt`` / ``last.pt``), or a seglab export (``.onnx``, run by
    ONNX Runtime; ``.torchscript``; ``.pt2``), for prediction and evaluation.

    A semantic model comes back as a :class:`SegModel`; a Mask R-CNN / Faster R-CNN checkpoint
    (``--task instance`` / ``detect``) as a :class:`seglab.instance.predictor.DetectorModel`.
    Checkpoints are read as data only; ``trust=True`` also loads one that needs pickled Python
    objects (which can run code: only for files you made yourself, e.g. with an older seglab)."""
    from seglab.deploy.runtime import exported_format, load_exported

    if exported_format(weights):
        if amp:
            raise SeglabError(f"--amp applies to checkpoints; {weights} runs in the precision it was exported in")
        module, card, meta = load_exported(weights, resolve_device(device))
        backend = {"onnx": "onnxruntime"}.get(meta["format"], meta["format"])
        config = {"data": meta.get("data")}
        return SegModel(module, card, device=device, metrics=meta.get("metrics"), config=config, backend=backend)
    model, card, ckpt = load_model(weights, trust=trust)
    if card.task != "semantic":  # Mask R-CNN / Faster R-CNN
        from seglab.instance.predictor import DetectorModel

        return DetectorModel(
            model, card, device=device, amp=amp, metrics=ckpt.get("metrics"), config=ckpt.get("config")
        )
    return SegModel(model, card, device=device, amp=amp, metrics=ckpt.get("metrics"), config=ckpt.get("config"))


class SegModel:
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
            h, w = card.crop_size or [card.img_size, card.img_size]
            tune_depthwise(self.model, torch.zeros(1, card.in_channels, h, w), backward=False)

    @property
    def classes(self) -> list[str]:
        return self.card.classes

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
        confidence: bool = False,
    ) -> Result | list[Result]:
        """Predict one image (a path or an (H, W, C) uint8 array) or many (a folder or a list).

        The image is resized so its long side is the training ``img_size`` (or ``img_size``),
        and the mask comes back at the image's own size. ``batch`` images of the same size
        share a forward pass (faster per image on both CPU and GPU). ``confidence`` also
        fills ``Result.confidence``, the probability of each pixel's class (a softmax more).
        """
        sources, single = expand_source(source)
        results = list(
            self.iter_predict(sources, tta=tta, slide=slide, img_size=img_size, batch=batch, confidence=confidence)
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
        confidence: bool = False,
    ) -> Iterator[Result]:
        """Results one at a time, in order; images are read only ``batch`` at a time."""
        from seglab.data import EvalTransform
        from seglab.data.io import read_image

        if batch < 1:
            raise SeglabError(f"predict: --batch {batch}: use 1 or more")
        check_img_size(img_size, slide)
        inferencer = self.inferencer(tta=tta, slide=slide)
        resize = EvalTransform(self.card.img_size if img_size is None else img_size)
        pending: list[tuple[np.ndarray, Path | None]] = []
        for i, item in enumerate(sources):
            if isinstance(item, np.ndarray):
                pending.append((item if item.ndim == 3 else item[..., None], None))
            else:
                pending.append((read_image(item, self.card.in_channels), Path(item)))
            if len(pending) == batch or i == len(sources) - 1:
                with out_of_memory(pending, slide):
                    yield from self._predict_batch(pending, inferencer, resize, slide, confidence)
                pending = []

    def _predict_batch(self, items, inferencer: Inferencer, resize, slide: bool, confidence: bool) -> Iterator[Result]:
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

    def _result(self, image: np.ndarray, path: Path | None, mask: torch.Tensor, conf: torch.Tensor | None) -> Result:
        card = self.card
        conf_array = conf.float().cpu().numpy() if conf is not None else None
        labels = mask.cpu().numpy().astype(np.uint8 if card.num_classes <= 256 else np.uint16, copy=False)
        return Result(image, labels, card.classes, card.colors, conf_array, path)

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
        """Score the model on a split: one confusion matrix over every labelled pixel.

        Under torchrun each rank scores every world-th image and the counts are summed, so the
        metrics equal a single process's exactly."""
        from seglab.data import (
            EpochSampler,
            EvalTransform,
            SegmentationDataset,
            build_loader,
            get_split,
            resolve_dataset,
        )
        from seglab.engine.distributed import init_distributed

        spec = resolve_dataset(data, cache_dir=data_cache, progress=progress)
        if spec.num_classes != self.card.num_classes:
            raise SeglabError(
                f"{data} has {spec.num_classes} classes but the model was trained on {self.card.num_classes} "
                f"({', '.join(self.card.classes)}); evaluate on data with the same classes"
            )
        samples = get_split(spec, split, val_fraction=val_fraction, seed=seed)[:limit]
        dataset = SegmentationDataset(
            samples,
            spec,
            EvalTransform(self.card.img_size),
            in_channels=self.card.in_channels,
            skip_bad=not strict_data,
        )
        dist = init_distributed(self.device.type)
        loader = build_loader(
            dataset,
            sampler=EpochSampler(len(dataset), batch=batch, shuffle=False, rank=dist.rank, world=dist.world),
            batch=batch,
            shuffle=False,
            workers=workers,
            ignore_index=spec.ignore_index,
            seed=seed,
            drop_last=False,
        )
        return evaluate(
            self.inferencer(tta=tta, slide=slide),
            loader,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            class_names=self.card.classes,
            progress=progress,
            desc=f"val {split}",
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


def write_metrics(result: EvalResult, out_dir: str | Path, class_names: list[str]) -> Path:
    """metrics.json and confusion_matrix.png into ``out_dir``."""
    from seglab.metrics import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result.metrics, indent=2))
    plot_confusion(result.confusion.numpy(), class_names, out / "confusion_matrix.png")
    return path
