"""Generation: images from label maps (pix2pix, SPADE), unconditional baselines (DCGAN, VAE),
their evaluation (segmenter fidelity, FID/KID) and synthetic training pairs for segmentation.

    from seglab.gen import Generator, train_generator
    train_generator(data="data/camvid", model="pix2pix", img_size=240, epochs=40)
    gen = Generator("runs/gen/exp/weights/generator.pt")
    images = gen(label_maps)        # uint8 [B, 3, H, W] from [B, H, W] class indices
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from seglab.gen.config import GenConfig

if TYPE_CHECKING:
    from seglab.gen.models import CONDITIONAL, GEN_MODELS, GenCard
    from seglab.gen.sample import Generator, augment, sample_folder
    from seglab.gen.trainer import train_generator

# Loaded on first use: they pull in torch (seconds), and `seglab gen --help` needs only GenConfig.
_LAZY = {
    "CONDITIONAL": "models", "GEN_MODELS": "models", "GenCard": "models",
    "Generator": "sample", "augment": "sample", "sample_folder": "sample", "train_generator": "trainer",
}  # fmt: skip

__all__ = [
    "CONDITIONAL",
    "GEN_MODELS",
    "GenCard",
    "GenConfig",
    "Generator",
    "augment",
    "sample_folder",
    "train_generator",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"seglab.gen.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'seglab.gen' has no attribute {name!r}")
