"""The base class of every seglab model: encoder + decoder, any input size in, logits out."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from seglab.errors import SeglabError
from seglab.models.encoders import Encoder, build_encoder
from seglab.registry import Registry


class SegmentationModel(nn.Module):
    """An encoder and a decoder with one contract for every architecture.

    ``forward(x [B, in_channels, H, W], normalised with mean/std) -> logits [B, num_classes, H, W]``
    for any H, W: the input is zero-padded (bottom/right) to a multiple of the encoder's output
    stride, decoded, upsampled bilinearly to the padded size and cropped back. Zero is the mean
    colour after normalisation, so the padding looks like a flat grey border.

    Subclasses set ``default_encoder``, ``description`` and, when the decoder wants a dilated
    encoder, ``encoder_output_stride``; they build their layers from ``self.encoder.out_channels``
    and implement :meth:`decode`. Every subclass takes
    ``(num_classes, in_channels=3, encoder=<its default>, encoder_weights=None)``.
    """

    arch: ClassVar[str] = ""
    default_encoder: ClassVar[str] = ""
    description: ClassVar[str] = ""
    encoder_output_stride: ClassVar[int] = 32

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        encoder: str | None = None,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise SeglabError(
                f"a model needs at least 1 class and 1 input channel, got num_classes="
                f"{num_classes}, in_channels={in_channels}"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.encoder_name = encoder or self.default_encoder
        self.encoder_weights = encoder_weights
        self.encoder = self.make_encoder(self.encoder_name, encoder_weights)
        self.mean: tuple[float, ...] = self.encoder.mean  # 0..1 scale, one value per input channel
        self.std: tuple[float, ...] = self.encoder.std

    def make_encoder(self, name: str, weights: str | None) -> Encoder:
        """Build the encoder; SegNet overrides this to insist on a VGG encoder."""
        return build_encoder(
            name, in_channels=self.in_channels, weights=weights, output_stride=self.encoder_output_stride
        )

    @property
    def output_stride(self) -> int:
        """The coarsest stride of the encoder's features; inputs are padded to a multiple of it."""
        return self.encoder.output_stride

    def forward_features(self, x: torch.Tensor) -> Any:
        """What :meth:`decode` consumes: the encoder's five feature maps, C1 (stride 2) first."""
        return self.encoder(x)

    def decode(self, features: Any) -> torch.Tensor:
        """Features -> logits [B, num_classes, h, w] at any stride; the base upsamples them."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.arch} expects input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.output_stride
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return self._forward_exported(x, h, w, s)
        # At least 2 strides per side: C5 is then >= 2x2, so BatchNorm on it works in training
        # with batch size 1 (a 1x1 map with batch 1 has a single value per channel).
        # (h + s - 1) // s, not -(-h // s): ONNX divides integers towards zero, so an exported
        # -(-h // s) rounds the wrong way for every h that is not a multiple of s.
        padded_h, padded_w = max((h + s - 1) // s * s, 2 * s), max((w + s - 1) // s * s, 2 * s)
        x = F.pad(x, (0, padded_w - w, 0, padded_h - h))
        logits = self.decode(self.forward_features(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def _forward_exported(self, x: torch.Tensor, h, w, s: int) -> torch.Tensor:
        """The same computation with no Python branch on the input size, so that a traced or
        exported graph computes the padding from the shape it is given, whatever that is."""
        x = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s))
        logits = F.interpolate(self.decode(self.forward_features(x)), size=x.shape[-2:], mode="bilinear")
        return logits[..., :h, :w]


MODELS: Registry[type[SegmentationModel]] = Registry("model")


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias, BN follows) -> BatchNorm -> ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
