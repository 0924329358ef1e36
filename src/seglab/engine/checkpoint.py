"""Self-describing checkpoints: weights plus everything needed to use them.

A checkpoint holds the model's weights and its recipe (architecture, encoder, classes,
colours, ignore index, preprocessing), the resolved training config and the metrics it
reached, so ``val``, ``predict`` and ``export`` need nothing but the file. Training
state (optimiser, scheduler, scaler, EMA, RNG) rides along in ``last.pt`` for ``--resume``.
A model whose layers no longer match its recipe (a pruned one, see ``seglab prune``) is also
stored as the pickled module itself, under ``"module"``, and rebuilt from it.
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seglab.errors import SeglabError

FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """What a checkpoint says about its model, apart from the weights."""

    arch: str
    encoder: str
    num_classes: int
    in_channels: int
    classes: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int
    mean: list[float]
    std: list[float]
    img_size: int
    crop_size: list[int] = field(default_factory=list)
    task: str = "semantic"  # semantic, instance or detect (then arch is maskrcnn/fasterrcnn, encoder the backbone)
    weights: str | None = None  # detectors: the pretrained weights training began from (they set the norm layers)

    def build(self) -> nn.Module:
        from seglab.models import build_model

        if self.task != "semantic":
            from seglab.instance.models import DetectorSpec, build_detector

            spec = DetectorSpec(self.arch, self.encoder, self.num_classes, self.weights, self.img_size)
            return build_detector(spec, download=False)

        return build_model(
            self.arch,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            encoder=self.encoder,
            encoder_weights=None,
        )


def require_semantic(card: ModelCard, path: str | Path, command: str) -> None:
    """Export, quantisation, pruning and serving handle semantic models only (so far)."""
    if card.task != "semantic":
        raise SeglabError(
            f"{path} is a {card.arch} checkpoint (--task {card.task}); seglab {command} works on semantic "
            "segmentation models so far (use seglab predict / val for detectors)"
        )


def previous_of(path: str | Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the file it replaced: last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, keep_previous: bool = False) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then rename).

    With ``keep_previous`` the file being replaced survives as ``<stem>.prev.pt``, so a resume
    has a good checkpoint to fall back on whatever happened to the newest one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_payload(model: nn.Module, card: ModelCard, *, with_module: bool = False, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict: card, weights and ``extra``. ``with_module`` also stores the module
    itself, for a model that ``card.build()`` cannot rebuild (a pruned one)."""
    payload: dict[str, Any] = {"format_version": FORMAT_VERSION, "card": asdict(card)}
    if with_module:
        from seglab.engine.fastpath import run_in_float32

        model = copy.deepcopy(model).cpu()
        run_in_float32(model, [])  # plain Conv2d classes again: which layers run in float32 is one run's choice
        payload["module"] = model
    # with a module, these share its storage, so the file still holds each weight once
    payload["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {**payload, **extra}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; any way it can be wrong becomes one SeglabError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0].split(". ")[0][:100] if str(e) else type(e).__name__
        raise SeglabError(
            f"cannot read checkpoint {path}: the file is truncated or not a seglab checkpoint ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or "card" not in ckpt or "model" not in ckpt:
        raise SeglabError(
            f"{path} is not a seglab checkpoint (no model card); train one with `seglab train` "
            "or pass a file from runs/train/<name>/weights/"
        )
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (EMA weights when present)."""
    ckpt = load_checkpoint(path)
    if ckpt["card"].get("task") == "generate":
        raise SeglabError(
            f"{path} is an image generator ({ckpt['card'].get('arch')}); use seglab gen sample / augment / eval with it"
        )
    card = ModelCard(**ckpt["card"])
    card.colors = [tuple(c) for c in card.colors]  # type: ignore[misc]
    model = ckpt["module"] if "module" in ckpt else card.build()
    if not isinstance(model, nn.Module):
        raise SeglabError(f"{path}: its 'module' entry is a {type(model).__name__}, not a model; re-save the weights")
    load_weights(model, ckpt["model"], source=str(path))
    model.eval()
    return model, card, ckpt


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, explaining a mismatch instead of dumping torch's key lists."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        detail = []
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{k} has shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        if missing:
            detail.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise SeglabError(
            f"weights in {source} do not match the model: {'; '.join(detail)}; "
            "use weights trained with the same --model, --encoder and number of classes"
        )
    model.load_state_dict(state)
