"""One worker: claim a start from the budget, run one trial, repeat until the budget is spent.

A worker killed mid-trial stops sending heartbeats; the next worker to look fails that trial, gives its
start back and re-queues the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``), and whoever
claims next runs the retry. A trial that crashes with an unexpected exception is re-queued up to
:data:`MAX_CRASH_RETRIES` times; deterministic faults (a bad combination, out of memory at the smallest
batch size) are not.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner import interrupts
from tuner.data import Dataset
from tuner.errors import TunerError
from tuner.search.budget import TrialBudget, drop_orphans, open_trials
from tuner.search.keys import StudyKey, TrialKey
from tuner.search.objective import EpochProgress, Objective
from tuner.search.optuna_internals import fail_trial, reread
from tuner.search.outage import DEFAULT_PATIENCE, StorageLost, storage_gone
from tuner.search.preemption import SavedTrials, TrialPreempted, requeue
from tuner.search.resources import process_gone, see_only_gpu, use_threads, worker_name
from tuner.search.samplers import build_pruner, build_sampler
from tuner.search.space import SearchSpace
from tuner.search.stop import stagnation
from tuner.search.storage import OnStaleTrial, open_storage
from tuner.search.trial_data import TrialData, prepare
from tuner.train import resolve_device

log = logging.getLogger(__name__)

MAX_CRASH_RETRIES = 2
MAX_FAILURES_IN_A_ROW = 5
POLL_SECONDS = 1.0


class AfterTrial:
    """Gives a failed trial's start back and re-queues crashed (not deterministic) trials."""

    def __init__(self, budget: TrialBudget) -> None:
        self.budget = budget
        self.failures_in_a_row = 0
        self.last_failure = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            self.failures_in_a_row = 0
            return
        self.failures_in_a_row += 1
        self.last_failure = trial.user_attrs.get(TrialKey.FAIL_REASON) or trial.system_attrs.get(
            TrialKey.FAIL_REASON, "unknown"
        )
        retries = int(trial.user_attrs.get(TrialKey.CRASH_RETRIES, 0))
        # A deterministic fault ("fail_reason") would fail again with the same parameters: not re-queued.
        if TrialKey.FAIL_REASON not in trial.user_attrs and retries < MAX_CRASH_RETRIES:
            original = trial.user_attrs.get(TrialKey.RETRY_OF, trial.number)
            study.enqueue_trial(
                trial.params, user_attrs={TrialKey.RETRY_OF: original, TrialKey.CRASH_RETRIES: retries + 1}
            )
            log.warning(
                "trial %d crashed; re-queued its parameters (retry %d of %d)",
                trial.number,
                retries + 1,
                MAX_CRASH_RETRIES,
            )
        # Only now the start: whoever claims it must find the re-queued trial waiting (see OnStaleTrial).
        self.budget.give_back()


def _give_back_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): give the start back; Optuna's callback re-queues it."""
    TrialBudget(study).give_back()


def fail_trials_of_dead_workers(study: optuna.Study, pid: int | None = None) -> list[int]:
    """Fail the running trials of worker ``pid`` (known to be dead) or, without ``pid``, of every process
    of this machine that has ended (a run killed, or stopped by a database it could not write), give their
    starts back and re-queue them, as a heartbeat timeout would, but at once. Returns the trial numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        name = trial.user_attrs.get(TrialKey.WORKER, "")
        if pid is not None:
            if name != worker_name(pid):
                continue
        elif not process_gone(name, trial.user_attrs.get(TrialKey.PROCESS_SPACE)):
            continue
        if not fail_trial(study, trial, f"worker {name} died"):
            continue  # a heartbeat check elsewhere got there first and did the same
        if pid is None:
            log.warning("trial %d was left running by process %s, which has ended; re-queued", trial.number, name)
        OnStaleTrial(_give_back_stale)(study, reread(study, trial))
        failed.append(trial.number)
    return failed


def work(
    space: SearchSpace,
    *,
    storage_url: str,
    cache_dir: Path,
    device: str | None = None,
    sampler_seed_offset: int = 0,
    heartbeat: int = 60,
    storage_patience: float = DEFAULT_PATIENCE,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    dataset: Dataset | None = None,
    threads: int | None = None,
    gpu: int | None = None,
    on_epoch: EpochProgress | None = None,
) -> None:
    """One worker: claim a start, run one trial, repeat until the budget is spent and nothing is left running.

    ``threads``: this worker's torch / BLAS threads; ``gpu``: the one GPU it sees (as ``cuda``).
    """
    if gpu is not None:
        see_only_gpu(gpu)
    if threads is not None:
        use_threads(threads)
    dataset = dataset or prepare(space, cache_dir=cache_dir)
    storage = open_storage(
        storage_url, heartbeat=heartbeat, on_stale=_give_back_stale, patience=storage_patience, wait_to_open=True
    )
    sampler_settings = space.study.sampler.model_copy(update={"seed": space.study.sampler.seed + sampler_seed_offset})
    study = optuna.load_study(
        study_name=space.study.name,
        storage=storage,
        sampler=build_sampler(sampler_settings),
        pruner=build_pruner(space.study.pruner, space.train.max_epochs),
    )
    torch_device = resolve_device(device or space.train.device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    artifacts = Path(study.user_attrs[StudyKey.ARTIFACT_DIR]) if space.study.artifacts else None
    if artifacts is not None:
        try:
            artifacts.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only or full disk: the trials' results do not need their plots
            log.warning(
                "could not create the trials' folder %s (%s); trials run without their files", artifacts, err.strerror
            )
            artifacts = None
    trial_data = TrialData(space, dataset, torch_device, cache_dir)
    data, folds = trial_data.at(dataset.image_size)
    saved = SavedTrials(Path(study.user_attrs[StudyKey.ARTIFACT_DIR]) / "resume")
    objective = Objective(
        space, data, dataset.class_names, artifacts, folds, on_epoch=on_epoch, trial_data=trial_data, saved=saved
    )
    budget = TrialBudget(study)
    fail_trials_of_dead_workers(study)
    after_trial = AfterTrial(budget)
    try:
        with interrupts.preemptible():
            _trials_until_done(study, objective, budget, after_trial, [*callbacks, after_trial], space, torch_device)
    finally:
        if objective.artifacts is not None:
            objective.artifacts.close()


def _trials_until_done(
    study: optuna.Study,
    objective: Objective,
    budget: TrialBudget,
    after_trial: AfterTrial,
    after: list[Callable[[optuna.Study, FrozenTrial], None]],
    space: SearchSpace,
    device: torch.device,
) -> None:
    deadline = time.monotonic() + space.study.timeout if space.study.timeout else None
    orphans: dict[int, float] = {}  # WAITING trials with no start left: when first seen so
    while deadline is None or time.monotonic() < deadline:
        interrupts.raise_if_interrupted()
        interrupts.raise_if_preempted("no trial was running")
        if space.study.stop is not None and stopped(study, space):
            return
        if after_trial.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            # Failed trials are replaced to keep the total exact; a space in which everything fails would loop forever.
            raise TunerError(
                f"{MAX_FAILURES_IN_A_ROW} trials in a row failed, the last with: {after_trial.last_failure}; "
                f"see `tuner trials --study {space.study.name}`"
            )
        if budget.claim():
            try:
                with interrupts.deferred():
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(Exception,),
                        callbacks=after,
                        gc_after_trial=device.type == "cuda",
                    )
            except TrialPreempted as stop:
                # Optuna failed the trial; its retry is queued before the start is given back (see OnStaleTrial).
                requeue(study, stop)
                budget.give_back(stopping=True)
                raise
            except KeyboardInterrupt:
                budget.give_back(stopping=True)  # Optuna marked the trial FAILED; its start is not used up
                raise
            except StorageLost as lost:  # the trial stays RUNNING: the next run finds it stale and retries it
                raise lost.error from None
            except AssertionError as err:  # Optuna could not record the trial's end and trips on its state
                gone = storage_gone(err)
                if gone is None:
                    raise
                raise gone from None
            except optuna.exceptions.UpdateFinishedTrialError:
                # Our heartbeat was missed long enough for another worker to declare this trial stale;
                # it was failed, given back and re-queued there. Carry on with the next one.
                log.warning("a trial of this worker was taken over as stale (missed heartbeats); continuing")
        elif open_trials(study):
            # Others are still running: one may fail or go stale and free a start, or be re-queued.
            with warnings.catch_warnings():  # experimental in Optuna, and what finds a dead worker's trial
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            fail_trials_of_dead_workers(study)
            drop_orphans(study, budget, orphans)
            time.sleep(POLL_SECONDS)
        else:
            return


def stopped(study: optuna.Study, space: SearchSpace) -> bool:
    """The study stopped improving (said by any worker, or found now and recorded for all of them)."""
    if study.user_attrs.get(StudyKey.STOPPED):
        return True
    reason = stagnation(study, space)
    if reason is None:
        return False
    study.set_user_attr(StudyKey.STOPPED, reason)
    log.warning("stopping the study: %s", reason)
    return True
