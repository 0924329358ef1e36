"""Training a generator (``seglab gen train``): the seglab run folder around a GAN or VAE loop.

    config.yaml, metrics.csv (losses and val L1 per epoch), curves.png, events.out.tfevents.*,
    samples/epoch_NNN.png (a fixed set of val label maps painted every epoch, beside the real
    images; or a fixed noise grid), weights/last.pt (generator, discriminator, optimisers:
    resumable), weights/generator.pt (the generator alone: what sample, augment and eval take)

pix2pix's recipe: Adam (lr 2e-4, beta1 0.5) for both networks, a constant learning rate for the
first half of the epochs and a linear decay to zero over the second, L1 weight 100.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.utils import make_grid, save_image

from seglab.config import build_config, read_yaml
from seglab.data import EpochSampler, resolve_dataset, train_val_splits
from seglab.engine.checkpoint import (
    load_checkpoint,
    read_resumable,
    restore_rng,
    rng_state,
    save_checkpoint,
    training_state,
)
from seglab.engine.inference import autocast, resolve_device
from seglab.engine.runs import check_name, next_run_dir, restore_rows, resume_run_dir, write_csv
from seglab.engine.stopping import TrainingStopped, run_epochs
from seglab.engine.trainer import epoch_bar, seed_everything
from seglab.errors import SeglabError
from seglab.gen.data import PairDataset, generation_size, to_unit
from seglab.gen.models import GEN_MODELS, VAE, GenCard, build_discriminator, init_weights, one_hot
from seglab.plots import plot_curves
from seglab.registry import did_you_mean

GAN_LOSSES = ("lsgan", "vanilla")
CSV_FIELDS = ["epoch", "loss_d", "loss_g", "loss_adv", "l1", "kl", "val_l1", "lr", "epoch_time_s"]


@dataclass
class GenConfig:
    """A generator's training run. Field comments become ``seglab gen train --help`` text."""

    data: str = ""  # dataset folder or data.yaml (images and label maps), as for seglab train
    data_cache: str | None = None  # where built-in datasets download to (default ~/.cache/seglab/datasets)
    model: str = "pix2pix"  # pix2pix or spade (label map to image); dcgan or vae (unconditional baselines)
    img_size: int = 256  # long side of the generated images; the aspect ratio is the data's
    width: int = 32  # generator channels in its first layer, doubling with depth (pix2pix's paper: 64)
    disc_width: int = 64  # discriminator channels in its first layer
    z_dim: int = 128  # noise size (dcgan, vae)
    epochs: int = 100
    batch: int = 8
    lr: float = 2e-4  # Adam, both networks
    beta1: float = 0.5  # Adam's first beta (GANs: 0.5)
    gan_loss: str = "lsgan"  # lsgan (least squares) or vanilla (cross-entropy)
    l1_weight: float = 100.0  # pix2pix and spade: weight of the L1 distance to the real image
    kl_weight: float = 1.0  # vae: weight of the KL term
    decay_from: float = 0.5  # the learning rate decays linearly to 0 from this fraction of the epochs
    hflip: float = 0.5  # horizontal-flip probability (image and label map together)
    val_fraction: float = 0.1  # hold-out fraction when the dataset has no validation split
    limit: int | None = None  # use only the first N samples of each split
    samples: int = 4  # label maps (rows) in the sample grid saved every epoch
    amp: bool = False  # mixed precision (bfloat16 on CPU, float16 on CUDA)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0
    out: str = "runs/gen"
    name: str = "exp"
    exist_ok: bool = False  # reuse runs/gen/<name> instead of incrementing
    resume: str | None = None  # weights/last.pt to continue from (in its own run folder when it sits in one)
    trust_weights: bool = False  # --resume: also load a checkpoint that needs pickled code (only files you made)


RESUME_OVERRIDES = ("epochs", "device", "out", "name", "trust_weights")


def load_gen_config(config_file: str | None = None, **overrides: Any) -> tuple[GenConfig, dict[str, Any] | None]:
    """Defaults, then the YAML file, then overrides; with ``resume``, the run's own config."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("resume"):
        trust = bool(overrides.get("trust_weights"))
        ckpt, path = read_resumable(overrides["resume"], trust=trust, key="optimizer_g")
        check_generator(ckpt, path)
        overrides["resume"] = str(path)
        changed = sorted(k for k in overrides if k not in (*RESUME_OVERRIDES, "resume"))
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise SeglabError(f"--resume continues a run with its own settings; {flags} cannot change")
        values = {**ckpt["config"], **overrides}
        return build_config(GenConfig, values, str(overrides["resume"])), ckpt
    values = read_yaml(config_file) if config_file else {}
    values.update(overrides)
    cfg = build_config(GenConfig, values, str(config_file or "gen train"))
    checks = [
        (cfg.model in GEN_MODELS, f"--model {cfg.model!r}{did_you_mean(cfg.model, GEN_MODELS)}: "
         f"choose one of {', '.join(GEN_MODELS)}"),
        (cfg.gan_loss in GAN_LOSSES, f"--gan-loss {cfg.gan_loss!r}: choose one of {', '.join(GAN_LOSSES)}"),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.batch >= 1, "--batch must be at least 1"),
        (cfg.img_size >= 32, "--img-size must be at least 32 pixels"),
        (cfg.width >= 4 and cfg.disc_width >= 4, "--width and --disc-width must be at least 4"),
        (cfg.lr > 0, "--lr must be positive"),
        (0 <= cfg.decay_from <= 1, "--decay-from is a fraction of the epochs, between 0 and 1"),
        (0 < cfg.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (cfg.limit is None or cfg.limit >= 1, "--limit must be at least 1"),
        (cfg.samples >= 1, "--samples must be at least 1"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise SeglabError(message)
    check_name(cfg.name)
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


def adversarial(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """The GAN loss of discriminator ``logits`` against an all-real or all-fake target."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class GenTrainer:
    """Train a pix2pix / SPADE / DCGAN / VAE generator on a segmentation dataset."""

    def __init__(self, cfg: GenConfig, *, progress: bool = True, log=print, checkpoint: dict | None = None) -> None:
        if Path(cfg.data).exists():
            cfg.data = str(Path(cfg.data).resolve())  # sample / augment / eval find it from anywhere
        self.cfg, self.progress, self.log = cfg, progress, log
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)

        # ---- data
        spec = self.spec = resolve_dataset(cfg.data, cache_dir=cfg.data_cache, progress=progress)
        train, val = train_val_splits(spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit)
        if len(train) < cfg.batch:
            raise SeglabError(f"--batch {cfg.batch} is more than the {len(train)} training images; lower --batch")
        size = GenCard.from_dict(checkpoint["card"], cfg.resume or "").size if checkpoint else None
        size = size or generation_size(train[0].image, cfg.img_size)
        self.train_set, self.val_set = PairDataset(train, spec, size), PairDataset(val, spec, size)
        self.train_set.preload(progress)
        self.sampler = EpochSampler(len(train), batch=cfg.batch, shuffle=True, seed=cfg.seed, drop_last=True)

        # ---- models, optimisers, schedule
        self.card = GenCard(
            arch=cfg.model,
            size=list(size),
            num_classes=spec.num_classes,
            classes=list(spec.classes),
            colors=list(spec.colors),
            ignore_index=spec.ignore_index,
            width=cfg.width,
            z_dim=cfg.z_dim,
        )
        self.generator = self.card.build().to(self.device)
        self.discriminator = build_discriminator(self.card, width=cfg.disc_width)
        init_weights(self.generator)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.optimizer_d = None
        if self.discriminator is not None:
            self.discriminator.to(self.device)
            init_weights(self.discriminator)
            self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        self.steps_per_epoch = len(self.sampler) // cfg.batch
        total, hold = cfg.epochs * self.steps_per_epoch, int(cfg.decay_from * cfg.epochs * self.steps_per_epoch)

        def factor(step: int) -> float:  # pix2pix: constant, then linear to zero
            return 1.0 if step < hold else max(0.0, (total - step) / max(1, total - hold))

        optimizers = [o for o in (self.optimizer_g, self.optimizer_d) if o is not None]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

        # the fixed inputs of the per-epoch sample grid
        g = torch.Generator().manual_seed(cfg.seed)
        self.grid_noise = torch.randn(4 * cfg.samples, cfg.z_dim, generator=g)
        spread = np.linspace(0, len(self.val_set) - 1, min(cfg.samples, len(self.val_set))).round().astype(int)
        self.grid_items = [self.val_set[int(i)] for i in spread]  # spread out: val sets are often video

        # ---- run folder and state
        self.start_epoch, self.start_batch = 0, 0
        self.rows: list[dict[str, Any]] = []
        self.stop_signal: int | None = None
        if checkpoint is not None:
            saved = checkpoint.get("config") or {}
            self.run_dir, _ = resume_run_dir(cfg.resume or "", saved, out=cfg.out, name=cfg.name, log=log)
            self._restore(checkpoint)
        else:
            self.run_dir = next_run_dir(cfg.out, cfg.name, cfg.exist_ok)
        for folder in ("weights", "samples"):
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        write_csv(self.run_dir / "metrics.csv", CSV_FIELDS, self.rows)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.run_dir))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        n_g = sum(p.numel() for p in self.generator.parameters()) / 1e6
        n_d = sum(p.numel() for p in self.discriminator.parameters()) / 1e6 if self.discriminator else 0.0
        h, w = self.card.size
        self.log(
            f"gen train: {cfg.model} ({n_g:.2f}M generator, {n_d:.2f}M discriminator params) on {self.device}, "
            f"{len(self.train_set)} train / {len(self.val_set)} val pairs at {h}x{w}, amp {'on' if cfg.amp else 'off'}"
        )
        stopped = run_epochs(self, "gen train")
        self.tb.close()
        if stopped is None:
            self.log(f"gen train: done; generator in {self.run_dir / 'weights' / 'generator.pt'}")
        return {"run_dir": self.run_dir, "rows": self.rows, "stopped": stopped}

    def _run_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        row: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
        row.update({k: round(v, 5) for k, v in self.train_epoch(epoch).items()})
        if self.cfg.model != "dcgan":
            row["val_l1"] = round(self.validate(), 5)
        row.update(epoch=epoch + 1, lr=f"{self.optimizer_g.param_groups[0]['lr']:.3e}")
        row["epoch_time_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        for key, value in row.items():
            if key not in ("epoch", "lr", "epoch_time_s") and value != "":
                self.tb.add_scalar(key, value, epoch + 1)
        write_csv(self.run_dir / "metrics.csv", CSV_FIELDS, self.rows)
        self.save_grid(self.run_dir / "samples" / f"epoch_{epoch + 1:03d}.png")
        self._save_state(self.run_dir / "weights" / "last.pt", epoch + 1, 0)
        lean = {"format_version": 1, "card": asdict(self.card), "model": self._state(self.generator)}
        save_checkpoint(self.run_dir / "weights" / "generator.pt", {**lean, "config": asdict(self.cfg)})
        plot_curves(
            self.rows,
            self.run_dir / "curves.png",
            losses={"loss_d": "discriminator", "loss_g": "generator"},
            scores={"val_l1": "val L1"} if row["val_l1"] != "" else {},
            title="val L1 x 100 (lower is closer to the real images)",
        )
        shown = ", ".join(f"{k} {row[k]}" for k in ("loss_d", "loss_g", "l1", "kl", "val_l1") if row[k] != "")
        self.log(f"epoch {epoch + 1}/{self.cfg.epochs}: {shown} ({row['epoch_time_s']} s)")

    def _batch(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked images in [-1, 1] and one-hot label maps, flipped together at random."""
        items = [self.train_set[i] for i in indices]
        images = to_unit(torch.stack([it["image"] for it in items]))
        labels = torch.stack([it["labels"] for it in items])
        flip = torch.rand(len(items), generator=generator) < self.cfg.hflip
        images[flip], labels[flip] = images[flip].flip(-1), labels[flip].flip(-1)
        onehot = one_hot(labels, self.card.num_classes, self.card.ignore_index)
        return images.to(self.device), onehot.to(self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.generator.train()
        if self.discriminator is not None:
            self.discriminator.train()
        start = self.start_batch if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, start)
        order = list(self.sampler)
        batches = [order[i : i + cfg.batch] for i in range(0, len(order) - cfg.batch + 1, cfg.batch)]
        sums: dict[str, float] = {}
        bar = epoch_bar(batches, epoch, cfg.epochs, start, self.progress)
        for i, indices in enumerate(bar, start=start):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 10_007 + i)  # flips and noise
            real, labels = self._batch(indices, g)
            parts = self.step(real, labels, g)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            for scheduler in self.schedulers:
                scheduler.step()
            if self.stop_signal is not None:
                self._save_state(self.run_dir / "weights" / "last.pt", epoch, i + 1)
                raise TrainingStopped(epoch, i + 1)
            bar.set_postfix({k: f"{v / (i - start + 1):.3f}" for k, v in sums.items() if k in ("loss_d", "loss_g")})
        return {k: v / max(1, len(batches)) for k, v in sums.items()}

    def step(self, real: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        """One optimisation step of the discriminator, then the generator (the VAE: its one step);
        returns the loss parts."""
        cfg, device = self.cfg, self.device
        if self.card.arch == "vae":
            return self._vae_step(real)
        assert self.discriminator is not None and self.optimizer_d is not None
        conditional = self.card.conditional
        with autocast(device, cfg.amp):
            if conditional:
                fake = self.generator(labels)
            else:
                fake = self.generator(torch.randn(len(real), cfg.z_dim, generator=g).to(device))

        discriminator = self.discriminator

        def judge(images: torch.Tensor) -> torch.Tensor:
            with autocast(device, cfg.amp):
                return discriminator(torch.cat([labels, images], 1) if conditional else images).float()

        # discriminator: real pairs against the generator's, the generator held fixed
        loss_d = 0.5 * (
            adversarial(judge(real), True, cfg.gan_loss) + adversarial(judge(fake.detach()), False, cfg.gan_loss)
        )
        self._check(loss_d)
        self.optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizer_d.step()

        # generator: fool the (now fixed) discriminator, and stay near the real image
        self.discriminator.requires_grad_(False)
        loss_adv = adversarial(judge(fake), True, cfg.gan_loss)
        l1 = (fake.float() - real).abs().mean()
        loss_g = loss_adv + (cfg.l1_weight * l1 if conditional else 0.0)
        self._check(loss_g)
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizer_g.step()
        self.discriminator.requires_grad_(True)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "loss_adv": loss_adv.item(), "l1": l1.item()}

    def _vae_step(self, real: torch.Tensor) -> dict[str, float]:
        with autocast(self.device, self.cfg.amp):
            recon, mu, logvar = self.generator(real)
        rec = F.mse_loss(recon.float(), real, reduction="sum") / len(real)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(real)
        loss = rec + self.cfg.kl_weight * kl
        self._check(loss)
        self.optimizer_g.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_g.step()
        return {"loss_g": loss.item(), "l1": (recon.float() - real).abs().mean().item(), "kl": kl.item()}

    def _check(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise SeglabError(f"the loss became {loss.item()}; lower --lr, or train without --amp")

    @torch.no_grad()
    def validate(self) -> float:
        """Mean L1 between val images and the generator's painting of their label maps (pix2pix,
        spade; dropout on, as when sampling) or their reconstruction (vae)."""
        total, count = 0.0, 0
        if not self.card.conditional:
            self.generator.eval()  # the VAE's BatchNorm: running statistics, and leave them alone
        for start in range(0, len(self.val_set), self.cfg.batch):
            items = [self.val_set[i] for i in range(start, min(start + self.cfg.batch, len(self.val_set)))]
            real = to_unit(torch.stack([it["image"] for it in items])).to(self.device)
            with autocast(self.device, self.cfg.amp):
                if self.card.conditional:
                    labels = torch.stack([it["labels"] for it in items])
                    fake = self.generator(
                        one_hot(labels, self.card.num_classes, self.card.ignore_index).to(self.device)
                    )
                else:
                    vae = cast(VAE, self.generator)
                    fake = vae.decode(vae.encode(real)[0])
            total += (fake.float() - real).abs().mean(dim=(1, 2, 3)).sum().item()
            count += len(items)
        self.generator.train()
        return total / count

    @torch.no_grad()
    def save_grid(self, path: Path) -> None:
        """Label map | generated | real, a row per fixed val item; or a grid from fixed noise."""
        from seglab.gen.sample import colorize

        if self.card.conditional:
            labels = torch.stack([it["labels"] for it in self.grid_items])
            with autocast(self.device, self.cfg.amp):
                fake = self.generator(one_hot(labels, self.card.num_classes, self.card.ignore_index).to(self.device))
            tiles = []
            for item, image in zip(self.grid_items, fake.float().cpu(), strict=True):
                tiles += [colorize(item["labels"], self.card), image.add(1).div(2), item["image"].float() / 255]
            nrow = 3
        else:
            self.generator.eval()  # BatchNorm's running statistics, as sampling uses
            with autocast(self.device, self.cfg.amp):
                decode = cast(VAE, self.generator).decode if self.card.arch == "vae" else self.generator
                fake = decode(self.grid_noise.to(self.device))
            self.generator.train()
            tiles, nrow = list(fake.float().cpu().add(1).div(2)), 4
        save_image(make_grid(torch.stack(tiles).clamp(0, 1), nrow=nrow, padding=2), path)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _state(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def _save_state(self, path: Path, epochs_done: int, batch: int) -> None:
        state: dict[str, Any] = {
            "format_version": 1,
            "card": asdict(self.card),
            "model": self._state(self.generator),
            "config": asdict(self.cfg),
            "epoch": epochs_done,
            "batch_in_epoch": batch,
            "optimizer_g": self.optimizer_g.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": rng_state(),
            "rows": self.rows,
        }
        if self.discriminator is not None and self.optimizer_d is not None:
            state["discriminator"] = self._state(self.discriminator)
            state["optimizer_d"] = self.optimizer_d.state_dict()
        save_checkpoint(path, state, keep_previous=True)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        with training_state(self.cfg.resume):
            self._load_state(ckpt)
        self.log(f"resume: continuing {self.run_dir} from epoch {self.start_epoch + 1}/{self.cfg.epochs}")

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        self.generator.load_state_dict(ckpt["model"])
        self.optimizer_g.load_state_dict(ckpt["optimizer_g"])
        if self.discriminator is not None and self.optimizer_d is not None:
            self.discriminator.load_state_dict(ckpt["discriminator"])
            self.optimizer_d.load_state_dict(ckpt["optimizer_d"])
        for scheduler, state in zip(self.schedulers, ckpt["schedulers"], strict=True):
            scheduler.load_state_dict(state)
        restore_rng(ckpt["rng"])
        self.start_epoch, self.start_batch = ckpt["epoch"], ckpt.get("batch_in_epoch", 0)
        self.rows = restore_rows(ckpt, self.run_dir, self.start_epoch)


def train_generator(config: str | None = None, *, progress: bool = True, log=print, **overrides: Any) -> dict:
    """Train a generator; keyword arguments are the fields of :class:`GenConfig`."""
    cfg, checkpoint = load_gen_config(config, **overrides)
    return GenTrainer(cfg, progress=progress, log=log, checkpoint=checkpoint).fit()
