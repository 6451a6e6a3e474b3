"""Report files: a refit's or an evaluation's ``report.json`` / ``report.md``, and the study report.

The study report's figures are Optuna's own matplotlib plots.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuner.metric_names import REPORT_ORDER
from tuner.search import (
    StudyKey,
    TrialKey,
    feasibility,
    feasible,
    first_value,
    front,
    maximizes,
    ranked_trials,
    study_objectives,
)


def markdown_param(value: Any) -> str:
    """A hyperparameter as the Markdown reports print it: four significant digits (a learning rate of 3e-05
    must not read 0.0000)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_number(value: Any) -> str:
    """A figure as the Markdown reports print it (four decimals)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, report: Mapping[str, Any], *, title: str) -> tuple[Path, Path]:
    """``report.json`` (everything) and ``report.md`` (readable summary) in ``out_dir``."""
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# {title}", ""]
    for key in ("study", "trial", "data", "seeds", "epochs", "threshold", "positive_class", "n_test"):
        if key in report:
            lines.append(f"- {key.replace('_', ' ')}: {markdown_number(report[key])}")
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
            f"{report.get('tta', 'none')}, threshold {markdown_number(report['final']['threshold'])}):",
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


def _save_optuna_plot(ax: Any, path: Path) -> Path:
    """Write one of ``optuna.visualization.matplotlib``'s plots and free its figure (they use pyplot)."""
    import matplotlib.pyplot as plt

    figure = ax.figure
    figure.set_size_inches(7, 3.8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def study_report(study: Any, out_dir: Path, *, top: int = 10) -> dict[str, Any]:
    """Top trials, parameter importances and the optimization history of an Optuna study (Optuna's own
    matplotlib plots), as files."""
    import optuna
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    objectives = study_objectives(study)
    metric = objectives[0]
    multi = len(objectives) > 1
    # Several objectives: the importances and the history are of the first (the metric), and the front is drawn.
    target = (lambda t: t.values[0]) if multi else None
    # Optuna's importance evaluator reads a target as "lower is better": the metric, signed so.
    lower_is_better = (lambda t: -t.values[0] if maximizes(study) else t.values[0]) if multi else None
    # Trials outside study.constraints are never the best: the feasible ones rank first (a stable sort).
    ranked = sorted(ranked_trials(study, feasible_only=False), key=lambda t: not feasible(t))
    importances: dict[str, float] = {}
    if len(completed) >= 2:
        try:
            with warnings.catch_warnings():  # its warning that a target means "lower is better": it is, here
                warnings.simplefilter("ignore", UserWarning)
                found = optuna.importance.get_param_importances(study, target=lower_is_better)
            importances = {k: float(v) for k, v in found.items()}
        except (RuntimeError, ValueError):  # e.g. no parameter varies
            importances = {}
    summary = {
        "study": study.study_name,
        "metric": metric,
        "direction": study.directions[0].name.lower(),
        "n_trials": len(study.get_trials(deepcopy=False)),
        "states": {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState},
        "top_trials": [
            {
                "number": t.number,
                "value": first_value(t),
                "best_epoch": t.user_attrs.get(TrialKey.BEST_EPOCH),
                "threshold": t.user_attrs.get(TrialKey.THRESHOLD),
                "feasible": feasibility(t),
                "params": t.params,
            }
            for t in ranked[:top]
        ],
        "importances": importances,
        **(
            {"objectives": objectives, "front": [{"number": t.number, "values": t.values} for t in front(study)]}
            if multi
            else {}
        ),
        "test_set_reads": study.user_attrs.get(StudyKey.TEST_SET_READS, []),
    }
    with warnings.catch_warnings():  # Optuna's matplotlib plots are experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if completed:
            ax = optuna.visualization.matplotlib.plot_optimization_history(study, target=target, target_name=metric)
            _save_optuna_plot(ax, out_dir / "optimization_history.png")
        if completed and multi:
            ax = optuna.visualization.matplotlib.plot_pareto_front(study, target_names=objectives)
            _save_optuna_plot(ax, out_dir / "pareto_front.png")
        if importances:
            warnings.simplefilter("ignore", UserWarning)  # as above: the target is "lower is better"
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, target=lower_is_better, target_name=metric
            )
            _save_optuna_plot(ax, out_dir / "importances.png")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [
        f"# Study {study.study_name}",
        "",
        f"{summary['n_trials']} trials: " + ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items() if v),
        "",
    ]
    lines += [f"| # | {metric} | best epoch | params |", "|---|---|---|---|"]
    for t in summary["top_trials"]:
        params = ", ".join(f"{k}={markdown_param(v)}" for k, v in t["params"].items())
        mark = " (outside study.constraints)" if t["feasible"] is False else ""
        lines.append(f"| {t['number']}{mark} | {markdown_number(t['value'])} | {t['best_epoch']} | {params} |")
    if multi:
        lines += ["", f"Pareto front ({len(summary['front'])} trials):", "", "| # | " + " | ".join(objectives) + " |"]
        lines += ["|---|" + "---|" * len(objectives)]
        lines += [
            f"| {t['number']} | " + " | ".join(markdown_number(v) for v in t["values"]) + " |" for t in summary["front"]
        ]
    if importances:
        lines += ["", "| parameter | importance |", "|---|---|"] + [
            f"| {k} | {v:.3f} |" for k, v in importances.items()
        ]
    lines += [""] + [f"![{p.name}]({p.name})" for p in sorted(out_dir.glob("*.png"))]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
