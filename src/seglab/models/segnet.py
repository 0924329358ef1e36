"""SegNet (Badrinarayanan et al., 2017): a VGG-BN encoder and a mirrored decoder that upsamples
with max-unpooling, putting each value back where the encoder's max-pool found it.

The VGG-BN encoders (vgg11_bn, vgg16_bn) are defined and registered here, beside the pooling
indices they exist for; like every encoder they also work under the other architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from seglab.errors import SeglabError
from seglab.models.base import MODELS, SegmentationModel, conv_bn_relu
from seglab.models.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    replace_first_conv,
    torchvision_weights,
)


class VGGEncoder(Encoder):
    """VGG-BN features as five stages of convs closed by a 2x2 max-pool (C1 is after pool 1).

    ``forward_with_indices`` also returns the pooling indices and pre-pool sizes for SegNet.
    """

    def __init__(self, features: nn.Sequential, in_channels: int) -> None:
        stages, current = [], []
        for layer in features:
            current.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(nn.Sequential(*current))
                current = []
        super().__init__(stages, in_channels, IMAGENET_MEAN, IMAGENET_STD)
        # conv widths per stage, e.g. [[64, 64], [128, 128], ...]: SegNet mirrors them
        self.stage_widths = [[m.out_channels for m in s if isinstance(m, nn.Conv2d)] for s in stages]

    def forward_with_indices(self, x: torch.Tensor):
        """-> (features [C1..C5], pooling indices, pre-pool sizes), finest first."""
        features, indices, sizes = [], [], []
        for stage in self.stages:
            x = cast(nn.Sequential, stage)[:-1](x)  # the convs; the stage's own pool does not return indices
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            features.append(x)
            indices.append(idx)
        return features, indices, sizes


def _vgg(name: str, config: str) -> Callable[[int, bool, int], Encoder]:
    def build(in_channels: int, pretrained: bool, output_stride: int) -> Encoder:
        if output_stride != 32:
            raise SeglabError(
                f"encoder {name} cannot be dilated (its stages end in max-pooling); "
                "use a resnet or mobilenet encoder for this model (--encoder)"
            )
        # Only the conv features: VGG's 120M-parameter classifier is never used here.
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[config], batch_norm=True)
        if pretrained:
            state = torchvision_weights(name)
            features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
        else:
            for m in features.modules():
                if isinstance(m, nn.Conv2d):  # torchvision VGG's own initialisation
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        replace_first_conv(features, in_channels, pretrained)
        return VGGEncoder(features, in_channels)

    return build


for _name, _config in (("vgg11_bn", "A"), ("vgg16_bn", "D")):
    ENCODERS.register(_name)(EncoderInfo(_name, "torchvision", _vgg(_name, _config), pool_indices=True))


def vgg_encoders() -> list[str]:
    """The registered encoders that can hand SegNet their pooling indices."""
    return sorted(name for name, info in ENCODERS.items() if info.pool_indices)


@MODELS.register("segnet")
class SegNet(SegmentationModel):
    """Decoder stage k mirrors encoder stage k: unpool, then as many 3x3 conv-BN-ReLU as the
    encoder stage had, the last one narrowing to the previous stage's width. The final conv
    of stage 1 gives the class scores (no BN/ReLU), as in the paper.

    The default encoder is vgg16_bn, the paper's (13 convs, ~29M parameters in all); vgg11_bn
    (8 convs) is about 2x faster on a CPU and is the one to pick for quick experiments.
    """

    arch = "segnet"
    default_encoder = "vgg16_bn"
    description = "SegNet: VGG-BN encoder, mirrored decoder upsampling with max-unpooling indices"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, encoder, encoder_weights)
        assert isinstance(self.encoder, VGGEncoder)
        widths = self.encoder.stage_widths  # e.g. [[64, 64], [128, 128], [256]*3, [512]*3, [512]*3]
        stages = []
        for k, convs in enumerate(widths):
            narrow_to = widths[k - 1][-1] if k > 0 else None
            layers: list[nn.Module] = [conv_bn_relu(c, c) for c in convs[:-1]]
            if narrow_to is None:  # stage 1 ends in the classifier
                layers.append(nn.Conv2d(convs[-1], num_classes, 3, padding=1))
            else:
                layers.append(conv_bn_relu(convs[-1], narrow_to))
            stages.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages)  # decoder[k] mirrors encoder stage k (run deep first)

    def make_encoder(self, name: str, weights: str | None) -> Encoder:
        # Check before building: building may download weights for an encoder SegNet can't use.
        info = ENCODERS.get_or_raise(name, flag="--encoder") if not name.startswith("timm:") else None
        if info is None or not info.pool_indices:
            raise SeglabError(
                f"segnet needs a VGG encoder whose max-pooling indices drive its decoder, "
                f"not '{name}' (from --encoder); choose one of: {', '.join(vgg_encoders())}"
            )
        return super().make_encoder(name, weights)

    def forward_features(self, x: torch.Tensor):
        assert isinstance(self.encoder, VGGEncoder)
        return self.encoder.forward_with_indices(x)

    def decode(self, features) -> torch.Tensor:
        maps, indices, sizes = features
        x = maps[-1]  # C5 [B, 512, H/32, W/32]
        for k in reversed(range(len(self.decoder))):
            if torch.jit.is_tracing():
                x = unpool_2x2(x, indices[k])
            else:
                x = F.max_unpool2d(x, indices[k], (2, 2), (2, 2), output_size=sizes[k])
            x = self.decoder[k](x)
        return x  # [B, K, H, W]


def unpool_2x2(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``max_unpool2d`` for 2x2 windows, built from ops every exporter knows (ONNX has no
    traceable unpooling): each value is copied over its window and kept only where the flat
    index of the position is the one max-pooling recorded. Exact when the size doubles, which
    it does here (inputs are padded to a multiple of 32)."""
    b, c, h, w = x.shape
    up = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    where = indices[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    position = torch.arange(4 * h * w, device=x.device).reshape(1, 1, 2 * h, 2 * w)
    return up * (where == position).to(up.dtype)
