"""Image generators: label map to image (pix2pix, SPADE), and unconditional ones from noise.

- ``pix2pix`` (Isola et al., 2017): a U-Net generator takes the one-hot label map and paints an
  RGB image; a PatchGAN discriminator judges (label map, image) pairs patch by patch (70x70
  receptive field). Trained with an adversarial loss plus L1 to the real image. Dropout in the
  decoder stays on when sampling, as in the paper: it is the generator's only noise.
- ``spade`` (Park et al., 2019): the same U-Net, but every decoder normalisation is SPADE:
  parameter-free instance norm whose per-pixel scale and shift are predicted from the label map,
  so the layout is not washed out by normalisation deep in the network.
- ``dcgan`` (Radford et al., 2016) and ``vae`` (Kingma and Welling, 2014): images from noise, no
  label map. They are the baselines a conditional model must beat on the same images.
- ``stylegan`` (Karras et al., 2020): StyleGAN2 from noise, with its resnet discriminator; the
  networks are in ``stylegan.py``.

Images are [-1, 1] floats, label maps ``[B, H, W]`` class indices; the ignore label gets its
own input channel (the generator still has to paint void pixels). Any image size works: the
networks pad to the multiple their down-sampling needs and crop back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GEN_MODELS = ("pix2pix", "spade", "dcgan", "vae", "stylegan")
CONDITIONAL = ("pix2pix", "spade")


@dataclass
class GenCard:
    """What a generator checkpoint says about its model, apart from the weights."""

    arch: str  # one of GEN_MODELS
    size: list[int]  # [H, W] of the images it makes
    num_classes: int = 0  # label classes (conditional models); the ignore label is one more channel
    classes: list[str] = field(default_factory=list)
    colors: list[tuple[int, int, int]] = field(default_factory=list)
    ignore_index: int = 255
    width: int = 32  # channels of the first layer; deeper layers double it, up to 8x
    z_dim: int = 128  # noise size (dcgan, vae; stylegan: z and w)
    task: str = "generate"

    @property
    def conditional(self) -> bool:
        return self.arch in CONDITIONAL

    @classmethod
    def from_dict(cls, values: Any, source: str | Path) -> GenCard:
        """The card a generator checkpoint claims, checked field by field (see CardFields)."""
        from seglab.engine.checkpoint import CardFields

        card = CardFields(values, cls, source)
        num_classes = card.integer("num_classes", 0, 254, default=0)  # label maps are 8-bit, ignore included
        classes, colors = card.classes(num_classes)
        return cls(
            arch=card.name("arch", GEN_MODELS),
            size=card.integers("size", (2,), 16, 4096),
            num_classes=num_classes,
            classes=classes,
            colors=colors,
            ignore_index=card.integer("ignore_index", 0, 255, default=255),
            width=card.integer("width", 4, 1024, default=32),
            z_dim=card.integer("z_dim", 1, 4096, default=128),
            task=card.name("task", ("generate",), default="generate"),
        )

    def build(self) -> nn.Module:
        h, w = self.size
        if self.conditional:
            return UNetGenerator(self.num_classes + 1, width=self.width, spade=self.arch == "spade")
        if self.arch == "dcgan":
            return DCGANGenerator(self.z_dim, (h, w), width=self.width)
        if self.arch == "stylegan":
            from seglab.gen.stylegan import StyleGAN2Generator  # stylegan.py imports pad_to from here

            return StyleGAN2Generator(self.z_dim, (h, w), width=self.width)
        return VAE(self.z_dim, (h, w), width=self.width)


def one_hot(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[B, H, W] class indices -> [B, num_classes + 1, H, W] floats; the last channel is 'ignore'
    (the ignore label, or any value outside the classes)."""
    labels = labels.long()
    labels = torch.where((labels < 0) | (labels >= num_classes) | (labels == ignore_index), num_classes, labels)
    return F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom and right edges to a multiple of ``multiple``; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    return x, (h, w)


def _widths(width: int, depth: int) -> list[int]:
    return [width * min(2**i, 8) for i in range(depth)]


class SPADE(nn.Module):
    """Instance norm without affine parameters, then a scale and shift per pixel from the label map."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = F.interpolate(labels, size=x.shape[-2:], mode="nearest")
        h = self.shared(labels)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class _Up(nn.Module):
    """ReLU, 2x transposed convolution, norm (instance or SPADE), optional dropout: a pix2pix decoder step."""

    def __init__(self, cin: int, cout: int, label_channels: int | None, dropout: float) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        self.norm: nn.Module = SPADE(cout, label_channels) if label_channels else nn.InstanceNorm2d(cout, affine=True)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(x))
        x = self.norm(x, labels) if isinstance(self.norm, SPADE) else self.norm(x)
        return self.dropout(x)


class UNetGenerator(nn.Module):
    """pix2pix's U-Net: ``depth`` stride-2 convolutions down, as many transposed ones up, with
    skip connections; dropout 0.5 in the three innermost decoder steps; tanh output.

    ``forward(labels one-hot [B, L, H, W]) -> image [B, 3, H, W]`` in [-1, 1].
    """

    def __init__(self, label_channels: int, *, width: int = 32, depth: int = 6, spade: bool = False) -> None:
        super().__init__()
        self.depth = depth
        c = _widths(width, depth)
        self.downs = nn.ModuleList([nn.Conv2d(label_channels, c[0], 4, stride=2, padding=1)])
        for i in range(1, depth):
            innermost = i == depth - 1  # pix2pix leaves the bottleneck unnormalised
            layers: list[nn.Module] = [nn.LeakyReLU(0.2), nn.Conv2d(c[i - 1], c[i], 4, 2, 1, bias=innermost)]
            if not innermost:
                layers.append(nn.InstanceNorm2d(c[i], affine=True))
            self.downs.append(nn.Sequential(*layers))
        spade_channels = label_channels if spade else None
        self.ups = nn.ModuleList(
            _Up(c[i] if i == depth - 1 else 2 * c[i], c[i - 1], spade_channels, 0.5 if i >= depth - 3 else 0.0)
            for i in range(depth - 1, 0, -1)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c[0], 3, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to(labels, 2**self.depth)
        padded_labels = x
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = torch.cat([up(x, padded_labels), skips.pop()], dim=1)
        return self.head(x)[..., :h, :w]


class PatchDiscriminator(nn.Module):
    """PatchGAN: a real/fake logit for every 70x70 patch (three stride-2 layers, then two stride-1)."""

    def __init__(self, in_channels: int, *, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = width
        for i in range(1, layers + 1):
            cout = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.InstanceNorm2d(cout, affine=True)]
            blocks.append(nn.LeakyReLU(0.2))
            cin = cout
        blocks.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DCGANGenerator(nn.Module):
    """Noise [B, z] -> image [B, 3, H, W]: a linear layer to a (H/16, W/16) map, four 2x transposed
    convolutions with BatchNorm, tanh; cropped to (H, W)."""

    def __init__(self, z_dim: int, size: tuple[int, int], *, width: int = 32) -> None:
        super().__init__()
        self.z_dim, self.size = z_dim, tuple(size)
        self.base = (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
        c = 8 * width
        self.fc = nn.Sequential(nn.Linear(z_dim, c * self.base[0] * self.base[1]), nn.Unflatten(1, (c, *self.base)))
        layers: list[nn.Module] = [nn.BatchNorm2d(c), nn.ReLU()]
        for _ in range(3):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        return self.net(self.fc(z))[..., :h, :w]


class ConvDiscriminator(nn.Module):
    """DCGAN's discriminator: four stride-2 convolutions (BatchNorm after the first), then a logit per
    location of the (H/16, W/16) map, so one network fits any image size."""

    def __init__(self, *, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(3):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pad_to(x, 16)[0])


class VAE(nn.Module):
    """A convolutional VAE: four stride-2 convolutions to a Gaussian over ``z``, and a DCGAN-shaped
    decoder back. ``forward(x) -> (reconstruction, mu, logvar)``; ``decode(z)`` samples."""

    def __init__(self, z_dim: int, size: tuple[int, int], *, width: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        layers: list[nn.Module] = []
        cin, c = 3, width
        for _ in range(4):
            layers += [nn.Conv2d(cin, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]
            cin, c = c, 2 * c
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.decoder = DCGANGenerator(z_dim, size, width=width)
        features = cin * self.decoder.base[0] * self.decoder.base[1]
        self.mu = nn.Linear(features, z_dim)
        self.logvar = nn.Linear(features, z_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(pad_to(x, 16)[0])
        return self.mu(h), self.logvar(h).clamp(-20, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def build_discriminator(card: GenCard, *, width: int = 64) -> nn.Module | None:
    """The discriminator a generator trains against (none for the VAE)."""
    if card.conditional:
        return PatchDiscriminator(card.num_classes + 1 + 3, width=width)
    if card.arch == "dcgan":
        return ConvDiscriminator(width=card.width)
    if card.arch == "stylegan":
        from seglab.gen.stylegan import StyleGAN2Discriminator

        return StyleGAN2Discriminator(card.size, width=width)
    return None


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation, used by pix2pix too: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
