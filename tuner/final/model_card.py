"""``MODEL_CARD.md``: the facts about a final model in one readable document, for a reviewer or a registry.

Sections follow what medical-AI reporting asks for (model cards; TRIPOD-AI and CLAIM items on data,
model, operating point and test performance): intended use, data, model, operating point, test results with
95% CIs and per-class figures, the validation-to-test gap, test-set reads, versions. Every number comes from
the refit's report (``report.json``), none is typed here, so the card cannot disagree with it.
"""

from __future__ import annotations

from pathlib import Path

from tuner.final.report import markdown_number, markdown_param
from tuner.final.results import Estimate, RefitReport
from tuner.metric_names import REPORT_ORDER


def _ci(e: Estimate) -> str:
    return "" if e.ci_low is None or e.ci_high is None else f"{e.ci_low:.4f} – {e.ci_high:.4f}"


def model_card(report: RefitReport) -> str:
    """The card's Markdown text."""
    r = report
    lines = [f"# Model card: study {r.study}, trial {r.trial}", ""]
    lines += ["## Intended use", ""]
    lines.append(r.description or "Not stated (give `study.description` in the space file).")
    lines += [
        "",
        "Measured only on the locked test split described below; not evaluated for clinical use.",
        "",
        "## Data",
        "",
        f"- source: {r.data}",
        f"- fingerprint: `{r.data_fingerprint}`",
        f"- classes: {', '.join(r.class_names)}"
        + (f" (positive class: {r.positive_class})" if r.positive_class else ""),
        f"- image size: {r.image_size} px",
        f"- trained on train+validation: {r.n_train} images; tested on: {r.n_test} images",
    ]
    if r.class_counts:
        lines += ["", "| split | " + " | ".join(r.class_names) + " |", "|---|" + "---|" * len(r.class_names)]
        lines += [f"| {split} | " + " | ".join(map(str, counts)) + " |" for split, counts in r.class_counts.items()]
    lines += [
        "",
        "## Model",
        "",
        f"- architecture: {r.hparams.get('model')}" + (", ImageNet-pretrained" if r.hparams.get("pretrained") else ""),
        f"- chosen trial: {r.trial} ({r.metric} {markdown_number(r.validation_value)} on validation)",
        *(
            [
                "- objectives of the chosen trial (a multi-objective study's Pareto front): "
                + ", ".join(f"{k} {markdown_number(v)}" for k, v in r.objectives.items())
                + (f"; costs measured on {r.costs_measured_on}" if r.costs_measured_on else "")
            ]
            if r.objectives
            else []
        ),
        f"- epochs: {r.epochs} ({r.epochs_rule})",
        f"- seeds: {', '.join(map(str, r.seeds))}; folds per seed: {r.folds or 'none (all of train+val)'}; "
        f"test-time augmentation: {r.tta}",
        f"- networks averaged in the final model: {r.networks}",
        "",
        "| hyperparameter | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {markdown_param(value)} |" for name, value in r.params.items()]
    lines += ["", "## Operating point", ""]
    lines.append(
        f"Threshold {markdown_number(r.threshold)} on the probability of {r.positive_class} ({r.threshold_rule})."
        if r.threshold is not None
        else "The class of highest probability."
    )
    resamples = r.bootstrap.get("resamples")
    grouped = " resampling whole groups (patients)" if r.bootstrap.get("grouped") else ""
    lines += [
        "",
        "## Test results",
        "",
        f"The final model on the test split (n = {r.n_test}); 95% CIs from {resamples} bootstrap resamples{grouped}.",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {r.final_summary[name].mean:.4f} | {_ci(r.final_summary[name])} |"
        for name in REPORT_ORDER
        if name in r.final_summary
    ]
    per_class = r.final.get("per_class") or {}
    if per_class:
        lines += ["", "| class | precision | recall | support |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']} |" for name, c in per_class.items()
        ]
    test_name = r.metric.removeprefix("val_")
    if r.validation_value is not None and test_name in r.final_summary:
        test_value = r.final_summary[test_name].mean
        lines += [
            "",
            f"Validation to test: {r.metric} {r.validation_value:.4f} (the trial, on validation) against "
            f"{test_name} {test_value:.4f} (the final model, on test): {test_value - r.validation_value:+.4f}.",
        ]
    lines += [
        "",
        "## Test-set reads",
        "",
        f"The test labels of this study were read {len(r.test_set_reads)} time(s):",
        "",
    ]
    lines += [
        f"- {read.get('when')}: {read.get('what')} of trial {read.get('trial')} (`{read.get('command')}`)"
        for read in r.test_set_reads
    ]
    lines += ["", "## Versions", ""]
    lines += [f"- {name}: {version}" for name, version in (r.versions or {}).items()]
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, report: RefitReport) -> Path:
    path = out_dir / "MODEL_CARD.md"
    path.write_text(model_card(report))
    return path
