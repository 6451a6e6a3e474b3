"""Decoded, split, resampled and augmented images: everything before a network sees a batch.

The names below are this folder's public face; each is imported from its module on first use
(see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

_EXPORTS = {
    "augment": ["AUGMENT_PRESETS", "AugmentConfig", "BatchAugment"],
    "cache": ["cache_key", "cached_array"],
    "dataset": ["Dataset", "Split", "load_dataset", "load_labelled_images"],
    "device": ["DeviceData", "pooled", "training_pool"],
    "imbalance": [
        "IMBALANCE_STRATEGIES",
        "SYNTHESIZING",
        "Strategy",
        "balanced_class_weights",
        "epoch_indices",
        "synthesize",
        "target_counts",
    ],
    "loader": ["Normalize", "TensorSplit", "iterate_batches"],
    "sources": ["CsvColumns", "decode_files"],
    "splits": ["assign_folds", "assign_splits"],
    "synthetic": ["make_synthetic"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, for type checkers
    from tuner.data.augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment
    from tuner.data.cache import cache_key, cached_array
    from tuner.data.dataset import Dataset, Split, load_dataset, load_labelled_images
    from tuner.data.device import DeviceData, pooled, training_pool
    from tuner.data.imbalance import (
        IMBALANCE_STRATEGIES,
        SYNTHESIZING,
        Strategy,
        balanced_class_weights,
        epoch_indices,
        synthesize,
        target_counts,
    )
    from tuner.data.loader import Normalize, TensorSplit, iterate_batches
    from tuner.data.sources import CsvColumns, decode_files
    from tuner.data.splits import assign_folds, assign_splits
    from tuner.data.synthetic import make_synthetic
