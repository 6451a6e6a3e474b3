"""What refit, evaluate and ensemble return: typed reports that the CLI prints and ``report.json`` holds.

``to_json()`` is the file's content (``report.json``, and ``report.md`` is written from it), so what a
command prints, what it returns to Python and what it leaves on disk are one object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar


@dataclass(frozen=True)
class Estimate:
    """One test metric: its value (mean over seeds), the sd over seeds (0 for one) and a bootstrap 95% CI
    (``None`` where none was computed)."""

    mean: float
    sd: float
    ci_low: float | None
    ci_high: float | None


Summary = dict[str, Estimate]  # metric name -> estimate, in tuner.metric_names.REPORT_ORDER


_SUMMARIES = ("summary", "single_network", "final_summary")  # fields holding a Summary
R = TypeVar("R", bound="_Report")


class _Report:
    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """The report again from what :meth:`to_json` gave (``report.json``); keys it does not know are left."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in data.items() if k in known}
        for name in _SUMMARIES:
            if isinstance(values.get(name), dict):
                values[name] = {metric: Estimate(**e) for metric, e in values[name].items()}
        return cls(**values)


@dataclass(frozen=True)
class EvaluationReport(_Report):
    """A saved model on a data source's test split (or all of it), at the model's frozen threshold."""

    model: str
    data: str
    split: str
    n_test: int
    threshold: float | None
    positive_class: str | None
    metrics: dict[str, Any]  # every metric, the confusion matrix and per-class figures
    summary: Summary


@dataclass(frozen=True)
class RefitReport(_Report):
    """A trial refit on train+validation and read once on the test split (see tuner.final.refit)."""

    study: str
    trial: int
    params: dict[str, Any]
    hparams: dict[str, Any]
    validation_value: float | None
    metric: str
    constraint_values: dict[str, float] | None  # the trial's, within study.constraints
    data: str
    class_names: list[str]
    positive_class: str | None
    threshold: float | None
    threshold_rule: str
    epochs: int
    epochs_rule: str
    seeds: list[int]
    folds: int | None
    tta: str
    networks: int  # in the final model: seeds x folds
    rescoring: list[dict[str, Any]] | None
    n_train: int
    n_test: int
    bootstrap: dict[str, Any]
    summary: Summary  # per seed: mean, sd and CI over seeds
    per_seed: list[dict[str, Any]]
    single_network: Summary | None  # one network alone, no TTA: what averaging adds is final minus this
    final: dict[str, Any]  # what model.pt holds and evaluate / predict reproduce
    final_summary: Summary
    test_set_reads: list[dict[str, Any]]
    # For the model card (reports written before these were kept read back with their defaults).
    description: str | None = None  # study.description: what the model is for
    data_fingerprint: str | None = None
    class_counts: dict[str, list[int]] | None = None  # split -> count per class, in class_names order
    image_size: int | None = None
    versions: dict[str, str] | None = None
    # A multi-objective study: the chosen trial's value of every objective, and where its costs were measured.
    objectives: dict[str, float] | None = None
    costs_measured_on: str | None = None


@dataclass(frozen=True)
class EnsembleRow:
    """One member of an ensemble (at its trial's own threshold), or the ensemble itself."""

    name: str
    threshold: float | None
    summary: Summary
    metrics: dict[str, Any]
    study: str | None = None
    trial: int | None = None
    model: str | None = None
    validation_value: float | None = None
    replayed_validation_value: float | None = None
    epochs: int | None = None
    members: list[str] | None = None


@dataclass(frozen=True)
class EnsembleReport(_Report):
    """The top trials of one or more studies, averaged, beside each member, read once on the test split."""

    studies: list[str]
    data: str
    class_names: list[str]
    positive_class: str | None
    threshold: float | None
    threshold_rule: str
    n_test: int
    members: list[EnsembleRow]
    ensemble: EnsembleRow
    summary: Summary
    metrics: dict[str, Any]
    test_set_reads: list[dict[str, Any]]
