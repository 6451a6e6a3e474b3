"""Running a study with one worker in this process or several worker processes, and watching them.

Workers that this process spawned are watched: when one dies (killed, crashed), its running trial is
failed and re-queued at once, without waiting for missed heartbeats, and a replacement worker is started
(at most :data:`MAX_RESPAWNS` times per slot). Each worker takes its share of the cores
(:mod:`tuner.search.resources`) and, with ``--gpus``, sees only its GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import interrupts
from tuner.data import Dataset
from tuner.errors import StorageError, TunerError
from tuner.search.budget import TrialBudget, open_trials
from tuner.search.keys import StudyKey
from tuner.search.objective import EpochProgress
from tuner.search.outage import DEFAULT_PATIENCE, DatabaseAway
from tuner.search.resources import gpu_slots, threads_per_worker
from tuner.search.samplers import SAMPLERS
from tuner.search.space import SearchSpace
from tuner.search.storage import STUDIES_DIR, open_storage, parse_storage_url, redact
from tuner.search.study import open_study
from tuner.search.trial_data import prepare
from tuner.search.warm_start import warm_start
from tuner.search.worker_server import worker_context
from tuner.search.workers import POLL_SECONDS, fail_trials_of_dead_workers, work

log = logging.getLogger(__name__)

WORKER_STOPPED = 3  # exit code of a worker that stopped on purpose, with its reason logged
MAX_RESPAWNS = 3  # per worker slot: a worker that keeps dying is not restarted for ever


def _worker_main(kwargs: dict, stops: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interrupts.install()
    try:
        work(**kwargs)
    except interrupts.Preempted as stop:
        log.warning("stopped by %s: %s", stop.signal_name, stop.message)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        pass
    except TunerError as err:  # a deliberate stop (e.g. every trial failing): not a death to recover from
        stops.put(str(err))  # said once by the parent, however many workers stopped for it
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
    storage_patience: float = DEFAULT_PATIENCE,
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
    storage = open_storage(storage_url, heartbeat=heartbeat, patience=storage_patience)  # a bad source: no file
    if storage_patience > 2 * heartbeat:
        log.warning(
            "--storage-patience %.0f is over two heartbeats (--heartbeat %d): a trial running through a database "
            "outage that long may be taken for a dead worker's and run again",
            storage_patience,
            heartbeat,
        )
    study = open_study(space, storage_url, dataset, artifacts_dir, storage=storage)
    if space.study.constraints and not SAMPLERS[space.study.sampler.name].uses_constraints:
        log.warning(
            "sampler %r draws without regard to study.constraints; they still decide which trial is best",
            space.study.sampler.name,
        )
    if warm_start_from is not None and not join:
        for line in warm_start(study, space, warm_start_from, top_k=warm_start_top_k):
            log.warning("%s", line)
    budget = TrialBudget(study)
    if not join:
        budget.add(space.study.n_trials, others_running=open_trials(study))
        # study.stop judges the trials of this run only (those queued for it included: warm start,
        # enqueued ones); an earlier run's stop does not hold for it.
        trials = study.get_trials(deepcopy=False)
        waiting = [t.number for t in trials if t.state == optuna.trial.TrialState.WAITING]
        study.set_user_attr(StudyKey.RUN_BEGAN_AT, min(waiting, default=len(trials)))
        study.set_user_attr(StudyKey.STOPPED, None)
    if plan:
        return study
    common: dict[str, Any] = {
        "space": space,
        "storage_url": storage_url,
        "cache_dir": cache_dir,
        "heartbeat": heartbeat,
        "storage_patience": storage_patience,
    }
    if n_workers == 1:
        gpu = slots[0] if slots else None
        work(**common, callbacks=callbacks, dataset=dataset, threads=threads, gpu=gpu, on_epoch=on_epoch)
        return study

    return _supervise(study, budget, common, n_workers, slots, threads, callbacks, on_epoch)


def _supervise(
    study: optuna.Study,
    budget: TrialBudget,
    common: dict[str, Any],
    n_workers: int,
    slots: list[int],
    threads: int,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
    on_epoch: EpochProgress | None,
) -> optuna.Study:
    """Start ``n_workers`` worker processes and watch them until none is left: a worker that died is
    recovered (its trial failed and re-queued) and replaced while trials are left; finished trials and
    running epochs are reported from the storage."""
    context = worker_context()
    stops = context.SimpleQueue()  # why workers stopped on purpose: the run's error once all have ended

    def start(i: int, respawn: int) -> multiprocessing.process.BaseProcess:
        # Sampler seeds differ per worker and per replacement, so no two draw the same sequence.
        kwargs = {**common, "sampler_seed_offset": i + n_workers * respawn, "threads": threads}
        kwargs["gpu"] = slots[i] if slots else None
        proc = context.Process(target=_worker_main, args=(kwargs, stops), name=f"worker-{i}")
        proc.start()
        return proc

    running: dict[int, multiprocessing.process.BaseProcess] = {}
    respawns = dict.fromkeys(range(n_workers), 0)
    seen: set[int] = set()
    try:
        with interrupts.preemptible():  # from the first start: a signal while workers start is passed on too
            for i in range(n_workers):
                running[i] = start(i, 0)
            _watch(study, budget, running, respawns, seen, start, callbacks, on_epoch)
    except KeyboardInterrupt:
        for proc in running.values():
            proc.join(timeout=30)
        raise
    except DatabaseAway:
        for proc in running.values():  # they saw the same outage and give up within their own patience
            proc.join()
        raise
    _report_new(study, seen, callbacks)
    reasons = []
    while not stops.empty():
        reasons.append(stops.get())
    if reasons:
        raise TunerError("\n".join(dict.fromkeys(reasons)))
    return study


def _watch(
    study: optuna.Study,
    budget: TrialBudget,
    running: dict[int, multiprocessing.process.BaseProcess],
    respawns: dict[int, int],
    seen: set[int],
    start: Callable[[int, int], multiprocessing.process.BaseProcess],
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
    on_epoch: EpochProgress | None,
) -> None:
    """Until no worker is left: recover and replace the ones that died, report progress. Preempted
    (SIGTERM, SIGUSR1, to this process or to all of the job's), the workers are told, if the signal
    did not reach them, and waited for while they save their trials."""
    while running:
        signum = interrupts.preempted()
        if signum is not None:
            for proc in running.values():
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signum)
            for proc in running.values():
                proc.join()
            running.clear()
            _report_new(study, seen, callbacks)
            interrupts.raise_if_preempted("the running trials were saved and queued to resume")
        for i, proc in list(running.items()):
            if proc.is_alive():
                continue
            del running[i]
            if proc.exitcode in (0, WORKER_STOPPED):
                continue
            _recover(study, proc, i)
            if respawns[i] < MAX_RESPAWNS and (budget.left() > 0 or open_trials(study)):
                respawns[i] += 1
                running[i] = start(i, respawns[i])
        _report_new(study, seen, callbacks)
        if on_epoch is not None:
            _report_running(study, on_epoch)
        time.sleep(POLL_SECONDS)


def _recover(study: optuna.Study, proc: multiprocessing.process.BaseProcess, slot: int) -> None:
    """A worker died (killed, crashed): its running trial is failed and re-queued now, not after
    three missed heartbeats."""
    failed = fail_trials_of_dead_workers(study, proc.pid or 0)
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
        planned = TrialBudget(study).left() > 0 or open_trials(study)
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
