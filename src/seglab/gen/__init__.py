"""Generation: images from label maps (pix2pix, SPADE), unconditional baselines (DCGAN, VAE),
their evaluation (segmenter fidelity, FID/KID) and synthetic training pairs for segmentation.

    from seglab.gen import Generator, train_generator
    train_generator(data="data/camvid", model="pix2pix", img_size=240, epochs=40)
    gen = Generator("runs/gen/exp/weights/generator.pt")
    images = gen(label_maps)        # uint8 [B, 3, H, W] from [B, H, W] class indices
"""

from seglab.gen.models import CONDITIONAL, GEN_MODELS, GenCard
from seglab.gen.sample import Generator, augment, sample_folder
from seglab.gen.trainer import GenConfig, train_generator

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
