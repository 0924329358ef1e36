"""Running an exported Mask R-CNN / Faster R-CNN: ``.onnx`` on ONNX Runtime, ``.torchscript`` on
PyTorch, behind :class:`seglab.instance.predictor.DetectorModel`'s interface.

model = ExportedDetector("best.onnx")
r = model.predict("facade.jpg", conf=0.3)               # the InstanceResult the checkpoint gives
model.evaluate("facades/", split="val").metrics["mask"]["AP"]

``seglab export`` writes a detector as one graph (``instance.export.DetectorGraph``): one image
[3, H, W] (float RGB 0..1, any size; the graph resizes it to img_size itself, as torchvision's
detectors do) in; boxes [N, 4] (x1, y1, x2, y2 in the image's pixels), labels [N] (1..K), scores [N]
and, for Mask R-CNN, masks [N, 1, H, W] (probabilities at the image's size) out. ``ExportedGraph``
turns that back into torchvision's eval-mode contract (a list of images in, one dict per image out),
so DetectorModel's own prediction and evaluation run on it unchanged.

Files from strangers are checked as semantic exports are (``seglab.deploy.runtime``): the model card
in the metadata field by field, the graph's input and outputs against it, a blank image run at load
(so ``serve`` fails at start); and every output of every call (shapes that agree, labels among the
card's classes, finite boxes, scores 0..1, at most DETECTIONS_PER_IMAGE objects), so a graph that
lies is one line, not an IndexError in the drawing code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from seglab.deploy.archive import METADATA_KEY, NOT_SEGLAB, verified_archive
from seglab.deploy.runtime import (
    DYNAMIC_CHECK_SIZE,
    exported_format,
    load_pytorch_export,
    ort_session,
    parse_metadata,
)
from seglab.engine.checkpoint import ModelCard
from seglab.engine.inference import resolve_device
from seglab.errors import SeglabError, first_line
from seglab.instance.models import DETECTIONS_PER_IMAGE
from seglab.instance.predictor import DetectorModel

OUTPUTS = ("boxes", "labels", "scores", "masks")  # the graph's outputs, in order; Faster R-CNN has no masks


def output_names(card: ModelCard) -> tuple[str, ...]:
    return OUTPUTS if card.task == "instance" else OUTPUTS[:3]


class ExportedDetector(DetectorModel):
    """A detector export with DetectorModel's ``predict`` / ``iter_predict`` / ``evaluate``, giving
    the same InstanceResult objects, COCO results and AP as the checkpoint it came from.

    ``config`` holds what ``seglab val`` needs from the training run: its data and its val hold-out
    (``val_fraction``, ``seed``), from the file's metadata."""

    def __init__(self, path: str | Path, *, device: str = "auto") -> None:
        self.path = Path(path)
        graph, card, meta = load_detector_graph(self.path, resolve_device(device))
        config = {key: meta[key] for key in ("data", "val_fraction", "seed") if meta.get(key) is not None}
        # DetectorModel calls the graph as it calls torchvision's detector (see ExportedGraph)
        super().__init__(cast(Any, graph), card, device=device, metrics=meta.get("metrics"), config=config)
        self.backend = {"onnx": "onnxruntime"}.get(meta["format"], meta["format"])


def load_detector_graph(path: Path, device: torch.device) -> tuple[ExportedGraph, ModelCard, dict[str, Any]]:
    """(the file as torchvision's eval-mode contract, its card, its metadata), after the checks in
    the module docstring."""
    if not path.is_file():
        raise SeglabError(f"model file not found: {path}")
    fmt = exported_format(path)
    run: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    if fmt == "onnx":
        session = ort_session(path, device)
        meta, card = parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path, fmt)
        _require_detector(card, path)
        run = _onnx_runner(session, card, path)
    elif fmt == "torchscript":
        archive, text, _ = verified_archive(path, fmt)
        meta, card = parse_metadata(text, path, fmt)
        _require_detector(card, path)
        run = load_pytorch_export(archive, path, fmt, device)
    else:
        raise SeglabError(f"{path}: a detector export is a .onnx or .torchscript file (seglab export --format onnx)")
    graph = ExportedGraph(run, card, path)
    blank = torch.full((3, DYNAMIC_CHECK_SIZE, DYNAMIC_CHECK_SIZE), 0.5, device=device)
    with torch.inference_mode():
        graph([blank])  # it runs, and gives what the card says (checked in ExportedGraph)
    return graph, card, meta


def _require_detector(card: ModelCard, path: Path) -> None:
    if card.task == "semantic":
        raise SeglabError(f"{path} is a semantic segmentation export; load it with seglab.load")


def _onnx_runner(session: Any, card: ModelCard, path: Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The session as image [3, H, W] -> its outputs, after checking its inputs and outputs against the card."""
    names = output_names(card)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if not (shape and len(shape) == 3 and shape[0] == 3 and not any(isinstance(d, int) for d in shape[1:])):
        given = ", ".join(f"{i.type} {i.shape}" for i in inputs)
        raise SeglabError(f"{path} takes {given}, not one float image [3, height, width] of any size; {NOT_SEGLAB}")
    if inputs[0].type != "tensor(float)" or [o.name for o in outputs] != list(names):
        given = ", ".join(o.name for o in outputs)
        raise SeglabError(
            f"{path} gives {given}; a {card.arch} export (task={card.task}) gives {', '.join(names)}; {NOT_SEGLAB}"
        )
    image_name = inputs[0].name

    def run(image: torch.Tensor) -> list[torch.Tensor]:
        array = image.detach().float().cpu().contiguous().numpy()
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, {image_name: array})]

    return run


class _Heads:
    """The one thing ``evaluate_detector`` asks of a torchvision detector's ``roi_heads``."""

    def __init__(self, masks: bool) -> None:
        self.masks = masks

    def has_mask(self) -> bool:
        return self.masks


class ExportedGraph(nn.Module):
    """An exported detector as torchvision's eval-mode detector: a list of float images [3, H, W]
    (0..1) in, one dict per image out (boxes, labels, scores, and masks [N, 1, H, W] for Mask R-CNN),
    each output checked against the card."""

    def __init__(self, run: Callable[[torch.Tensor], Sequence[torch.Tensor]], card: ModelCard, path: Path) -> None:
        super().__init__()
        self.run, self.card, self.path = run, card, path
        self.names = output_names(card)
        self.roi_heads = _Heads(card.task == "instance")

    def train(self, mode: bool = True) -> ExportedGraph:
        """An exported graph is frozen in eval mode."""
        self.training = mode
        return self

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self._run_one(image) for image in images]

    def _run_one(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        try:
            outputs = self.run(image)
        except Exception as e:  # onnxruntime and TorchScript raise their own types
            why = first_line(e, 150)
            raise SeglabError(f"{self.path} does not run on a {h}x{w} image ({why}); {NOT_SEGLAB}") from None
        if not isinstance(outputs, tuple | list) or len(outputs) != len(self.names):
            raise self._lies(f"{len(outputs) if isinstance(outputs, tuple | list) else type(outputs).__name__} outputs")
        out = {name: tensor.cpu() for name, tensor in zip(self.names, outputs, strict=True)}
        n = len(out["scores"])
        expected = {"boxes": (n, 4), "labels": (n,), "scores": (n,), "masks": (n, 1, h, w)}
        shapes = {name: tuple(tensor.shape) for name, tensor in out.items()}
        if any(shapes[name] != expected[name] for name in self.names) or n > DETECTIONS_PER_IMAGE:
            raise self._lies(f"outputs of shapes {shapes} for a {h}x{w} image")
        labels, scores, boxes = out["labels"], out["scores"], out["boxes"]
        k = self.card.num_classes
        if labels.is_floating_point() or (n and not 1 <= int(labels.min()) <= int(labels.max()) < k):
            raise self._lies(f"labels {labels.unique().tolist()[:5]} (classes 1..{k - 1})")
        if not (torch.isfinite(boxes).all() and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()):
            raise self._lies("boxes or scores that are not finite, or scores outside 0..1")
        return out

    def _lies(self, what: str) -> SeglabError:
        return SeglabError(f"{self.path} gives {what}, not what its model card describes; {NOT_SEGLAB}")
