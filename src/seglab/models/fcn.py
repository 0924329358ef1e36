"""FCN-8s (Long et al., 2015): class scores from strides 32, 16 and 8, summed coarse to fine."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seglab.models.base import MODELS, SegmentationModel, conv_bn_relu


@MODELS.register("fcn")
class FCN(SegmentationModel):
    """FCN-8s on any encoder: a 3x3 head scores C5; 1x1 convs score C4 and C3.

    The paper's learned deconvolutions (initialised as bilinear) are plain bilinear upsampling
    here, and the two skip scorers start at zero as in the paper, so training begins as FCN-32s.
    """

    arch = "fcn"
    default_encoder = "resnet18"
    description = "FCN-8s: scores from strides 32, 16, 8 summed with upsampling"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        c3, c4, c5 = self.encoder.out_channels[2:]
        self.head = nn.Sequential(  # as torchvision's FCNHead: C5 -> C5/4 channels -> scores
            conv_bn_relu(c5, max(c5 // 4, 64)),
            nn.Dropout(0.1),
            nn.Conv2d(max(c5 // 4, 64), num_classes, 1),
        )
        self.score16 = nn.Conv2d(c4, num_classes, 1)
        self.score8 = nn.Conv2d(c3, num_classes, 1)
        for param in [*self.score16.parameters(), *self.score8.parameters()]:
            nn.init.zeros_(param)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        c3, c4, c5 = features[2:]
        scores = self.head(c5)  # [B, K, H/32, W/32]
        scores = F.interpolate(scores, size=c4.shape[-2:], mode="bilinear", align_corners=False)
        scores = scores + self.score16(c4)  # [B, K, H/16, W/16]
        scores = F.interpolate(scores, size=c3.shape[-2:], mode="bilinear", align_corners=False)
        return scores + self.score8(c3)  # [B, K, H/8, W/8]; the base upsamples to H, W
