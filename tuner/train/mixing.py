"""Mixup and CutMix: each training batch blended with itself reversed.

Mixup (Zhang et al. 2018) averages two images; CutMix (Yun et al. 2019) pastes a box of one into the
other. Either way the loss is ``lam * loss(y) + (1 - lam) * loss(y_partner)``, which for cross-entropy
is the soft-target loss timm's ``Mixup`` computes, and which also holds for the class-weighted,
focal and one-logit BCE losses here (timm's one-hot soft targets would need losses of their own).
The partner of each image is the batch reversed, as in timm's batch mode; batches are shuffled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class MixedTargets:
    """A blended batch's labels: its own, its partners' and how much of its own it kept."""

    first: torch.Tensor
    second: torch.Tensor
    lam: float

    def __len__(self) -> int:
        return len(self.first)


class MixingLoss(nn.Module):
    """``loss`` for plain labels; the ``lam``-weighted sum of both labels' losses for a blended batch."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor | MixedTargets) -> torch.Tensor:
        if isinstance(target, MixedTargets):
            return target.lam * self.loss(logits, target.first) + (1 - target.lam) * self.loss(logits, target.second)
        return self.loss(logits, target)


def mix_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    rng: np.random.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | MixedTargets]]:
    """Blend each batch with probability ``prob``: by mixup or cutmix (half and half when both are on),
    with ``lam`` drawn from Beta(alpha, alpha)."""
    modes = [m for m, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    for x, y in batches:
        if not modes or len(y) < 2 or rng.random() >= prob:
            yield x, y
            continue
        mode = modes[rng.integers(len(modes))]
        alpha = mixup_alpha if mode == "mixup" else cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = x.flip(0)
        if mode == "mixup":
            x = x.mul(lam).add_(partner, alpha=1 - lam)
        else:
            x, lam = _paste_box(x, partner, lam, rng)
        yield x, MixedTargets(y, y.flip(0), lam)


def _paste_box(
    x: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator
) -> tuple[torch.Tensor, float]:
    """A box of ``1 - lam`` of the area, centred at random (clipped at the border), from ``partner``;
    ``lam`` corrected to the area actually kept."""
    height, width = x.shape[-2:]
    cut = np.sqrt(1 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - box_h // 2, cy + box_h // 2], 0, height)
    left, right = np.clip([cx - box_w // 2, cx + box_w // 2], 0, width)
    x = x.clone()
    x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return x, 1 - (bottom - top) * (right - left) / (height * width)
