"""Reading a generator's config (``seglab gen train``) and a generator back from its checkpoint.

The loop is the engine's (engine/trainer.py) with the generator task (gen/task.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from seglab.config import build_config, check, read_yaml, validate_run
from seglab.engine.checkpoint import load_checkpoint
from seglab.errors import SeglabError
from seglab.gen.config import GAN_LOSSES, GenConfig
from seglab.gen.models import GEN_MODELS, GenCard
from seglab.registry import did_you_mean


def load_gen_config(config_file: str | None = None, **overrides: Any) -> tuple[GenConfig, dict[str, Any] | None]:
    """Defaults, then the YAML file, then overrides; with ``resume``, the run's own config."""
    from seglab.engine.trainer import auto_resume, resume_config

    overrides = auto_resume(GenConfig, {k: v for k, v in overrides.items() if v is not None})
    if overrides.get("resume"):
        cfg, ckpt = resume_config(GenConfig, overrides)
        check_generator(ckpt, cfg.resume)
        return cfg, ckpt
    values = read_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = build_config(GenConfig, values, str(config_file or "gen train"))
    validate_run(cfg)
    check([
        (cfg.model in GEN_MODELS, f"--model {cfg.model!r}{did_you_mean(cfg.model, GEN_MODELS)}: "
         f"choose one of {', '.join(GEN_MODELS)}"),
        (cfg.gan_loss in GAN_LOSSES, f"--gan-loss {cfg.gan_loss!r}: choose one of {', '.join(GAN_LOSSES)}"),
        (cfg.img_size >= 32, "--img-size must be at least 32 pixels"),
        (cfg.width >= 4 and cfg.disc_width >= 4, "--width and --disc-width must be at least 4"),
        (cfg.lr is not None and cfg.lr > 0, "--lr must be positive"),
        (cfg.beta1 is not None and 0 <= cfg.beta1 < 1, "--beta1 must be at least 0 and below 1"),
        (cfg.r1_gamma >= 0, "--r1-gamma must be 0 (no R1 penalty) or more"),
        (0 <= cfg.style_mixing <= 1, "--style-mixing is a probability, between 0 and 1"),
        (0 <= cfg.decay_from <= 1, "--decay-from is a fraction of the epochs, between 0 and 1"),
        (cfg.samples >= 1, "--samples must be at least 1"),
    ])  # fmt: skip
    if not cfg.data:
        raise SeglabError("gen train: --data is required (a dataset folder or data.yaml), or --config / --resume")
    return cfg, None


def check_generator(ckpt: dict[str, Any], path: str | Path) -> GenCard:
    """The card of a generator checkpoint; a segmentation checkpoint is refused in one line."""
    if ckpt["card"].get("task") != "generate":
        raise SeglabError(
            f"{path} is a {ckpt['card'].get('arch', '?')!s:.40} segmentation checkpoint, not a generator; "
            "pass weights from seglab gen train (runs/gen/<name>/weights/generator.pt)"
        )
    return GenCard.from_dict(ckpt["card"], path)


def load_generator(path: str | Path, *, trust: bool = False) -> tuple[nn.Module, GenCard, dict[str, Any]]:
    """The generator a checkpoint holds (in eval mode), its card and the checkpoint."""
    from seglab.engine.checkpoint import load_weights

    ckpt = load_checkpoint(path, trust=trust)
    card = check_generator(ckpt, path)
    model = card.build()
    load_weights(model, ckpt["model"], source=str(path))
    return model.eval(), card, ckpt


def train_generator(config: str | None = None, *, progress: bool = True, log=print, **overrides: Any) -> dict:
    """Train a generator; keyword arguments are the fields of :class:`GenConfig`."""
    from seglab.engine.trainer import Trainer
    from seglab.gen.task import GenTask

    cfg, checkpoint = load_gen_config(config, **overrides)
    return Trainer(cfg, GenTask, progress=progress, log=log, checkpoint=checkpoint).fit()
