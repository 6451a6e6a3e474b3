"""Classification metrics from torchmetrics, binary and multiclass.

Ranking metrics (AUROC, AUPRC) always come from probabilities; thresholded
metrics use ``threshold`` on the positive class's probability (binary) or the
arg-max (multiclass, macro-averaged over classes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics.functional import classification as tmf

from tuner.metric_names import FOCUS_NAMES


def binary_metrics(scores: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """The binary metrics of the positive class's ``scores`` against 0/1 ``target``: of N items, or of each
    row of B×N (B bootstrap resamples in one call: the thresholded metrics per row through torchmetrics'
    ``samplewise`` reduction, the ranking metrics row by row)."""
    rows = scores.dim() == 2
    s, t = (scores, target) if rows else (scores[None], target[None])
    each: dict[str, Any] = {"threshold": threshold, "multidim_average": "samplewise", "validate_args": False}
    recall = tmf.binary_recall(s, t, **each)
    specificity = tmf.binary_specificity(s, t, **each)
    out = {
        "accuracy": tmf.binary_accuracy(s, t, **each),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": tmf.binary_precision(s, t, **each),
        "recall": recall,
        "specificity": specificity,
        "f1": tmf.binary_f1_score(s, t, **each),
        "auroc": torch.stack([tmf.binary_auroc(a, b, validate_args=False) for a, b in zip(s, t, strict=True)]),
        "auprc": torch.stack(
            [tmf.binary_average_precision(a, b, validate_args=False) for a, b in zip(s, t, strict=True)]
        ),
    }
    out = {name: value.reshape(len(s)) for name, value in out.items()}  # torchmetrics squeezes a single row
    return out if rows else {name: value[0] for name, value in out.items()}


def _multiclass(probs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    k = probs.shape[1]
    macro: dict[str, Any] = {"num_classes": k, "average": "macro"}
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


def _focus(probs: torch.Tensor, target: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """One class's recall, precision and F1 under arg-max decisions: e.g. 'cancer' of normal/benign/cancer."""
    k = probs.shape[1]
    per_class: dict[str, Any] = {"num_classes": k, "average": "none"}
    return {
        "focus_recall": tmf.multiclass_recall(probs, target, **per_class)[index],
        "focus_precision": tmf.multiclass_precision(probs, target, **per_class)[index],
        "focus_f1": tmf.multiclass_f1_score(probs, target, **per_class)[index],
    }


def classification_metrics(
    probs: torch.Tensor, target: torch.Tensor, *, positive_index: int | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """All of :data:`tuner.metric_names.METRIC_NAMES` for ``probs`` (N×K, rows sum to 1) and integer ``target`` (N).

    With two classes, ``positive_index`` names the class of interest (e.g. malignant):
    recall is its sensitivity, AUROC ranks by its probability. With more, the macro averages are
    joined by ``focus_recall`` / ``focus_precision`` / ``focus_f1`` of that class (e.g. cancer).
    """
    probs = probs.detach().float().cpu()
    target = target.detach().long().cpu()
    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        values = binary_metrics(probs[:, pos], (target == pos).long(), threshold)
        focus = {name: values[name.removeprefix("focus_")] for name in FOCUS_NAMES}
    else:
        values = _multiclass(probs, target)
        focus = _focus(probs, target, positive_index) if positive_index is not None else {}
    values.update(focus)
    out: dict[str, float] = {}
    for name, tensor in values.items():
        value = float(tensor)
        out[name] = value if math.isfinite(value) else float("nan")
    return out


# ---------------------------------------------------------------- operating point

THRESHOLD_RULES = ("youden", "max_f1", "target_recall", "fixed")


def choose_threshold(
    probs: torch.Tensor, target: torch.Tensor, *, positive_index: int, rule: str = "youden", recall: float = 0.95
) -> float:
    """The decision threshold on the positive class's probability, chosen on validation.

    ``youden``: maximises sensitivity + specificity - 1; ``max_f1``: maximises F1;
    ``target_recall``: the highest threshold whose recall reaches ``recall`` (screening);
    ``fixed``: 0.5.
    """
    score = probs.detach().float().cpu()[:, positive_index]
    is_pos = (target.detach().cpu() == positive_index).long()
    if rule == "fixed" or is_pos.sum() == 0 or is_pos.sum() == len(is_pos):
        return 0.5
    if rule == "youden":
        fpr, tpr, thresholds = tmf.binary_roc(score, is_pos)
        best = int(torch.argmax(tpr - fpr))
        return float(thresholds[best].clamp(0, 1))
    precision, rec, thresholds = tmf.binary_precision_recall_curve(score, is_pos)
    precision, rec = precision[:-1], rec[:-1]  # the last point has no threshold
    if rule == "max_f1":
        f1 = 2 * precision * rec / (precision + rec).clamp_min(1e-12)
        return float(thresholds[int(torch.argmax(f1))])
    if rule == "target_recall":
        reaching = torch.nonzero(rec >= recall).flatten()
        return float(thresholds[int(reaching.max())]) if len(reaching) else float(thresholds[0])
    raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, but got rule={rule!r}")


def evaluation_report(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    class_names: tuple[str, ...] | list[str],
    positive_index: int | None,
    threshold: float = 0.5,
) -> dict:
    """Everything a test evaluation reports: the headline metrics (binary: at ``threshold`` for the
    positive class), MCC, prevalence, the confusion matrix and per-class precision/recall/F1."""
    probs = probs.detach().float().cpu()
    target = target.detach().long().cpu()
    k = probs.shape[1]
    binary = k == 2 and positive_index is not None
    out: dict[str, Any] = classification_metrics(probs, target, positive_index=positive_index, threshold=threshold)
    if k == 2:  # the focus class's metrics are recall / precision / f1 themselves
        for name in FOCUS_NAMES:
            out.pop(name, None)
    if binary:
        assert positive_index is not None
        # torchmetrics' own thresholding (strictly above), so the decisions agree with the metrics above
        above = probs[:, positive_index] > threshold
        decided = torch.where(above, positive_index, 1 - positive_index)
        out["mcc"] = float(tmf.binary_matthews_corrcoef(above.long(), (target == positive_index).long()))
        out["prevalence"] = float((target == positive_index).float().mean())
        out["threshold"] = threshold
    else:
        decided = probs.argmax(dim=1)
        out["mcc"] = float(tmf.multiclass_matthews_corrcoef(probs, target, num_classes=k))
        out["prevalence"] = {name: float((target == i).float().mean()) for i, name in enumerate(class_names)}
    matrix = tmf.multiclass_confusion_matrix(decided, target, num_classes=k)
    out["confusion_matrix"] = matrix.tolist()  # rows: true class, columns: predicted
    each: dict[str, Any] = {"num_classes": k, "average": "none", "zero_division": 0}
    precision = tmf.multiclass_precision(decided, target, **each).tolist()
    recall = tmf.multiclass_recall(decided, target, **each).tolist()
    f1 = tmf.multiclass_f1_score(decided, target, **each).tolist()
    support = torch.bincount(target, minlength=k).tolist()
    out["per_class"] = {
        name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        for i, name in enumerate(class_names)
    }
    out["n"] = len(target)
    if not binary and positive_index is not None:
        # the focus class (e.g. cancer among normal/benign/cancer): its focus_* metrics come first in reports
        out["focus_class"] = class_names[positive_index]
    return out
