"""Size, speed and accuracy of model variants, measured in one run so that they compare.

``quantize`` and ``prune`` end with this report: the float model first, then what was made
from it. Speed is timed on this machine, rounds interleaved (float, variant, float, variant,
...) so that a busy moment on a shared machine slows every model alike, and reported as medians.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from seglab.errors import SeglabError


@dataclass
class Measurement:
    name: str
    path: str
    backend: str  # onnxruntime, pytorch (eager float32), torchscript, torch-export
    size_mb: float
    gflops: float | None  # per image at the measured input size (PyTorch models only)
    input_size: tuple[int, int]
    latency_ms: float  # batch 1, median
    throughput: float  # images/s at batch 8, median
    miou: float | None  # percent, on the split evaluated


def measure(
    models: Mapping[str, str | Path],
    data: str | Path | None,
    *,
    split: str = "val",
    limit: int | None = None,
    data_cache: str | Path | None = None,
    rounds: int = 10,
    throughput_batch: int = 8,
    size: tuple[int, int] | None = None,
    load: dict[str, dict] | None = None,
    trust: bool = False,
    log=print,
) -> list[Measurement]:
    """Measure each model (checkpoint or export) at the size ``data``'s images are evaluated at
    (or ``size``); ``load`` gives a model's own ``seglab.load`` keywords (``{"amp": True}``)."""
    import seglab
    from seglab.deploy.runtime import exported_format

    loaded = {
        name: seglab.load(path, device="cpu", trust=trust, **(load or {}).get(name, {}))
        for name, path in models.items()
    }
    first = next(iter(loaded.values()))
    size = size or _eval_size(first, data, split, data_cache)
    timings: dict[str, dict[int, list[float]]] = {name: {1: [], throughput_batch: []} for name in loaded}
    inputs = {b: torch.randn(b, first.card.in_channels, *size) for b in (1, throughput_batch)}
    log(f"report: timing {', '.join(loaded)} at {size[0]}x{size[1]}, batch 1 and {throughput_batch}, {rounds} rounds")
    with torch.inference_mode():
        for batch, x in inputs.items():
            for model in loaded.values():  # warm-up: allocators, ORT's first-run planning
                _forward(model, x)
            for _ in range(rounds):
                for name, model in loaded.items():
                    start = time.perf_counter()
                    _forward(model, x)
                    timings[name][batch].append(time.perf_counter() - start)
    rows = []
    for name, model in loaded.items():
        path = Path(models[name])
        miou = None
        if data is not None:
            log(f"report: evaluating {name} on {split}")
            result = model.evaluate(data, split=split, limit=limit, data_cache=data_cache, progress=False)
            miou = 100 * result.metrics["miou"]
        rows.append(
            Measurement(
                name=name,
                path=str(path),
                backend=exported_format(path) or "pytorch",
                size_mb=path.stat().st_size / 2**20,
                gflops=None if exported_format(path) else _gflops(model.model, (1, model.card.in_channels, *size)),
                input_size=size,
                latency_ms=1000 * statistics.median(timings[name][1]),
                throughput=throughput_batch / statistics.median(timings[name][throughput_batch]),
                miou=miou,
            )
        )
    return rows


def _forward(model, x: torch.Tensor) -> torch.Tensor:
    """The network alone on normalised ``x``, in the precision ``model`` predicts in (autocast with --amp)."""
    from seglab.engine.inference import autocast

    with autocast(torch.device("cpu"), bool(getattr(model, "amp", False))):
        return model.model(x.contiguous(memory_format=torch.channels_last))


def _eval_size(model, data, split: str, data_cache) -> tuple[int, int]:
    """The H, W that ``data``'s first image of ``split`` is evaluated at (the model's crop without data)."""
    from seglab.data import EvalTransform, get_split, read_image, resolve_dataset

    if data is None:
        crop = model.card.crop_size or [model.card.img_size] * 2
        return (crop[0], crop[1])
    spec = resolve_dataset(data, cache_dir=data_cache, progress=False)
    samples = get_split(spec, split)
    if not samples:
        raise SeglabError(f"report: {data} has no {split} images to measure on")
    image = torch.from_numpy(read_image(samples[0].image, model.card.in_channels).copy()).permute(2, 0, 1)
    h, w = EvalTransform(model.card.img_size).resize_image(image).shape[-2:]
    return (h, w)


def _gflops(model: torch.nn.Module, shape: tuple[int, ...]) -> float | None:
    """Multiply-adds x 2 per image, counted by torch-pruning (which counts grouped convolutions right)."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    macs, _ = tp.utils.count_ops_and_params(model, torch.randn(shape))
    return 2 * macs / 1e9


def format_report(rows: list[Measurement], title: str) -> str:
    """A Markdown table, each variant with its ratios against the first row."""
    base = rows[0]
    lines = [
        f"# {title}",
        "",
        f"Input {base.input_size[0]}x{base.input_size[1]}; latency at batch 1 and throughput at batch 8 are medians "
        "of interleaved rounds in one run on this machine; ratios are against the first row.",
        "",
        "| model | backend | size MB | GFLOPs | latency b1 ms | throughput b8 img/s | mIoU "
        "| size | speed b1 | speed b8 | mIoU change |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gflops = f"{r.gflops:.2f}" if r.gflops is not None else "-"
        miou = f"{r.miou:.2f}" if r.miou is not None else "-"
        delta = f"{r.miou - base.miou:+.2f}" if r.miou is not None and base.miou is not None else "-"
        lines.append(
            f"| {r.name} | {r.backend} | {r.size_mb:.1f} | {gflops} | {r.latency_ms:.1f} | {r.throughput:.1f} | {miou} "
            f"| {r.size_mb / base.size_mb:.2f}x | {base.latency_ms / r.latency_ms:.2f}x "
            f"| {r.throughput / base.throughput:.2f}x | {delta} |"
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[Measurement], out_dir: str | Path, title: str) -> Path:
    """report.md and report.json in ``out_dir``; returns the Markdown file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"title": title, "rows": [asdict(r) for r in rows]}, indent=2))
    path = out / "report.md"
    path.write_text(format_report(rows, title))
    return path
