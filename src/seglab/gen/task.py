"""Generators in the training loop (``seglab gen train``): pix2pix and SPADE paint label maps,
DCGAN and VAE are the unconditional baselines, StyleGAN2 the unconditional model. The run folder adds

    samples/epoch_NNN.png  a fixed set of val label maps painted every epoch, beside the real
                           images (or a fixed noise grid)
    weights/generator.pt   the generator alone: what sample, augment and eval take

and metrics.csv has the loss parts and the val L1 distance per epoch. pix2pix's recipe: Adam
(lr 2e-4, beta1 0.5) for both networks, a constant learning rate for the first half of the epochs
and a linear decay to zero over the second, L1 weight 100.

StyleGAN2's (Karras et al. 2020), in ``_stylegan_step``: the non-saturating logistic loss for both
networks; style mixing (two ws, a random crossover layer) in ``--style-mixing`` of the steps; the
R1 penalty on real images every ``R1_INTERVAL``-th discriminator step ("lazy" regularisation),
weighted ``--r1-gamma / 2`` times the interval, with the discriminator's Adam rate and betas
raised to the power interval / (interval + 1) to match, as in the paper; Adam betas (0, 0.99);
the generator's mean w tracked at every step. No path-length regularisation.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid, save_image

from seglab.data import resolve_dataset, train_val_splits
from seglab.engine.distributed import all_reduce_sum
from seglab.engine.inference import autocast
from seglab.engine.schedule import Plan
from seglab.engine.trainer import Step, Task
from seglab.gen.data import PairDataset, generation_size, to_unit
from seglab.gen.models import VAE, GenCard, build_discriminator, init_weights, one_hot
from seglab.gen.stylegan import StyleGAN2Generator

R1_INTERVAL = 16  # stylegan: the R1 penalty every this many discriminator steps


def adversarial(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """The GAN loss of discriminator ``logits`` against an all-real or all-fake target."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class GenTask(Task):
    command = "gen train"
    fields = ("loss_d", "loss_g", "loss_adv", "l1", "kl", "r1", "val_l1")
    best = "generator.pt"  # every good epoch: a generator has no score that picks one epoch over another
    curves: ClassVar[dict[str, Any]] = {
        "losses": {"loss_d": "discriminator", "loss_g": "generator"},
        "scores": {"val_l1": "val L1"},
        "title": "val L1 x 100 (lower is closer to the real images)",
    }

    def setup(self, checkpoint: dict[str, Any] | None, model: nn.Module | None) -> None:
        cfg = self.cfg
        spec = self.spec = resolve_dataset(cfg.data, cache_dir=cfg.data_cache, progress=self.trainer.progress)
        train, val = train_val_splits(spec, val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit)
        size = GenCard.from_dict(checkpoint["card"], cfg.resume or "").size if checkpoint else None
        size = size or generation_size(train[0].image, cfg.img_size)
        self.train_set = PairDataset(train, spec, size, hflip=cfg.hflip)
        self.val_set = PairDataset(val, spec, size)
        self.train_set.preload(self.trainer.progress)
        self.train_loader = self.epoch_loader(self.train_set)
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
        stylegan = cfg.model == "stylegan"  # its layers initialise themselves (equalised learning rate)
        if not stylegan:
            init_weights(self.generator)
        self.models = {"generator": self.generator}
        self.discriminator = build_discriminator(self.card, width=cfg.disc_width)
        if self.discriminator is not None:
            if not stylegan:
                init_weights(self.discriminator)
            self.models["discriminator"] = self.discriminator.to(self.device)
        self.d_steps = 0  # discriminator steps so far: when stylegan's lazy R1 penalty is due
        # the fixed inputs of the per-epoch sample grid
        g = torch.Generator().manual_seed(cfg.seed)
        self.grid_noise = torch.randn(4 * cfg.samples, cfg.z_dim, generator=g)
        spread = np.linspace(0, len(self.val_set) - 1, min(cfg.samples, len(self.val_set))).round().astype(int)
        self.grid_items = [self.val_set[int(i)] for i in spread]  # spread out: val sets are often video

    def optimizers(self, plan: Plan) -> dict[str, tuple[torch.optim.Optimizer, Any]]:
        cfg = self.cfg

        def factor(step: int) -> float:  # pix2pix: constant, then linear to zero (of the plan as it is now)
            total = plan.total
            hold = int(cfg.decay_from * total)
            return 1.0 if step < hold else max(0.0, (total - step) / max(1, total - hold))

        assert cfg.lr is not None and cfg.beta1 is not None  # GenConfig fills them in
        parts: dict[str, tuple[torch.optim.Optimizer, Any]] = {}
        for name, model in self.models.items():
            lr, betas = cfg.lr, (cfg.beta1, 0.999)
            if cfg.model == "stylegan":
                betas = (cfg.beta1, 0.99)
                if name == "discriminator":  # lazy R1: the same effective rate with the penalty every 16th step
                    c = R1_INTERVAL / (R1_INTERVAL + 1)
                    lr, betas = lr * c, (betas[0] ** c, betas[1] ** c)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
            parts[name] = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
        return parts

    def summary(self) -> str:
        count = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in self.models.items()}
        h, w = self.card.size
        return (
            f"{self.cfg.model} ({count['generator']:.2f}M generator, {count.get('discriminator', 0.0):.2f}M "
            f"discriminator params) on {self.device}, {len(self.train_set)} train / {len(self.val_set)} val pairs "
            f"at {h}x{w}, {self.amp()}"
        )

    def step(self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]) -> Step:
        """The discriminator's update, then the generator's (the VAE: its one update)."""
        cfg, device = self.cfg, self.device
        real = to_unit(batch["image"]).to(device)
        if self.card.arch == "stylegan":
            yield from self._stylegan_step(real, nets)
            return
        labels = one_hot(batch["labels"], self.card.num_classes, self.card.ignore_index).to(device)
        if self.card.arch == "vae":
            with autocast(device, cfg.amp, cfg.amp_dtype):
                recon, mu, logvar = nets["generator"](real)
            rec = F.mse_loss(recon.float(), real, reduction="sum") / len(real)
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(real)
            loss = rec + cfg.kl_weight * kl
            yield (
                "generator",
                loss,
                {"loss_g": loss.item(), "l1": (recon.float() - real).abs().mean().item(), "kl": kl.item()},
            )
            return
        conditional = self.card.conditional
        with autocast(device, cfg.amp, cfg.amp_dtype):
            fake = nets["generator"](labels if conditional else torch.randn(len(real), cfg.z_dim, device=device))

        def judge(discriminator: nn.Module, images: torch.Tensor) -> torch.Tensor:
            with autocast(device, cfg.amp, cfg.amp_dtype):
                return discriminator(torch.cat([labels, images], 1) if conditional else images).float()

        # discriminator: real pairs against the generator's, the generator held fixed
        d = nets["discriminator"]
        loss_d = 0.5 * (
            adversarial(judge(d, real), True, cfg.gan_loss) + adversarial(judge(d, fake.detach()), False, cfg.gan_loss)
        )
        yield "discriminator", loss_d, {"loss_d": loss_d.item()}
        # generator: fool the (now fixed) discriminator, and stay near the real image. The bare
        # discriminator: under DDP its wrapper would wait for gradients it does not get here
        fixed = self.models["discriminator"].requires_grad_(False)
        try:
            loss_adv = adversarial(judge(fixed, fake), True, cfg.gan_loss)
            l1 = (fake.float() - real).abs().mean()
            loss_g = loss_adv + (cfg.l1_weight * l1 if conditional else 0.0)
            yield "generator", loss_g, {"loss_g": loss_g.item(), "loss_adv": loss_adv.item(), "l1": l1.item()}
        finally:
            fixed.requires_grad_(True)

    def _stylegan_step(self, real: torch.Tensor, nets: dict[str, nn.Module]) -> Step:
        """StyleGAN2's step: one batch of images from noise (two ws in --style-mixing of the steps),
        the discriminator's logistic loss (plus lazy R1), then the generator's non-saturating loss."""
        cfg, device = self.cfg, self.device
        num_ws = cast(StyleGAN2Generator, self.models["generator"]).num_ws
        z = torch.randn(len(real), cfg.z_dim, device=device)
        mix = None
        if torch.rand(()).item() < cfg.style_mixing:  # ws from z before the crossover layer, from z2 after
            mix = (torch.randn(len(real), cfg.z_dim, device=device), int(torch.randint(1, num_ws, ()).item()))
        with autocast(device, cfg.amp, cfg.amp_dtype):
            fake = nets["generator"](z, mix, update_w_avg=True)

        def judge(discriminator: nn.Module, images: torch.Tensor) -> torch.Tensor:
            with autocast(device, cfg.amp, cfg.amp_dtype):
                return discriminator(images).float()

        # discriminator: softplus(D(fake)) + softplus(-D(real)); every 16th step also
        # gamma / 2 * |grad_x D(x)|^2 on the reals, times 16 (the paper's lazy regularisation)
        d = nets["discriminator"]
        lazy_r1 = cfg.r1_gamma > 0 and self.d_steps % R1_INTERVAL == 0
        real = real.detach().requires_grad_(lazy_r1)
        real_logits = judge(d, real)
        loss_d = F.softplus(judge(d, fake.detach())).mean() + F.softplus(-real_logits).mean()
        r1 = torch.zeros((), device=device)
        if lazy_r1:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = cfg.r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * R1_INTERVAL
        self.d_steps += 1
        yield "discriminator", loss_d + r1, {"loss_d": loss_d.item(), "r1": r1.item()}
        # generator: softplus(-D(fake)), the bare discriminator held fixed (see step)
        fixed = self.models["discriminator"].requires_grad_(False)
        try:
            loss_g = F.softplus(-judge(fixed, fake)).mean()
            yield "generator", loss_g, {"loss_g": loss_g.item()}
        finally:
            fixed.requires_grad_(True)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Mean L1 between val images and the generator's painting of their label maps (pix2pix,
        spade; dropout on, as when sampling) or their reconstruction (vae); each rank scores every
        world-th pair and the sums are added. DCGAN and StyleGAN have nothing to compare with."""
        if self.card.arch in ("dcgan", "stylegan"):
            return {}, None
        cfg, device = self.cfg, self.device
        if not self.card.conditional:
            model.eval()  # the VAE's BatchNorm: running statistics, and leave them alone
        mine = list(range(self.dist.rank, len(self.val_set), self.dist.world))
        total, count = 0.0, 0
        for start in range(0, len(mine), cfg.batch):
            items = [self.val_set[i] for i in mine[start : start + cfg.batch]]
            real = to_unit(torch.stack([it["image"] for it in items])).to(device)
            with autocast(device, cfg.amp, cfg.amp_dtype):
                if self.card.conditional:
                    labels = torch.stack([it["labels"] for it in items])
                    fake = model(one_hot(labels, self.card.num_classes, self.card.ignore_index).to(device))
                else:
                    vae = cast(VAE, model)
                    fake = vae.decode(vae.encode(real)[0])
            total += (fake.float() - real).abs().mean(dim=(1, 2, 3)).sum().item()
            count += len(items)
        model.train()
        sums = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device)).tolist()
        return {"val_l1": sums[0] / sums[1]}, {"val_l1": sums[0] / sums[1]}

    def after_epoch(self, run_dir: Path, epoch: int, model: nn.Module) -> None:
        (run_dir / "samples").mkdir(exist_ok=True)
        self.save_grid(model, run_dir / "samples" / f"epoch_{epoch + 1:03d}.png")

    @torch.no_grad()
    def save_grid(self, model: nn.Module, path: Path) -> None:
        """Label map | generated | real, a row per fixed val item; or a grid from fixed noise. Its
        dropout draws from a generator of its own: the same every epoch, and the run's untouched
        (a run resumed from last.pt, saved before the grid, draws what the uninterrupted one drew)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            self._grid(model, path)

    def _grid(self, model: nn.Module, path: Path) -> None:
        from seglab.gen.sample import colorize

        cfg, card = self.cfg, self.card
        if card.conditional:
            labels = torch.stack([it["labels"] for it in self.grid_items])
            with autocast(self.device, cfg.amp, cfg.amp_dtype):
                fake = model(one_hot(labels, card.num_classes, card.ignore_index).to(self.device))
            tiles = []
            for item, image in zip(self.grid_items, fake.float().cpu(), strict=True):
                tiles += [colorize(item["labels"], card), image.add(1).div(2), item["image"].float() / 255]
            nrow = 3
        else:
            model.eval()  # BatchNorm's running statistics, as sampling uses
            with autocast(self.device, cfg.amp, cfg.amp_dtype):
                decode = cast(VAE, model).decode if card.arch == "vae" else model
                fake = decode(self.grid_noise.to(self.device))
            model.train()
            tiles, nrow = list(fake.float().cpu().add(1).div(2)), 4
        save_image(make_grid(torch.stack(tiles).clamp(0, 1), nrow=nrow, padding=2), path)

    def state(self) -> dict[str, Any]:
        return {"d_steps": self.d_steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.d_steps = int(state.get("d_steps", 0))

    def payload(self, model: nn.Module) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {"format_version": 1, "card": asdict(self.card), "model": weights}
