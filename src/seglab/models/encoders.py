"""Encoders: backbones that return five feature maps, at strides 2, 4, 8, 16 and 32.

Every encoder is an :class:`Encoder`: ``forward(x [B,C,H,W]) -> [C1, C2, C3, C4, C5]`` with
``out_channels`` and ``strides`` measured once on a dummy input, plus the ``mean``/``std`` its
weights expect. Sources: torchvision (registered here; the VGG-BN ones
live in segnet.py beside the pooling indices they exist for), timm (``timm:<name>``) and
EfficientNet-Lite (timm_encoders.py). With ``output_stride`` 16 or 8 the deepest
stage(s) trade stride for dilation, so C5 (and C4) keep a finer resolution.
"""

from __future__ import annotations

import math
import socket
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from seglab.errors import SeglabError
from seglab.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PROBE = 64  # side of the dummy input used to measure strides (C5 is then 2x2)


@dataclass(frozen=True)
class EncoderInfo:
    """A registered encoder: ``build(in_channels, pretrained, output_stride) -> Encoder``."""

    name: str
    source: str  # "torchvision" or "lite" ("timm:<name>" encoders are not registered one by one)
    build: Callable[[int, bool, int], Encoder]
    pool_indices: bool = False  # a VGG encoder that can return max-pooling indices (SegNet)
    weights_package: str | None = None  # the PyPI package that ships the ImageNet weights


ENCODERS: Registry[EncoderInfo] = Registry("encoder")


class Encoder(nn.Module):
    """Runs ``stages`` in turn and returns each one's output: five maps, finest first."""

    def __init__(self, stages: Sequence[nn.Module], in_channels: int, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.mean, self.std = channel_stats(mean, in_channels), channel_stats(std, in_channels)
        self.out_channels, self.strides = probe(self, in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    @property
    def output_stride(self) -> int:
        return self.strides[-1]

    @property
    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def probe(encoder: nn.Module, in_channels: int) -> tuple[list[int], list[int]]:
    """Channels and strides of the encoder's outputs, from one dummy forward in eval mode."""
    was_training = encoder.training
    encoder.eval()  # train mode would update BatchNorm running statistics with the dummy input
    features = encoder(torch.zeros(1, in_channels, _PROBE, _PROBE))
    encoder.train(was_training)
    return [f.shape[1] for f in features], [_PROBE // f.shape[-1] for f in features]


def channel_stats(values: tuple, in_channels: int) -> tuple[float, ...]:
    """Per-channel mean/std for ``in_channels``: one averaged value for grey, else RGB cycled."""
    if in_channels == 1:
        return (round(sum(values) / len(values), 4),)
    return tuple(float(values[i % len(values)]) for i in range(in_channels))


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn a pretrained RGB kernel [O,3,k,k] into one for ``in_channels`` inputs.

    Grey: sum the RGB kernels (a grey pixel is R=G=B, so responses stay the same). Other
    counts: repeat RGB cyclically and rescale by 3/in_channels to keep the activation scale.
    """
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def replace_first_conv(net: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Swap the network's first Conv2d for one taking ``in_channels`` inputs."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    layout: dict[str, Any] = {k: getattr(conv, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    new = nn.Conv2d(in_channels, conv.out_channels, bias=conv.bias is not None, **layout)
    if pretrained:  # random weights keep the fresh conv's own initialisation
        with torch.no_grad():
            new.weight.copy_(adapt_conv_weight(conv.weight, in_channels))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    net.set_submodule(name, new)


def dilate(stage: nn.Module, dilation: int) -> None:
    """Make a stage keep its input resolution: stride-2 convs get stride 1, k>1 convs dilate."""
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size[0] > 1:
                m.dilation = (dilation, dilation)
                m.padding = tuple((k - 1) // 2 * dilation for k in m.kernel_size)


def split_at_downsampling(blocks: nn.Sequential, in_channels: int) -> list[nn.Sequential]:
    """Group a ``features`` Sequential into stages, one per halving of the spatial size.

    The boundaries come from running a dummy input through the blocks once, not from names.
    """
    x, starts = torch.zeros(1, in_channels, _PROBE, _PROBE), []
    was_training = blocks.training
    blocks.eval()
    with torch.no_grad():
        for i, block in enumerate(blocks):
            y = block(x)
            if y.shape[-1] < x.shape[-1]:
                starts.append(i)
            x = y
    blocks.train(was_training)
    starts[0] = 0  # blocks before the first downsampling (if any) belong to stage 1
    ends = [*starts[1:], len(blocks)]
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(starts, ends, strict=True)]


def _is_offline(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says the network could not be reached."""
    for _ in range(10):  # exception chains are short; the bound guards against cycles
        if exc is None:
            return False
        if isinstance(exc, urllib.error.URLError | ConnectionError | TimeoutError | socket.gaierror):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def weights_error(name: str, cache: str, exc: BaseException, url: str = "", kind: str = "ImageNet") -> SeglabError:
    """The SeglabError for pretrained weights that could not be fetched (``exc``: the cause)."""
    why = f"no internet connection ({exc})" if _is_offline(exc) else str(exc)
    where = f"under {cache}; the file is {url}" if url else f"under {cache}"
    return SeglabError(
        f"could not download {kind} weights for {name}: {why}; download them on a machine with "
        f"internet (they cache {where}) or use --encoder-weights none"
    )


def torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of torchvision model ``name``, downloaded once into the hub cache."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except OSError as exc:  # urllib's URLError, socket errors and ConnectionError are OSErrors
        cache = str(Path(torch.hub.get_dir()) / "checkpoints")
        raise weights_error(name, cache, exc, weights.url) from exc


def _torchvision_net(name: str, pretrained: bool, **kwargs: Any) -> Any:
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    if pretrained:
        net.load_state_dict(torchvision_weights(name))
    return net


def _stages_with_dilation(stages: Sequence[nn.Module], output_stride: int) -> Sequence[nn.Module]:
    for level, stage in enumerate(stages[3:], start=4):  # C4 dilates for stride 8, C5 for 8 and 16
        if 2**level > output_stride:
            dilate(stage, 2 ** (level - int(math.log2(output_stride))))
    return stages


def _resnet(name: str, native_dilation: bool) -> Callable[[int, bool, int], Encoder]:
    def build(in_channels: int, pretrained: bool, output_stride: int) -> Encoder:
        # Bottleneck ResNets dilate natively; BasicBlock ones (18/34) refuse, so use dilate().
        kwargs = {}
        if native_dilation:
            kwargs["replace_stride_with_dilation"] = [False, output_stride == 8, output_stride <= 16]
        net = _torchvision_net(name, pretrained, **kwargs)
        replace_first_conv(net, in_channels, pretrained)
        stages = [
            nn.Sequential(net.conv1, net.bn1, net.relu),
            nn.Sequential(net.maxpool, net.layer1),
            net.layer2,
            net.layer3,
            net.layer4,
        ]
        if not native_dilation:
            _stages_with_dilation(stages, output_stride)
        return Encoder(stages, in_channels, IMAGENET_MEAN, IMAGENET_STD)

    return build


def _features_net(name: str) -> Callable[[int, bool, int], Encoder]:
    """MobileNet / EfficientNet: a ``features`` Sequential split where the size halves."""

    def build(in_channels: int, pretrained: bool, output_stride: int) -> Encoder:
        net = _torchvision_net(name, pretrained)
        replace_first_conv(net, in_channels, pretrained)
        # torchvision's MobileNetV3 sets BatchNorm momentum 0.01, tuned for long ImageNet runs. In a
        # segmentation run of a few hundred steps the running statistics then lag the weights so far
        # that eval-mode predictions collapse to one class (measured on CamVid from scratch: val
        # mIoU 3-7 after 7 epochs while the train loss fell). PyTorch's default 0.1 tracks them.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        stages = split_at_downsampling(net.features, in_channels)
        return Encoder(_stages_with_dilation(stages, output_stride), in_channels, IMAGENET_MEAN, IMAGENET_STD)

    return build


def _register(info: EncoderInfo) -> None:
    ENCODERS.register(info.name)(info)


for _name in ("resnet18", "resnet34", "resnet50"):
    _register(EncoderInfo(_name, "torchvision", _resnet(_name, native_dilation=_name == "resnet50")))
for _name in ("mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0"):
    _register(EncoderInfo(_name, "torchvision", _features_net(_name)))


def build_encoder(name: str, *, in_channels: int = 3, weights: str | None = None, output_stride: int = 32) -> Encoder:
    """Build encoder ``name`` (registered, or ``timm:<model>``); ``weights`` is None/"none"/"imagenet"."""
    if weights not in (None, "none", "imagenet"):
        raise SeglabError(f"unknown encoder weights '{weights}' (from --encoder-weights); choose imagenet or none")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
    pretrained = weights == "imagenet"
    if name.startswith("timm:"):
        from seglab.models.timm_encoders import build_timm  # imports encoders.py itself

        encoder = build_timm(name[len("timm:") :], in_channels, pretrained, output_stride)
    else:
        encoder = ENCODERS.get_or_raise(name, flag="--encoder").build(in_channels, pretrained, output_stride)
    expected = [min(2**i, output_stride) for i in range(1, 6)]
    if encoder.strides != expected:  # a guard on the stage splitting and dilation above
        raise ValueError(f"encoder {name} gives strides {encoder.strides}, expected {expected}")
    return encoder
