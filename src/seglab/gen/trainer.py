"""A generator's config (``seglab gen train``), and reading a generator back from its checkpoint.

The loop is the engine's (engine/trainer.py) with the generator task (gen/task.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from seglab.config import RunConfig, build_config, check, read_yaml, validate_run
from seglab.engine.checkpoint import load_checkpoint
from seglab.errors import SeglabError
from seglab.gen.models import GEN_MODELS, GenCard
from seglab.registry import did_you_mean

GAN_LOSSES = ("lsgan", "vanilla")
# Adam's (learning rate, first beta) when --lr / --beta1 are not given: pix2pix's, and StyleGAN2's
RECIPES = {"stylegan": (2e-3, 0.0)}
DEFAULT_RECIPE = (2e-4, 0.5)


@dataclass
class GenConfig(RunConfig):
    """A generator's training run. Field comments become ``seglab gen train --help`` text."""

    data: str = ""  # dataset folder or data.yaml (images and label maps), as for seglab train
    model: str = "pix2pix"  # pix2pix or spade (label map to image); dcgan, vae or stylegan (from noise)
    img_size: int = 256  # long side of the generated images; the aspect ratio is the data's
    width: int = 32  # generator channels in its first layer, doubling with depth (pix2pix's paper: 64)
    disc_width: int = 64  # discriminator channels in its first layer
    z_dim: int = 128  # noise size (dcgan, vae; stylegan: z and w)
    epochs: int = 100
    lr: float | None = None  # Adam, both networks (default: 2e-4; stylegan 2e-3)
    beta1: float | None = None  # Adam's first beta (default: 0.5; stylegan 0)
    gan_loss: str = "lsgan"  # lsgan (least squares) or vanilla (cross-entropy); stylegan: its logistic loss
    r1_gamma: float = 0.1  # stylegan: weight of the R1 penalty on real images (applied every 16th step)
    style_mixing: float = 0.9  # stylegan: share of steps whose images take two ws (style mixing)
    l1_weight: float = 100.0  # pix2pix and spade: weight of the L1 distance to the real image
    kl_weight: float = 1.0  # vae: weight of the KL term
    decay_from: float = 0.5  # the learning rate decays linearly to 0 from this fraction of the epochs
    hflip: float = 0.5  # horizontal-flip probability (image and label map together)
    samples: int = 4  # label maps (rows) in the sample grid saved every epoch
    workers: int = 0  # DataLoader worker processes (the pairs are decoded once, in memory)
    out: str = "runs/gen"

    def __post_init__(self) -> None:
        lr, beta1 = RECIPES.get(self.model, DEFAULT_RECIPE)  # the model's own recipe
        self.lr = lr if self.lr is None else self.lr
        self.beta1 = beta1 if self.beta1 is None else self.beta1


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
