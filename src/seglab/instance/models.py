"""Detectors: torchvision's Faster R-CNN and Mask R-CNN on a choice of FPN backbones.

Nothing here re-implements a detector. ``build_detector`` picks torchvision's own
ResNet-50-FPN and MobileNetV3-Large-FPN backbones (with their ImageNet weights, or the whole
detector's COCO weights, downloaded on a user's machine), or puts a feature pyramid on any
seglab encoder, which is how EfficientNet-Lite0's ImageNet weights (a PyPI package, so
available offline) become a detection backbone.

Every detector takes a list of float images ``[C, H, W]`` on the 0..1 scale (it normalises
and resizes them itself, to ``min_size``/``max_size`` = the training ``img_size``) and returns,
in eval mode, one dict per image: ``boxes [N, 4]`` (x1, y1, x2, y2 in input pixels),
``labels [N]`` (1..K; 0 is background), ``scores [N]`` and, for Mask R-CNN, ``masks [N, 1, H, W]``
probabilities. In train mode it returns its dict of losses.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from seglab.errors import SeglabError
from seglab.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, build_encoder
from seglab.registry import did_you_mean

DETECTORS = ("maskrcnn", "fasterrcnn")  # --model for --task instance / detect
TASK_DETECTORS = {"instance": "maskrcnn", "detect": "fasterrcnn"}
TORCHVISION_BACKBONES = ("resnet50", "mobilenet_v3_large")  # torchvision's own FPN backbones
DEFAULT_BACKBONE = "resnet50"
DETECTIONS_PER_IMAGE = 100  # COCO's maxDets
# A pyramid and mask head on a seglab encoder are 128 channels wide, not torchvision's 256: on a CPU
# a Mask R-CNN training step is 1.47x faster in float32, 2.16x with mixed precision
# (benchmarks/detector_speed.py, benchmarks/README.md section 6).
LIGHT_CHANNELS = 128


@dataclass(frozen=True)
class DetectorSpec:
    arch: str  # maskrcnn or fasterrcnn
    backbone: str  # resnet50, mobilenet_v3_large, or any seglab encoder (efficientnet_lite0, resnet18, timm:...)
    num_classes: int  # including background
    weights: str | None = None  # None, "imagenet" (backbone) or "coco" (the whole detector, torchvision's)
    img_size: int = 512


class EncoderFPN(nn.Module):
    """A seglab encoder's stride-4..32 maps through a feature pyramid: the backbone contract
    torchvision's detectors expect (``out_channels`` and an ordered dict of 256-channel maps named
    "0".."3" and "pool", the five levels its default anchors and RoI pooling are laid out for)."""

    def __init__(self, encoder: Encoder, out_channels: int = 256) -> None:
        super().__init__()
        self.encoder = encoder
        # BatchNorm in the pyramid, as torchvision's v2 detectors have: without it, ImageNet features
        # reach the heads at a scale that starts the mask loss near 20 instead of 0.7
        self.fpn = FeaturePyramidNetwork(
            list(encoder.out_channels[1:]), out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.encoder(x)[1:]  # strides 4, 8, 16, 32
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))  # adds "pool" (stride 64)


def _check(spec: DetectorSpec) -> None:
    if spec.arch not in DETECTORS:
        raise SeglabError(
            f"--model {spec.arch!r}{did_you_mean(spec.arch, DETECTORS)}: choose one of maskrcnn, fasterrcnn"
        )
    if spec.weights not in (None, "none", "imagenet", "coco"):
        raise SeglabError(f"--encoder-weights {spec.weights!r}: choose none, imagenet or coco")
    if spec.weights == "coco" and spec.backbone not in TORCHVISION_BACKBONES:
        raise SeglabError(
            f"--encoder-weights coco exists for the torchvision backbones ({', '.join(TORCHVISION_BACKBONES)}), "
            f"not {spec.backbone}; use --encoder-weights imagenet"
        )
    if spec.weights == "coco" and spec.arch == "maskrcnn" and spec.backbone != "resnet50":
        raise SeglabError("torchvision has COCO Mask R-CNN weights for resnet50 only; use --encoder resnet50")


def _torchvision_backbone(spec: DetectorSpec, download: bool) -> tuple[nn.Module, AnchorGenerator | None]:
    """torchvision's ResNet-50-FPN or MobileNetV3-Large-FPN, laid out as its detectors have them.

    Pretrained (imagenet or coco) backbones keep BatchNorm frozen and their first stages fixed, as
    torchvision trains them; from scratch, BatchNorm trains and so does every stage."""
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights

    pretrained = spec.weights in ("imagenet", "coco")
    fetch = download and spec.weights == "imagenet"  # coco: the whole detector's weights come later
    norm = {} if pretrained else {"norm_layer": nn.BatchNorm2d}
    if spec.backbone == "resnet50":
        weights = ResNet50_Weights.IMAGENET1K_V1 if fetch else None
        layers = 3 if pretrained else 5
        return resnet_fpn_backbone(backbone_name="resnet50", weights=weights, trainable_layers=layers, **norm), None
    weights_mb = MobileNet_V3_Large_Weights.IMAGENET1K_V1 if fetch else None
    layers = 3 if pretrained else 6
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large", weights=weights_mb, fpn=True, trainable_layers=layers, **norm
    )
    # torchvision's fasterrcnn_mobilenet_v3_large_fpn: two pyramid levels plus pooling, 5 sizes x 3 ratios on each
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return backbone, anchors


COCO_CLASSES = 91  # torchvision's COCO detectors: 90 category ids + background


def _coco_weights(spec: DetectorSpec) -> dict[str, torch.Tensor]:
    """The COCO-trained detector's state dict (downloaded once into torch's hub cache)."""
    from torchvision.models import detection as D

    from seglab.models.encoders import weights_error

    if spec.arch == "maskrcnn":
        weights: Any = D.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    elif spec.backbone == "resnet50":
        weights = D.FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    else:
        weights = D.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, a proxy, a corrupt download: say which file and where
        cache = str(Path(torch.hub.get_dir()) / "checkpoints")
        raise weights_error(f"{spec.arch} {spec.backbone}", cache, e, weights.url, kind="COCO") from None


def mixed_precision(model: FasterRCNN, device_type: str, dtype: torch.dtype) -> None:
    """Run the backbone (with its pyramid) and the mask head in ``dtype``; the rest stays float32.

    Autocast over the whole detector breaks it in bfloat16: torchvision casts anchors to the
    dtype of the predicted offsets, and bfloat16 holds a coordinate near 500 only to within 2-4
    pixels, so boxes collapse to zero width and the box loss becomes NaN within a few steps.
    The convolutions that cost the time are the backbone's; the box arithmetic is cheap.
    The wrapped forwards return float32, and the parameters (state_dict keys) do not change; a deep
    copy (EMA) runs its own forward."""
    parts = [model.backbone]
    if getattr(model.roi_heads, "mask_head", None) is not None:
        parts.append(model.roi_heads.mask_head)
    for part in parts:
        part.amp = (device_type, dtype)  # read by the bound forward below, so a deep copy (EMA) keeps it
        part.forward = types.MethodType(_autocast_forward, part)


def _autocast_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module``'s own forward under autocast, returning float32."""
    device_type, dtype = cast(tuple[str, torch.dtype], module.amp)
    with torch.autocast(device_type, dtype=dtype):
        out = type(module).forward(module, *args, **kwargs)
    if isinstance(out, dict):
        return OrderedDict((k, v.float()) for k, v in out.items())
    return out.float()


def build_detector(spec: DetectorSpec, *, download: bool = True) -> FasterRCNN:
    """A torchvision Faster R-CNN / Mask R-CNN for ``spec``; see the module docstring for its contract.

    ``download=False`` builds the same layers without fetching pretrained weights (loading a checkpoint)."""
    _check(spec)
    common: dict[str, Any] = dict(
        min_size=spec.img_size, max_size=spec.img_size, box_detections_per_img=DETECTIONS_PER_IMAGE
    )
    anchors = None
    mean: Sequence[float]
    std: Sequence[float]
    if spec.backbone in TORCHVISION_BACKBONES:
        try:
            backbone, anchors = _torchvision_backbone(spec, download)
        except (OSError, RuntimeError) as e:  # the ImageNet download failed
            from seglab.models.encoders import weights_error

            raise weights_error(spec.backbone, str(Path(torch.hub.get_dir()) / "checkpoints"), e) from None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        width = 256
    else:
        encoder = build_encoder(spec.backbone, weights=spec.weights if download else None)
        backbone, mean, std = EncoderFPN(encoder, LIGHT_CHANNELS), encoder.mean, encoder.std
        width = LIGHT_CHANNELS
        if spec.arch == "maskrcnn":
            common["mask_head"] = MaskRCNNHeads(width, (width,) * 4, 1, norm_layer=nn.BatchNorm2d)
    coco = spec.weights == "coco"
    classes = COCO_CLASSES if coco else spec.num_classes
    if spec.arch == "maskrcnn":  # torchvision wants either num_classes or every predictor
        common["mask_predictor"] = MaskRCNNPredictor(width, 256 if width == 256 else width, classes)
    common["box_predictor"] = FastRCNNPredictor(1024, classes)
    cls = MaskRCNN if spec.arch == "maskrcnn" else FasterRCNN
    model = cls(
        backbone, num_classes=None, rpn_anchor_generator=anchors, image_mean=list(mean), image_std=list(std), **common
    )
    if coco:
        if download:
            model.load_state_dict(_coco_weights(spec))
        # new heads for our classes; the rest keeps what COCO taught it
        model.roi_heads.box_predictor = FastRCNNPredictor(1024, spec.num_classes)
        if spec.arch == "maskrcnn":
            model.roi_heads.mask_predictor = MaskRCNNPredictor(width, 256, spec.num_classes)
    model.arch, model.backbone_name, model.num_classes = spec.arch, spec.backbone, spec.num_classes
    return model
