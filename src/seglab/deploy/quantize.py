"""``seglab quantize``: int8 post-training quantisation with ONNX Runtime, then a report.

ONNX Runtime's static quantisation, because the ONNX file is what leaves the lab anyway and its
int8 kernels (VNNI on this CPU) met the goal: on the CamVid LR-ASPP-Lite0 recipe model, 1.6-1.9x
ONNX Runtime's float32 speed for 0.3 mIoU (README: Results). PyTorch's own flow (PT2E) was not
measured: it is fast only through torch.compile at load time. Weights are int8 per output
channel, activations uint8 per tensor, with ranges calibrated on training images preprocessed
exactly as prediction preprocesses them.

Formats: ``qdq`` (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels;
what TensorRT and other accelerators expect too) or ``qoperator`` (QLinearConv and friends; slower
than QDQ on the LR-ASPP-Lite0 here, and ONNX Runtime's quantiser produces an invalid graph with it
for models exported with a dynamic batch).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seglab.deploy.report import Measurement, format_report, measure, write_report
from seglab.deploy.runtime import METADATA_KEY, exported_format, read_metadata, weights_task
from seglab.engine.checkpoint import ModelCard, card_from_dict
from seglab.engine.stopping import DeferredSignals
from seglab.errors import SeglabError
from seglab.files import remove_stale_temporaries, temporary
from seglab.instance.models import TASK_DETECTORS

if TYPE_CHECKING:
    import onnx

METHODS = ("minmax", "entropy", "percentile")
QUANT_FORMATS = ("qdq", "qoperator")


@dataclass
class QuantizeResult:
    float_model: Path
    int8_model: Path
    report: Path | None
    rows: list[Measurement]


def quantize(
    weights: str | Path,
    *,
    data: str | Path | None = None,
    calib: int = 64,
    method: str = "minmax",
    quant_format: str = "qdq",
    out: str | Path | None = None,
    report: bool = True,
    limit: int | None = None,
    data_cache: str | Path | None = None,
    trust: bool = False,
    log=print,
) -> QuantizeResult:
    """Quantise a checkpoint (exported to ONNX first) or a float ONNX export to int8; ``trust`` as in
    ``export``."""
    if method not in METHODS:
        raise SeglabError(f"quantize: --method {method!r} is not one of {', '.join(METHODS)}")
    if quant_format not in QUANT_FORMATS:
        raise SeglabError(f"quantize: --quant-format {quant_format!r} is not one of {', '.join(QUANT_FORMATS)}")
    if calib < 1:
        raise SeglabError(f"quantize: --calib {calib}: use 1 or more calibration images")
    weights = Path(weights)
    if not weights.is_file():
        raise SeglabError(f"quantize: weights file not found: {weights}")
    task = weights_task(weights, trust=trust)
    if task in ("instance", "detect"):
        raise SeglabError(
            f"quantize: {weights} is a {TASK_DETECTORS[task]} (--task {task}); int8 quantisation is built for semantic "
            "models only (calibration on whole-image logits, scored by mIoU), and a detector's box decoding, NMS "
            "and RoIAlign would have to stay float; use its float32 export: seglab export --format onnx"
        )
    out = Path(out) if out else weights.with_name(f"{weights.stem}.int8.onnx")
    if out.suffix != ".onnx":
        raise SeglabError(f"quantize: --out {out}: the int8 model is an ONNX file; end the name in .onnx")

    with DeferredSignals() as signals:  # see seglab.deploy.export: SIGINT/SIGTERM stop at safe points
        float_onnx = _float_onnx(weights, data, trust, log)
        meta = read_metadata(float_onnx)
        if meta.get("half") or meta.get("quantized"):
            raise SeglabError(f"quantize: {float_onnx} is already reduced precision; quantise a float32 export")
        card = card_from_dict(meta["card"], float_onnx)
        data = data or meta.get("data")
        if data is None or not Path(data).exists():
            raise SeglabError(f"quantize: calibration needs the training images; pass --data (got {data})")

        log(f"quantize: calibrating on {calib} train images of {data} ({method}, {quant_format})")
        fixed = _fixed_size(meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = temporary(out, directory=True)
        try:
            prepared, quantized = tmp / "prepared.onnx", tmp / "int8.onnx"
            images = _calibration(card, data, calib, fixed, data_cache, signals.check)
            try:
                _quantize_static(float_onnx, prepared, quantized, images, method, quant_format)
            except AssertionError as e:  # ONNX Runtime's quantiser asserts on graphs it cannot rewrite
                raise SeglabError(
                    f"quantize: ONNX Runtime's quantiser failed on {float_onnx} ({e}); "
                    "use --quant-format qdq, or quantise a fixed-shape export (seglab export without --dynamic)"
                ) from None
            signals.check()
            _copy_metadata(quantized, meta, method, quant_format, calib)
            signals.check()  # the last point to stop at
            os.replace(quantized, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"quantize: wrote {out} ({out.stat().st_size / 2**20:.1f} MB, from {float_onnx.stat().st_size / 2**20:.1f} MB)")

    rows: list[Measurement] = []
    report_path = None
    if report:
        rows = measure(
            {"float32 (ONNX Runtime)": float_onnx, "int8 (ONNX Runtime)": out},
            data,
            limit=limit,
            data_cache=data_cache,
            log=log,
        )
        report_path = write_report(rows, out.with_name(f"{out.stem}_report"), f"int8 quantisation of {weights.name}")
        log(format_report(rows, f"int8 quantisation of {weights.name}"))
        log(f"quantize: report in {report_path}")
    return QuantizeResult(float_onnx, out, report_path, rows)


def _float_onnx(weights: Path, data: str | Path | None, trust: bool, log) -> Path:
    """The float32 ONNX model to quantise: the file itself, or a dynamic export of the checkpoint."""
    fmt = exported_format(weights)
    if fmt == "onnx":
        return weights
    if fmt is not None:
        raise SeglabError(f"quantize: {weights} is a {fmt} file; give a checkpoint (.pt) or an ONNX export")
    from seglab.deploy.export import export

    target = weights.with_suffix(".onnx")
    # A fixed shape, because ONNX Runtime runs fixed-shape graphs faster here, float32 and int8
    # alike, even 8 images fed one at a time (README: Quantise).
    log(f"quantize: exporting {weights} to {target} (float32, one image at the training crop size)")
    return export(weights, format="onnx", out=target, data=data, trust=trust, log=log).path


def _fixed_size(meta: dict) -> tuple[int, int] | None:
    shape = meta.get("input_shape") or []
    return (shape[2], shape[3]) if len(shape) == 4 and isinstance(shape[2], int) else None


def _calibration(
    card: ModelCard, data: str | Path, count: int, fixed: tuple[int, int] | None, data_cache, check=lambda: None
) -> Iterator[np.ndarray]:
    """Train images, evenly spread over the split, preprocessed as prediction does: [1,C,H,W] float32.

    ``check`` runs before each image: a deferred interrupt stops the calibration there, between two
    of ONNX Runtime's runs, instead of after all of them."""
    import torch.nn.functional as F

    from seglab.data import EvalTransform, get_split, read_image, resolve_dataset
    from seglab.engine.inference import normalize

    spec = resolve_dataset(data, cache_dir=data_cache, progress=False)
    samples = get_split(spec, "train")
    if not samples:
        raise SeglabError(f"quantize: {data} has no train images to calibrate on")
    picked = [samples[i] for i in np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)]
    resize = EvalTransform(card.img_size)
    for sample in picked:
        check()
        image = torch.from_numpy(read_image(sample.image, card.in_channels).copy()).permute(2, 0, 1)
        x = resize.resize_image(image)[None]
        if fixed is not None and tuple(x.shape[-2:]) != fixed:
            x = F.interpolate(x.float(), size=fixed, mode="bilinear", antialias=True).round().clamp(0, 255)
        yield normalize(x, card.mean, card.std).numpy()


def _quantize_static(source: Path, prepared: Path, target: Path, images, method: str, quant_format: str) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.images, None)
            return None if image is None else {"images": image}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Fold constants and fuse Conv+BN before calibration, so ranges are those of the fused graph.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        proto = onnx.load(str(prepared))
        _untangle(proto.graph)
        onnx.save(proto, str(prepared))
        keep_float = _classifier_convs(proto.graph) + _shape_arithmetic(proto.graph)
        ort_quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            per_channel=True,
            nodes_to_exclude=keep_float,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
        )


def _classifier_convs(graph: onnx.GraphProto) -> list[str]:
    """The convolutions that produce the logits, found by walking back from the graph's output
    through everything that is not a convolution (upsampling, adds, slices).

    They stay float: rounding logits to 256 levels flips the argmax wherever two classes are
    close, which is along every boundary, and they are a sliver of the compute."""
    producer = {out: node for node in graph.node for out in node.output}
    found, stack, seen = [], [o.name for o in graph.output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def _shape_arithmetic(graph: onnx.GraphProto) -> list[str]:
    """Nodes that compute sizes, not pixels: everything downstream of a Shape op that no image
    tensor flows into (the padding a dynamic-shape export works out at run time).

    Quantising them rounds a padding of 8 pixels to 7.97 or 8.03, and the feature maps stop
    lining up: on the CamVid LR-ASPP-Lite0 that alone cost 2.6 mIoU points."""
    image = {i.name for i in graph.input}  # tensors that carry pixels
    nodes = []
    for node in graph.node:  # the exporter writes nodes in topological order
        if node.op_type != "Shape" and any(i in image for i in node.input):
            image.update(node.output)
        else:
            nodes.append(node.name)
    return nodes


def _untangle(graph: onnx.GraphProto) -> None:
    """Work around ONNX Runtime's quantiser on graphs with shape arithmetic (dynamic padding).

    Its topological sort counts a node's inputs with repeats, so a node that reads one tensor
    twice (``Slice(x, c, d, c)``) is never ready and the save fails with "Graph is not a DAG";
    and a Constant node shared by two quantised nodes is quantised twice. Each repeated input is
    read through its own Identity, and Constant nodes become initialisers, which it handles.
    """
    from onnx import helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            value = numpy_helper.to_array(node.attribute[0].t)
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        seen: set[str] = set()
        for i, name in enumerate(node.input):
            if name and name in seen:
                alias = f"{name}/read{len(nodes)}_{i}"
                nodes.append(helper.make_node("Identity", [name], [alias], name=alias))
                node.input[i] = alias
            seen.add(name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _copy_metadata(path: Path, meta: dict, method: str, quant_format: str, calib: int) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    quantized = {"weights": "int8 per channel", "activations": "uint8 per tensor", "format": quant_format,
                 "calibration": f"{method} on {calib} train images"}  # fmt: skip
    entry.key, entry.value = METADATA_KEY, json.dumps({**meta, "quantized": quantized})
    onnx.save(proto, str(path))
