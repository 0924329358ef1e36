"""One typed schema for training: defaults in code, a YAML file and flags on top.

The same dataclass drives ``seglab train --flag``, ``--config file.yaml`` and
``seglab.train(**kwargs)``, so the three can never disagree. Unknown keys are
rejected with the nearest valid one suggested; the resolved config is saved into
the run folder and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seglab.errors import SeglabError
from seglab.registry import did_you_mean

TASKS = ("semantic", "instance", "detect")
DEFAULT_MODELS = {"semantic": "unet", "instance": "maskrcnn", "detect": "fasterrcnn"}


@dataclass
class RunConfig:
    """What the training loop reads, the same for every task. Field comments become ``--help`` text."""

    data: str = ""  # dataset folder, data.yaml, or a built-in name: camvid, voc2012, isbi2012
    data_cache: str | None = None  # where built-in datasets download to (default ~/.cache/seglab/datasets)
    val_fraction: float = 0.1  # hold-out fraction when the dataset has no validation split
    limit: int | None = None  # use only the first N samples of each split
    workers: int = 2  # DataLoader worker processes
    epochs: int = 50  # with --time: the first guess at the schedule's length, refitted after each epoch
    time: float | None = None  # train for this many minutes (validation included): the epochs are fitted to it
    batch: int = 8
    accumulate: int = 1  # gradient accumulation steps
    grad_clip: float | None = None  # clip gradient norm to this value
    ema: bool = False  # keep an exponential moving average of the weights
    ema_decay: float = 0.999
    swa: bool = False  # stochastic weight averaging: an equal average of the last epochs' weights (not with --ema)
    swa_start: int | None = None  # --swa: the first epoch at the SWA rate (default: the last quarter of the run)
    swa_lr: float | None = None  # --swa: the rate SWALR anneals to and holds (default: a tenth of --lr)
    amp: bool = False  # mixed precision (autocast)
    amp_dtype: str = "auto"  # auto (bfloat16 on CPU, float16 on CUDA), bfloat16 or float16
    device: str = "auto"  # auto, cpu, cuda, cuda:N (under torchrun: cuda means each rank's own GPU)
    dist_timeout: float = 600.0  # under torchrun: seconds a rank waits for the others before failing
    nonfinite: str = "stop"  # a non-finite loss: stop with a message, or skip the step and count it
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower)
    out: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False  # reuse <out>/<name> instead of incrementing
    resume: str | None = None  # last.pt to continue from, or auto: <out>/<name>/weights/last.pt if there is one
    trust_weights: bool = False  # --resume: also load a checkpoint that needs pickled code (only files you made)
    val_interval: int = 1  # validate every N epochs
    save_period: int = 0  # also keep weights/epoch<N>.pt every N epochs (0 = never)
    plots: bool = True  # write curves.png, the pictures and report.html (seglab.engine.report)
    log_interval: int = 50  # without a terminal (nohup, CI, > file): a log line every N steps (0 = never)
    log_seconds: float = 60.0  # ... and at least every this many seconds (0 = never)


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run of a segmentation model or detector needs."""

    task: str = "semantic"  # semantic (a class per pixel), instance (Mask R-CNN) or detect (Faster R-CNN)
    # data
    img_size: int = 512  # long side images are resized to (train, val and predict)
    crop_size: list[int] | None = None  # training crop [height, width]; default: img_size square
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale range
    hflip: float = 0.5  # horizontal-flip probability
    jitter: float = 0.2  # photometric jitter strength (brightness/contrast/saturation), 0 = off
    cache: bool = False  # keep decoded images in memory (small datasets)
    strict_data: bool = False  # an unreadable image or mask stops the run (default: report and skip it)
    in_channels: int = 3  # 3 = RGB, 1 = greyscale
    # model
    model: str = ""  # architecture (see `seglab models`); default: unet, maskrcnn or fasterrcnn by --task
    encoder: str | None = None  # encoder (a detector's backbone); default: the architecture's own
    encoder_weights: str | None = None  # 'imagenet' for a pretrained encoder; detectors also 'coco' (whole model)
    # loss
    loss: str = "ce"  # ce, dice, focal, ce+dice, ohem
    class_weights: str | None = None  # none, inverse, median, enet: computed from the train split
    # optimisation
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 1e-3
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4
    scheduler: str = "poly"  # poly, cosine, step, constant
    warmup_epochs: float = 1.0  # linear learning-rate warm-up
    poly_power: float = 0.9
    step_size: int = 30  # epochs between decays for the step schedule
    step_gamma: float = 0.1
    # speed
    channels_last: bool = True  # channels-last memory format
    sync_bn: bool = False  # under torchrun: synchronise BatchNorm statistics across ranks

    def __post_init__(self) -> None:
        if not self.model:  # the task's own architecture
            self.model = DEFAULT_MODELS.get(self.task, "unet")


def field_help(cls: type) -> dict[str, str]:
    """Read the trailing ``# comment`` of each dataclass field as its help text."""
    import inspect

    help_text: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's comment wins
        for line in inspect.getsource(klass).splitlines():
            name, sep, rest = line.strip().partition(":")
            if sep and "#" in rest and name.isidentifier():
                help_text[name] = rest.split("#", 1)[1].strip()
    return help_text


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check and convert one value against its type annotation; raise a SeglabError if it cannot."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], source)
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, list | tuple):
            raise SeglabError(f"{source}: '{name}' must be a list, got {value!r}")
        return [_coerce(name, v, item, source) for v in value]
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    kind = getattr(annotation, "__name__", str(annotation))
    raise SeglabError(f"{source}: '{name}' must be {kind}, got {value!r}")


def build_config(cls: type, values: dict[str, Any], source: str) -> Any:
    """Make ``cls(**values)`` after rejecting unknown keys and checking every type."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise SeglabError(f"{source}: unknown key '{key}'{did_you_mean(key, known)}")
    checked = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
    return cls(**checked)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, turning every way it can go wrong into one clear SeglabError."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SeglabError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SeglabError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SeglabError(f"{path}: expected a mapping of keys to values, got {type(content).__name__}")
    return {str(k).replace("-", "_"): v for k, v in content.items()}


def load_train_config(config_file: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (flags or keyword arguments)."""
    values: dict[str, Any] = read_yaml(config_file) if config_file else {}
    source = str(config_file) if config_file else "train"
    build_config(TrainConfig, values, source)  # report errors against the file first
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = build_config(TrainConfig, values, source if not overrides else "train")
    if cfg.task not in TASKS:
        raise SeglabError(f"--task {cfg.task!r}{did_you_mean(cfg.task, TASKS)}: choose one of {', '.join(TASKS)}")
    validate(cfg)
    return cfg


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise SeglabError(message)


def validate_run(cfg: RunConfig) -> None:
    """Range checks of the fields every task shares."""
    check([
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.time is None or cfg.time > 0, "--time is minutes of training and must be more than 0"),
        (cfg.batch >= 1, "--batch must be at least 1"),
        (cfg.accumulate >= 1, "--accumulate must be at least 1"),
        (0 < cfg.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (cfg.limit is None or cfg.limit >= 1, "--limit must be at least 1"),
        (cfg.workers >= 0, "--workers must be 0 or more"),
        (0 < cfg.ema_decay < 1, "--ema-decay must be between 0 and 1"),
        (
            not (cfg.ema and cfg.swa),
            "--ema and --swa are two ways to average the weights (EMA every step, SWA every epoch from --swa-start); "
            "choose one",
        ),
        (cfg.swa_start is None or cfg.swa_start >= 1, "--swa-start is an epoch, 1 or more"),
        (cfg.swa_lr is None or cfg.swa_lr > 0, "--swa-lr must be positive"),
        (cfg.val_interval >= 1, "--val-interval must be at least 1"),
        (cfg.nonfinite in ("stop", "skip"), f"--nonfinite {cfg.nonfinite!r}: choose one of stop, skip"),
    ])  # fmt: skip
    from seglab.engine.runs import check_name

    check_name(cfg.name)


def validate(cfg: TrainConfig) -> None:
    """Range checks that a type alone cannot express."""
    validate_run(cfg)
    checks = [
        (cfg.img_size >= 16, "--img-size must be at least 16 pixels"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.in_channels in (1, 3), "--in-channels must be 1 or 3"),
        (0 <= cfg.hflip <= 1, "--hflip is a probability between 0 and 1"),
        (
            len(cfg.scale_range) == 2 and 0 < cfg.scale_range[0] <= cfg.scale_range[1],
            "--scale-range needs two numbers, 0 < low <= high",
        ),
        (
            cfg.crop_size is None or (len(cfg.crop_size) == 2 and min(cfg.crop_size) >= 16),
            "--crop-size needs two numbers (height width), each at least 16",
        ),
    ]
    check(checks)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
