"""``seglab quantize --backend pytorch``: PyTorch 2 export quantisation (PT2E), run through Inductor.

The flow of PyTorch's own int8 tutorial for x86 CPUs: ``torch.export`` captures the model at its
training crop size, torchao's ``X86InductorQuantizer`` marks where int8 goes (weights int8 per
output channel, activations uint8 per tensor, the default config), ``prepare_pt2e`` inserts
observers, training images preprocessed as prediction preprocesses them calibrate them, and
``convert_pt2e`` turns the ranges into quantize/dequantize pairs. The result is saved as a
``.pt2`` archive with seglab's metadata; at load (``seglab.deploy.runtime``) ``torch.compile``
with weight freezing lowers each pair around a convolution into one int8 oneDNN kernel. Without
that compile the graph would run in float32 with extra rounding: the compile is the speed, and it
is paid once per process at load (tens of seconds).

The quantisation ops are torchao's (``torch.ops.quantized_decomposed``, which torch 2.14 no longer
registers itself), so writing and loading these files needs the ``int8`` extra.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from seglab.errors import SeglabError

if TYPE_CHECKING:
    from seglab.models.base import SegmentationModel

# Every int8 graph is checked against the float model it came from, on real images. This catches a
# broken graph (it agrees on a tenth to a third of the pixels), not a small loss, which the report's
# mIoU measures: the CamVid Lite0 recipe model agrees on 96-97%, an untrained one on about 90%.
MIN_AGREEMENT = 0.8


def require_torchao(what: str) -> None:
    """Import torchao's x86 quantiser, which registers the quantisation ops and the Inductor passes
    that lower them to int8 kernels (without those passes the graph compiles, 15x slower), or say
    how to install it."""
    try:
        with _quiet("torch.utils._pytree"):  # torchao registers an enum the old way, and torch says so
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError:
        raise SeglabError(f"{what} needs torchao, PyTorch's quantisation library: pip install 'seglab[int8]'") from None


class CompiledInt8(nn.Module):
    """A loaded int8 graph run by ``torch.compile`` with its weights frozen into constants, which is
    what lets torchao's passes prepack them for oneDNN's int8 convolutions. torchao reads Inductor's
    global ``freezing`` flag, so it is set around every call (a compile happens inside one) rather
    than for the whole process."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = torch.compile(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config

        with torch._inductor.config.patch(freezing=True), _quiet("torch.utils.cpp_extension"):  # "no CUDA runtime"
            return self.graph(x)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` for the block: torch's notices would break one-line error output."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quantizer(graph: torch.fx.GraphModule, qat: bool = False):
    """The x86 Inductor quantiser with its default config (its fake-quantising one for ``qat``), except
    for the convolutions that produce the logits, which stay float32 (as in ``seglab.deploy.quantize``:
    rounding logits flips the argmax wherever two classes are close, which is along every boundary, and
    they are a sliver of the compute)."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(is_qat=qat)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    for name in _classifier_convs(graph):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _classifier_convs(graph: torch.fx.GraphModule) -> list[str]:
    """The modules of the convolutions found walking back from the output through everything that is
    not a convolution (upsampling, adds, slices)."""
    output = next(node for node in graph.graph.nodes if node.op == "output")
    found, stack, seen = [], list(output.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target is torch.ops.aten.conv2d.default:
            found.append(list(node.meta["nn_module_stack"].values())[-1][0])
        else:
            stack.extend(node.all_input_nodes)
    return found


def post_training_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[np.ndarray], check=lambda: None):
    """The int8 ``torch.export`` program of ``model`` (eval mode) at ``example``'s shape, its
    activation ranges observed on ``calibration`` ([1,C,H,W] normalised images)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        graph = torch.export.export(model.eval(), (example,)).module()
        prepared = prepare_pt2e(graph, quantizer(graph))
        for image in calibration:
            check()
            prepared(torch.from_numpy(image))
        return torch.export.export(_without_unused_tensors(convert_pt2e(prepared)), (example,))


class QATModel(nn.Module):
    """A float model captured for quantisation-aware training: ``torch.export`` in training mode at
    the training crop with any batch size, and fake quantisation (``prepare_qat_pt2e``) where the x86
    quantiser puts int8, so the weights learn to live with the rounding. It trains in seglab's own
    trainer like any model: ``train()``/``eval()`` switch its BatchNorm and dropout through torchao
    (an exported graph has no modules to switch), and images of another size are letterboxed to the
    crop as the saved int8 graph will letterbox them (``run_fixed``). ``int8()`` is the finished graph."""

    def __init__(self, model: SegmentationModel, crop: tuple[int, int], source: str | Path = "") -> None:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        super().__init__()
        self.source = source  # the float checkpoint, for the messages (seglab quantize --weights)
        self.mean, self.std, self.num_classes = model.mean, model.std, model.num_classes
        self.encoder_name = model.encoder_name
        self.channels, self.crop = model.in_channels, crop
        self.shape = ("batch", self.channels, *crop)  # as run_fixed reads it: any batch, a fixed size
        example = torch.zeros(2, self.channels, *crop)
        batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        graph = torch.export.export(model.train(), (example,), dynamic_shapes=batch).module()
        self.graph = prepare_qat_pt2e(graph, quantizer(graph, qat=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from seglab.deploy.runtime import run_fixed

        return run_fixed(self.graph, x, self.shape)

    def train(self, mode: bool = True) -> QATModel:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        self.training = mode
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        return self

    def int8(self) -> torch.export.ExportedProgram:
        """The int8 program of the trained graph, for one image: ``convert_pt2e``'s quantize/dequantize
        pairs where the fake quantisation was, its BatchNorms folded into the convolutions."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        self.eval()
        example = torch.zeros(1, self.channels, *self.crop)
        with torch.no_grad():
            int8 = convert_pt2e(copy.deepcopy(self.graph))  # in place: the graph stays as trained
            return torch.export.export(_without_unused_tensors(int8), (example,))


def _without_unused_tensors(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``convert_pt2e`` leaves each float weight it replaced with an int8 copy on the module, and
    ``torch.export`` would save them all (on the Lite0 model: 11.6 MB of float32 beside 2.9 MB of int8)."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner), leaf)
    return graph


def quantized_metadata(calib: int = 0, qat_epochs: int = 0) -> dict[str, str]:
    ranges = f"learned in {qat_epochs} epoch(s) of quantisation-aware training" if qat_epochs else None
    return {
        "backend": "pytorch",
        "weights": "int8 per channel",
        "activations": "uint8 per tensor",
        "format": "pt2e (X86InductorQuantizer)",
        "calibration": ranges or f"observed on {calib} train images",
    }


def is_pytorch_int8(meta: dict) -> bool:
    quantized = meta.get("quantized")
    return isinstance(quantized, dict) and quantized.get("backend") == "pytorch"
