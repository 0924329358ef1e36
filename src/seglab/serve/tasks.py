"""What differs between serving a semantic model and a detector, and nothing else.

The worker, the limits, the memory budget and the upload handling are the same for both; a task
says how the worker runs the model on a batch, what it keeps of each result, what that costs in
memory, and how the JSON and PNG answers are made. ``serve_task(model)`` picks one by the
checkpoint card's ``task``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from seglab.instance.predictor import DEFAULT_CONF
from seglab.serve.codec import RequestError, image_png, instances_json, mask_json, mask_png

if TYPE_CHECKING:
    from seglab.api import SegModel
    from seglab.instance.predictor import InstanceResult

# A Mask R-CNN holds each object's mask at the image's size: torchvision pastes them as float32
# (twice over while it stacks them), seglab keeps the ones above conf as float32 then bool.
# Measured: 850-930 bytes a pixel beyond the image for 100 objects.
BYTES_PER_OBJECT_PIXEL = 10


@dataclass(frozen=True)
class SemanticTask:
    """A :class:`seglab.api.SegModel`: the answer is the (H, W) class-index mask."""

    model: SegModel

    def conf(self, value: str | None) -> float | None:
        if value is not None:
            message = f"conf={value[:50]}: this server's model is semantic; conf is for detectors, drop it"
            raise RequestError(400, message)
        return None

    def object_bytes_per_pixel(self) -> int:
        return 0

    def predict(self, images: list[np.ndarray], conf: float | None) -> list[np.ndarray]:
        return [result.mask for result in self.model.iter_predict(images, batch=len(images))]

    def json(self, mask: np.ndarray, **extra: Any) -> bytes:
        return mask_json(mask, self.model.card.classes, self.model.card.colors, **extra)

    def png(self, mask: np.ndarray) -> bytes:
        return mask_png(mask, self.model.card.colors)


@dataclass(frozen=True)
class DetectorTask:
    """A Mask R-CNN / Faster R-CNN: anything whose ``predict(images, conf=, batch=)`` returns one
    :class:`seglab.instance.predictor.InstanceResult` per image (DetectorModel, or an exported
    detector run by a runtime). The answer is the objects, or the image with them drawn."""

    model: Any

    def conf(self, value: str | None) -> float:
        """``?conf=``: the lowest score kept, 0..1 (DEFAULT_CONF when absent)."""
        if value is None:
            return DEFAULT_CONF
        try:
            conf = float(value)
        except ValueError:
            conf = float("nan")
        if not 0 <= conf <= 1:  # NaN fails too
            raise RequestError(400, f"conf={value[:50]}: use a score between 0 and 1, e.g. conf=0.25")
        return conf

    def object_bytes_per_pixel(self) -> int:
        """Masks of up to ``DETECTIONS_PER_IMAGE`` objects at the image's size; a box detector has none."""
        from seglab.instance.models import DETECTIONS_PER_IMAGE

        return DETECTIONS_PER_IMAGE * BYTES_PER_OBJECT_PIXEL if self.model.card.task == "instance" else 0

    def predict(self, images: list[np.ndarray], conf: float | None) -> list[InstanceResult]:
        return list(self.model.predict(images, conf=DEFAULT_CONF if conf is None else conf, batch=len(images)))

    def json(self, result: InstanceResult, **extra: Any) -> bytes:
        return instances_json(result, **extra)

    def png(self, result: InstanceResult) -> bytes:
        return image_png(result.plot())


SERVE_TASKS: dict[str, type[SemanticTask] | type[DetectorTask]] = {
    "semantic": SemanticTask,
    "instance": DetectorTask,
    "detect": DetectorTask,
}


def serve_task(model: Any) -> SemanticTask | DetectorTask:
    """The task of a loaded model, by its card (``semantic``, ``instance`` or ``detect``)."""
    return SERVE_TASKS[model.card.task](model)
