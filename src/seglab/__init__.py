"""seglab: train, evaluate, predict and ship semantic segmentation models with PyTorch."""

from seglab.api import SegModel, TrainRun, load, train
from seglab.errors import SeglabError

__version__ = "0.1.0"
__all__ = ["SegModel", "SeglabError", "TrainRun", "__version__", "load", "train"]
