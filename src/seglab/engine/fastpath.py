"""bfloat16 on CPUs, layer by layer: keep a depthwise convolution in float32 where that is faster.

bfloat16 autocast roughly triples dense convolutions on an AVX-512 BF16 CPU, but oneDNN's
bfloat16 depthwise convolutions (MobileNet, EfficientNet) are often slower than float32 ones,
and which is faster depends on the kernel size and the feature-map size. Measured on the 2-core
AVX-512 BF16 CPU seglab is developed on, forward + backward, batch 8, channels-last:

    depthwise conv                  float32   bfloat16
    960 ch, 23x30, 5x5 dilated 2     60 ms     131 ms
    72 ch, 92x120, 5x5               45 ms     104 ms
    64 ch, 184x240, 3x3              92 ms      63 ms

So no fixed rule wins: :func:`tune_depthwise` times each depthwise convolution of a model at
its own training input shape in both precisions and makes the ones where float32 is clearly
faster run in float32 inside the autocast region (a class swap: same parameters, same
``state_dict``). On that CPU it lifts LR-ASPP training from 5.9 to 7.3 images/s with
MobileNetV3-Large and from 3.0 to 4.9 with EfficientNet-Lite0 (benchmarks/train_speed.py).
The result is a list of layer names, saved in checkpoints so a resumed run keeps the same
numerics.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn


class Float32Conv2d(nn.Conv2d):
    """A Conv2d that runs in float32 inside a lower-precision autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def depthwise_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in (nn.Conv2d, Float32Conv2d) and m.groups > 1 and m.groups == m.in_channels
    }


def run_in_float32(model: nn.Module, names: Iterable[str]) -> None:
    """Make the named convolutions run in float32 (and only those)."""
    names = set(names)
    for name, conv in depthwise_convs(model).items():
        conv.__class__ = Float32Conv2d if name in names else nn.Conv2d


def _seconds(conv: nn.Conv2d, shape: Sequence[int], dtype: torch.dtype, repeats: int, backward: bool) -> float:
    probe = copy.deepcopy(conv).to(dtype).to(memory_format=torch.channels_last)
    probe.__class__ = nn.Conv2d  # time the plain convolution, whatever it was swapped to
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(backward)
    best = float("inf")
    for i in range(repeats + 1):  # the first call builds oneDNN's kernels
        t = time.perf_counter()
        if backward:
            probe(x).sum().backward()
        else:
            with torch.no_grad():
                probe(x)
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def tune_depthwise(
    model: nn.Module,
    example: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    margin: float = 0.9,
    repeats: int = 2,
    backward: bool = True,
) -> list[str]:
    """Time each depthwise convolution at the shape ``example`` gives it, in float32 and in
    ``dtype``; those where float32 takes under ``margin`` of the time run in float32 from now
    on. Returns their names. CPU only; ``example`` is one batch (its values unused); timings
    are of forward + backward for training, of the forward alone with ``backward=False``.
    """
    convs = depthwise_convs(model)
    if not convs:  # ResNet, VGG: nothing to decide, no forward pass needed
        return []
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [conv.register_forward_pre_hook(record(name)) for name, conv in convs.items()]
    training = model.training
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            model.eval()(example)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    chosen = []
    for name, shape in shapes.items():
        fp32 = _seconds(convs[name], shape, torch.float32, repeats, backward)
        low = _seconds(convs[name], shape, dtype, repeats, backward)
        if fp32 < margin * low:
            chosen.append(name)
    run_in_float32(model, chosen)
    return chosen


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into the convolution.

    Inference only: the BatchNorm becomes an ``nn.Identity`` and the convolution's weight and bias
    absorb its scale and shift, so one pass over each feature map disappears. Pairs are found
    as neighbours in an ``nn.Sequential`` (torchvision's Conv2dNormActivation, decoder blocks) and
    as ``convN``/``bnN`` attributes (ResNet blocks). Returns how many were folded. The model's
    ``state_dict`` changes (no BatchNorm entries), so fold a model that is only used to predict.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(model.modules()):
        pairs: list[tuple[str, str]] = []
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            pairs += [(a, b) for (a, _), (b, _) in itertools.pairwise(children)]
        names = dict(children)
        pairs += [(f"conv{i}", f"bn{i}") for i in range(1, 4) if f"conv{i}" in names and f"bn{i}" in names]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if type(conv) in (nn.Conv2d, Float32Conv2d) and type(bn) is nn.BatchNorm2d and not bn.training:
                fused = fuse_conv_bn_eval(conv, bn)
                fused.__class__ = type(conv)
                setattr(parent, conv_name, fused)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded
