"""LR-ASPP (Howard et al., 2019, MobileNetV3): a light head on stride-8 and stride-16 features."""

from __future__ import annotations

import torch
from torchvision.models.segmentation.lraspp import LRASPPHead

from seglab.models.base import MODELS, SegmentationModel

INTER_CHANNELS = 128


@MODELS.register("lraspp")
class LRASPP(SegmentationModel):
    """torchvision's LRASPPHead: C5 (dilated, stride 16) gated by its global average, upsampled
    to C3 (stride 8); both scored by 1x1 convs and summed. Its pooling branch has no BatchNorm,
    so batch size 1 trains fine."""

    arch = "lraspp"
    default_encoder = "mobilenet_v3_large"
    description = "LR-ASPP: MobileNetV3's light head on stride-8 and dilated stride-16 features"
    encoder_output_stride = 16

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        channels = self.encoder.out_channels
        self.head = LRASPPHead(channels[2], channels[4], num_classes, INTER_CHANNELS)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head({"low": features[2], "high": features[4]})  # [B, K, H/8, W/8]
