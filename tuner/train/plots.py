"""Plots of one network's results: training curves, confusion matrix, ROC and PR curves.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot
state, no display needed) and written as PNG files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchmetrics.functional import classification as tmf


def save_figure(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_history(history: Mapping[str, Sequence[float]], metric: str, path: Path) -> Path:
    """Loss (train vs validation) and the study metric per epoch."""
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_metric = fig.subplots(1, 2)
    epochs = range(1, len(history.get("train_loss", [])) + 1)
    ax_loss.plot(epochs, history.get("train_loss", []), label="train")
    if "val_loss" in history:
        ax_loss.plot(epochs, history["val_loss"], label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    if metric in history and metric != "val_loss":
        ax_metric.plot(epochs, history[metric], color="tab:green")
        best = max(
            range(len(history[metric])), key=lambda i: history[metric][i] if math.isfinite(history[metric][i]) else -1
        )
        ax_metric.axvline(best + 1, color="grey", linestyle=":", label=f"best epoch {best + 1}")
        ax_metric.legend()
    ax_metric.set(title=metric, xlabel="epoch")
    return save_figure(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    fig = Figure(figsize=(1.4 + 1.1 * len(class_names), 1.1 + 1.0 * len(class_names)))
    ax = fig.subplots()
    values = torch.tensor(matrix, dtype=torch.float32)
    ax.imshow(values.numpy(), cmap="Blues")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            color = "white" if values[i, j] > values.max() / 2 else "black"
            ax.text(j, i, str(int(values[i, j])), ha="center", va="center", color=color)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return save_figure(fig, path)


def plot_roc_pr(
    probs: torch.Tensor, target: torch.Tensor, *, positive_index: int, threshold: float, path: Path
) -> Path:
    """ROC and precision-recall curves of the positive class, the operating point marked."""
    score = probs.detach().float().cpu()[:, positive_index]
    is_pos = (target.detach().cpu() == positive_index).long()
    fpr, tpr, _ = tmf.binary_roc(score, is_pos)
    precision, recall, _ = tmf.binary_precision_recall_curve(score, is_pos)
    pred = score >= threshold
    tp = int((pred & (is_pos == 1)).sum())
    op_recall = tp / max(int(is_pos.sum()), 1)
    op_fpr = int((pred & (is_pos == 0)).sum()) / max(int((is_pos == 0).sum()), 1)
    op_precision = tp / max(int(pred.sum()), 1)
    auroc, auprc = float(tmf.binary_auroc(score, is_pos)), float(tmf.binary_average_precision(score, is_pos))

    fig = Figure(figsize=(9, 3.8))
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot(fpr.numpy(), tpr.numpy(), label=f"AUROC {auroc:.3f}")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_roc.scatter([op_fpr], [op_recall], color="tab:red", zorder=3, label=f"threshold {threshold:.3f}")
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax_roc.legend(loc="lower right")
    ax_pr.plot(recall.numpy(), precision.numpy(), label=f"AUPRC {auprc:.3f}")
    ax_pr.axhline(float(is_pos.float().mean()), color="grey", linestyle=":", label="prevalence")
    ax_pr.scatter([op_recall], [op_precision], color="tab:red", zorder=3, label="operating point")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    ax_pr.legend(loc="lower left")
    return save_figure(fig, path)


def per_class_csv(per_class: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    lines = ["class,precision,recall,f1,support"]
    lines += [
        f"{name},{m['precision']:.6f},{m['recall']:.6f},{m['f1']:.6f},{m['support']}" for name, m in per_class.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
