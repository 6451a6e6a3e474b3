"""Optuna glue: sampler, pruner, the objective, the study's provenance and its best trials.

The objective is a thin caller of :func:`tuner.training.train_model`: it draws
hyperparameters, trains with a per-epoch callback that reports to the pruner,
and stores the whole per-epoch history and timings as user attributes, so the
dashboard and refit need nothing else. A fault in one trial (NaN loss, CUDA
out-of-memory, an impossible combination) ends that trial with its reason; the
study goes on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner import __version__
from tuner.artifacts import TrialArtifacts
from tuner.data import Dataset, load_dataset
from tuner.data.splits import assign_folds
from tuner.engine import FitResult, NonFiniteLossError
from tuner.errors import SpaceError, StorageError, TunerError
from tuner.hparams import Hyperparameters
from tuner.metrics import choose_threshold, classification_metrics
from tuner.resources import GPU_ENV, worker_name
from tuner.samplers import PRUNERS, SAMPLERS
from tuner.space import SamplerSettings, SearchSpace, class_names_used, iter_specs, suggest
from tuner.storage import STUDIES_DIR, open_storage, redact
from tuner.training import DeviceData, OutOfMemory, TrainSettings, free_memory, pooled, train_model

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


EpochProgress = Callable[[int, int, float], None]  # (trial number, epoch, the study metric's value)


class TrialFault(RuntimeError):
    """A trial could not finish (out of memory, impossible combination); the reason is recorded."""


# ------------------------------------------------------------------ sampler and pruner


def build_sampler(settings: SamplerSettings) -> optuna.samplers.BaseSampler:
    return SAMPLERS[settings.name](settings.seed, settings.n_startup_trials)


def build_pruner(settings: Any, max_epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[settings.name](max_epochs, **settings.model_dump(exclude={"name"}))


# ------------------------------------------------------------------ study


def open_study(
    space: SearchSpace, storage_url: str, data: Dataset, artifacts_dir: Path | None = None, *, heartbeat: int = 60
) -> optuna.Study:
    """Create the study, or load it if it exists and was made from the same space (resume)."""
    storage = open_storage(storage_url, heartbeat=heartbeat)
    name = space.study.name
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize" if space.study.resolved_direction == "maximize" else "minimize",
        sampler=build_sampler(space.study.sampler),
        pruner=build_pruner(space.study.pruner, space.train.max_epochs),
        load_if_exists=True,
    )
    attrs = study.user_attrs
    fingerprint = space.fingerprint()
    if "space_fingerprint" not in attrs:
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("tuner_version", __version__)
        study.set_user_attr("space", space.model_dump(mode="json"))
        study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
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
        study.set_user_attr("test_set_reads", [])
        study.set_user_attr("artifact_dir", str(artifact_dir(name, storage_url, artifacts_dir)))
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


def train_settings(space: SearchSpace) -> TrainSettings:
    """The loop's settings for this space's trials (refit and re-scoring use them too)."""
    checkpoint = space.train.checkpoint_metric
    if checkpoint is None:
        monitor, mode = space.study.metric, "max" if space.study.resolved_direction == "maximize" else "min"
    else:
        monitor, mode = checkpoint, "min" if checkpoint == "val_loss" else "max"
    return TrainSettings(
        max_epochs=space.train.max_epochs,
        patience=space.train.patience,
        monitor=monitor,
        mode=mode,
        amp=space.train.amp,
        channels_last=space.train.channels_last,
        eval_batch_size=space.train.eval_batch_size,
        min_batch_size=space.train.min_batch_size,
    )


def cv_folds(dataset: Dataset, k: int, seed: int, device: torch.device) -> list[DeviceData]:
    """Train and validation pooled, then k stratified (grouped, when there are groups) folds."""
    labels = np.concatenate([dataset.train.labels, dataset.val.labels])
    images = np.concatenate([dataset.train.images, dataset.val.images])
    groups = pooled(dataset.train.groups, dataset.val.groups)
    tags = pooled(dataset.train.tags, dataset.val.tags)
    fold = assign_folds(labels, groups, k=k, seed=seed)
    return [
        DeviceData.build(
            dataset,
            device,
            train=(images[fold != f], labels[fold != f]),
            val=(images[fold == f], labels[fold == f]),
            train_tags=None if tags is None else tags[fold != f],
        )
        for f in range(k)
    ]


def space_at_size(space: SearchSpace, image_size: int | None) -> SearchSpace:
    """``space`` with its data at ``image_size`` (None: as it is)."""
    if image_size is None or image_size == space.data.image_size:
        return space
    return space.model_copy(update={"data": space.data.model_copy(update={"image_size": image_size})})


class TrialData:
    """A worker's data at each image size its trials ask for: decoded once per size into the disk cache,
    moved to the device once per size, kept for the trials after (never resized per epoch)."""

    def __init__(self, space: SearchSpace, dataset: Dataset, device: torch.device, cache_dir: Path) -> None:
        self.space, self.device, self.cache_dir = space, device, cache_dir
        self._by_size: dict[int, tuple[DeviceData, list[DeviceData]]] = {}
        self._add(dataset)

    def _add(self, dataset: Dataset) -> tuple[DeviceData, list[DeviceData]]:
        k = self.space.study.cv_folds
        folds = cv_folds(dataset, k, self.space.data.split_seed, self.device) if k else []
        self._by_size[dataset.image_size] = (DeviceData.from_dataset(dataset, self.device), folds)
        return self._by_size[dataset.image_size]

    def at(self, image_size: int | None) -> tuple[DeviceData, list[DeviceData]]:
        """Hold-out data and the cross-validation folds (empty without ``study.cv_folds``)."""
        size = image_size or self.space.data.image_size
        if size in self._by_size:
            return self._by_size[size]
        return self._add(prepare(space_at_size(self.space, size), cache_dir=self.cache_dir))


class Objective:
    """Optuna objective: hyperparameters -> trained model(s) -> validation metric.

    Hold-out (default): one model, reported to the pruner every epoch, valued at its best epoch.
    Cross-validated (``folds``): one model per fold, each fold's best value reported as step
    ``fold`` (so median or Wilcoxon pruning stops a weak trial after a few folds), valued at the
    mean over folds; the threshold is chosen on the pooled out-of-fold predictions.
    """

    def __init__(
        self,
        space: SearchSpace,
        data: DeviceData,
        class_names: tuple[str, ...] = (),
        artifacts: Path | None = None,
        folds: list[DeviceData] | None = None,
        on_epoch: EpochProgress | None = None,
        sizes: TrialData | None = None,
    ) -> None:
        self.on_epoch = on_epoch  # told (trial, epoch, metric value) after each epoch: progress display
        self.space = space
        self.data = data
        self.folds = folds or []
        self.sizes = sizes  # the data at other image sizes, when image_size is a hyperparameter
        self.class_names = class_names or tuple(str(i) for i in range(data.num_classes))
        self.artifacts = (
            None
            if artifacts is None
            else TrialArtifacts(
                artifacts,
                metric=space.study.metric,
                class_names=self.class_names,
                positive_index=data.positive_index,
                save_checkpoints=space.study.save_checkpoints,
            )
        )
        self.metric = space.study.metric
        self.settings = train_settings(space)
        if sizes is not None:  # features of a frozen backbone go to the disk cache beside the pixels
            self.settings = replace(self.settings, feature_cache=sizes.cache_dir)

    def __call__(self, trial: optuna.Trial) -> float:
        hparams = suggest(trial, self.space)
        return self.run(trial, hparams, seed=self.space.train.seed + trial.number)

    def run(self, trial: optuna.Trial | optuna.trial.FixedTrial, hparams: Hyperparameters, seed: int) -> float:
        """Train (hold-out or every fold) with ``seed``; record everything on ``trial``; return its value."""
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("hparams", hparams.model_dump(mode="json"))
        trial.set_user_attr("worker", worker_name())  # which machine and process ran it
        trial.set_user_attr("threads", torch.get_num_threads())
        if os.environ.get(GPU_ENV) is not None:
            trial.set_user_attr("visible_gpus", os.environ[GPU_ENV])  # the GPU(s) that worker was given
        history: dict[str, list[float]] = {}
        try:
            data, folds = self._data_for(hparams)
            if folds:
                return self._cross_validate(trial, hparams, seed, history, folds)
            return self._holdout(trial, hparams, seed, history, data)
        except NonFiniteLossError as err:
            trial.set_user_attr("history", history)
            trial.set_user_attr("prune_reason", str(err))
            raise optuna.TrialPruned(str(err)) from None
        except OutOfMemory as err:
            # Infeasible here, not broken: pruned (not failed), so the sampler learns to avoid it
            # and the trial counts towards the total instead of being replaced and retried.
            trial.set_user_attr("history", history)
            trial.set_user_attr("prune_reason", str(err))
            trial.set_user_attr("infeasible", True)
            raise optuna.TrialPruned(str(err)) from None
        except TunerError as err:
            reason = str(err)
        free_memory()
        trial.set_user_attr("history", history)
        trial.set_user_attr("fail_reason", reason)
        raise TrialFault(reason)

    def _data_for(self, hparams: Hyperparameters) -> tuple[DeviceData, list[DeviceData]]:
        if hparams.image_size in (None, self.data.image_size):
            return self.data, self.folds
        if self.sizes is None:
            raise TunerError(
                f"image_size={hparams.image_size} was asked for, but only {self.data.image_size} is loaded"
            )
        return self.sizes.at(hparams.image_size)

    def _retry(self, trial: Any, history: dict) -> Callable[[Hyperparameters], None]:
        """Out of memory: the run starts over at a smaller batch size; record each one tried."""

        def on_retry(smaller: Hyperparameters) -> None:
            history.clear()
            tried = [*trial.user_attrs.get("out_of_memory_at", []), smaller.batch_size * 2]
            trial.set_user_attr("out_of_memory_at", tried)
            trial.set_user_attr("batch_size_run", smaller.batch_size)
            trial.set_user_attr("accumulate_steps_run", smaller.accumulate_steps)

        return on_retry

    def _prune(self, trial: Any, history: dict, reason: str, value: float) -> None:
        trial.set_user_attr("history", history)
        trial.set_user_attr("prune_reason", reason)
        raise optuna.TrialPruned(f"{reason} with {self.metric}={value:.4f}")

    def _holdout(self, trial: Any, hparams: Hyperparameters, seed: int, history: dict, data: DeviceData) -> float:
        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
            value = metrics[self.metric]
            if math.isfinite(value):
                trial.report(value, epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, epoch, value)
            if trial.should_prune():
                self._prune(trial, history, f"pruned at epoch {epoch}", value)

        _, result = train_model(
            hparams, data, self.settings, seed=seed, on_epoch=on_epoch, on_retry=self._retry(trial, history)
        )
        self._record(trial, result, result.history, result.best_epoch)
        self._finish(trial, result.history, result.best_val_probs, result.val_targets, result.best_state)
        return self._value(result)

    def _value(self, result: FitResult) -> float:
        """The study's metric at the checkpoint epoch (which the checkpoint metric may have chosen)."""
        return result.history[self.metric][result.best_epoch - 1]

    def _cross_validate(
        self, trial: Any, hparams: Hyperparameters, seed: int, history: dict, folds: list[DeviceData]
    ) -> float:
        values, epochs = [], []
        probs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        first = None
        for fold, data in enumerate(folds):
            _, result = train_model(hparams, data, self.settings, seed=seed, on_retry=self._retry(trial, history))
            first = first or result
            value = self._value(result)
            values.append(value)
            epochs.append(result.best_epoch)
            assert result.best_val_probs is not None and result.val_targets is not None  # folds validate
            probs.append(result.best_val_probs)
            targets.append(result.val_targets)
            history.setdefault(f"fold_{self.metric}", []).append(value)
            trial.set_user_attr("fold_values", values)
            trial.report(value, fold)
            if fold < len(folds) - 1 and trial.should_prune():  # after the last fold there is nothing to save
                self._prune(trial, history, f"pruned after fold {fold + 1} of {len(folds)}", value)
        assert first is not None
        history.update(first.history)  # the first fold's curves stand for the trial's
        self._record(trial, first, history, int(np.median(epochs)))
        trial.set_user_attr("fold_best_epochs", epochs)
        self._finish(trial, history, torch.cat(probs), torch.cat(targets), first.best_state)
        return float(np.mean(values))

    def _record(self, trial: Any, result: FitResult, history: dict, best_epoch: int) -> None:
        trial.set_user_attr("history", history)
        trial.set_user_attr("best_epoch", best_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("stopped_early", result.stopped_early)
        trial.set_user_attr("seconds_per_epoch", round(result.seconds_per_epoch, 4))
        trial.set_user_attr("images_per_second", round(result.images_per_second, 1))
        trial.set_user_attr("peak_memory_mb", round(result.peak_memory_mb, 1))
        if result.train_counts is not None:  # after hard examples left out, extra and SMOTE images added
            trial.set_user_attr("train_counts", dict(zip(self.class_names, result.train_counts, strict=True)))
            trial.set_user_attr("images_per_epoch", result.images_per_epoch)

    def _finish(
        self, trial: Any, history: dict, probs: torch.Tensor | None, targets: torch.Tensor | None, state: dict
    ) -> None:
        """Operating point on validation (frozen for the test set) and the dashboard's artifacts."""
        positive = self.data.positive_index
        threshold = 0.5
        at: dict[str, float] = {}
        if self.data.num_classes == 2 and positive is not None and probs is not None and targets is not None:
            rule = self.space.study.threshold
            threshold = choose_threshold(probs, targets, positive_index=positive, rule=rule.rule, recall=rule.recall)
            at = classification_metrics(probs, targets, positive_index=positive, threshold=threshold)
            trial.set_user_attr("threshold", threshold)
            trial.set_user_attr("val_at_threshold", at)
        self._constrain(trial, history, at)
        if self.artifacts is not None and isinstance(trial, optuna.Trial):
            self.artifacts.add(
                trial,
                history=history,
                probs=probs,
                targets=targets,
                threshold=threshold,
                state=state,
                hparams=trial.user_attrs["hparams"],
            )

    def _constrain(self, trial: Any, history: dict, at_threshold: dict[str, float]) -> None:
        """``study.constraints``, each metric at the trial's operating point (or its best epoch), given to
        Optuna (``set_constraint``: TPE and GP sample around the infeasible, ``best_trial`` skips them)."""
        constraints = self.space.study.constraints
        if not constraints:
            return
        values = {}
        for name, bound in constraints.items():
            value = at_threshold.get(name.removeprefix("val_"))
            if value is None:
                value = history[name][trial.user_attrs["best_epoch"] - 1]
            values[name] = value
            violation = bound.violation(value) if math.isfinite(value) else 1.0  # NaN: not shown to be met
            if isinstance(trial, optuna.Trial):
                trial.set_constraint(name, violation)
        trial.set_user_attr("constraint_values", values)
        trial.set_user_attr("feasible", all(constraints[n].violation(v) <= 0 for n, v in values.items()))


def feasible(trial: FrozenTrial) -> bool:
    """Whether a finished trial met its study's constraints (every trial does when there are none)."""
    return all(v <= 0 for v in trial.constraints.values())


def ranked_trials(study: optuna.Study, *, feasible_only: bool = True) -> list[FrozenTrial]:
    """The study's completed trials, best first (within study.constraints unless ``feasible_only=False``)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and t.value is not None and (feasible(t) or not feasible_only)
    ]
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(done, key=lambda t: sign * float(t.value))  # type: ignore[arg-type]


def best_value(study: optuna.Study) -> float | None:
    """The best value so far among completed trials within the constraints; None before there is one."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and feasible(t)]
    return study.best_value if done else None


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The best completed trial among those meeting the study's constraints; a clear error when none do."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        raise TunerError(f"study {study.study_name!r} has no completed trial yet")
    if not any(feasible(t) for t in completed):
        bounds = study.user_attrs.get("space", {}).get("study", {}).get("constraints", {})
        raise TunerError(
            f"none of the {len(completed)} completed trials of study {study.study_name!r} meets its constraints "
            f"({_describe_bounds(bounds)}); run more trials, or relax study.constraints"
        )
    return study.best_trial


def _describe_bounds(bounds: dict) -> str:
    parts = []
    for name, b in bounds.items():
        parts += [f"{name} >= {b['min']}"] if b.get("min") is not None else []
        parts += [f"{name} <= {b['max']}"] if b.get("max") is not None else []
    return ", ".join(parts)


def prepare(space: SearchSpace, *, cache_dir: Path, include_test: bool = False) -> Dataset:
    """Load the train and validation splits; the test split only with ``include_test`` (refit).

    Also checks what the space says about the data (class names, a hard-example column) against
    the data itself, so a typo fails here, before any trial, and not in every trial.
    """
    d = space.data
    dataset = load_dataset(
        d.source,
        image_size=d.image_size,
        channels=d.channels,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        columns=d.csv_columns(),
        label_aliases=d.label_aliases,
        positive_class=d.positive_class,
        synthetic_options=d.synthetic.model_dump(),
        extra_train=None if d.extra_train is None else (d.extra_train.source, d.extra_train.label),
        cache_dir=cache_dir,
        include_test=include_test,
    )
    check_space_against_data(space, dataset)
    return dataset


def check_space_against_data(space: SearchSpace, dataset: Dataset) -> None:
    """Class names in per-class hyperparameters, focus metrics, drop_hard and extra_ratio need the data to match."""
    problems: list[tuple[str, str]] = []
    for name, used in class_names_used(space.specs).items():
        unknown = sorted(used - set(dataset.class_names))
        if unknown:
            classes = ", ".join(dataset.class_names)
            problems.append(
                (f"params.{name}", f"unknown class(es) {', '.join(unknown)}; the data's classes are {classes}")
            )
    for key, metric in (
        ("study.metric", space.study.metric),
        ("train.checkpoint_metric", space.train.checkpoint_metric),
    ):
        if metric and metric.startswith("val_focus_") and dataset.positive_index is None:
            classes = ", ".join(dataset.class_names)
            problems.append((key, f"{metric} needs data.positive_class, the class to focus on ({classes})"))
    names = {spec.name for spec, _ in iter_specs(space.specs)}
    if "drop_hard" in names and space.data.hard_example_column is None:
        problems.append(("params.drop_hard", "needs data.hard_example_column (a CSV column) to be set"))
    if "extra_ratio" in names and space.data.extra_train is None:
        problems.append(("params.extra_ratio", "needs data.extra_train (a folder of extra images) to be set"))
    if problems:
        raise SpaceError("search space", problems)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """What a person wants to know about one trial, JSON-serialisable."""
    duration = trial.duration.total_seconds() if trial.duration else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "best_epoch": trial.user_attrs.get("best_epoch"),
        "epochs_run": trial.user_attrs.get("epochs_run", len(trial.intermediate_values) or None),
        "seed": trial.user_attrs.get("seed"),
        "params": trial.params,
        "duration_s": None if duration is None else round(duration, 2),
        "reason": trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason"),
        "feasible": trial.user_attrs.get("feasible"),  # None: the study has no constraints
    }
