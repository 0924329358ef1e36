"""seglab: train, evaluate, predict and ship semantic segmentation models with PyTorch.

import seglab
run = seglab.train(data="path/to/data", model="unet", epochs=20)
model = seglab.load(run.best)
"""

from typing import TYPE_CHECKING, Any

from seglab.errors import SeglabError

__version__ = "0.1.0"
__all__ = ["SegModel", "SeglabError", "TrainRun", "__version__", "load", "train"]

if TYPE_CHECKING:
    from seglab.api import SegModel, TrainRun, load, train


def __getattr__(name: str) -> Any:
    # The API pulls in torch (seconds); `seglab --help` and argument errors should not wait for it.
    if name in ("SegModel", "TrainRun", "load", "train"):
        from seglab import api

        return getattr(api, name)
    raise AttributeError(f"module 'seglab' has no attribute {name!r}")
