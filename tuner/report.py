"""Plots and report files: training curves, confusion matrix, ROC and PR curves, report.json / report.md.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot
state, no display needed) and written as PNG files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torchmetrics.functional import classification as tmf

from tuner.metric_names import REPORT_ORDER


def _save(fig: Figure, path: Path) -> Path:
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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def per_class_csv(per_class: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    lines = ["class,precision,recall,f1,support"]
    lines += [
        f"{name},{m['precision']:.6f},{m['recall']:.6f},{m['f1']:.6f},{m['support']}" for name, m in per_class.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, report: Mapping[str, Any], *, title: str) -> tuple[Path, Path]:
    """``report.json`` (everything) and ``report.md`` (readable summary) in ``out_dir``."""
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# {title}", ""]
    for key in ("study", "trial", "data", "seeds", "epochs", "threshold", "positive_class", "n_test"):
        if key in report:
            lines.append(f"- {key.replace('_', ' ')}: {_fmt(report[key])}")
    summary = report.get("summary")
    if summary:
        lines += ["", "| metric | mean | sd | 95% CI |", "|---|---|---|---|"]
        for name in REPORT_ORDER:
            if name in summary:
                s = summary[name]
                ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]" if s.get("ci_low") is not None else ""
                lines.append(f"| {name} | {s['mean']:.4f} | {s['sd']:.4f} | {ci} |")
    final = report.get("final_summary")
    if final:
        lines += [
            "",
            f"Final model ({report['final']['networks']} networks averaged, saved as model.pt, TTA "
            f"{report.get('tta', 'none')}, threshold {_fmt(report['final']['threshold'])}):",
            "",
        ]
        lines += ["| metric | value | 95% CI |", "|---|---|---|"]
        for name in REPORT_ORDER:
            if name in final:
                s = final[name]
                ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]" if s.get("ci_low") is not None else ""
                lines.append(f"| {name} | {s['mean']:.4f} | {ci} |")
    first = (report.get("per_seed") or [report.get("metrics")])[0]
    if first and "per_class" in first:
        lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for name, m in first["per_class"].items():
            lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
        lines += ["", "Confusion matrix (rows true, columns predicted): " + json.dumps(first["confusion_matrix"])]
    plots = sorted(p.name for p in out_dir.glob("*.png"))
    if plots:
        lines += [""] + [f"![{p}]({p})" for p in plots]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def plot_optimization_history(
    numbers: Sequence[int], values: Sequence[float], *, maximize: bool, metric: str, path: Path
) -> Path:
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    ax.scatter(numbers, values, s=14, label="completed trial")
    best, running = [], None
    for v in values:
        running = v if running is None else (max(running, v) if maximize else min(running, v))
        best.append(running)
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="optimization history")
    ax.legend()
    return _save(fig, path)


def plot_importances(importances: Mapping[str, float], path: Path) -> Path:
    names = list(importances)[::-1]
    fig = Figure(figsize=(6, max(2.0, 0.8 + 0.35 * len(names))))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="hyperparameter importances")
    return _save(fig, path)


def study_report(study: Any, out_dir: Path, *, top: int = 10) -> dict[str, Any]:
    """Top trials, parameter importances and the optimization history of an Optuna study, as files."""
    import optuna
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    maximize = study.direction.name == "MAXIMIZE"
    metric = study.user_attrs.get("space", {}).get("study", {}).get("metric", "value")
    # Trials outside study.constraints are never the best: the feasible ones rank first.
    ranked = sorted(completed, key=lambda t: (t.user_attrs.get("feasible") is False, -t.value if maximize else t.value))
    importances: dict[str, float] = {}
    if len(completed) >= 2:
        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError):  # e.g. no parameter varies
            importances = {}
    summary = {
        "study": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "n_trials": len(study.get_trials(deepcopy=False)),
        "states": {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState},
        "top_trials": [
            {
                "number": t.number,
                "value": t.value,
                "best_epoch": t.user_attrs.get("best_epoch"),
                "threshold": t.user_attrs.get("threshold"),
                "feasible": t.user_attrs.get("feasible"),
                "params": t.params,
            }
            for t in ranked[:top]
        ],
        "importances": importances,
        "test_set_reads": study.user_attrs.get("test_set_reads", []),
    }
    if completed:
        plot_optimization_history(
            [t.number for t in completed],
            [t.value for t in completed],
            maximize=maximize,
            metric=metric,
            path=out_dir / "optimization_history.png",
        )
    if importances:
        plot_importances(importances, out_dir / "importances.png")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [
        f"# Study {study.study_name}",
        "",
        f"{summary['n_trials']} trials: " + ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items() if v),
        "",
    ]
    lines += [f"| # | {metric} | best epoch | params |", "|---|---|---|---|"]
    for t in summary["top_trials"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
        mark = " (outside study.constraints)" if t["feasible"] is False else ""
        lines.append(f"| {t['number']}{mark} | {_fmt(t['value'])} | {t['best_epoch']} | {params} |")
    if importances:
        lines += ["", "| parameter | importance |", "|---|---|"] + [
            f"| {k} | {v:.3f} |" for k, v in importances.items()
        ]
    lines += [""] + [f"![{p.name}]({p.name})" for p in sorted(out_dir.glob("*.png"))]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
