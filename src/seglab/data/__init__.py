"""Datasets: layouts, reading files, checking, PyTorch datasets and transforms.

spec = resolve_dataset("path/to/data")        # or a data.yaml
train = get_split(spec, "train")              # list[Sample]
mask = read_mask(train[0], spec)              # (H, W) uint8 class indices
print(check_dataset("path/to/data").format())

pack_dataset("path/to/data", "shards/")       # <split>-NNNNNN.tar + dataset.json (WebDataset format)
spec = resolve_dataset("http://host/shards/val-{000000..000003}.tar")   # a ShardSpec
dataset, loader = shard_loader(spec, "val", EvalTransform(480), batch=4, workers=2)
"""

from seglab.data.check import CheckReport, Problem, check_dataset, class_pixel_counts
from seglab.data.dataset import EpochSampler, SegmentationDataset, build_loader, collate_pad
from seglab.data.formats import (
    FORMATS,
    DatasetFormat,
    color_palette,
    get_split,
    resolve_dataset,
    split_names,
    train_val_splits,
)
from seglab.data.io import read_image, read_mask
from seglab.data.shards import ShardDataset, ShardSpec, build_train_data, build_val_data, pack_dataset, shard_loader
from seglab.data.spec import DataConfig, DatasetSpec, Sample
from seglab.data.synthetic import make_shapes_dataset
from seglab.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "FORMATS",
    "CheckReport",
    "DataConfig",
    "DatasetFormat",
    "DatasetSpec",
    "EpochSampler",
    "EvalTransform",
    "Problem",
    "Sample",
    "SegmentationDataset",
    "ShardDataset",
    "ShardSpec",
    "TrainTransform",
    "build_loader",
    "build_train_data",
    "build_val_data",
    "check_dataset",
    "class_pixel_counts",
    "collate_pad",
    "color_palette",
    "get_split",
    "make_shapes_dataset",
    "pack_dataset",
    "read_image",
    "read_mask",
    "resolve_dataset",
    "shard_loader",
    "split_names",
    "train_val_splits",
]
