"""Running a study: one worker in this process, or several processes (and machines) on one study.

The trial total is exact however many workers share a study. A small table
beside Optuna's, ``tuner_trial_budget``, holds each study's target and the
number of trial starts claimed so far; a worker claims a start with one atomic
``UPDATE … WHERE claimed < target`` before every trial. A trial that fails
gives its start back, so ``--n-trials 12`` ends with exactly 12 finished
(complete or pruned) trials. A worker killed mid-trial stops sending
heartbeats; the next worker to look fails that trial, gives its start back and
re-queues the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``),
and whoever claims next runs the retry. A trial that crashes with an
unexpected exception is re-queued up to :data:`MAX_CRASH_RETRIES` times;
deterministic faults (a bad combination, CUDA out of memory) are not.

Workers that this process spawned are watched: when one dies (killed,
crashed), its running trial is failed and re-queued at once, without waiting
for missed heartbeats, and a replacement worker is started. Each worker takes
its share of the cores (:mod:`tuner.resources`) and, with ``--gpus``, sees only
its GPU.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner import interrupts
from tuner.data import Dataset
from tuner.engine import resolve_device
from tuner.errors import StorageError, TunerError
from tuner.objective import EpochProgress, Objective
from tuner.resources import gpu_slots, see_only_gpu, threads_per_worker, use_threads, worker_name
from tuner.samplers import build_pruner, build_sampler
from tuner.space import SearchSpace
from tuner.storage import STUDIES_DIR, OnStaleTrial, open_storage, parse_storage_url, redact
from tuner.study import FINISHED, feasible, open_study
from tuner.trial_data import TrialData, prepare
from tuner.warm_start import warm_start

log = logging.getLogger(__name__)

MAX_CRASH_RETRIES = 2
MAX_FAILURES_IN_A_ROW = 5
WORKER_STOPPED = 3  # exit code of a worker that stopped on purpose, with its reason logged
MAX_RESPAWNS = 3  # per worker slot: a worker that keeps dying is not restarted for ever
POLL_SECONDS = 1.0
_metadata = sa.MetaData()
_budget = sa.Table(
    "tuner_trial_budget",
    _metadata,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("claimed", sa.Integer, nullable=False),
)


class TrialBudget:
    """The study's trial total, shared by every worker through the study's own database."""

    def __init__(self, study: optuna.Study) -> None:
        storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps RDBStorage in a cache
        self.engine = storage.engine  # type: ignore[union-attr]
        self.study_id = study._study_id
        _metadata.create_all(self.engine, checkfirst=True)

    def add(self, n: int, *, others_running: bool) -> int:
        """Allow ``n`` more trial starts. Starts left over from an interrupted run are dropped
        unless other workers are running now (then they are theirs to use)."""
        with self.engine.begin() as con:
            row = con.execute(sa.select(_budget).where(_budget.c.study_id == self.study_id)).first()
            if row is None:
                con.execute(sa.insert(_budget).values(study_id=self.study_id, target=n, claimed=0))
                return n
            base = max(row.target, row.claimed) if others_running else row.claimed
            con.execute(sa.update(_budget).where(_budget.c.study_id == self.study_id).values(target=base + n))
            return base + n

    def claim(self) -> bool:
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(_budget)
                .where(_budget.c.study_id == self.study_id, _budget.c.claimed < _budget.c.target)
                .values(claimed=_budget.c.claimed + 1)
            )
            return result.rowcount == 1

    def give_back(self, *, stopping: bool = False) -> None:
        """Return one claimed start. ``stopping`` (Ctrl-C): wait a few seconds for the database at most;
        should it be busy, nothing is lost, as the next run's ``add`` drops starts that no one is using."""
        try:
            with self.engine.begin() as con:
                if stopping and self.engine.dialect.name == "sqlite":
                    con.exec_driver_sql("PRAGMA busy_timeout = 3000")
                con.execute(
                    sa.update(_budget)
                    .where(_budget.c.study_id == self.study_id, _budget.c.claimed > 0)
                    .values(claimed=_budget.c.claimed - 1)
                )
        except sa.exc.OperationalError as err:
            if not stopping:
                raise
            log.warning("could not give the interrupted trial's start back (%s); the next run drops it", err.orig)

    def left(self) -> int:
        with self.engine.connect() as con:
            row = con.execute(sa.select(_budget).where(_budget.c.study_id == self.study_id)).first()
            return 0 if row is None else max(0, row.target - row.claimed)


ORPHAN_GRACE_SECONDS = 10.0


def _drop_orphans(study: optuna.Study, budget: TrialBudget, seen: dict[int, float]) -> None:
    """WAITING trials that no start is left to run while nothing runs, seen so for ``ORPHAN_GRACE_SECONDS``
    (not just between a retry's re-queue and its start's return): the total was reached without them.
    Failed with that reason, so no worker waits for them for ever; the finished total stays exact."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or budget.left() > 0:
        seen.clear()
        return
    now = time.monotonic()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if now - seen.setdefault(trial._trial_id, now) < ORPHAN_GRACE_SECONDS:
            continue
        storage = study._storage
        # Claimed first, the way a worker claims a queued trial (the storage's compare-and-set on WAITING):
        # a trial a worker took between the read above and now is left to run, never failed under it.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                continue
            storage.set_trial_system_attr(trial._trial_id, "fail_reason", "not run: the planned total was reached")
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            log.warning("trial %d was waiting with no start left to run it; marked failed", trial.number)


def _open_trials(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


class _AfterTrial:
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
        self.last_failure = trial.user_attrs.get("fail_reason") or trial.system_attrs.get("fail_reason", "unknown")
        retries = int(trial.user_attrs.get("crash_retries", 0))
        # A deterministic fault ("fail_reason") would fail again with the same parameters: not re-queued.
        if "fail_reason" not in trial.user_attrs and retries < MAX_CRASH_RETRIES:
            original = trial.user_attrs.get("retry_of", trial.number)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": original, "crash_retries": retries + 1})
            log.warning(
                "trial %d crashed; re-queued its parameters (retry %d of %d)",
                trial.number,
                retries + 1,
                MAX_CRASH_RETRIES,
            )
        # Only now the start: whoever claims it must find the re-queued trial waiting (see OnStaleTrial).
        self.budget.give_back()


def stagnation(study: optuna.Study, space: SearchSpace) -> str | None:
    """Why the study should stop (``study.stop``), or None: among the trials finished in this run, the
    last ``patience`` did not improve the best value found before them by ``min_delta``."""
    stop = space.study.stop
    if stop is None:
        return None
    began = int(study.user_attrs.get("run_began_at", 0))
    finished = sorted(
        (t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.datetime_complete is not None),
        key=lambda t: t.datetime_complete,  # type: ignore[arg-type,return-value]
    )
    window, before = finished[-stop.patience :], finished[: -stop.patience]
    if len(window) < stop.patience or any(t.number < began for t in window):
        return None
    sign = 1.0 if space.study.resolved_direction == "maximize" else -1.0

    def counted(trials: list[FrozenTrial]) -> list[float]:  # completed, and within study.constraints
        return [
            sign * t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None and feasible(t)
        ]

    earlier, recent = counted(before), counted(window)
    if not earlier or (recent and max(recent) - max(earlier) >= stop.min_delta):
        return None
    return (
        f"{space.study.metric} did not improve by {stop.min_delta} in the last {stop.patience} finished trials "
        f"(best {sign * max(earlier):.4g})"
    )


def _give_back_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): give the start back; Optuna's callback re-queues it."""
    TrialBudget(study).give_back()


def fail_trials_of_dead_worker(study: optuna.Study, pid: int) -> list[int]:
    """Fail the running trials of worker ``pid`` (known to be dead), give their starts back and re-queue
    them, as a heartbeat timeout would, but at once. Returns the failed trial numbers."""
    storage = study._storage
    name = worker_name(pid)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") != name:
            continue
        try:
            storage.set_trial_system_attr(trial._trial_id, "fail_reason", f"worker {name} died")
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # a heartbeat check elsewhere got there first and did the same
        OnStaleTrial(_give_back_stale)(study, storage.get_trial(trial._trial_id))
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
    storage = open_storage(storage_url, heartbeat=heartbeat, on_stale=_give_back_stale)
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
    artifacts = Path(study.user_attrs["artifact_dir"]) if space.study.artifacts else None
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
    sizes = TrialData(space, dataset, torch_device, cache_dir)
    data, folds = sizes.at(dataset.image_size)
    objective = Objective(space, data, dataset.class_names, artifacts, folds, on_epoch=on_epoch, sizes=sizes)
    budget = TrialBudget(study)
    after_trial = _AfterTrial(budget)
    try:
        _trials_until_done(study, objective, budget, after_trial, [*callbacks, after_trial], space, torch_device)
    finally:
        if objective.artifacts is not None:
            objective.artifacts.close()


def _trials_until_done(
    study: optuna.Study,
    objective: Objective,
    budget: TrialBudget,
    after_trial: _AfterTrial,
    after: list[Callable[[optuna.Study, FrozenTrial], None]],
    space: SearchSpace,
    device: torch.device,
) -> None:
    deadline = time.monotonic() + space.study.timeout if space.study.timeout else None
    orphans: dict[int, float] = {}  # WAITING trials with no start left: when first seen so
    while deadline is None or time.monotonic() < deadline:
        interrupts.raise_if_interrupted()
        if space.study.stop is not None and _stopped(study, space):
            return
        if after_trial.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            # Failed trials are replaced to keep the total exact; a space in which everything fails would loop forever.
            raise TunerError(
                f"{MAX_FAILURES_IN_A_ROW} trials in a row failed, the last with: {after_trial.last_failure}; "
                f"see `tuner trials --study {space.study.name}`"
            )
        if budget.claim():
            try:
                study.optimize(
                    objective,
                    n_trials=1,
                    catch=(Exception,),
                    callbacks=after,
                    gc_after_trial=device.type == "cuda",
                )
            except KeyboardInterrupt:
                budget.give_back(stopping=True)  # Optuna marked the trial FAILED; its start is not used up
                raise
            except optuna.exceptions.UpdateFinishedTrialError:
                # Our heartbeat was missed long enough for another worker to declare this trial stale;
                # it was failed, given back and re-queued there. Carry on with the next one.
                log.warning("a trial of this worker was taken over as stale (missed heartbeats); continuing")
        elif _open_trials(study):
            # Others are still running: one may fail or go stale and free a start, or be re-queued.
            with warnings.catch_warnings():  # experimental in Optuna, and what finds a dead worker's trial
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            _drop_orphans(study, budget, orphans)
            time.sleep(POLL_SECONDS)
        else:
            return


def _stopped(study: optuna.Study, space: SearchSpace) -> bool:
    """The study stopped improving (said by any worker, or found now and recorded for all of them)."""
    if study.user_attrs.get("stopped"):
        return True
    reason = stagnation(study, space)
    if reason is None:
        return False
    study.set_user_attr("stopped", reason)
    log.warning("stopping the study: %s", reason)
    return True


def _worker_main(kwargs: dict) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interrupts.install()
    try:
        work(**kwargs)
    except KeyboardInterrupt:
        pass
    except TunerError as err:  # a deliberate stop (e.g. every trial failing): not a death to recover from
        log.error("%s", err)
        sys.exit(WORKER_STOPPED)


def run_optimize(
    space: SearchSpace,
    *,
    storage_url: str,
    cache_dir: Path = STUDIES_DIR / "cache",
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    on_epoch: EpochProgress | None = None,
    dataset: Dataset | None = None,
    artifacts_dir: Path | None = None,
    workers: int | None = None,
    gpus: Sequence[int] = (),
    workers_per_gpu: int = 1,
    threads: int | None = None,
    join: bool = False,
    heartbeat: int = 60,
    warm_start_from: optuna.Study | None = None,
    warm_start_top_k: int = 3,
    plan: bool = False,
) -> optuna.Study:
    """Add ``space.study.n_trials`` trials to the study (creating it if needed) with ``workers`` processes.

    ``warm_start_from``: that study's ``warm_start_top_k`` best configurations run first (logged).

    With ``gpus``, ``workers_per_gpu`` workers run on each GPU, each seeing only its own. Each worker
    takes ``threads`` threads, by default its share of the cores. ``join`` adds nothing and helps
    finish what other workers (other machines) are running. ``plan`` creates the study and adds its
    trials but runs none: workers started elsewhere with ``join`` (a Slurm array) run them.
    """
    if plan and join:
        raise TunerError("--plan adds trials for others to run and --join runs trials someone planned; give one")
    slots = gpu_slots(list(gpus), workers_per_gpu)
    if slots and workers not in (None, len(slots)):
        raise TunerError(
            f"--workers {workers} does not match --gpus with --workers-per-gpu {workers_per_gpu} "
            f"({len(slots)} workers); leave --workers out"
        )
    if workers is not None and workers < 1:
        raise TunerError(f"--workers must be at least 1, but got --workers {workers}")
    n_workers = len(slots) or workers or 1
    threads = threads_per_worker(n_workers, threads)
    if join:
        _check_joinable(space.study.name, storage_url)
    dataset = dataset or prepare(space, cache_dir=cache_dir)  # decoded once, before any worker starts
    study = open_study(space, storage_url, dataset, artifacts_dir, heartbeat=heartbeat)
    if warm_start_from is not None and not join:
        for line in warm_start(study, space, warm_start_from, top_k=warm_start_top_k):
            log.warning("%s", line)
    budget = TrialBudget(study)
    if not join:
        budget.add(space.study.n_trials, others_running=_open_trials(study))
        # study.stop judges the trials of this run only; an earlier run's stop does not hold for it.
        study.set_user_attr("run_began_at", len(study.get_trials(deepcopy=False)))
        study.set_user_attr("stopped", None)
    if plan:
        return study
    common: dict[str, Any] = {
        "space": space,
        "storage_url": storage_url,
        "cache_dir": cache_dir,
        "heartbeat": heartbeat,
    }
    if n_workers == 1:
        gpu = slots[0] if slots else None
        work(**common, callbacks=callbacks, dataset=dataset, threads=threads, gpu=gpu, on_epoch=on_epoch)
        return study

    def start(i: int, respawn: int) -> multiprocessing.process.BaseProcess:
        # Sampler seeds differ per worker and per replacement, so no two draw the same sequence.
        kwargs = {**common, "sampler_seed_offset": i + n_workers * respawn, "threads": threads}
        kwargs["gpu"] = slots[i] if slots else None
        proc = context.Process(target=_worker_main, args=(kwargs,), name=f"worker-{i}")
        proc.start()
        return proc

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    running = {i: start(i, 0) for i in range(n_workers)}
    respawns = dict.fromkeys(running, 0)
    seen: set[int] = set()
    try:
        while running:
            for i, proc in list(running.items()):
                if proc.is_alive():
                    continue
                del running[i]
                if proc.exitcode in (0, WORKER_STOPPED):
                    continue
                _recover(study, proc, i)
                if respawns[i] < MAX_RESPAWNS and (budget.left() > 0 or _open_trials(study)):
                    respawns[i] += 1
                    running[i] = start(i, respawns[i])
            _report_new(study, seen, callbacks)
            if on_epoch is not None:
                _report_running(study, on_epoch)
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        for proc in running.values():
            proc.join(timeout=30)
        raise
    _report_new(study, seen, callbacks)
    return study


def _recover(study: optuna.Study, proc: multiprocessing.process.BaseProcess, slot: int) -> None:
    """A worker died (killed, crashed): its running trial is failed and re-queued now, not after
    three missed heartbeats."""
    failed = fail_trials_of_dead_worker(study, proc.pid or 0)
    what = f"; trial {', '.join(map(str, failed))} failed and re-queued" if failed else ""
    log.warning("worker %d (pid %s) died with exit code %s%s; starting another", slot, proc.pid, proc.exitcode, what)


def _check_joinable(study_name: str, storage_url: str) -> None:
    """``--join`` needs a study whose trials were planned by a run without ``--join``."""
    parsed = parse_storage_url(storage_url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        raise StorageError(
            f"no study {study_name!r} to join: {parsed.database} does not exist; start it first without --join"
        )
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    planned = False
    if study_name in names:
        study = optuna.load_study(study_name=study_name, storage=storage)
        planned = TrialBudget(study).left() > 0 or _open_trials(study)
    if not planned:
        raise StorageError(
            f"study {study_name!r} has no trials left to join in {redact(storage_url)}; "
            "start it first without --join (that run adds --n-trials trials)"
        )


def _report_running(study: optuna.Study, on_epoch: EpochProgress) -> None:
    """The workers' running trials, from what they reported to the storage: the latest epoch of each."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.intermediate_values:
            epoch = max(trial.intermediate_values)
            on_epoch(trial.number, epoch, trial.intermediate_values[epoch])


def _report_new(study: optuna.Study, seen: set[int], callbacks: Sequence[Callable]) -> None:
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if trial.number not in seen:
            seen.add(trial.number)
            for callback in callbacks:
                callback(study, trial)
