"""Decoded, split, resampled and augmented images: everything before a network sees a batch.

The names imported below are this folder's public face; each is imported from its module on first
use (see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

if TYPE_CHECKING:  # also read at run time by lazy_exports
    from tuner.data.augment import AUGMENT_PRESETS, AugmentConfig, BatchAugment
    from tuner.data.cache import cache_key, cached_array
    from tuner.data.dataset import Dataset, Split, load_dataset, load_labelled_images
    from tuner.data.device import DeviceData, pooled, training_pool
    from tuner.data.imbalance import (
        IMBALANCE_STRATEGIES,
        SYNTHESIZING,
        Strategy,
        balanced_class_weights,
        epoch_chunk,
        epoch_indices,
        synthesize,
        target_counts,
    )
    from tuner.data.loader import Normalize, TensorSplit, iterate_batches
    from tuner.data.sources import CsvColumns, decode_files, decode_image, resize_array
    from tuner.data.splits import assign_folds, assign_splits
    from tuner.data.synthetic import make_synthetic
