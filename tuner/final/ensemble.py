"""Ensembles: average the probabilities of the top trials of one or more studies.

Each member is a completed trial. Its validation probabilities come from replaying the
trial (same hyperparameters, same seed, trained on the training split); the ensemble's
decision threshold is chosen on the average of those, by the first study's rule, so the
test set never chooses anything. Then each member is refit on train+validation exactly
as ``tuner refit`` does, and the test split is read once: every member with its own
frozen threshold, and the ensemble, side by side. Members may differ in architecture and
image size; they must share the data and its split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from tuner.data import Dataset, DeviceData
from tuner.errors import TunerError
from tuner.final.evaluation import (
    bootstrap_ci,
    check_test_reuse,
    load_test_data,
    prepare_out_dir,
    record_test_read,
    summarize,
    test_metric_fn,
    test_reads,
    write_predictions,
)
from tuner.final.replay import refit_one, replay_hparams, study_space
from tuner.final.report import write_report
from tuner.final.results import EnsembleReport, EnsembleRow
from tuner.metric_names import TABLE_METRICS
from tuner.search import (
    STUDIES_DIR,
    SearchSpace,
    StudyKey,
    TrialKey,
    first_value,
    ranked_trials,
    run_settings,
    space_at_size,
)
from tuner.train import choose_threshold, plot_confusion, plot_roc_pr, resolve_device, train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    study: optuna.Study
    trial: FrozenTrial
    space: SearchSpace

    @property
    def name(self) -> str:
        return f"{self.study.study_name}#{self.trial.number}"


def pick_members(studies: list[optuna.Study], top_k: int, per_model: bool) -> list[Member]:
    """The ``top_k`` best completed trials of each study; with ``per_model`` only each model's best."""
    if top_k < 1:
        raise TunerError(f"--top-k must be at least 1, but got {top_k}")
    members = []
    for study in studies:
        space = study_space(study)
        ranked = ranked_trials(study)
        if per_model:
            best_per_model: dict[str, FrozenTrial] = {}
            for t in ranked:
                best_per_model.setdefault(t.user_attrs[TrialKey.HPARAMS]["model"], t)
            ranked = list(best_per_model.values())
        members += [Member(study, t, space) for t in ranked[:top_k]]
    if len(members) < 2:
        raise TunerError(
            f"an ensemble needs at least two members, but the studies give {len(members)} completed trial(s); "
            "raise --top-k or add a study"
        )
    return members


def _split_identity(space: SearchSpace, study: optuna.Study) -> tuple:
    d = space.data
    return (
        study.user_attrs[StudyKey.DATA]["fingerprint"],
        d.val_fraction,
        d.test_fraction,
        d.split_seed,
        d.group_column,
        tuple(study.user_attrs[StudyKey.DATA]["class_names"]),
        d.positive_class,
    )


def check_same_split(members: list[Member]) -> None:
    """Averaging probabilities needs the same test items, in the same order, with the same classes."""
    first = members[0]
    reference = _split_identity(first.space, first.study)
    for m in members[1:]:
        if _split_identity(m.space, m.study) != reference:
            raise TunerError(
                f"study {m.study.study_name!r} was not run on the same data, split and classes as "
                f"{first.study.study_name!r}, so their probabilities cannot be averaged"
            )


@dataclass(frozen=True)
class MemberOutput:
    replayed: float  # the study metric of the replayed trial, at its best epoch
    val_probs: torch.Tensor
    val_target: torch.Tensor
    test_probs: torch.Tensor


def _run_member(m: Member, dataset: Dataset, device: torch.device, out_dir: Path) -> MemberOutput:
    """Replay the trial on the training split (validation probabilities), refit it on train+val
    for its best epoch like ``tuner refit``, save that model and predict the test split."""
    assert dataset.test is not None
    hparams = replay_hparams(m.trial, m.space)
    seed = int(m.trial.user_attrs[TrialKey.SEED])
    _, result = train_model(hparams, DeviceData.from_dataset(dataset, device), run_settings(m.space), seed=seed)
    replayed = result.history[m.space.study.metric][result.best_epoch - 1]
    value = first_value(m.trial)
    assert value is not None and result.best_val_probs is not None and result.val_targets is not None
    if not math.isclose(replayed, value, rel_tol=1e-3, abs_tol=1e-3):
        log.warning("%s replayed to %.4f on validation, not %.4f (non-deterministic kernels?)", m.name, replayed, value)
    test_probs = refit_one(
        out_dir / f"model-{m.study.study_name}-{m.trial.number}.pt",
        hparams,
        m.study,
        m.trial,
        m.space,
        dataset,
        DeviceData.train_and_val(dataset, device),
        seed=seed,
        epochs=int(m.trial.user_attrs[TrialKey.BEST_EPOCH]),
        threshold=m.trial.user_attrs.get(TrialKey.THRESHOLD),
    )
    return MemberOutput(
        replayed=replayed,
        val_probs=result.best_val_probs.cpu(),
        val_target=result.val_targets.cpu(),
        test_probs=test_probs,
    )


def run_ensemble(
    studies: list[optuna.Study],
    *,
    top_k: int = 3,
    per_model: bool = False,
    out_dir: Path | None = None,
    cache_dir: Path = STUDIES_DIR / "cache",
    device: str | None = None,
    allow_test_reuse: bool = False,
    force: bool = False,
    bootstrap: int = 1000,
    on_member: Callable[[int, int], None] | None = None,
) -> EnsembleReport:
    """Average the ``top_k`` best trials of ``studies`` (with ``per_model``, each architecture's best only).

    Each member is replayed on the training split (its validation probabilities, averaged, set the
    ensemble's threshold by the first study's rule), refit on train+validation like ``tuner refit``, and
    the test split is read once; the report shows every member beside the ensemble.
    """
    members = pick_members(studies, top_k, per_model)
    check_same_split(members)
    warnings = [w for m in members if (w := check_test_reuse(m.study, m.trial.number, allow_test_reuse))]
    out_dir = out_dir or STUDIES_DIR / studies[0].study_name / "ensemble"
    prepare_out_dir(out_dir, force)
    for warning in dict.fromkeys(warnings):
        log.warning("%s", warning)

    torch_device = resolve_device(device or members[0].space.train.device)
    datasets: dict[str, Dataset] = {}
    outputs = []
    for i, m in enumerate(members):
        space = space_at_size(m.space, replay_hparams(m.trial, m.space).image_size)  # a searched image_size
        data_key = space.data.model_dump_json()  # members with the same data settings share one load
        if data_key not in datasets:
            datasets[data_key] = load_test_data(m.study, space, cache_dir)
        outputs.append(_run_member(m, datasets[data_key], torch_device, out_dir))
        if on_member is not None:
            on_member(i + 1, len(members))
    dataset = next(iter(datasets.values()))
    assert dataset.test is not None
    for other in datasets.values():  # same items in the same order, whatever the image size
        assert other.test is not None
        if not np.array_equal(other.test.labels, dataset.test.labels):
            raise TunerError("the members' test splits differ, so their probabilities cannot be averaged")
    val_target, test_target = outputs[0].val_target, torch.from_numpy(dataset.test.labels)
    test_probs = [o.test_probs for o in outputs]

    positive = dataset.positive_index
    binary = positive is not None and dataset.num_classes == 2
    ensemble_val = torch.stack([o.val_probs for o in outputs]).mean(0)
    ensemble_test = torch.stack(test_probs).mean(0)
    rule = members[0].space.study.threshold
    threshold = (
        choose_threshold(ensemble_val, val_target, positive_index=positive, rule=rule.rule, recall=rule.recall)
        if positive is not None and binary
        else None
    )
    for m in members:
        record_test_read(
            m.study,
            {
                "trial": m.trial.number,
                "what": "ensemble",
                "members": [x.name for x in members],
            },
        )

    def row(name: str, probs: torch.Tensor, thr: float | None, extra: dict) -> EnsembleRow:
        assert dataset.test is not None
        metric_fn = test_metric_fn(dataset.class_names, dataset.positive_index, thr)
        metrics = metric_fn(probs, test_target)
        ci = bootstrap_ci(
            [probs],
            test_target,
            positive_index=dataset.positive_index,
            thresholds=thr,
            groups=dataset.test.groups,
            bootstrap=bootstrap,
        )
        return EnsembleRow(name=name, threshold=thr, summary=summarize([metrics], ci), metrics=metrics, **extra)

    rows = [
        row(
            m.name,
            o.test_probs,
            m.trial.user_attrs.get(TrialKey.THRESHOLD) if binary else None,
            {
                "study": m.study.study_name,
                "trial": m.trial.number,
                "model": m.trial.user_attrs[TrialKey.HPARAMS]["model"],
                "validation_value": first_value(m.trial),
                "replayed_validation_value": o.replayed,
                "epochs": int(m.trial.user_attrs[TrialKey.BEST_EPOCH]),
            },
        )
        for m, o in zip(members, outputs, strict=True)
    ]
    ensemble_row = row("ensemble", ensemble_test, threshold, {"members": [m.name for m in members]})
    report = EnsembleReport(
        studies=[s.study_name for s in studies],
        data=dataset.description,
        class_names=list(dataset.class_names),
        positive_class=None if positive is None else dataset.class_names[positive],
        threshold=threshold,
        threshold_rule=f"{rule.rule}, on the averaged validation probabilities of the replayed members",
        n_test=len(test_target),
        members=rows,
        ensemble=ensemble_row,
        summary=ensemble_row.summary,
        metrics=ensemble_row.metrics,
        test_set_reads=test_reads(members[0].study),
    )
    labelled = [*((r.name, p) for r, p in zip(rows, test_probs, strict=True)), ("ensemble", ensemble_test)]
    write_predictions(out_dir / "predictions.csv", test_target, "model", labelled, dataset.class_names)
    plot_confusion(ensemble_row.metrics["confusion_matrix"], dataset.class_names, out_dir / "confusion_matrix.png")
    if positive is not None and threshold is not None:  # binary
        plot_roc_pr(
            ensemble_test, test_target, positive_index=positive, threshold=threshold, path=out_dir / "roc_pr.png"
        )
    write_report(out_dir, report.to_json(), title=f"Ensemble of {', '.join(m.name for m in members)}")
    _append_member_table(out_dir / "report.md", [*rows, ensemble_row])
    return report


def _append_member_table(path: Path, rows: list[EnsembleRow]) -> None:
    """Members and the ensemble side by side, with each one's bootstrap 95% CI for AUROC."""
    names = [m for m in TABLE_METRICS if m in rows[0].summary]
    lines = ["", "## Members and ensemble on the test split", ""]
    lines.append("| model | val | " + " | ".join(names) + " | AUROC 95% CI |")
    lines.append("|---" * (len(names) + 3) + "|")
    for r in rows:
        val = "" if r.validation_value is None else f"{r.validation_value:.4f}"
        cells = [f"{r.summary[n].mean:.4f}" for n in names]
        auroc = r.summary.get("auroc")
        ci = f"[{auroc.ci_low:.3f}, {auroc.ci_high:.3f}]" if auroc is not None and auroc.ci_low is not None else ""
        label = r.name if r.model is None else f"{r.name} ({r.model})"
        lines.append(f"| {label} | {val} | " + " | ".join(cells) + f" | {ci} |")
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
