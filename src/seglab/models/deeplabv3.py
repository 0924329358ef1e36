"""DeepLabV3 (Chen et al., 2017) and DeepLabV3+ (Chen et al., 2018) on a dilated encoder.

Both reuse torchvision's ASPP with one change: its image-pooling branch has a BatchNorm on a
1x1 map, which raises in training with batch size 1 (one value per channel). That branch is
swapped for :class:`ImagePooling`, the same layers with the BatchNorm replaced by a conv bias.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPPooling

from seglab.models.base import MODELS, SegmentationModel, conv_bn_relu

ATROUS_RATES = (6, 12, 18)  # the paper's rates for output stride 16
ASPP_CHANNELS = 256


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv (with bias, no BatchNorm) -> ReLU -> broadcast back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))  # [B, C, 1, 1]
        return pooled.expand(-1, -1, *x.shape[-2:])


def make_aspp(in_channels: int) -> ASPP:
    aspp = ASPP(in_channels, ATROUS_RATES, ASPP_CHANNELS)
    for i, branch in enumerate(aspp.convs):
        if isinstance(branch, ASPPPooling):
            aspp.convs[i] = ImagePooling(in_channels, ASPP_CHANNELS)
    return aspp


@MODELS.register("deeplabv3")
class DeepLabV3(SegmentationModel):
    """ASPP on C5 at output stride 16, a 3x3 conv-BN-ReLU, then 1x1 class scores.

    Default encoder resnet18 (dilated), for CPUs: at 360x480 on 2 cores it runs in ~160 ms
    against ~370 ms for the paper's resnet50 (--encoder resnet50), with 16M vs 40M parameters.
    """

    arch = "deeplabv3"
    default_encoder = "resnet18"
    description = "DeepLabV3: ASPP (rates 6, 12, 18 + image pooling) on a dilated encoder, stride 16"
    encoder_output_stride = 16

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        self.aspp = make_aspp(self.encoder.out_channels[4])
        self.head = nn.Sequential(conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS), nn.Conv2d(ASPP_CHANNELS, num_classes, 1))

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.aspp(features[4]))  # [B, K, H/16, W/16]


@MODELS.register("deeplabv3plus")
class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3's ASPP, upsampled x4 and joined with C2 (stride 4) projected to 48 channels,
    then two 3x3 conv-BN-ReLU and 1x1 class scores at stride 4."""

    arch = "deeplabv3plus"
    default_encoder = "resnet18"
    description = "DeepLabV3+: ASPP + stride-4 low-level features, two 3x3 convs, stride 4"
    encoder_output_stride = 16

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        self.aspp = make_aspp(self.encoder.out_channels[4])
        self.low_level = conv_bn_relu(self.encoder.out_channels[1], 48, kernel_size=1)
        self.fuse = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS + 48, ASPP_CHANNELS), conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS)
        )
        self.classifier = nn.Conv2d(ASPP_CHANNELS, num_classes, 1)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features[1])  # [B, 48, H/4, W/4]
        high = F.interpolate(self.aspp(features[4]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))  # [B, K, H/4, W/4]
