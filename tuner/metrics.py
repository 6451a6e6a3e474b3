"""Classification metrics from torchmetrics, binary and multiclass.

Ranking metrics (AUROC, AUPRC) always come from probabilities; thresholded
metrics use ``threshold`` on the positive class's probability (binary) or the
arg-max (multiclass, macro-averaged over classes).
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import classification as tmf

METRIC_NAMES = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc", "auprc")


def _binary(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    recall = tmf.binary_recall(probs, target, threshold=threshold)
    specificity = tmf.binary_specificity(probs, target, threshold=threshold)
    return {
        "accuracy": tmf.binary_accuracy(probs, target, threshold=threshold),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": tmf.binary_precision(probs, target, threshold=threshold),
        "recall": recall,
        "specificity": specificity,
        "f1": tmf.binary_f1_score(probs, target, threshold=threshold),
        "auroc": tmf.binary_auroc(probs, target),
        "auprc": tmf.binary_average_precision(probs, target),
    }


def _multiclass(probs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    k = probs.shape[1]
    macro = {"num_classes": k, "average": "macro"}
    return {
        "accuracy": tmf.multiclass_accuracy(probs, target, num_classes=k, average="micro"),
        "balanced_accuracy": tmf.multiclass_recall(probs, target, **macro),
        "precision": tmf.multiclass_precision(probs, target, **macro),
        "recall": tmf.multiclass_recall(probs, target, **macro),
        "specificity": tmf.multiclass_specificity(probs, target, **macro),
        "f1": tmf.multiclass_f1_score(probs, target, **macro),
        "auroc": tmf.multiclass_auroc(probs, target, **macro),
        "auprc": tmf.multiclass_average_precision(probs, target, **macro),
    }


def classification_metrics(
    probs: torch.Tensor, target: torch.Tensor, *, positive_index: int | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for ``probs`` (N×K, rows sum to 1) and integer ``target`` (N).

    With two classes, ``positive_index`` names the class of interest (e.g. malignant):
    recall is its sensitivity, AUROC ranks by its probability.
    """
    probs = probs.detach().float().cpu()
    target = target.detach().long().cpu()
    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        values = _binary(probs[:, pos], (target == pos).long(), threshold)
    else:
        values = _multiclass(probs, target)
    out = {}
    for name, value in values.items():
        value = float(value)
        out[name] = value if math.isfinite(value) else float("nan")
    return out
