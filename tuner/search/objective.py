"""The Optuna objective: hyperparameters -> trained model(s) -> validation metric.

It draws hyperparameters, trains through :func:`tuner.train.train_model` (hold-out, or every fold of a
cross-validated objective) with a per-epoch callback that reports to the pruner, chooses the operating
point on validation, judges ``study.constraints``, and stores the whole per-epoch history and timings
as user attributes, so the dashboard and refit need nothing else. A fault in one trial (NaN loss, CUDA
out-of-memory, an impossible combination) ends that trial with its reason; the study goes on.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from tuner import interrupts
from tuner.data import DeviceData
from tuner.errors import TunerError
from tuner.metric_names import COST_METRICS
from tuner.search.artifacts import TrialArtifacts
from tuner.search.keys import TrialKey
from tuner.search.outage import DATABASE_GONE, StorageLost
from tuner.search.pareto import PruneRule, cost_signs, judge, peers_of
from tuner.search.preemption import Resume, SavedTrials, TrialPreempted, original_number
from tuner.search.resources import GPU_ENV, process_space, worker_name
from tuner.search.space import SearchSpace, suggest
from tuner.search.trial_data import TrialData
from tuner.train import (
    FitResult,
    Hyperparameters,
    Interrupted,
    NonFiniteLossError,
    OutOfMemory,
    RunSettings,
    build_classifier,
    choose_threshold,
    classification_metrics,
    free_memory,
    network_costs,
    resolve_device,
    train_model,
)

log = logging.getLogger(__name__)

EpochProgress = Callable[[int, int, float], None]  # (trial number, epoch, the study metric's value)


class TrialFault(RuntimeError):
    """A trial could not finish (out of memory, impossible combination); the reason is recorded."""


def run_settings(space: SearchSpace) -> RunSettings:
    """The loop's settings for this space's trials (refit and re-scoring use them too)."""
    checkpoint = space.train.checkpoint_metric
    if checkpoint is None:
        monitor, mode = space.study.metric, "max" if space.study.resolved_direction == "maximize" else "min"
    else:
        monitor, mode = checkpoint, "min" if checkpoint == "val_loss" else "max"
    return RunSettings(
        max_epochs=space.train.max_epochs,
        patience=space.train.patience,
        monitor=monitor,
        mode=mode,
        amp=space.train.amp,
        channels_last=space.train.channels_last,
        eval_batch_size=space.train.eval_batch_size,
        min_batch_size=space.train.min_batch_size,
        epoch_images=space.train.epoch_images,
    )


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
        trial_data: TrialData | None = None,
        saved: SavedTrials | None = None,
    ) -> None:
        self.on_epoch = on_epoch  # told (trial, epoch, metric value) after each epoch: progress display
        self.space = space
        self.data = data
        self.folds = folds or []
        self.trial_data = trial_data  # the data at other image sizes, when image_size is a hyperparameter
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
        self.objectives = space.study.objectives
        self.multi = space.study.multi_objective  # then tuner prunes (see tuner.search.pareto), not Optuna
        self.rule = PruneRule.from_settings(space.study.pruner) if self.multi else None
        self.cost_signs = cost_signs(self.objectives, space.study.resolved_directions)
        self.sign = 1.0 if space.study.resolved_direction == "maximize" else -1.0
        self.saved = saved  # preempted trials' states; None: trials stop only when the process ends
        self.settings = run_settings(space)
        if trial_data is not None:  # features of a frozen backbone go to the disk cache beside the pixels
            self.settings = replace(self.settings, feature_cache=trial_data.cache_dir)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        with interrupts.immediate():  # the worker defers Ctrl-C around Optuna's bookkeeping (see interrupts)
            hparams = suggest(trial, self.space)
            resume = None if self.saved is None else self.saved.load(trial, hparams)
            # A retry is the same trial again: the original's seed, so it ends as the original would have.
            seed = resume.seed if resume is not None else self.space.train.seed + original_number(trial)
            try:
                return self.run(trial, hparams, seed=seed, resume=resume)
            except DATABASE_GONE as err:
                raise StorageLost(err) from None

    def run(
        self,
        trial: optuna.Trial | optuna.trial.FixedTrial,
        hparams: Hyperparameters,
        seed: int,
        resume: Resume | None = None,
    ) -> float | tuple[float, ...]:
        """Train (hold-out or every fold) with ``seed``; record everything on ``trial``; return its value
        (its values, one per objective, in a multi-objective study).

        ``resume``: a preempted trial's saved state, to go on from its epoch (hold-out)."""
        trial.set_user_attr(TrialKey.SEED, seed)
        trial.set_user_attr(TrialKey.HPARAMS, hparams.model_dump(mode="json"))
        trial.set_user_attr(TrialKey.WORKER, worker_name())  # which machine and process ran it
        trial.set_user_attr(TrialKey.PROCESS_SPACE, process_space())
        trial.set_user_attr(TrialKey.THREADS, torch.get_num_threads())
        if os.environ.get(GPU_ENV) is not None:
            trial.set_user_attr(TrialKey.VISIBLE_GPUS, os.environ[GPU_ENV])  # the GPU(s) that worker was given
        history: dict[str, list[float]] = {}
        folds: list[DeviceData] = []
        try:
            data, folds = self._data_for(hparams)
            if folds:
                return self._cross_validate(trial, hparams, seed, history, folds)
            return self._holdout(trial, hparams, seed, history, data, resume)
        except Interrupted as stopped:
            raise self._preempted(trial, hparams, seed, stopped, keep=not folds) from None
        except NonFiniteLossError as err:
            trial.set_user_attr(TrialKey.HISTORY, history)
            trial.set_user_attr(TrialKey.PRUNE_REASON, str(err))
            raise optuna.TrialPruned(str(err)) from None
        except OutOfMemory as err:
            # Infeasible here, not broken: pruned (not failed), so the sampler learns to avoid it
            # and the trial counts towards the total instead of being replaced and retried.
            trial.set_user_attr(TrialKey.HISTORY, history)
            trial.set_user_attr(TrialKey.PRUNE_REASON, str(err))
            trial.set_user_attr(TrialKey.INFEASIBLE, True)
            raise optuna.TrialPruned(str(err)) from None
        except DATABASE_GONE:
            raise
        except TunerError as err:
            reason = str(err)
        finally:
            if resume is not None and self.saved is not None and isinstance(trial, optuna.Trial):
                if not interrupts.preempted():  # ended (or failed) for good: its saved state is spent
                    self.saved.discard(trial)
        free_memory()
        trial.set_user_attr(TrialKey.HISTORY, history)
        trial.set_user_attr(TrialKey.FAIL_REASON, reason)
        raise TrialFault(reason)

    def _stop(self) -> Callable[[], object] | None:
        """What the loop asks before each batch: whether this process was preempted (in a worker)."""
        return interrupts.preempted if self.saved is not None else None

    def _preempted(
        self, trial: Any, hparams: Hyperparameters, seed: int, stopped: Interrupted, *, keep: bool
    ) -> TrialPreempted:
        """Save the state of the last complete epoch (``keep``: hold-out; a cross-validated trial starts
        again), record why the trial stops, and say how its retry finds the state."""
        signum = interrupts.preempted() or signal.SIGTERM
        snapshot = stopped.snapshot
        epoch = snapshot.progress.epoch if keep else 0
        path = None
        if epoch > 0 and self.saved is not None:
            path = self.saved.save(trial, seed=seed, hparams=hparams, snapshot=snapshot)
        if path is None:
            epoch = 0
        trial.set_user_attr(TrialKey.HISTORY, snapshot.progress.history if keep else {})
        trial.set_user_attr(TrialKey.PREEMPTED, {"epoch": epoch, "state": None if path is None else str(path)})
        # Optuna logs a failed trial with its traceback; this one stops on purpose, and says so itself.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        where = f"saved after epoch {epoch}" if epoch else "to start again"
        return TrialPreempted(
            signum,
            f"trial {trial.number} {where}",
            params=dict(trial.params),
            retry_attrs={
                TrialKey.RETRY_OF: original_number(trial),
                TrialKey.CRASH_RETRIES: int(trial.user_attrs.get(TrialKey.CRASH_RETRIES, 0)),
            },
        )

    def _data_for(self, hparams: Hyperparameters) -> tuple[DeviceData, list[DeviceData]]:
        if hparams.image_size in (None, self.data.image_size):
            return self.data, self.folds
        if self.trial_data is None:
            raise TunerError(
                f"image_size={hparams.image_size} was asked for, but only {self.data.image_size} is loaded"
            )
        return self.trial_data.at(hparams.image_size)

    def _retry(self, trial: Any, history: dict) -> Callable[[Hyperparameters], None]:
        """Out of memory: the run starts over at a smaller batch size; record each one tried."""

        def on_retry(smaller: Hyperparameters) -> None:
            history.clear()
            tried = [*trial.user_attrs.get(TrialKey.OUT_OF_MEMORY_AT, []), smaller.batch_size * 2]
            trial.set_user_attr(TrialKey.OUT_OF_MEMORY_AT, tried)
            trial.set_user_attr(TrialKey.BATCH_SIZE_RUN, smaller.batch_size)
            trial.set_user_attr(TrialKey.ACCUMULATE_STEPS_RUN, smaller.accumulate_steps)

        return on_retry

    def _prune(self, trial: Any, history: dict, reason: str, value: float) -> None:
        trial.set_user_attr(TrialKey.HISTORY, history)
        trial.set_user_attr(TrialKey.PRUNE_REASON, reason)
        raise optuna.TrialPruned(f"{reason} with {self.metric}={value:.4f}")

    def _costs(self, trial: Any, hparams: Hyperparameters, data: DeviceData) -> dict[str, float]:
        """A multi-objective trial's network costs, measured before it trains (its pruning compares them)."""
        names = [m for m in self.objectives if m in COST_METRICS]
        if not names:
            return {}
        device = resolve_device(self.space.train.device)
        if self.artifacts is not None:
            self.artifacts.wait()  # the previous trial's plots are drawn on these cores otherwise
        model = build_classifier(
            hparams.model_copy(update={"pretrained": False}),  # the same network; its weights cost the same
            num_classes=data.num_classes,
            channels=data.channels,
            image_size=data.image_size,
        ).to(device)
        costs = network_costs(
            model,
            channels=data.channels,
            image_size=data.image_size,
            batch=hparams.batch_size,
            latency=any("latency" in m for m in names),
            channels_last=self.settings.channels_last and device.type == "cuda",
        )
        del model
        # every cost measured (two latencies only when one is an objective), under its objective's name
        out = {m: round(float(v), 6) for m in COST_METRICS if (v := getattr(costs, m)) is not None}
        trial.set_user_attr(TrialKey.COSTS, out)
        trial.set_user_attr(
            TrialKey.COSTS_MEASURED_ON, f"{costs.device}, {costs.threads} thread(s), batch {costs.batch}"
        )
        return out

    def _should_stop(self, trial: Any, epoch: int, history: dict, costs: dict[str, float]) -> str | None:
        """Optuna's pruner (one objective), or tuner's against cheaper trials (several; tuner.search.pareto)."""
        if not self.multi:
            return f"pruned at epoch {epoch}" if trial.should_prune() else None
        if self.rule is None or not isinstance(trial, optuna.Trial):
            return None
        curve = [v for v in history[self.metric] if math.isfinite(v)]
        best = max(curve, key=lambda v: self.sign * v) if curve else math.nan  # as Optuna's: the best so far
        peers = peers_of(trial.study, self.metric, exclude=trial.number)
        return judge(best, epoch, costs, peers, rule=self.rule, sign=self.sign, cost_signs=self.cost_signs)

    def _holdout(
        self, trial: Any, hparams: Hyperparameters, seed: int, history: dict, data: DeviceData, resume: Resume | None
    ) -> float | tuple[float, ...]:
        costs = self._costs(trial, hparams, data) if self.multi else {}

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
            value = metrics[self.metric]
            if math.isfinite(value) and not self.multi:  # Optuna keeps one objective's curve only
                trial.report(value, epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, epoch, value)
            reason = self._should_stop(trial, epoch, history, costs)
            if reason is not None:
                self._prune(trial, history, reason, value)

        if resume is not None:  # the epochs before the stop, as they were reported then
            history.update({k: list(v) for k, v in resume.history.items()})
            for epoch, value in enumerate(history.get(self.metric, []), 1):
                if math.isfinite(value) and not self.multi:
                    trial.report(value, epoch)
            trial.set_user_attr(TrialKey.RESUMED_AT, resume.epoch)
        _, result = train_model(
            hparams,
            data,
            self.settings,
            seed=seed,
            on_epoch=on_epoch,
            on_retry=self._retry(trial, history),
            stop=self._stop(),
            start=None if resume is None else resume.snapshot,
        )
        self._record(trial, result, result.history, result.best_epoch)
        self._finish(trial, result.history, result.best_val_probs, result.val_targets, result.best_state)
        if self.multi:  # each validation objective at the checkpoint epoch, each cost as measured
            return tuple(
                costs[m] if m in COST_METRICS else result.history[m][result.best_epoch - 1] for m in self.objectives
            )
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
            _, result = train_model(
                hparams, data, self.settings, seed=seed, on_retry=self._retry(trial, history), stop=self._stop()
            )
            first = first or result
            value = self._value(result)
            values.append(value)
            epochs.append(result.best_epoch)
            assert result.best_val_probs is not None and result.val_targets is not None  # folds validate
            probs.append(result.best_val_probs)
            targets.append(result.val_targets)
            history.setdefault(f"fold_{self.metric}", []).append(value)
            trial.set_user_attr(TrialKey.FOLD_VALUES, values)
            trial.report(value, fold)
            if fold < len(folds) - 1 and trial.should_prune():  # after the last fold there is nothing to save
                self._prune(trial, history, f"pruned after fold {fold + 1} of {len(folds)}", value)
        assert first is not None
        history.update(first.history)  # the first fold's curves stand for the trial's
        self._record(trial, first, history, int(np.median(epochs)))
        trial.set_user_attr(TrialKey.FOLD_BEST_EPOCHS, epochs)
        self._finish(trial, history, torch.cat(probs), torch.cat(targets), first.best_state)
        return float(np.mean(values))

    def _record(self, trial: Any, result: FitResult, history: dict, best_epoch: int) -> None:
        trial.set_user_attr(TrialKey.HISTORY, history)
        trial.set_user_attr(TrialKey.BEST_EPOCH, best_epoch)
        trial.set_user_attr(TrialKey.EPOCHS_RUN, result.epochs_run)
        trial.set_user_attr(TrialKey.STOPPED_EARLY, result.stopped_early)
        trial.set_user_attr(TrialKey.SECONDS_PER_EPOCH, round(result.seconds_per_epoch, 4))
        trial.set_user_attr(TrialKey.IMAGES_PER_SECOND, round(result.images_per_second, 1))
        trial.set_user_attr(TrialKey.PEAK_MEMORY_MB, round(result.peak_memory_mb, 1))
        if result.train_counts is not None:  # after hard examples left out, extra and SMOTE images added
            trial.set_user_attr(TrialKey.TRAIN_COUNTS, dict(zip(self.class_names, result.train_counts, strict=True)))
            trial.set_user_attr(TrialKey.IMAGES_PER_EPOCH, result.images_per_epoch)

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
            trial.set_user_attr(TrialKey.THRESHOLD, threshold)
            trial.set_user_attr(TrialKey.VAL_AT_THRESHOLD, at)
        self._constrain(trial, history, at)
        if self.artifacts is not None and isinstance(trial, optuna.Trial):
            self.artifacts.add(
                trial,
                history=history,
                probs=probs,
                targets=targets,
                threshold=threshold,
                state=state,
                hparams=trial.user_attrs[TrialKey.HPARAMS],
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
                value = history[name][trial.user_attrs[TrialKey.BEST_EPOCH] - 1]
            values[name] = value
            violation = bound.violation(value) if math.isfinite(value) else 1.0  # NaN: not shown to be met
            if isinstance(trial, optuna.Trial):
                trial.set_constraint(name, violation)
        trial.set_user_attr(TrialKey.CONSTRAINT_VALUES, values)
