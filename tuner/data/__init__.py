"""Data: sources, the decode-once cache, splits, imbalance strategies, batched augmentation."""

from tuner.data.dataset import Dataset, Split, load_dataset

__all__ = ["Dataset", "Split", "load_dataset"]
