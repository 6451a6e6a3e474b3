"""Reproducible, stratified and group-aware splits.

With a group column (patient, slide, lesion) no group ever lands in two splits;
without one the split is stratified by class. The same seed gives the same split.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tuner.errors import DataError

# scikit-learn is imported where a split is drawn: a source with its own splits never needs it, and
# importing it costs every worker a second.


def holdout_mask(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about ``fraction`` of the items, stratified by label and grouped by ``groups``."""
    n = len(labels)
    counts = Counter(labels.tolist())
    rare = [f"{label!r} ({count})" for label, count in counts.items() if count < 2]
    if rare:
        raise DataError(
            f"cannot split stratified: each class needs at least 2 images, but these have fewer: {', '.join(rare)}"
        )
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    mask = np.zeros(n, dtype=bool)
    if groups is None:
        _, held = train_test_split(np.arange(n), test_size=fraction, stratify=labels, random_state=seed)
        mask[held] = True
        return mask
    n_groups = len(set(groups.tolist()))
    n_splits = min(max(2, round(1 / fraction)), n_groups)
    if n_splits < 2:
        raise DataError(f"cannot split by group: only {n_groups} distinct group(s)")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(n), labels, groups))
    mask[held] = True
    return mask


def assign_splits(
    labels: np.ndarray, groups: np.ndarray | None, *, val_fraction: float, test_fraction: float | None, seed: int
) -> np.ndarray:
    """An array of 'train' / 'val' / 'test' per item. ``test_fraction=None`` makes no test split."""
    split = np.full(len(labels), "train", dtype=object)
    rest = np.arange(len(labels))
    if test_fraction:
        test = holdout_mask(labels, groups, test_fraction, seed)
        split[test] = "test"
        rest = np.flatnonzero(~test)
    val_of_rest = val_fraction / (1 - (test_fraction or 0.0))
    val = holdout_mask(labels[rest], None if groups is None else groups[rest], min(val_of_rest, 0.9), seed + 1)
    split[rest[val]] = "val"
    return split


def assign_folds(labels: np.ndarray, groups: np.ndarray | None, *, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per item: stratified, and grouped when ``groups`` is given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = Counter(labels.tolist())
    if min(counts.values()) < k:
        raise DataError(f"cannot make {k} stratified folds: the smallest class has only {min(counts.values())} images")
    fold = np.zeros(len(labels), dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    else:
        if len(set(groups.tolist())) < k:
            raise DataError(f"cannot make {k} grouped folds from {len(set(groups.tolist()))} groups")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups
        )
    for f, (_, held) in enumerate(splitter):
        fold[held] = f
    return fold
