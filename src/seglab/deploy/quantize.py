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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seglab.deploy.report import Measurement, format_report, measure, write_report
from seglab.deploy.runtime import METADATA_KEY, exported_format, read_metadata, weights_task
from seglab.engine.checkpoint import ModelCard, card_from_dict
from seglab.engine.stopping import DeferredSignals, Interrupted
from seglab.errors import SeglabError
from seglab.files import atomic_path, remove_stale_temporaries, temporary
from seglab.instance.models import TASK_DETECTORS

if TYPE_CHECKING:
    import onnx

    from seglab.config import TrainConfig
    from seglab.deploy.pt2e import QATModel

BACKENDS = ("onnxruntime", "pytorch")
SUFFIX = {"onnxruntime": ".onnx", "pytorch": ".pt2"}
METHODS = ("minmax", "entropy", "percentile")
QAT_EPOCHS = 3
QAT_LR_SCALE = 0.1  # QAT fine-tune lr = the training run's x this (a trained model, nudged to live with int8)
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
    backend: str = "onnxruntime",
    data: str | Path | None = None,
    calib: int = 64,
    method: str | None = None,
    quant_format: str | None = None,
    out: str | Path | None = None,
    report: bool = True,
    limit: int | None = None,
    data_cache: str | Path | None = None,
    img_size: Sequence[int] | None = None,
    qat: bool = False,
    epochs: int = QAT_EPOCHS,
    lr: float | None = None,
    resume: str | Path | None = None,
    trust: bool = False,
    log=print,
) -> QuantizeResult:
    """Quantise a checkpoint to int8: with ONNX Runtime (the checkpoint exported to ONNX first, or a
    float ONNX export) or with PyTorch's PT2E (``seglab.deploy.pt2e``; a checkpoint, captured at
    ``img_size`` H, W, default the training crop); ``trust`` as in ``export``. ``method`` and
    ``quant_format`` are ONNX Runtime's (default minmax, qdq).

    ``qat`` (PT2E only): instead of calibrating, fine-tune the model for ``epochs`` with fake
    quantisation on its own training data and recipe (``seglab.engine.trainer``, a run folder under
    runs/qat/; ``lr`` default the training run's x ``QAT_LR_SCALE``), then convert its best epoch.
    ``resume``: that run's ``weights/last.pt``, to continue a stopped fine-tune with its own settings."""
    if qat and backend != "pytorch":
        raise SeglabError(
            "quantize: --qat is PyTorch's quantisation-aware training (PT2E); use it with --backend pytorch"
        )
    if resume is not None and not qat:
        raise SeglabError("quantize: --resume continues a quantisation-aware training run; add --qat")
    if qat and (epochs < 1 or (lr is not None and lr <= 0)):
        raise SeglabError(f"quantize: --qat needs --epochs 1 or more and a positive --lr (got {epochs}, {lr})")
    if backend not in BACKENDS:
        raise SeglabError(f"quantize: --backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "pytorch" and (method or quant_format):
        raise SeglabError(
            "quantize: --method and --quant-format are ONNX Runtime's; --backend pytorch uses the x86 Inductor "
            "quantiser's own observers (histogram for activations, min-max per channel for weights)"
        )
    method, quant_format = method or "minmax", quant_format or "qdq"
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
    suffix = SUFFIX[backend]
    out = Path(out) if out else weights.with_name(f"{weights.stem}.{'qat-' if qat else ''}int8{suffix}")
    if out.suffix != suffix:
        raise SeglabError(f"quantize: --out {out}: a {backend} int8 model is a {suffix} file; end the name in {suffix}")

    with DeferredSignals() as signals:  # see seglab.deploy.export: SIGINT/SIGTERM stop at safe points
        if backend == "pytorch":
            training = (epochs, lr, resume) if qat else None
            float_model, data = _quantize_pytorch(
                weights, out, data, calib, data_cache, img_size, training, trust, signals.check, log
            )
        else:
            float_model, data = _quantize_onnxruntime(
                weights, out, data, calib, method, quant_format, data_cache, trust, signals.check, log
            )
    int8_mb, float_mb = out.stat().st_size / 2**20, float_model.stat().st_size / 2**20
    log(f"quantize: wrote {out} ({int8_mb:.1f} MB, from {float_mb:.1f} MB)")

    rows: list[Measurement] = []
    report_path = None
    if report:
        pt2e = f"int8 (PyTorch PT2E{', QAT' if qat else ''}, Inductor)"
        names = {"onnxruntime": ("float32 (ONNX Runtime)", "int8 (ONNX Runtime)"),
                 "pytorch": ("float32 (PyTorch eager)", pt2e)}[backend]  # fmt: skip
        models = dict(zip(names, (float_model, out), strict=True))
        rows = measure(models, data, limit=limit, data_cache=data_cache, log=log)
        report_path = write_report(rows, out.with_name(f"{out.stem}_report"), f"int8 quantisation of {weights.name}")
        log(format_report(rows, f"int8 quantisation of {weights.name}"))
        log(f"quantize: report in {report_path}")
    return QuantizeResult(float_model, out, report_path, rows)


def _quantize_onnxruntime(
    weights: Path, out: Path, data, calib: int, method: str, quant_format: str, data_cache, trust: bool, check, log
) -> tuple[Path, str | Path]:
    """ONNX Runtime's static quantisation of the float ONNX model; returns (that model, the data)."""
    float_onnx = _float_onnx(weights, data, trust, log)
    meta = read_metadata(float_onnx)
    if meta.get("half") or meta.get("quantized"):
        raise SeglabError(f"quantize: {float_onnx} is already reduced precision; quantise a float32 export")
    card = card_from_dict(meta["card"], float_onnx)
    data = _calibration_data(data or meta.get("data"))
    log(f"quantize: calibrating on {calib} train images of {data} ({method}, {quant_format})")
    fixed = _fixed_size(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary(out, directory=True)
    try:
        prepared, quantized = tmp / "prepared.onnx", tmp / "int8.onnx"
        images = _calibration(card, data, calib, fixed, data_cache, check)
        try:
            _quantize_static(float_onnx, prepared, quantized, images, method, quant_format)
        except AssertionError as e:  # ONNX Runtime's quantiser asserts on graphs it cannot rewrite
            raise SeglabError(
                f"quantize: ONNX Runtime's quantiser failed on {float_onnx} ({e}); "
                "use --quant-format qdq, or quantise a fixed-shape export (seglab export without --dynamic)"
            ) from None
        check()
        _copy_metadata(quantized, meta, method, quant_format, calib)
        check()  # the last point to stop at
        os.replace(quantized, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return float_onnx, data


def _quantize_pytorch(
    weights: Path,
    out: Path,
    data,
    calib: int,
    data_cache,
    img_size,
    training: tuple[int, float | None, str | Path | None] | None,
    trust: bool,
    check,
    log,
) -> tuple[Path, str | Path]:
    """PT2E int8 of the checkpoint at its training crop, calibrated (post-training) or, with
    ``training`` = (epochs, lr, a stopped run's last.pt or None), fine-tuned with fake quantisation;
    checked on real images against the float model (or the fake-quantised graph it was trained as)
    before it is renamed into place. Returns (the checkpoint, the data)."""
    from seglab.deploy.export import SEMANTIC_IO, check_parity, export_metadata, input_size, parity_images, save_program
    from seglab.deploy.pt2e import MIN_AGREEMENT, post_training_int8, quantized_metadata, require_torchao
    from seglab.engine.checkpoint import load_model

    if exported_format(weights) is not None:
        raise SeglabError(f"quantize: --backend pytorch quantises a checkpoint; give the .pt that {weights} came from")
    require_torchao("quantize --backend pytorch")
    model, card, ckpt = load_model(weights, trust=trust)
    resumed = _stopped_qat_run(training[2], trust, log) if training and training[2] is not None else None
    trained_on = resumed[0].data if resumed else (ckpt.get("config") or {}).get("data")
    data = _calibration_data(data or trained_on)
    h, w = input_size(card, img_size)
    if training is None:
        log(f"quantize: calibrating on {calib} train images of {data} (PT2E, x86 Inductor quantiser, {h}x{w})")
        images = list(_calibration(card, data, calib, (h, w), data_cache, check))
        quantized = quantized_metadata(calib=len(images))
        program = post_training_int8(model, torch.from_numpy(images[0]), images, check)
        reference, against = model, "the float model"
    else:
        qat_model, epochs = _train_qat(model, card, ckpt, weights, data, (h, w), *training[:2], resumed, log)
        quantized = quantized_metadata(qat_epochs=epochs)
        log("quantize: converting the trained graph to int8 (convert_pt2e)")
        program = qat_model.int8()
        reference, against = qat_model, "the trained fake-quantised graph"  # the model has learned on since
    meta = export_metadata(
        card, ckpt, weights, "torch-export", input_shape=[1, card.in_channels, h, w], **SEMANTIC_IO, quantized=quantized
    )  # fmt: skip
    with atomic_path(out) as tmp:
        save_program(program, tmp, meta)
        check()
        log(f"quantize: compiling the int8 graph (Inductor) to check it against {against}")
        checked, source = parity_images(card, ckpt, data, 8, (h, w))
        parity = check_parity(reference, card, tmp, checked, batch=1, half=False, source=source)
        log(f"quantize: argmax agreement with {against} on {parity.images} {source}: {100 * parity.agreement:.2f}%")
        if parity.agreement < MIN_AGREEMENT:
            raise SeglabError(
                f"quantize: the int8 graph agrees with {against} on only {100 * parity.agreement:.1f}% of pixels "
                f"(at least {100 * MIN_AGREEMENT:.0f}% expected); nothing was written to {out}. "
                "Try --backend onnxruntime, or more --calib images"
            )
        check()  # the last point to stop at
    return weights, data


def _stopped_qat_run(last: str | Path, trust: bool, log) -> tuple[TrainConfig, dict]:
    """The config (its own settings) and checkpoint of the stopped QAT run that ``last`` continues."""
    from seglab.config import TrainConfig
    from seglab.engine.trainer import resume_config

    cfg, ckpt = resume_config(TrainConfig, {"resume": str(last), "trust_weights": trust}, log=log)
    if not ckpt.get("qat"):
        raise SeglabError(
            f"quantize: --resume {last} is not from a quantisation-aware training run; give the "
            "runs/qat/<name>/weights/last.pt that a stopped seglab quantize --qat left"
        )
    return cfg, ckpt


def _train_qat(
    model, card: ModelCard, ckpt: dict, weights: Path, data, crop, epochs: int, lr: float | None, resumed, log
) -> tuple[QATModel, int]:
    """Quantisation-aware fine-tuning of ``model`` in seglab's trainer, in float32 (fake quantisation
    under bfloat16 autocast would round twice), without weight averaging (the average of fake-quantised
    weights is not what was trained); returns the graph with its best epoch's weights, on the CPU.
    ``resumed``: (config, checkpoint) of a stopped run to continue, from ``_stopped_qat_run``."""
    from seglab.deploy.prune import finetune_config
    from seglab.deploy.pt2e import QATModel
    from seglab.engine.checkpoint import load_checkpoint
    from seglab.engine.runs import next_run_dir
    from seglab.engine.trainer import Trainer
    from seglab.semantic.task import SemanticTask

    if resumed is None:
        trained = ckpt.get("config") or {}
        run_dir = next_run_dir("runs/qat", trained.get("name") or weights.parent.parent.name or "exp", exist_ok=False)
        lr = lr or float(trained.get("lr", 1e-3)) * QAT_LR_SCALE
        cfg = finetune_config(
            ckpt, card, "quantize --qat", data=str(data), epochs=epochs, lr=lr, amp=False, ema=False, swa=False,
            out=str(run_dir.parent), name=run_dir.name, exist_ok=True,
        )  # fmt: skip
        last = None
    else:  # the stopped run's own settings, state and folder
        cfg, last = resumed
        run_dir, epochs, lr = Path(cfg.resume).parent.parent, cfg.epochs, cfg.lr
    log(f"quantize: exporting {weights} for quantisation-aware training at {crop[0]}x{crop[1]} (prepare_qat_pt2e)")
    qat = QATModel(model, crop, source=weights)
    log(f"quantize: quantisation-aware training, {epochs} epoch(s) at lr {lr:g} on {cfg.data}, float32")
    result = Trainer(cfg, SemanticTask, log=log, checkpoint=last, model=qat).fit()
    if result["stopped"] is not None:  # last.pt saved; the trainer has said how to continue
        log("quantize: stopped before the int8 graph; nothing written")
        raise Interrupted(result["stopped"])
    best = load_checkpoint(run_dir / "weights" / "best.pt")
    qat.load_state_dict(best["model"])
    return qat.cpu(), epochs


def _calibration_data(data: str | Path | None) -> str | Path:
    if data is None or not Path(data).exists():
        raise SeglabError(f"quantize: calibration needs the training images; pass --data (got {data})")
    return data


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
