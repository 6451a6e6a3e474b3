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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from tuner.errors import TunerError

# imbalanced-learn and scikit-learn are imported where they are used: importing them costs every
# worker a second, and most trials draw their epochs without them.

Counts = dict[int, int]


def _as_they_are(classes: np.ndarray, counts: np.ndarray, ratio: float, multipliers: dict[int, float]) -> Counts:
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def _capped(classes: np.ndarray, counts: np.ndarray, ratio: float, multipliers: dict[int, float]) -> Counts:
    cap = math.ceil(ratio * counts.min())  # no class more than ratio times the smallest
    return {int(c): int(min(n, cap)) for c, n in zip(classes, counts, strict=True)}


def _floored(classes: np.ndarray, counts: np.ndarray, ratio: float, multipliers: dict[int, float]) -> Counts:
    floor = math.ceil(counts.max() / ratio)  # no class fewer than the largest over ratio
    return {int(c): int(max(n, floor)) for c, n in zip(classes, counts, strict=True)}


def _times(classes: np.ndarray, counts: np.ndarray, ratio: float, multipliers: dict[int, float]) -> Counts:
    return {int(c): int(round(n * multipliers.get(int(c), 1.0))) for c, n in zip(classes, counts, strict=True)}


def _in_order(labels: np.ndarray, wanted: Counts, seed: int) -> np.ndarray:
    return np.arange(len(labels))


def _resampled(labels: np.ndarray, wanted: Counts, seed: int, *, over: bool) -> np.ndarray:
    """imbalanced-learn's random over- (or under-) sampler, drawing indices to ``wanted`` counts per class."""
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    sampler = (RandomOverSampler if over else RandomUnderSampler)(sampling_strategy=wanted, random_state=seed)
    return sampler.fit_resample(np.arange(len(labels)).reshape(-1, 1), labels)[0][:, 0]


def _multiplied(labels: np.ndarray, wanted: Counts, seed: int) -> np.ndarray:
    """Each class's indices repeated ``int(m)`` times plus a fresh random share for the fraction of ``m``."""
    rng = np.random.default_rng(seed)
    out = []
    for cls, count in wanted.items():
        members = np.flatnonzero(labels == cls)
        whole, extra = divmod(count, len(members))
        out += [np.tile(members, whole), rng.choice(members, size=extra, replace=False)]
    return np.concatenate(out)


def _weighted(labels: np.ndarray, wanted: Counts, seed: int) -> np.ndarray:
    # Draw with replacement, each class equally likely: torch's WeightedRandomSampler semantics.
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return np.random.default_rng(seed).choice(len(labels), size=len(labels), p=weights / weights.sum())


@dataclass(frozen=True)
class Strategy:
    """How many images of each class one epoch holds, how an epoch's indices are drawn, and whether
    new minority images are made once per trial first (then each epoch takes the pool as it is)."""

    counts: Callable[[np.ndarray, np.ndarray, float, dict[int, float]], Counts]
    draw: Callable[[np.ndarray, Counts, int], np.ndarray]
    synthesizes: bool = False


# The registry ``params.imbalance`` names: the schema's allowed values come from its keys.
IMBALANCE_STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(_as_they_are, _in_order),
    "oversample": Strategy(_floored, partial(_resampled, over=True)),
    "undersample": Strategy(_capped, partial(_resampled, over=False)),
    "weighted_sampler": Strategy(_as_they_are, _weighted),
    "multiply": Strategy(_times, _multiplied),
    "smote": Strategy(_floored, _in_order, synthesizes=True),
    "adasyn": Strategy(_floored, _in_order, synthesizes=True),
}
SYNTHESIZING = tuple(name for name, s in IMBALANCE_STRATEGIES.items() if s.synthesizes)


def target_counts(
    labels: np.ndarray, strategy: str, ratio: float, multipliers: dict[int, float] | None = None
) -> Counts:
    """How many items of each class one epoch holds under ``strategy``."""
    classes, counts = np.unique(labels, return_counts=True)
    return IMBALANCE_STRATEGIES[strategy].counts(classes, counts, ratio, multipliers or {})


def epoch_indices(
    labels: np.ndarray,
    strategy: str,
    *,
    ratio: float = 1.0,
    seed: int = 0,
    multipliers: dict[int, float] | None = None,
) -> np.ndarray:
    """Indices into the training split for one epoch (unshuffled for 'none')."""
    wanted = target_counts(labels, strategy, ratio, multipliers)
    return IMBALANCE_STRATEGIES[strategy].draw(labels, wanted, seed)


def epoch_chunk(draw_pass: Callable[[int], np.ndarray], epoch: int, size: int) -> np.ndarray:
    """Epoch ``epoch``'s indices when an epoch is ``size`` images (``train.epoch_images``) rather than a pass.

    The epochs are consecutive slices of a stream of passes (pass ``p`` is ``draw_pass(p)``, already
    shuffled; every pass has the same length), so each pass is seen whole before the next begins, and
    epoch ``k`` is the same whatever ran before it (a resumed trial draws what it would have)."""
    pass_size = len(draw_pass(0))
    start, parts = (epoch - 1) * size, []
    while size > 0:
        p, offset = divmod(start, pass_size)
        part = draw_pass(p)[offset : offset + size]
        parts.append(part)
        start, size = start + len(part), size - len(part)
    return np.concatenate(parts)


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
