"""Class-imbalance strategies, applied to the training split only, after splitting.

Resampling draws fresh indices every epoch (undersampling then sees all of the
majority class over a run); ``imbalanced-learn`` does the drawing. ``ratio`` is
the largest majority:minority ratio allowed after resampling (1 = balanced).
"""

from __future__ import annotations

import math

import numpy as np
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.utils.class_weight import compute_class_weight

IMBALANCE_STRATEGIES = ("none", "oversample", "undersample", "class_weight", "weighted_sampler")


def target_counts(labels: np.ndarray, strategy: str, ratio: float) -> dict[int, int]:
    """How many items of each class one epoch holds under ``strategy``."""
    classes, counts = np.unique(labels, return_counts=True)
    if strategy == "undersample":
        cap = math.ceil(ratio * counts.min())
        return {int(c): int(min(n, cap)) for c, n in zip(classes, counts, strict=True)}
    if strategy == "oversample":
        floor = math.ceil(counts.max() / ratio)
        return {int(c): int(max(n, floor)) for c, n in zip(classes, counts, strict=True)}
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def epoch_indices(labels: np.ndarray, strategy: str, *, ratio: float = 1.0, seed: int = 0) -> np.ndarray:
    """Indices into the training split for one epoch (unshuffled for 'none' and 'class_weight')."""
    index = np.arange(len(labels)).reshape(-1, 1)
    if strategy == "undersample":
        sampler = RandomUnderSampler(sampling_strategy=target_counts(labels, strategy, ratio), random_state=seed)
    elif strategy == "oversample":
        sampler = RandomOverSampler(sampling_strategy=target_counts(labels, strategy, ratio), random_state=seed)
    elif strategy == "weighted_sampler":
        # Draw with replacement, each class equally likely: torch's WeightedRandomSampler semantics.
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        return np.random.default_rng(seed).choice(len(labels), size=len(labels), p=weights / weights.sum())
    else:
        return index[:, 0]
    resampled, _ = sampler.fit_resample(index, labels)
    return resampled[:, 0]


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights, n / (k * count); 0 for a class absent from training."""
    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights
