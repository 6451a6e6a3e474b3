"""Class-imbalance strategies, applied to the training split only, after splitting.

Resampling draws fresh indices every epoch (undersampling then sees all of the
majority class over a run); ``imbalanced-learn`` does the drawing. ``ratio`` is
the largest majority:minority ratio allowed after resampling (1 = balanced).

``multiply`` repeats each class by its own multiplier (``cancer: 12`` puts each
cancer image into an epoch 12 times; a fractional part is drawn afresh each
epoch). ``smote`` and ``adasyn`` make new minority images once per trial, by
interpolating in pixel space between a training image and one of its nearest
same-class neighbours (images flattened at the training size); the new images
join the training split of that trial only, never validation or test.
"""

from __future__ import annotations

import math

import numpy as np

from tuner.errors import TunerError

# imbalanced-learn and scikit-learn are imported where they are used: importing them costs every
# worker a second, and most trials draw their epochs without them.

IMBALANCE_STRATEGIES = (
    "none",
    "oversample",
    "undersample",
    "class_weight",
    "weighted_sampler",
    "multiply",
    "smote",
    "adasyn",
)
SYNTHESIZING = ("smote", "adasyn")  # strategies that make new images rather than draw indices


def target_counts(
    labels: np.ndarray, strategy: str, ratio: float, multipliers: dict[int, float] | None = None
) -> dict[int, int]:
    """How many items of each class one epoch holds under ``strategy``."""
    classes, counts = np.unique(labels, return_counts=True)
    if strategy == "undersample":
        cap = math.ceil(ratio * counts.min())
        return {int(c): int(min(n, cap)) for c, n in zip(classes, counts, strict=True)}
    if strategy in ("oversample", *SYNTHESIZING):
        floor = math.ceil(counts.max() / ratio)
        return {int(c): int(max(n, floor)) for c, n in zip(classes, counts, strict=True)}
    if strategy == "multiply":
        multipliers = multipliers or {}
        return {int(c): int(round(n * multipliers.get(int(c), 1.0))) for c, n in zip(classes, counts, strict=True)}
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def _multiplied(labels: np.ndarray, multipliers: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """Each class's indices repeated ``int(m)`` times plus a fresh random share for the fraction of ``m``."""
    out = []
    for cls, count in target_counts(labels, "multiply", 1.0, multipliers).items():
        members = np.flatnonzero(labels == cls)
        whole, extra = divmod(count, len(members))
        out += [np.tile(members, whole), rng.choice(members, size=extra, replace=False)]
    return np.concatenate(out)


def epoch_indices(
    labels: np.ndarray,
    strategy: str,
    *,
    ratio: float = 1.0,
    seed: int = 0,
    multipliers: dict[int, float] | None = None,
) -> np.ndarray:
    """Indices into the training split for one epoch (unshuffled for 'none' and 'class_weight')."""
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    index = np.arange(len(labels)).reshape(-1, 1)
    if strategy == "undersample":
        sampler = RandomUnderSampler(sampling_strategy=target_counts(labels, strategy, ratio), random_state=seed)
    elif strategy == "oversample":
        sampler = RandomOverSampler(sampling_strategy=target_counts(labels, strategy, ratio), random_state=seed)
    elif strategy == "multiply":
        return _multiplied(labels, multipliers or {}, np.random.default_rng(seed))
    elif strategy == "weighted_sampler":
        # Draw with replacement, each class equally likely: torch's WeightedRandomSampler semantics.
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        return np.random.default_rng(seed).choice(len(labels), size=len(labels), p=weights / weights.sum())
    else:
        return index[:, 0]
    resampled, _ = sampler.fit_resample(index, labels)
    return resampled[:, 0]


def synthesize(
    images: np.ndarray, labels: np.ndarray, strategy: str, *, ratio: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """New minority images (uint8, N×C×H×W) and their labels from SMOTE or ADASYN on flattened pixels."""
    classes, counts = np.unique(labels, return_counts=True)
    wanted = target_counts(labels, strategy, ratio)
    short = [int(n) for c, n in zip(classes, counts, strict=True) if wanted[int(c)] > n]
    if not short:  # already within the ratio
        return images[:0], labels[:0]
    if min(short) < 2:
        raise TunerError(f"{strategy} needs at least 2 training images of each class it oversamples")
    from imblearn.over_sampling import ADASYN, SMOTE

    k = min(5, min(short) - 1)
    cls = SMOTE if strategy == "smote" else ADASYN
    kwargs = {"k_neighbors": k} if strategy == "smote" else {"n_neighbors": k}
    sampler = cls(sampling_strategy=wanted, random_state=seed, **kwargs)
    flat = images.reshape(len(images), -1).astype(np.float32)
    try:
        resampled, new_labels = sampler.fit_resample(flat, labels)
    except (ValueError, RuntimeError) as err:  # ADASYN: no majority neighbours; too few samples
        raise TunerError(f"{strategy} could not make new images: {err}") from None
    # imbalanced-learn appends the synthetic rows after the originals.
    new = resampled[len(images) :].round().clip(0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
    return new, new_labels[len(images) :].astype(labels.dtype)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights, n / (k * count); 0 for a class absent from training."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return weights
