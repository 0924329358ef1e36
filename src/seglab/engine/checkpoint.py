"""Self-describing checkpoints: weights plus everything needed to use them.

A checkpoint holds the model's weights and its recipe (architecture, encoder, classes,
colours, ignore index, preprocessing), the resolved training config and the metrics it
reached, so ``val``, ``predict`` and ``export`` need nothing but the file. Training
state (optimiser, scheduler, scaler, EMA, RNG) rides along in ``last.pt`` for ``--resume``.
A model whose layers no longer match its recipe (a pruned one, see ``seglab prune``) also
stores the width of every layer (``"layers"``), and is rebuilt from the recipe and those widths.

Checkpoints come from strangers too, so a file is data, never code: it is read with torch's
``weights_only`` unpickler (tensors, dicts, lists, tuples, numbers, strings; nothing else is
even looked up), its archive is checked for size before anything is read, and its model card
field by field. A file that needs pickled Python objects is refused unless the caller passes
``trust=True`` (``--trust-weights``), for files the user made with an older seglab.
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import zipfile
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seglab.errors import SeglabError, short
from seglab.files import atomic_path

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
        """The untrained network this card describes, as its task builds it."""
        from seglab.tasks import get_task

        return get_task(self.task).build_model(self)


MAX_CLASSES = 65535  # masks of more than 256 classes are 16-bit
MAX_SIDE = 16384  # the largest img_size / crop side a card may claim
TASKS = ("semantic", "instance", "detect")


class CardFields:
    """Reads the fields of a card dict that a file claims, each checked as it is read.

    Checkpoints and exports come from strangers: every way a card can be wrong (not a mapping,
    a missing or unknown key, a wrong type, lengths that disagree, colours outside 0..255, a zero
    std, an absurd size) is one SeglabError naming the file and the field."""

    def __init__(self, values: Any, schema: type, source: str | Path) -> None:
        self.where = f"{source}: its model card"
        if not isinstance(values, dict):
            raise SeglabError(
                f"{self.where} is a {type(values).__name__}, not a mapping; this is not a file seglab wrote"
            )
        names = [f.name for f in fields(schema)]
        required = [f.name for f in fields(schema) if f.default is MISSING and f.default_factory is MISSING]
        unknown = sorted(str(k) for k in values if k not in names)
        missing = [k for k in required if k not in values]
        if unknown or missing:
            parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
                [f"missing {', '.join(missing)}"] if missing else []
            )
            raise SeglabError(f"{self.where} has {'; '.join(parts)}; this is not a file seglab wrote")
        self.values = values

    def bad(self, key: str, what: str) -> SeglabError:
        shown = short(self.values.get(key))
        return SeglabError(f"{self.where} says {key}={shown}: expected {what}; this file is damaged or not seglab's")

    def integer(self, key: str, low: int, high: int, default: Any = MISSING) -> int:
        value = self.values.get(key, default)
        if not _whole(value) or not low <= value <= high:
            raise self.bad(key, f"a whole number from {low} to {high}")
        return value

    def integers(self, key: str, lengths: tuple[int, ...], low: int, high: int, default: Any = MISSING) -> list[int]:
        return self.integer_list(key, self.values.get(key, default), lengths, low, high)

    def integer_list(self, key: str, value: Any, lengths: tuple[int, ...], low: int, high: int) -> list[int]:
        if (
            not isinstance(value, list | tuple)
            or len(value) not in lengths
            or not all(_whole(v) and low <= v <= high for v in value)
        ):
            raise self.bad(key, f"lists of {' or '.join(map(str, lengths))} whole numbers from {low} to {high}")
        return list(value)

    def numbers(self, key: str, length: int, positive: bool = False) -> list[float]:
        value = self.values[key]
        ok = isinstance(value, list) and len(value) == length
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (positive and min(value) <= 0):
            raise self.bad(key, f"{length} finite {'positive ' if positive else ''}number(s), one per input channel")
        return [float(v) for v in value]

    def name(self, key: str, choices: tuple[str, ...] | None = None, default: Any = MISSING) -> str:
        value = self.values.get(key, default)
        if not isinstance(value, str) or not value or (choices and value not in choices):
            raise self.bad(key, f"one of {', '.join(choices)}" if choices else "a name")
        return value

    def classes(self, num_classes: int) -> tuple[list[str], list[tuple[int, int, int]]]:
        """The class names and colours, one of each per class."""
        names, colors = self.values.get("classes", []), self.values.get("colors", [])
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(c, str) for c in names):
            raise self.bad("classes", f"{num_classes} class names (num_classes)")
        if not isinstance(colors, list | tuple) or len(colors) != num_classes:
            raise self.bad("colors", f"{num_classes} [r, g, b] colours (num_classes)")
        rgb = [self.integer_list("colors", c, (3,), 0, 255) for c in colors]
        return names, [(r, g, b) for r, g, b in rgb]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def card_from_dict(values: Any, source: str | Path) -> ModelCard:
    """The model card a file claims, checked field by field before anything is built from it."""
    card = CardFields(values, ModelCard, source)
    num_classes = card.integer("num_classes", 1, MAX_CLASSES)
    in_channels = card.integer("in_channels", 1, 3)
    if in_channels == 2:
        raise card.bad("in_channels", "1 (greyscale) or 3 (RGB)")
    classes, colors = card.classes(num_classes)
    weights = values.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise card.bad("weights", "a name or nothing")
    return ModelCard(
        arch=card.name("arch"),
        encoder=card.name("encoder"),
        num_classes=num_classes,
        in_channels=in_channels,
        classes=classes,
        colors=colors,
        ignore_index=card.integer("ignore_index", 0, MAX_CLASSES),
        mean=card.numbers("mean", in_channels),
        std=card.numbers("std", in_channels, positive=True),
        img_size=card.integer("img_size", 16, MAX_SIDE),
        crop_size=card.integers("crop_size", (0, 2), 16, MAX_SIDE, default=[]),
        task=card.name("task", TASKS, default="semantic"),
        weights=weights,
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
    """Write ``payload`` to ``path`` atomically (see seglab.files: a temporary file, then a rename).

    With ``keep_previous`` the file being replaced survives as ``<stem>.prev.pt``, so a resume
    has a good checkpoint to fall back on whatever happened to the newest one. A full disk is an
    OSError naming ``path`` (torch reports it as a RuntimeError), and leaves both files as they were."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        try:
            torch.save(payload, f)
            f.flush()
        except RuntimeError as e:  # torch's writer wraps the OSError of a full or failing disk
            cause = e.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, str(path)) from None
            raise
        os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))


def make_payload(model: nn.Module, card: ModelCard, *, pruned: bool = False, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict: card, weights and ``extra``. ``pruned`` also stores every layer's width
    (``"layers"``), for a model that ``card.build()`` alone cannot rebuild."""
    payload: dict[str, Any] = {"format_version": FORMAT_VERSION, "card": asdict(card)}
    if pruned:
        payload["layers"] = layer_widths(model)
    payload["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {**payload, **extra}


# --------------------------------------------------------------------------- pruned architectures as data

# The constructor arguments that pruning changes, by layer type: what "layers" records of each.
_WIDTHS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.ConvTranspose2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


def _width_fields(module: nn.Module) -> tuple[str, ...] | None:
    return next((names for kind, names in _WIDTHS.items() if isinstance(module, kind)), None)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """{layer name: [its widths]} for every convolution, BatchNorm and linear layer: a pruned model's
    architecture as plain data (see ``rebuild_pruned``)."""
    widths = {}
    for name, module in model.named_modules():
        names = _width_fields(module)
        if names:
            widths[name] = [int(getattr(module, n)) for n in names]
    return widths


def rebuild_pruned(model: nn.Module, widths: Any, source: str | Path) -> nn.Module:
    """Narrow the layers of a freshly built ``model`` to the recorded ``widths`` (in place, as
    torch-pruning itself narrows them: attributes and empty parameters of the new shape), ready for
    ``load_weights``. Pruning only narrows, so a width larger than the built layer's is refused, as is
    a layer the model does not have: the file cannot make seglab allocate more than the model itself."""
    if not isinstance(widths, dict):
        raise SeglabError(f"{source}: its 'layers' entry is a {type(widths).__name__}, not a mapping of layer widths")
    modules = dict(model.named_modules())
    for name, values in widths.items():
        module = modules.get(name) if isinstance(name, str) else None
        names = _width_fields(module) if module is not None else None
        if module is None or names is None or not isinstance(values, list) or len(values) != len(names):
            arch = f"{getattr(model, 'arch', type(model).__name__)} ({getattr(model, 'encoder_name', '?')})"
            raise SeglabError(f"{source}: 'layers' names {short(name)}, which is not a layer of {arch}")
        built = [getattr(module, n) for n in names]
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= b for v, b in zip(values, built, strict=True)
        ):
            raise SeglabError(
                f"{source}: 'layers' gives {name} the widths {short(values)}; a pruned layer has at most {built}"
            )
        _narrow(module, dict(zip(names, values, strict=True)))
    return model


def _narrow(module: nn.Module, widths: dict[str, int]) -> None:
    """Give ``module`` new widths and uninitialised parameters and buffers of the matching shapes."""
    for key, value in widths.items():
        setattr(module, key, value)
    shapes: dict[str, tuple[int, ...]]
    if isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        shapes = {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,)}
    elif isinstance(module, nn.Linear):
        shapes = {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    else:  # a convolution: weight [out, in / groups, kh, kw], transposed [in, out / groups, kh, kw]
        conv: Any = module
        if conv.in_channels % conv.groups or conv.out_channels % conv.groups:
            raise SeglabError(f"'layers' gives a convolution {conv.groups} groups for {conv.in_channels} channels")
        a, b = (
            (conv.in_channels, conv.out_channels)
            if isinstance(conv, nn.ConvTranspose2d)
            else (conv.out_channels, conv.in_channels)
        )
        shapes = {"weight": (a, b // conv.groups, *conv.kernel_size), "bias": (conv.out_channels,)}
    for key, shape in shapes.items():
        old = getattr(module, key, None)
        if old is None:
            continue
        new = torch.empty(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, key, new)


# --------------------------------------------------------------------------- reading


class UnsafeCheckpoint(SeglabError):
    """A checkpoint that needs pickled Python objects (code) to load, refused without ``trust``."""


MAX_PICKLE_BYTES = 256 << 20  # the non-tensor part of a checkpoint: configs, metrics, optimiser structure


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint as data; any way it can be wrong becomes one SeglabError naming the file.

    Tensors are memory-mapped, not read, so a file costs little memory until its weights are used;
    ``trust`` lets torch unpickle arbitrary objects (only for files the user made)."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"weights file not found: {path}")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as e:
        if not trust and "Weights only load failed" in str(e):
            raise UnsafeCheckpoint(_needs_code(path)) from None
        raise _unreadable(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("card"), dict) or "model" not in ckpt:
        raise SeglabError(
            f"{path} is not a seglab checkpoint (no model card); train one with `seglab train` "
            "or pass a file from runs/train/<name>/weights/"
        )
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise SeglabError(f"{path}: its 'model' entry is not a mapping of layer names to tensors; re-save the weights")
    return ckpt


def _check_archive(path: Path) -> None:
    """What torch.save writes: a zip of uncompressed records, one small pickle, sizes that add up.

    Checked from the zip directory before any record is read, so a file that claims more than it
    holds, or a pickle too large to be a checkpoint's, costs nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    size = path.stat().st_size
    pickles = [r for r in records if r.filename.endswith("/data.pkl")]
    if (
        len(pickles) != 1
        or any(r.compress_type != zipfile.ZIP_STORED for r in records)
        or sum(r.file_size for r in records) > size
    ):
        raise SeglabError(
            f"cannot read checkpoint {path}: its archive is not one torch.save writes (compressed, "
            "oversized or several records); it is damaged or not a seglab checkpoint"
        )
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise SeglabError(
            f"cannot read checkpoint {path}: {pickles[0].file_size / 2**20:.0f} MB of pickled data besides the "
            f"tensors (a seglab checkpoint holds a few MB at most); it is not a seglab checkpoint"
        )


def _unreadable(path: Path, e: BaseException) -> SeglabError:
    reason = str(e).splitlines()[0].split(". ")[0][:100] if str(e) else type(e).__name__
    return SeglabError(f"cannot read checkpoint {path}: the file is truncated or not a seglab checkpoint ({reason})")


def _needs_code(path: Path) -> str:
    """Why a file that needs pickled objects is refused, naming the objects, without loading any."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the listing is only for the message
        found = []
    named = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
    return (
        f"{path} holds pickled Python objects{named}, which could run any code when loaded; seglab loads "
        "checkpoints as plain data only. If you made this file yourself (e.g. with an older seglab), "
        "pass --trust-weights (seglab.load(..., trust=True))"
    )


def read_resumable(
    path: str | Path, *, trust: bool = False, key: str = "train", log=print
) -> tuple[dict[str, Any], Path]:
    """(a training checkpoint to resume from, its path): ``path``, or when that cannot be read, the
    ``last.prev.pt`` saved before it. The unreadable file is then moved aside to ``<stem>.corrupt.pt``,
    so the next save cannot rotate it into ``last.prev.pt`` over the good one. ``key`` is what a
    training state holds (``train``: every network's weights, optimiser and schedule)."""
    path = Path(path)
    try:
        ckpt = load_checkpoint(path, trust=trust)
    except UnsafeCheckpoint:
        raise  # not damaged: refused on purpose, and so would its predecessor be
    except SeglabError as e:
        previous = previous_of(path)
        if not previous.is_file():
            raise
        ckpt = load_checkpoint(previous, trust=trust)
        if path.is_file():
            aside = path.with_name(f"{path.stem}.corrupt{path.suffix}")
            os.replace(path, aside)
            damaged = f" (the damaged file is now {aside.name})"
            log(f"resume: {e}; falling back to the previous checkpoint {previous}{damaged}")
        else:
            log(f"resume: {e}; falling back to the previous checkpoint {previous}")
        path = previous
    if key not in ckpt:
        raise SeglabError(f"{path} holds no training state; resume from weights/last.pt")
    return ckpt, path


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside this, every ``torch.load`` is weights-only whatever its caller asks: for loaders
    seglab does not own that ask for ``weights_only=False`` (``torch.export.load`` for a .pt2's
    pickled weights, torch-fidelity for FID's Inception weights). torch reads the variable at each call."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def training_state(path: str | Path | None) -> Iterator[None]:
    """Restore a run's training state inside this: a ``last.pt`` whose state is incomplete or of the
    wrong shapes (damaged, or crafted) is one SeglabError, not a KeyError traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        detail = str(e).splitlines()[0][:80] if str(e) else ""
        raise SeglabError(
            f"{path}: its training state is incomplete or damaged ({type(e).__name__}: {detail}); "
            "resume from another last.pt or start a new run"
        ) from None


def load_model(path: str | Path, *, trust: bool = False) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (EMA weights when present)."""
    ckpt = load_checkpoint(path, trust=trust)
    if ckpt["card"].get("task") == "generate":
        raise SeglabError(
            f"{path} is an image generator ({short(ckpt['card'].get('arch'))}); "
            "use seglab gen sample / augment / eval with it"
        )
    card = card_from_dict(ckpt["card"], path)
    model = build_from(card, ckpt, path)
    load_weights(model, ckpt["model"], source=str(path))
    model.eval()
    return model, card, ckpt


def build_from(card: ModelCard, ckpt: dict[str, Any], source: str | Path) -> nn.Module:
    """The (untrained) model of a checkpoint: its card's architecture, narrowed to its recorded
    layer widths when it was pruned. A pickled module (older pruned files) is used only when the
    file was loaded with ``trust``."""
    if ckpt.get("qat"):
        raise SeglabError(
            f"{source} is a checkpoint of quantisation-aware training (seglab quantize --qat): a fake-quantised "
            "graph, not a model; use the int8 .pt2 that command wrote, or the checkpoint it started from"
        )
    if "module" in ckpt:
        if not isinstance(ckpt["module"], nn.Module):
            raise SeglabError(f"{source}: its 'module' entry is not a model; re-save the weights")
        return ckpt["module"]
    model = card.build()
    if "layers" in ckpt:
        rebuild_pruned(model, ckpt["layers"], source)
        from seglab.models.encoders import probe

        encoder = getattr(model, "encoder", None)
        if encoder is not None and hasattr(encoder, "out_channels"):  # what the narrowed encoder returns
            encoder.out_channels, encoder.strides = probe(encoder, card.in_channels)
    return model


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


def non_finite(model: nn.Module) -> list[str]:
    """The parameters and buffers that hold NaN or infinity (a run that diverged)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# --------------------------------------------------------------------------- random state


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from (torch, CUDA, numpy, Python), as tensors, numbers
    and tuples: what a weights-only load accepts (numpy's own state is an array, so it is converted)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
