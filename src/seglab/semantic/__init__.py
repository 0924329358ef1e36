"""Semantic segmentation: a class per pixel. Its training task and its predictor."""
