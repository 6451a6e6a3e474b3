"""Losses: cross-entropy, one-logit BCE and focal, each optionally class-weighted.

Every loss comes with the matching logits -> probabilities map, so metrics see
N×K probabilities whatever the head: a one-logit BCE head gives the positive
class's probability and its complement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuner.errors import TunerError


class CrossEntropy(nn.Module):
    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma."""

    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None, gamma: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target, reduction="none")
        p_true = torch.exp(-ce)
        loss = (1 - p_true) ** self.gamma * ce
        if self.weight is not None:
            w = self.weight[target]
            return (w * loss).sum() / w.sum()
        return loss.mean()


class BinaryCrossEntropy(nn.Module):
    """One logit for P(class == positive_index); class weights become ``pos_weight``."""

    pos_weight: torch.Tensor | None

    def __init__(self, positive_index: int, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.positive_index = positive_index
        pos_weight = None if weight is None else (weight[positive_index] / weight[1 - positive_index]).reshape(1)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        is_positive = (target == self.positive_index).float()
        return F.binary_cross_entropy_with_logits(logits.float()[:, 0], is_positive, pos_weight=self.pos_weight)


def _bce(num_classes: int, positive_index: int | None, weights: torch.Tensor | None, **_: float) -> nn.Module:
    if num_classes != 2:
        raise TunerError(f"loss='bce' needs exactly two classes, but the data has {num_classes}; use 'ce' or 'focal'")
    return BinaryCrossEntropy(1 if positive_index is None else positive_index, weights)


@dataclass(frozen=True)
class LossInfo:
    """A registered loss: what builds it, and whether its head has one logit (binary data only)."""

    build: Callable[..., nn.Module]
    one_logit: bool = False


# The registry: a loss's name in a space file -> its record (the schema's names come from the keys).
LOSSES: dict[str, LossInfo] = {
    "ce": LossInfo(
        lambda num_classes, positive_index, weights, label_smoothing, focal_gamma: CrossEntropy(
            weights, label_smoothing
        )
    ),
    "bce": LossInfo(_bce, one_logit=True),
    "focal": LossInfo(
        lambda num_classes, positive_index, weights, label_smoothing, focal_gamma: FocalLoss(weights, focal_gamma)
    ),
}


def num_outputs(loss: str, num_classes: int) -> int:
    """How many logits the head of a network trained with ``loss`` has."""
    return 1 if LOSSES[loss].one_logit else num_classes


def build_loss(
    name: str,
    *,
    num_classes: int,
    positive_index: int | None = None,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
) -> nn.Module:
    if name not in LOSSES:
        raise TunerError(f"loss must be one of {', '.join(LOSSES)}, but got loss={name!r}")
    return LOSSES[name].build(
        num_classes=num_classes,
        positive_index=positive_index,
        weights=class_weights,
        label_smoothing=label_smoothing,
        focal_gamma=focal_gamma,
    )


def logits_to_probs(logits: torch.Tensor, *, num_classes: int, positive_index: int | None = None) -> torch.Tensor:
    """N×K class probabilities from the head's logits (softmax, or sigmoid for one logit)."""
    logits = logits.float()
    if logits.shape[1] != 1:
        return logits.softmax(dim=1)
    p = torch.sigmoid(logits[:, 0])
    pos = 1 if positive_index is None else positive_index
    return torch.stack([1 - p, p] if pos == 1 else [p, 1 - p], dim=1)
