"""U-Net (Ronneberger et al., 2015) decoder on a pretrained encoder, as in segmentation_models."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seglab.models.base import MODELS, SegmentationModel, conv_bn_relu

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Module):
    """Upsample x2, concatenate the encoder's skip (if any), then two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)
        return self.convs(x)


@MODELS.register("unet")
class UNet(SegmentationModel):
    """C5 goes up through five blocks joined by C4, C3, C2, C1 (strides 16, 8, 4, 2) to stride 1."""

    arch = "unet"
    default_encoder = "resnet18"
    description = "U-Net: skip concatenation at strides 16, 8, 4, 2; decoder 256-128-64-32-16"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        enc = self.encoder.out_channels  # [C1, ..., C5]
        skips = [*enc[3::-1], 0]  # C4, C3, C2, C1, then none at stride 1
        ins = [enc[4], *DECODER_CHANNELS[:-1]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, DECODER_CHANNELS, strict=True))
        self.classifier = nn.Conv2d(DECODER_CHANNELS[-1], num_classes, 3, padding=1)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x, skips = features[4], [*features[3::-1], None]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip)
        return self.classifier(x)  # [B, K, H, W]
