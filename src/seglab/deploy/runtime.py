"""Running exported models: ONNX files with ONNX Runtime, TorchScript and torch.export files with
PyTorch, each behind the ``nn.Module`` interface the rest of seglab calls.

Every seglab export carries its model card (classes, colours, preprocessing) as metadata, so an
exported file is as self-describing as a checkpoint: ``seglab.load("model.onnx")`` gives the same
``SegModel`` as ``seglab.load("best.pt")``, and ``predict``, ``val``, TTA and sliding windows work
unchanged on top of it.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seglab.engine.checkpoint import ModelCard
from seglab.errors import SeglabError

METADATA_KEY = "seglab"  # ONNX metadata_props key; "seglab.json" inside TorchScript / torch.export archives
SUFFIXES = {".onnx": "onnx", ".torchscript": "torchscript", ".pt2": "torch-export"}


def exported_format(path: str | Path) -> str | None:
    """'onnx', 'torchscript' or 'torch-export' for an exported file's name, None for a checkpoint."""
    return SUFFIXES.get(Path(path).suffix.lower())


def card_metadata(card: ModelCard, **extra: Any) -> str:
    """The JSON an export carries: the model card, plus how the file was made."""
    card_dict = {f.name: getattr(card, f.name) for f in fields(card)}
    return json.dumps({"format_version": 1, "card": card_dict, **extra})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a seglab export; a file without it is named in one SeglabError."""
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
                name = next((n for n in archive.namelist() if n.endswith(f"/{METADATA_KEY}.json")), None)
                text = archive.read(name).decode() if name else None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise SeglabError(f"cannot read {path}: not a valid {fmt} file ({str(e).splitlines()[0][:80]})") from None
    except Exception as e:  # onnx raises its own DecodeError for a damaged protobuf
        raise SeglabError(f"cannot read {path}: not a valid {fmt} file ({type(e).__name__})") from None
    return _parse_metadata(text, path)


def _parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    if not text:
        raise SeglabError(f"{path} carries no seglab metadata (classes, preprocessing); export it with seglab export")
    return json.loads(text)


def load_exported(path: str | Path, device: torch.device) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """(a module mapping normalised images to logits, its card, the file's metadata)."""
    path = Path(path)
    module: nn.Module
    if exported_format(path) == "onnx":  # the session has parsed the file: take the metadata from it
        if not path.is_file():
            raise SeglabError(f"model file not found: {path}")
        module = OrtModule(path, device)
        meta = _parse_metadata(module.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
    else:
        meta = read_metadata(path)
        module = _load_pytorch_export(path, device, meta.get("half", False))
    card = ModelCard(**meta["card"])
    card.colors = [tuple(c) for c in card.colors]  # type: ignore[misc]
    return module, card, meta


def _load_pytorch_export(path: Path, device: torch.device, half: bool) -> nn.Module:
    if exported_format(path) == "torchscript":
        with warnings.catch_warnings():  # TorchScript's deprecation notice, on every load
            warnings.simplefilter("ignore", FutureWarning)
            return _HalfIO(torch.jit.load(str(path), map_location=device), half)
    return _HalfIO(torch.export.load(str(path)).module(), half).to(device)


class _HalfIO(nn.Module):
    """Feeds a float16 export float16 and hands back float32, as the checkpoint would."""

    def __init__(self, module: nn.Module, half: bool) -> None:
        super().__init__()
        self.module, self.float16 = module, half

    def train(self, mode: bool = True) -> _HalfIO:
        """An exported graph is frozen in eval mode (torch.export's module refuses train())."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half() if self.float16 else x).float()


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
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    try:
        return ort.InferenceSession(str(path), options, providers=ort_providers(device or torch.device("cpu")))
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SeglabError(f"ONNX Runtime cannot run {path}: {first}") from None


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module: float32 [B,C,H,W] in, float32 logits [B,K,H,W] out.

    A file exported with a fixed batch size is fed that many images at a time, so ``val`` and
    ``predict --batch`` work on it; a fixed image size that differs from the input is an error
    that says how to re-export.
    """

    def __init__(self, path: str | Path, device: torch.device | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(path, device)
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        self.input_shape = list(inp.shape)  # ints where fixed, names where dynamic
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = x.shape
        fixed_h, fixed_w = self.input_shape[2:]
        if (isinstance(fixed_h, int) and fixed_h != h) or (isinstance(fixed_w, int) and fixed_w != w):
            raise SeglabError(
                f"{self.path} takes {fixed_h}x{fixed_w} images and was given {h}x{w}; "
                f"export with --dynamic, or with --img-size {h} {w}"
            )
        step = self.input_shape[0] if isinstance(self.input_shape[0], int) else batch
        array = x.detach().float().cpu().contiguous().numpy().astype(self.input_dtype, copy=False)
        outputs = []
        for i in range(0, batch, step):
            chunk = array[i : i + step]
            if len(chunk) < step:  # a fixed batch size: pad the last chunk, drop the padding after
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            outputs.append(out[: batch - i])
        return torch.from_numpy(np.concatenate(outputs).astype(np.float32, copy=False)).to(x.device)
