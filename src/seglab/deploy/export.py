"""``seglab export``: a checkpoint to ONNX, TorchScript or torch.export, checked against PyTorch.

The exported graph takes normalised float images [B, C, H, W] and returns logits [B, K, H, W];
its metadata says how to normalise (mean, std, long side ``img_size``) and what the classes and
colours are. Every export is written to a temporary file, run on real images next to the eager
model, and only renamed into place when the two agree: an export that silently breaks never
reaches ``--out``.

Formats:
    onnx          torch.onnx's TorchScript-based exporter (seconds, and what ONNX Runtime is
                  tested against most); ``--dynamic`` makes batch, height and width symbolic.
    torchscript   torch.jit.trace; ``--dynamic`` works too (the models pad with traced arithmetic).
    torch-export  torch.export, saved as .pt2; fixed shapes only (see ``export`` below).

SIGINT and SIGTERM are deferred while exporting (``engine.stopping.DeferredSignals``): torch.onnx
and onnx spend their time in C++, where a KeyboardInterrupt raised mid-call ended in tracebacks and
once in a segfault. The signal is recorded, the current step finishes, the temporary file is removed
and ``Interrupted`` is raised (the CLI: one line, exit 130 or 143). Temporary files are seglab.files',
so the next export of the same file removes those of a process that was killed outright.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from seglab.data.spec import Sample
from seglab.deploy.runtime import METADATA_KEY, card_metadata, load_exported
from seglab.engine.checkpoint import ModelCard, load_model
from seglab.engine.inference import normalize
from seglab.engine.stopping import DeferredSignals
from seglab.errors import SeglabError
from seglab.files import atomic_path

if TYPE_CHECKING:
    from seglab.instance.export import DetectorParity

SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript", "torch-export": ".pt2"}
# Float32 exports must match eager PyTorch to rounding; float16 ones to float16's precision.
TOLERANCE = {"float32": (1e-3, 0.999), "float16": (0.25, 0.99)}  # max |logit difference|, argmax agreement
SEMANTIC_IO = {  # what a semantic export's metadata says about its input and output
    "input": "float32 NCHW, RGB: (pixel / 255 - mean) / std, after resizing the long side to img_size",
    "output": "float32 logits [batch, num_classes, height, width]; argmax over dim 1 gives class indices",
}


@dataclass
class Parity:
    """How an export's outputs compare with eager PyTorch on the same inputs."""

    images: int
    source: str  # where the images came from
    max_abs_diff: float
    mean_abs_diff: float
    agreement: float  # fraction of pixels whose argmax class is the same
    passed: bool

    def format(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"parity on {self.images} {self.source}: max |logit diff| {self.max_abs_diff:.2e}, "
            f"mean {self.mean_abs_diff:.2e}, argmax agreement {100 * self.agreement:.3f}% ({verdict})"
        )


@dataclass
class ExportResult:
    path: Path
    format: str
    seconds: float
    size_mb: float
    parity: Parity | DetectorParity


def export(
    weights: str | Path,
    *,
    format: str,
    out: str | Path | None = None,
    dynamic: bool = False,
    dynamic_batch: bool = False,
    half: bool = False,
    img_size: Sequence[int] | None = None,
    batch: int = 1,
    opset: int = 18,
    data: str | Path | None = None,
    check_images: int = 8,
    trust: bool = False,
    log=print,
) -> ExportResult:
    """Export ``weights`` and check it; returns where it went and how well it matched.

    ``dynamic``: any batch size and image size; ``dynamic_batch``: any batch size at a fixed image
    size, which lets the exporter fold the padding arithmetic away (a faster graph, and the one
    int8 quantisation prefers). ``trust``: also read a checkpoint that needs pickled objects
    (``--trust-weights``; only for files the user made)."""
    if format not in SUFFIX:
        raise SeglabError(f"export: --format {format!r} is not one of {', '.join(SUFFIX)}")
    if format == "torch-export" and (dynamic or dynamic_batch):
        raise SeglabError(
            "export: torch.export with symbolic shapes takes minutes on these models and still fixes the size; "
            "use --format onnx or torchscript for --dynamic / --dynamic-batch"
        )
    if batch < 1 or check_images < 1:
        raise SeglabError("export: --batch and --check-images need to be 1 or more")
    if img_size is not None and (len(img_size) not in (1, 2) or min(img_size) < 1):
        raise SeglabError(f"export: --img-size {' '.join(map(str, img_size))}: give H W (or one size for both)")
    out = Path(out) if out else Path(weights).with_suffix(SUFFIX[format])
    if out.suffix != SUFFIX[format]:
        raise SeglabError(f"export: --out {out}: a {format} file should end in {SUFFIX[format]}")
    with DeferredSignals() as signals:
        model, card, ckpt = load_model(weights, trust=trust)
        if card.task == "semantic":
            steps = _semantic_steps(
                model, card, ckpt, weights, format, opset, data, check_images,
                dynamic=dynamic, dynamic_batch=dynamic_batch, half=half, img_size=img_size, batch=batch,
            )  # fmt: skip
        else:
            from seglab.instance.export import detector_steps

            flags = {"--dynamic-batch": dynamic_batch, "--half": half, "--img-size": img_size, "--batch": batch != 1}
            given = [flag for flag, value in flags.items() if value]
            if given:
                raise SeglabError(
                    f"export: {', '.join(given)} apply to semantic models; a {card.arch} export takes one image "
                    "of any size (it resizes to img_size inside), in float32"
                )
            steps = detector_steps(model, card, ckpt, weights, format, opset, data, check_images)
        signals.check()
        start = time.perf_counter()
        with atomic_path(out) as tmp:
            steps.write(tmp)
            seconds = time.perf_counter() - start
            signals.check()
            parity = steps.check(tmp)
            log(f"export: {parity.format()}")
            if not parity.passed:
                raise SeglabError(
                    f"export: the {format} file does not reproduce the model ({parity.format()}); "
                    f"nothing was written to {out}. Try another --format or --opset, or without --half"
                )
            signals.check()  # the last point to stop at; from here on the export completes
        size_mb = out.stat().st_size / 2**20
        log(f"export: wrote {out} ({size_mb:.1f} MB, {format}, {seconds:.1f} s)")
        (out.parent / f"{out.name}.parity.json").write_text(json.dumps(asdict(parity), indent=2))
    return ExportResult(out, format, seconds, size_mb, parity)


@dataclass
class ExportSteps:
    """What differs between exporting a semantic model and a detector: writing the file, checking it."""

    write: Callable[[Path], None]
    check: Callable[[Path], Parity | DetectorParity]


def _semantic_steps(
    model: nn.Module,
    card: ModelCard,
    ckpt: dict,
    weights: str | Path,
    format: str,
    opset: int,
    data: str | Path | None,
    check_images: int,
    *,
    dynamic: bool,
    dynamic_batch: bool,
    half: bool,
    img_size: Sequence[int] | None,
    batch: int,
) -> ExportSteps:
    h, w = input_size(card, img_size)
    images, source = parity_images(card, ckpt, data, check_images, (h, w))
    example = normalize(images[:batch], card.mean, card.std)
    if len(example) < batch:
        example = example.repeat(-(-batch // len(example)), 1, 1, 1)[:batch]
    meta = export_metadata(
        card,
        ckpt,
        weights,
        format,
        dynamic=dynamic,
        dynamic_batch=dynamic_batch,
        half=half,
        input_shape=[
            "batch" if dynamic or dynamic_batch else batch,
            card.in_channels,
            "height" if dynamic else h,
            "width" if dynamic else w,
        ],
        **SEMANTIC_IO,
    )
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"} if dynamic_batch else {}

    def write(tmp: Path) -> None:
        model_in, example_in = (model.half(), example.half()) if half else (model, example)
        EXPORTERS[format](model_in, example_in, tmp, meta, axes, opset)

    def check(tmp: Path) -> Parity:
        model.float()
        return check_parity(model, card, tmp, images, batch=None if axes else batch, half=half, source=source)

    return ExportSteps(write, check)


def export_metadata(card: ModelCard, ckpt: dict, weights: str | Path, format: str, **extra: Any) -> str:
    """The metadata every export carries: the model card, the file it came from, the metrics and
    data it was trained on, and ``extra`` (its input and output)."""
    return card_metadata(
        card,
        exported_from=str(Path(weights).name),
        format=format,
        metrics=ckpt.get("metrics"),
        data=(ckpt.get("config") or {}).get("data"),
        torch_version=torch.__version__,
        **extra,
    )


def input_size(card: ModelCard, img_size: Sequence[int] | None) -> tuple[int, int]:
    """The export's input H, W: --img-size, else the training crop, else a square img_size."""
    if img_size:
        return (img_size[0], img_size[-1])
    if card.crop_size:
        return (card.crop_size[0], card.crop_size[1])
    return (card.img_size, card.img_size)


def parity_samples(card: ModelCard, ckpt: dict, data: str | Path | None, count: int) -> tuple[list[Sample] | None, str]:
    """(up to ``count`` samples of the val split of --data, or of the data the model was trained on,
    or of its train split; None when there is no such data), and what to call them in the report."""
    from seglab.data import get_split, resolve_dataset

    data = data or (ckpt.get("config") or {}).get("data")
    if data is None or not Path(data).exists():
        return None, "random images (pass --data for real ones)"
    spec = resolve_dataset(data, progress=False, task=card.task)
    return get_split(spec, "val")[:count] or get_split(spec, "train")[:count], f"{Path(data).name} images"


def parity_images(
    card: ModelCard, ckpt: dict, data: str | Path | None, count: int, size: tuple[int, int]
) -> tuple[torch.Tensor, str]:
    """``count`` uint8 images [N,C,H,W] at ``size``: real ones (``parity_samples``), else random
    images, which still compare the two graphs but say less."""
    import torch.nn.functional as F

    from seglab.data import read_image

    samples, source = parity_samples(card, ckpt, data, count)
    if samples is None:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (count, card.in_channels, *size), generator=generator, dtype=torch.uint8)
        return noise, source
    tensors = []
    for sample in samples:
        image = torch.from_numpy(read_image(sample.image, card.in_channels).copy()).permute(2, 0, 1)[None].float()
        tensors.append(F.interpolate(image, size=size, mode="bilinear", antialias=True).round().clamp(0, 255))
    return torch.cat(tensors).to(torch.uint8), source


def check_parity(
    model: nn.Module,
    card: ModelCard,
    exported: Path,
    images: torch.Tensor,
    *,
    batch: int | None,
    half: bool,
    source: str,
) -> Parity:
    """Eager float32 PyTorch against the exported file, image batch by image batch."""
    reference, _, _ = load_exported(exported, torch.device("cpu"))
    step = batch or len(images)
    diffs, means, agree, total = [], [], 0, 0
    with torch.inference_mode():
        for i in range(0, len(images), step):
            x = normalize(images[i : i + step], card.mean, card.std)
            expected, got = model(x), reference(x)
            delta = (expected - got).abs()
            diffs.append(delta.max().item())
            means.append(delta.mean().item())
            agree += (expected.argmax(1) == got.argmax(1)).sum().item()
            total += expected.argmax(1).numel()
    max_diff, agreement = max(diffs), agree / total
    limit_diff, limit_agree = TOLERANCE["float16" if half else "float32"]
    passed = bool(np.isfinite(max_diff)) and max_diff <= limit_diff and agreement >= limit_agree
    return Parity(len(images), source, max_diff, float(np.mean(means)), agreement, passed)


# --------------------------------------------------------------------------------------------- exporters


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: str, axes: dict, opset: int) -> None:
    doc = "seglab segmentation model; metadata 'seglab' holds classes, colours and preprocessing"
    names = (["images"], ["logits"])
    onnx_export(model, example, path, meta, opset=opset, names=names, axes={"images": axes, "logits": axes}, doc=doc)


def onnx_export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    meta: str,
    *,
    opset: int,
    names: tuple[list[str], list[str]],
    axes: dict[str, dict[int, str]],
    doc: str,
) -> None:
    """torch.onnx's TorchScript-based exporter (inputs and outputs named by ``names``, dynamic where
    ``axes`` says), then the model card into ``metadata_props``, and onnx's checker."""
    import onnx

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=names[0],
            output_names=names[1],
            dynamic_axes={name: dims for name, dims in axes.items() if dims} or None,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    proto.doc_string = doc
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: str, axes: dict, _: int) -> None:
    torchscript_export(model, example, path, meta)


def torchscript_export(model: nn.Module, example: torch.Tensor, path: Path, meta: str) -> None:
    """torch.jit.trace, the model card as ``seglab.json`` in the archive."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes: the traced paths handle any size
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": meta})


def _export_program(model: nn.Module, example: torch.Tensor, path: Path, meta: str, axes: dict, _: int) -> None:
    save_program(torch.export.export(model, (example,)), path, meta)


def save_program(program: torch.export.ExportedProgram, path: Path, meta: str) -> None:
    """A torch.export program as a .pt2 file, the model card as ``seglab.json`` in the archive."""
    torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": meta})


EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript, "torch-export": _export_program}
