"""``seglab benchmark``: every way seglab runs a model on this machine, measured in one run.

As ``yolo benchmark`` does for Ultralytics: the checkpoint is exported to each format seglab writes,
each export checked against eager PyTorch before it counts (``seglab.deploy.export``); then every
variant is timed in interleaved rounds and scored on the same images (``seglab.deploy.report``).
A format whose export fails, or does not reproduce the model, is a row that says why, and the
others go on. Formats (``--formats``):

    pytorch        the checkpoint, eager float32
    pytorch-amp    the CPU fast path (``seglab predict --amp``): bfloat16 autocast, channels-last,
                   BatchNorm folded, depthwise convolutions tuned (README: CPU fast path)
    onnx           ONNX Runtime, float32
    torchscript    torch.jit
    torch-export   torch.export (.pt2)
    onnx-int8      ONNX Runtime int8 (``seglab quantize``: calibrated on training images)
    pytorch-int8   PyTorch's PT2E int8 through Inductor (``seglab quantize --backend pytorch``; torchao)

The exports are fixed-shape at the size the evaluation images are run at (a fixed graph is the
fastest one here; batch 8 is fed to them one image at a time, as ``seglab predict`` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from seglab.deploy.report import _eval_size, measure
from seglab.deploy.runtime import exported_format, weights_task
from seglab.errors import SeglabError

FORMATS = ("pytorch", "pytorch-amp", "onnx", "torchscript", "torch-export", "onnx-int8", "pytorch-int8")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript", "torch-export": "model.pt2"}


@dataclass
class Row:
    format: str
    file: str | None
    size_mb: float | None
    latency_ms: float | None  # batch 1, median
    throughput: float | None  # images/s at batch 8, median
    miou: float | None  # percent
    parity: str  # what the export's check found, or "reference" / "-"
    error: str | None = None  # why the format has no figures
    fastest: bool = False  # the lowest batch-1 latency of the rows that ran


def benchmark(
    weights: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    limit: int | None = None,
    formats: tuple[str, ...] = FORMATS,
    rounds: int = 10,
    calib: int = 64,
    data_cache: str | Path | None = None,
    trust: bool = False,
    log=print,
) -> list[Row]:
    """Export ``weights`` to each of ``formats`` in ``out``, then time and score them all."""
    weights, out = Path(weights), Path(out)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SeglabError(f"benchmark: --formats {' '.join(unknown)}: choose from {', '.join(FORMATS)}")
    if not weights.is_file():
        raise SeglabError(f"benchmark: weights file not found: {weights}")
    if exported_format(weights):
        raise SeglabError(f"benchmark: {weights} is an export; give the checkpoint (.pt) it was made from")
    task = weights_task(weights, trust=trust)
    if task != "semantic":
        raise SeglabError(
            f"benchmark: {weights} is a --task {task} model; seglab benchmark measures semantic models (mIoU, "
            f"whole-image logits). Time a detector's export with: seglab export --weights {weights} --format onnx, "
            "then seglab val --weights <the .onnx>"
        )
    import seglab

    reference = seglab.load(weights, device="cpu", trust=trust)
    data = data or reference.config.get("data")
    if not data:
        raise SeglabError(f"benchmark: {weights} does not say what it was trained on; pass --data")
    size = _eval_size(reference, data, split, data_cache)
    out.mkdir(parents=True, exist_ok=True)
    log(f"benchmark: {weights} at {size[0]}x{size[1]} in {out}; formats {', '.join(formats)}")

    files: dict[str, str | Path] = {}
    parity: dict[str, str] = {}
    failed: dict[str, str] = {}
    for fmt in formats:
        if fmt in ("pytorch", "pytorch-amp"):
            files[fmt], parity[fmt] = weights, "reference" if fmt == "pytorch" else "-"
        elif fmt in ("onnx-int8", "pytorch-int8"):
            _int8(fmt, weights, out, data, size, calib, data_cache, trust, files, parity, failed, log)
        else:
            from seglab.deploy.export import export

            try:
                done = export(weights, format=fmt, out=out / FILES[fmt], data=data, img_size=size, trust=trust, log=log)
            except SeglabError as e:
                failed[fmt] = str(e)
                log(f"benchmark: {fmt}: {e}")
                continue
            files[fmt], parity[fmt] = done.path, _parity(done.parity)

    measured = {}
    if files:
        rows = measure(
            files, data, split=split, limit=limit, data_cache=data_cache, rounds=rounds, size=size,
            load={"pytorch-amp": {"amp": True}}, trust=trust, log=log,
        )  # fmt: skip
        measured = {r.name: r for r in rows}
    table = []
    for fmt in formats:
        if fmt in failed:
            table.append(Row(fmt, None, None, None, None, None, "-", error=failed[fmt]))
            continue
        m = measured[fmt]
        table.append(Row(fmt, m.path, m.size_mb, m.latency_ms, m.throughput, m.miou, parity[fmt]))
    ran = [r for r in table if r.latency_ms is not None]
    if ran:
        min(ran, key=lambda r: r.latency_ms or 0.0).fastest = True
    return table


def _int8(fmt, weights, out, data, size, calib, data_cache, trust, files, parity, failed, log) -> None:
    """An int8 row: ONNX Runtime's from the float ONNX export (made here if the onnx row was not), or
    PT2E's from the checkpoint, at the evaluation size."""
    from seglab.deploy.export import export
    from seglab.deploy.quantize import quantize

    calibration = {"calib": calib, "data": data, "data_cache": data_cache, "report": False, "log": log}
    try:
        if fmt == "pytorch-int8":
            done = quantize(weights, backend="pytorch", img_size=size, out=out / "model.int8.pt2", trust=trust,
                            **calibration)  # fmt: skip
        else:
            source = files.get("onnx")
            if source is None:  # the onnx row was not asked for: a float export of its own to quantise
                float_export = export(weights, format="onnx", out=out / "model.float.onnx", data=data, img_size=size,
                                      trust=trust, log=log)  # fmt: skip
                source = float_export.path
            done = quantize(source, out=out / "model.int8.onnx", **calibration)
    except SeglabError as e:
        failed[fmt] = str(e)
        log(f"benchmark: {fmt}: {e}")
        return
    files[fmt], parity[fmt] = done.int8_model, f"calibrated on {calib} train images"


def _parity(p) -> str:
    return f"max diff {p.max_abs_diff:.1e}, argmax {100 * p.agreement:.2f}% agree"


def format_table(rows: list[Row], weights: str | Path) -> str:
    """A Markdown table: one row a format, the fastest marked with *."""
    lines = [
        f"seglab benchmark of {weights} (latency: batch 1, median; throughput: batch 8; * the fastest)",
        "",
        "| format | file | size MB | latency b1 ms | throughput b8 img/s | val mIoU | parity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.format} | - | - | - | - | - | failed: {r.error} |")
            continue
        miou = f"{r.miou:.2f}" if r.miou is not None else "-"
        star = " *" if r.fastest else ""
        lines.append(
            f"| {r.format}{star} | {Path(r.file or '').name} | {r.size_mb:.1f} | {r.latency_ms:.1f} | "
            f"{r.throughput:.1f} | {miou} | {r.parity} |"
        )
    return "\n".join(lines) + "\n"


def write_table(rows: list[Row], out: Path, weights: str | Path, json_path: str | Path | None = None) -> Path:
    """benchmark.md and benchmark.json in ``out`` (and the JSON at ``json_path`` too); the Markdown file."""
    payload = json.dumps({"weights": str(weights), "rows": [asdict(r) for r in rows]}, indent=2)
    (out / "benchmark.json").write_text(payload)
    if json_path is not None:
        Path(json_path).write_text(payload)
    path = out / "benchmark.md"
    path.write_text(format_table(rows, weights))
    return path
