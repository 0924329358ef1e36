"""Running exported models: ONNX files with ONNX Runtime, TorchScript and torch.export files with
PyTorch, each behind the ``nn.Module`` interface the rest of seglab calls.

Every seglab export carries its model card (classes, colours, preprocessing) as metadata, so an
exported file is as self-describing as a checkpoint: ``seglab.load("model.onnx")`` gives the same
``SegModel`` as ``seglab.load("best.pt")``, and ``predict``, ``val``, TTA and sliding windows work
unchanged on top of it.

Exported files come from strangers too, so nothing in one is trusted before it is checked:

- the metadata is validated field by field (``card_from_dict``), then against the graph: input
  channels, output classes, a sane fixed size; a warm-up forward pass at load time confirms the
  output shape (so ``serve`` fails at start, not at the first request);
- TorchScript and .pt2 archives are checked without running anything (``seglab.deploy.archive``):
  only what seglab's own exports contain is accepted, and torch is handed a copy of the archive
  rebuilt in memory from the checked members.

A fixed-shape export is letterboxed (``run_fixed``): any image is scaled down to fit if needed,
padded, run, and its logits cropped and resized back, so a file exported at the training crop works
on the model's own images whatever their size.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seglab.deploy.archive import METADATA_KEY, NOT_SEGLAB, verified_archive
from seglab.deploy.pt2e import CompiledInt8, is_pytorch_int8, require_torchao
from seglab.engine.checkpoint import MAX_SIDE, ModelCard, card_from_dict, weights_only_loads
from seglab.errors import SeglabError, first_line, short

SUFFIXES = {".onnx": "onnx", ".torchscript": "torchscript", ".pt2": "torch-export"}
# A fixed input larger than this is no image size seglab exports (and its warm-up pass alone would
# take gigabytes); a fixed batch larger than MAX_BATCH neither.
MAX_FIXED_PIXELS = 4096 * 4096
MAX_BATCH = 256
DYNAMIC_CHECK_SIZE = 64  # the warm-up image of a dynamic-size export: two strides of 32 per side
DETECTOR_INPUT = [3, "height", "width"]  # a detector export's input: one RGB image, float 0..1
DETECTOR_FORMATS = ("onnx", "torchscript")


def exported_format(path: str | Path) -> str | None:
    """'onnx', 'torchscript' or 'torch-export' for an exported file's name, None for a checkpoint."""
    return SUFFIXES.get(Path(path).suffix.lower())


def card_metadata(card: ModelCard, **extra: Any) -> str:
    """The JSON an export carries: the model card, plus how the file was made."""
    card_dict = {f.name: getattr(card, f.name) for f in fields(card)}
    return json.dumps({"format_version": 1, "card": card_dict, **extra})


# --------------------------------------------------------------------------------------------- metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The validated metadata of a seglab export, read without running anything in the file."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"model file not found: {path}")
    fmt = exported_format(path)
    try:
        if fmt == "onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            text = props.get(METADATA_KEY)
        else:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}.json")), None)
                info = archive.getinfo(name) if name else None
                if info is not None and info.file_size > 2**20:
                    raise SeglabError(f"{path}: its {METADATA_KEY}.json is {info.file_size} bytes; {NOT_SEGLAB}")
                text = archive.read(name).decode() if name else None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise SeglabError(f"cannot read {path}: not a valid {fmt} file ({first_line(e, 80)})") from None
    except SeglabError:
        raise
    except Exception as e:  # onnx raises its own DecodeError for a damaged protobuf
        raise SeglabError(f"cannot read {path}: not a valid {fmt} file ({type(e).__name__})") from None
    return parse_metadata(text, path, fmt)[0]


def parse_metadata(text: str | None, path: Path, fmt: str | None) -> tuple[dict[str, Any], ModelCard]:
    """(the metadata, its model card), every field checked; any way it is wrong is one SeglabError."""
    if not text:
        raise SeglabError(f"{path} carries no seglab metadata (classes, preprocessing); export it with seglab export")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        detail = first_line(e, 60) if isinstance(e, ValueError) else "nested too deeply"
        raise SeglabError(f"{path}: its seglab metadata is not valid JSON ({detail}); {NOT_SEGLAB}") from None
    if not isinstance(meta, dict):
        raise SeglabError(f"{path}: its seglab metadata is a {type(meta).__name__}, not a mapping; {NOT_SEGLAB}")
    card = card_from_dict(meta.get("card"), path)

    def bad(key: str, expected: str) -> SeglabError:
        return SeglabError(f"{path}: its seglab metadata says {key}={short(meta.get(key))}: expected {expected}")

    if meta.get("format") != fmt:
        raise bad("format", f"{fmt!r} for a {path.suffix} file")
    for key in ("dynamic", "dynamic_batch", "half"):
        if not isinstance(meta.setdefault(key, False), bool):
            raise bad(key, "true or false")
    shape = meta.get("input_shape")
    if card.task != "semantic":  # a detector takes one float RGB image of any size (it resizes inside)
        if fmt not in DETECTOR_FORMATS:
            raise bad("format", f"onnx or torchscript for a {card.arch}")
        if meta["half"]:
            raise bad("half", f"false for a {card.arch} (detectors export in float32)")
        if shape != DETECTOR_INPUT or card.in_channels != 3:
            detector = f"{DETECTOR_INPUT} for a {card.arch} (task={card.task}, in_channels=3)"
            raise bad("input_shape", f"{detector}; [batch, C, height, width] is a semantic model's")
    elif not (
        isinstance(shape, list)
        and len(shape) == 4
        and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 1) for d in shape)
        and shape[1] == card.in_channels
    ):
        raise bad("input_shape", f"[batch, {card.in_channels}, height, width] (in_channels={card.in_channels})")
    else:
        check_fixed_shape(shape, path)
    # val_fraction, seed: a detector's training hold-out (of a dataset without a val split)
    kinds = {"metrics": dict, "data": str, "exported_from": str, "quantized": dict, "val_fraction": float, "seed": int}
    for key, kind in kinds.items():
        if meta.get(key) is not None and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise bad(key, f"a {kind.__name__} or nothing")
    return meta, card


def weights_task(path: str | Path, *, trust: bool = False) -> str:
    """The task (semantic, instance, detect, generate) that a checkpoint's or an export's model card
    names, read without building or running anything (an export's card checked, a checkpoint's
    left to ``load_model``)."""
    from seglab.engine.checkpoint import load_checkpoint

    if exported_format(path):
        return read_metadata(path)["card"]["task"]
    card = load_checkpoint(path, trust=trust).get("card")
    task = card.get("task", "semantic") if isinstance(card, dict) else "semantic"
    return task if isinstance(task, str) else "semantic"


def check_fixed_shape(shape: Sequence[Any], path: Path) -> None:
    """A fixed batch and image size that seglab could have exported (and that fit in memory)."""
    batch, _, h, w = shape
    if isinstance(batch, int) and not 1 <= batch <= MAX_BATCH:
        raise SeglabError(f"{path} takes a fixed batch of {batch} images; a seglab export takes 1 to {MAX_BATCH}")
    fixed = [d for d in (h, w) if isinstance(d, int)]
    if any(not 1 <= d <= MAX_SIDE for d in fixed) or (len(fixed) == 2 and fixed[0] * fixed[1] > MAX_FIXED_PIXELS):
        raise SeglabError(
            f"{path} takes {h}x{w} images, not a size seglab exports (at most {MAX_FIXED_PIXELS} pixels); {NOT_SEGLAB}"
        )


def load_exported(path: str | Path, device: torch.device) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """(a module mapping normalised images of any size to logits, its card, the file's metadata),
    after the checks in this module's docstring."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"model file not found: {path}")
    module: nn.Module
    fmt = exported_format(path)
    if fmt is None:
        raise SeglabError(f"{path} is not an export (.onnx, .torchscript or .pt2)")
    if fmt == "onnx":  # the session has parsed the file: take the metadata from it
        session = ort_session(path, device)
        meta, card = parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path, fmt)
        _require_semantic_export(card, path)
        module = OrtModule(path, session, card, meta)
    else:
        archive, text, graph_shape = verified_archive(path, fmt)
        meta, card = parse_metadata(text, path, fmt)
        _require_semantic_export(card, path)
        if graph_shape is not None and graph_shape != meta["input_shape"]:
            declared = meta["input_shape"]
            raise SeglabError(f"{path}: its metadata says input_shape={declared}, the graph takes {graph_shape}")
        int8 = is_pytorch_int8(meta)
        module = _TorchExport(load_pytorch_export(archive, path, fmt, device, int8=int8), meta["half"], graph_shape)
    _check_outputs(module, card, meta["input_shape"], path)
    return module, card, meta


def _require_semantic_export(card: ModelCard, path: Path) -> None:
    if card.task != "semantic":
        raise SeglabError(
            f"{path} is an exported {card.arch} (--task {card.task}), not a semantic model; "
            "seglab val / predict run it, and from Python seglab.instance.runtime.ExportedDetector"
        )


def _check_outputs(module: nn.Module, card: ModelCard, shape: list, path: Path) -> None:
    """One forward pass of a blank image at the file's own input size: the graph runs and gives
    [batch, num_classes, H, W]. This is what catches a card that disagrees with a graph whose output
    shape is dynamic or not declared (TorchScript declares none), and it pays ONNX Runtime's
    first-run planning at load time instead of in the first request."""
    batch, _, h, w = (d if isinstance(d, int) else None for d in shape)
    size = (h or DYNAMIC_CHECK_SIZE, w or DYNAMIC_CHECK_SIZE)
    x = torch.zeros(batch or 1, card.in_channels, *size)
    try:
        with torch.inference_mode():
            logits = module(x)
    except SeglabError:
        raise
    except Exception as e:
        first = first_line(e, 150)
        raise SeglabError(f"{path} does not run on a {size[0]}x{size[1]} image ({first}); {NOT_SEGLAB}") from None
    expected = (batch or 1, card.num_classes, *size)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SeglabError(
            f"{path} gives logits of shape {got} for a {size[0]}x{size[1]} image, not {expected}: "
            f"its model card (num_classes={card.num_classes}) does not describe the graph"
        )


def load_pytorch_export(
    archive: io.BytesIO, path: Path, fmt: str, device: torch.device, *, int8: bool = False
) -> nn.Module:
    """torch's own loaders, on the verified copy of the archive; ``int8``: a PT2E graph, which runs
    compiled (``seglab.deploy.pt2e``)."""
    if int8:
        require_torchao(f"{path} is a PyTorch int8 model (seglab quantize --backend pytorch); running it")
        if device.type != "cpu":
            raise SeglabError(f"{path} is a PyTorch int8 model for x86 CPUs; run it with --device cpu")
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation notice, on every load
            warnings.simplefilter("ignore", FutureWarning)
            if fmt == "torchscript":
                return torch.jit.load(archive, map_location=device)
            with weights_only_loads():  # the archive was checked to hold no pickles; this makes sure
                module = torch.export.load(archive).module().to(device)
            return CompiledInt8(module) if int8 else module
    except Exception as e:  # a checked archive torch still cannot read: another torch version, damage
        first = first_line(e, 150)
        raise SeglabError(f"cannot load {path} with torch {torch.__version__} ({first}); re-export it") from None


# --------------------------------------------------------------------------------------------- running


def run_fixed(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shape: Sequence[Any]) -> torch.Tensor:
    """Run a graph whose input shape is fixed (ints in ``shape``; names where dynamic) on images of
    any batch size and any size: [B,C,h,w] normalised -> logits [B,K,h,w].

    The batch goes in chunks of the fixed batch size (the last one padded). An image is letterboxed
    as Ultralytics does: scaled down to fit if it is larger (aspect kept), padded at the bottom and
    right with 0 (after normalisation, the mean colour, and exactly what seglab's models pad with
    inside, so an image within the same multiple of 32 gives the eager model's logits), run; the
    logits are cropped to the image and resized to its size."""
    batch, _, fixed_h, fixed_w = shape
    n, _, h, w = x.shape
    fixed_h, fixed_w = (fixed_h if isinstance(fixed_h, int) else h), (fixed_w if isinstance(fixed_w, int) else w)
    scale = min(1.0, fixed_h / h, fixed_w / w)
    fit_h, fit_w = min(fixed_h, max(1, round(h * scale))), min(fixed_w, max(1, round(w * scale)))
    if (fit_h, fit_w) != (h, w):
        x = F.interpolate(x, size=(fit_h, fit_w), mode="bilinear", align_corners=False, antialias=True)
    if (fit_h, fit_w) != (fixed_h, fixed_w):
        x = F.pad(x, (0, fixed_w - fit_w, 0, fixed_h - fit_h))
    step = batch if isinstance(batch, int) else n
    outputs = []
    for i in range(0, n, step):
        chunk = x[i : i + step]
        if len(chunk) < step:
            chunk = torch.cat([chunk, chunk.new_zeros(step - len(chunk), *chunk.shape[1:])])
        outputs.append(run(chunk)[: n - i])
    logits = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if (fit_h, fit_w) != (fixed_h, fixed_w):
        logits = logits[..., :fit_h, :fit_w]
    if (fit_h, fit_w) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits


class _TorchExport(nn.Module):
    """A TorchScript or torch.export module: fed float16 if it was exported in float16 (float32
    comes back, as from the checkpoint), and letterboxed when its shape is fixed (.pt2 files:
    torch.export specialises every size; a traced TorchScript computes its padding from the input
    shape, so it runs at any size, whatever the export's --dynamic said)."""

    def __init__(self, module: nn.Module, half: bool, fixed_shape: list | None) -> None:
        super().__init__()
        self.module, self.float16, self.fixed_shape = module, half, fixed_shape

    def train(self, mode: bool = True) -> _TorchExport:
        """An exported graph is frozen in eval mode (torch.export's module refuses train())."""
        self.training = mode
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half() if self.float16 else x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_shape is None:
            return self._run(x)
        return run_fixed(self._run, x, self.fixed_shape)


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: str | Path, device: torch.device | None = None, threads: int | None = None):
    """An ONNX Runtime session with every graph optimisation and one intra-op thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.log_severity_level = 4  # fatal only: its warnings are noise, and its errors become one seglab line
    # No spin-waiting after a run: spinning threads took the cores from the torch work around each run
    # (and from a second session): in one report, ORT int8 went 56 -> 37 ms, PT2E int8 94 -> 61 ms.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=ort_providers(device or torch.device("cpu")))
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented)
        first = first_line(e)
        raise SeglabError(f"ONNX Runtime cannot run {path}: {first}") from None


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module: float32 [B,C,H,W] in, float32 logits [B,K,H,W] out, for
    any batch and image size (``run_fixed`` where the file's shape is fixed).

    The graph is checked against the card first: one float image input of card.in_channels
    channels, a fixed size that seglab could have exported, the metadata's input_shape, and where
    the graph declares it, card.num_classes output channels."""

    def __init__(self, path: Path, session: Any, card: ModelCard, meta: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.session = path, session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise SeglabError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs, not one image and logits")
        (inp,) = inputs
        # ints where fixed; names (or None) where dynamic
        shape = [d if isinstance(d, int) and d > 0 else str(d) for d in inp.shape] if inp.shape is not None else []
        if inp.type not in ("tensor(float)", "tensor(float16)") or len(shape) != 4:
            raise SeglabError(f"{path} takes {inp.type} of shape {inp.shape}, not float images [batch, C, H, W]")
        if shape[1] != card.in_channels:
            says = f"its model card says in_channels={card.in_channels}"
            raise SeglabError(f"{path} takes {shape[1]}-channel images; {says}")
        check_fixed_shape(shape, path)
        declared = meta["input_shape"]
        if [isinstance(d, int) and d for d in declared] != [isinstance(d, int) and d for d in shape]:
            raise SeglabError(f"{path}: its metadata says input_shape={declared}, the graph takes {inp.shape}")
        self.input_name, self.input_shape = inp.name, shape
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if meta["half"] != (self.input_dtype == np.float16):
            raise SeglabError(f"{path}: its metadata says half={meta['half']}, the graph takes {inp.type}")
        out_shape = outputs[0].shape or []
        if len(out_shape) == 4 and isinstance(out_shape[1], int) and out_shape[1] != card.num_classes:
            raise SeglabError(
                f"{path} gives {out_shape[1]} classes; its model card says num_classes={card.num_classes} "
                "(the card does not describe the graph)"
            )
        self.channels = card.in_channels

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy().astype(self.input_dtype, copy=False)
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(np.asarray(out).astype(np.float32, copy=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            given = tuple(x.shape)
            raise SeglabError(f"{self.path} takes {self.channels}-channel images [B, C, H, W], was given {given}")
        return run_fixed(self._run, x, self.input_shape).to(x.device)
