"""The metric names, in one place (a light module: the space schema and the CLI read them without
importing torchmetrics).

``METRIC_NAMES``: what :func:`tuner.train.metrics.classification_metrics` computes for every task, in the
order reports list them (ranking metrics first); ``FOCUS_NAMES``: the focus class's own (with a
positive_class); ``REPORT_ORDER``: what a test report lists, in order; ``TABLE_METRICS``: a short
table's columns; ``VALIDATION_METRICS``: what a study can optimise, checkpoint on or constrain;
``COST_METRICS``: what a network costs to run, the further objectives of a multi-objective study.
"""

from typing import Literal

METRIC_NAMES = ("auroc", "auprc", "recall", "specificity", "precision", "f1", "balanced_accuracy", "accuracy")
FOCUS_NAMES = ("focus_recall", "focus_precision", "focus_f1")
REPORT_ORDER = ("focus_recall", "focus_precision", *METRIC_NAMES, "mcc")
TABLE_METRICS = ("auroc", "auprc", "f1", "recall", "specificity", "balanced_accuracy", "focus_recall")
VALIDATION_METRICS = tuple(f"val_{name}" for name in (*METRIC_NAMES, "loss", *FOCUS_NAMES))
Direction = Literal["maximize", "minimize"]
COST_METRICS = ("latency_ms", "batch_latency_ms", "params_m", "flops_g")
OBJECTIVE_METRICS = (*VALIDATION_METRICS, *COST_METRICS)


def natural_direction(metric: str) -> Direction:
    """'minimize' for a loss or a cost, 'maximize' for every other metric."""
    return "minimize" if metric == "val_loss" or metric in COST_METRICS else "maximize"
