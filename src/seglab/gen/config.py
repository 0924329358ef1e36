"""A generator's training config: the flags of ``seglab gen train``. Imports no torch, so the
command line can be built (and ``--help`` answered) before torch is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from seglab.config import RunConfig

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
