"""Class probabilities from trained networks: one or several averaged (seeds, folds), each over
flipped views of the images (test-time augmentation).

refit, evaluate and predict all go through :func:`average_probabilities`, so a saved model
reproduces the numbers refit reported for it, ensemble and TTA included.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from tuner.data import Normalize, TensorSplit, iterate_batches
from tuner.train.loop import predict
from tuner.train.losses import logits_to_probs

# Each view is the image dimensions it flips: none, left-right, up-down, both.
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip": ((), (-1,)),
    "flips": ((), (-1,), (-2,), (-2, -1)),
}


def check_tta(name: str) -> str:
    if name not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}, but got tta={name!r}")
    return name


@torch.inference_mode()
def average_probabilities(
    models: Sequence[nn.Module],
    images: TensorSplit | np.ndarray,
    *,
    normalize: Normalize,
    num_classes: int,
    positive_index: int | None,
    tta: str = "none",
    batch_size: int = 512,
) -> torch.Tensor:
    """Mean class probabilities over ``models`` and the ``tta`` views (on the CPU, one row per image).

    ``images``: a split already on the models' device, or uint8 images N×C×S×S at the models' size.
    """
    views = TTA_VIEWS[check_tta(tta)]
    device = next(models[0].parameters()).device
    if isinstance(images, np.ndarray):
        images = TensorSplit.from_numpy(images, np.zeros(len(images), dtype=np.int64), device)
    to_probs = partial(logits_to_probs, num_classes=num_classes, positive_index=positive_index)
    order = torch.arange(len(images))
    total: torch.Tensor | None = None
    for model in models:
        for dims in views:
            batches = iterate_batches(images, order, batch_size, normalize=normalize)
            if dims:
                batches = ((x.flip(dims), y) for x, y in batches)
            probs, _, _ = predict(model, batches, to_probs=to_probs)
            total = probs if total is None else total + probs
    assert total is not None
    return (total / (len(models) * len(views))).cpu()
