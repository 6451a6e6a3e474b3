"""The study: created or resumed with its provenance (space, data, version), and its trials ranked
within the study's constraints."""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tuner import __version__
from tuner.data import Dataset
from tuner.errors import StorageError, TunerError
from tuner.search.keys import StudyKey, TrialKey
from tuner.search.samplers import build_pruner, build_sampler
from tuner.search.space import SearchSpace
from tuner.search.storage import STUDIES_DIR, open_storage, redact

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def open_study(
    space: SearchSpace,
    storage_url: str,
    data: Dataset,
    artifacts_dir: Path | None = None,
    *,
    storage: RDBStorage | None = None,
) -> optuna.Study:
    """Create the study, or load it if it exists and was made from the same space (resume), in ``storage``
    (opened at ``storage_url`` if not given)."""
    storage = storage or open_storage(storage_url)
    name = space.study.name
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=list(space.study.resolved_directions),
        sampler=build_sampler(space.study.sampler),
        pruner=build_pruner(space.study.pruner, space.train.max_epochs),
        load_if_exists=True,
    )
    if space.study.multi_objective and study.metric_names is None:  # optuna-dashboard names the axes with them
        # (one objective keeps Optuna's "value": trials_dataframe()'s column, which notebooks read)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(space.study.objectives))
    attrs = study.user_attrs
    fingerprint = space.fingerprint()
    if "space_fingerprint" not in attrs:
        study.set_user_attr(StudyKey.SPACE_FINGERPRINT, fingerprint)
        study.set_user_attr(StudyKey.TUNER_VERSION, __version__)
        study.set_user_attr(StudyKey.SPACE, space.model_dump(mode="json"))
        study.set_user_attr(StudyKey.CREATED, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        study.set_user_attr(
            "data",
            {
                "description": data.description,
                "fingerprint": data.fingerprint,
                "class_names": list(data.class_names),
                "positive_class": None if data.positive_index is None else data.class_names[data.positive_index],
                "train": data.train.class_counts(data.num_classes),
                "val": data.val.class_counts(data.num_classes),
            },
        )
        study.set_user_attr(StudyKey.TEST_SET_READS, [])
        study.set_user_attr(StudyKey.ARTIFACT_DIR, str(artifact_dir(name, storage_url, artifacts_dir)))
    elif attrs["space_fingerprint"] != fingerprint:
        raise StorageError(
            f"study {name!r} in {redact(storage_url)} was created from a different search space "
            f"(fingerprint {attrs['space_fingerprint']}, this one {fingerprint}); "
            f"use another --study name, restore the original space file, or delete the study"
        )
    return study


def artifact_dir(study_name: str, storage_url: str, explicit: Path | None = None) -> Path:
    """Where a study's artifacts live: ``--artifacts`` if given, else beside the study's SQLite file
    (``studies/<study>.artifacts``), else ``studies/<study>.artifacts`` under the working folder."""
    if explicit is not None:
        return explicit.resolve()
    parsed = sqlalchemy.engine.make_url(storage_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).resolve().with_suffix(".artifacts")
    return (STUDIES_DIR / f"{study_name}.artifacts").resolve()


def feasible(trial: FrozenTrial) -> bool:
    """Whether a finished trial met its study's constraints (every trial does when there are none)."""
    return all(v <= 0 for v in trial.constraints.values())


def feasibility(trial: FrozenTrial) -> bool | None:
    """Whether a completed trial met ``study.constraints``; None where it was not judged (no constraints)."""
    return feasible(trial) if trial.constraints else None


def first_value(trial: FrozenTrial) -> float | None:
    """The trial's value of the study's metric (its first objective, in a multi-objective study)."""
    return trial.values[0] if trial.values else None


def study_objectives(study: optuna.Study) -> list[str]:
    """The names of what the study's trials return, from its stored space: ``metrics``, or ``metric`` alone."""
    stored = study.user_attrs.get(StudyKey.SPACE, {}).get("study", {})
    return list(stored.get("metrics") or [stored.get("metric", "value")])


def maximizes(study: optuna.Study) -> bool:
    """Whether the study's metric (its first objective) is maximised."""
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def ranked_trials(study: optuna.Study, *, feasible_only: bool = True) -> list[FrozenTrial]:
    """The study's completed trials, best first on its metric (the first objective), within
    study.constraints unless ``feasible_only=False``."""
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and t.values and (feasible(t) or not feasible_only)
    ]
    sign = -1.0 if maximizes(study) else 1.0
    return sorted(done, key=lambda t: sign * t.values[0])


def best_value(study: optuna.Study) -> float | None:
    """The best value of the metric so far among completed trials within the constraints; None before there is one."""
    ranked = ranked_trials(study)
    return first_value(ranked[0]) if ranked else None


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The best completed trial among those meeting the study's constraints; a clear error when none do."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        raise TunerError(f"study {study.study_name!r} has no completed trial yet")
    if not any(feasible(t) for t in completed):
        bounds = study.user_attrs.get(StudyKey.SPACE, {}).get("study", {}).get("constraints", {})
        raise TunerError(
            f"none of the {len(completed)} completed trials of study {study.study_name!r} meets its constraints "
            f"({_describe_bounds(bounds)}); run more trials, or relax study.constraints"
        )
    if len(study.directions) > 1:  # the front's trial with the best first objective (refit --pick chooses others)
        return ranked_trials(study)[0]
    return study.best_trial


def _describe_bounds(bounds: dict) -> str:
    parts = []
    for name, b in bounds.items():
        parts += [f"{name} >= {b['min']}"] if b.get("min") is not None else []
        parts += [f"{name} <= {b['max']}"] if b.get("max") is not None else []
    return ", ".join(parts)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """What a person wants to know about one trial, JSON-serialisable."""
    duration = trial.duration.total_seconds() if trial.duration else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": first_value(trial),
        "values": trial.values,
        "best_epoch": trial.user_attrs.get(TrialKey.BEST_EPOCH),
        "epochs_run": trial.user_attrs.get(TrialKey.EPOCHS_RUN, len(trial.intermediate_values) or None),
        "seed": trial.user_attrs.get(TrialKey.SEED),
        "params": trial.params,
        "duration_s": None if duration is None else round(duration, 2),
        "reason": trial.user_attrs.get(TrialKey.FAIL_REASON)
        or trial.user_attrs.get(TrialKey.PRUNE_REASON)
        or _preempted(trial),
        "feasible": feasibility(trial),
    }


def _preempted(trial: FrozenTrial) -> str | None:
    stop = trial.user_attrs.get(TrialKey.PREEMPTED)
    if stop is None:
        return None
    return f"preempted after epoch {stop['epoch']}, queued to resume" if stop["epoch"] else "preempted, queued again"
