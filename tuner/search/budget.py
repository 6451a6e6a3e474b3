"""The exact trial total, shared by every worker of a study through the study's own database.

A small table beside Optuna's, ``tuner_trial_budget``, holds each study's target and the number of trial
starts claimed so far; a worker claims a start with one atomic ``UPDATE … WHERE claimed < target`` before
every trial. A trial that fails gives its start back, so ``--n-trials 12`` ends with exactly 12 finished
(complete or pruned) trials, however many workers share the study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

from tuner.search.optuna_internals import fail_trial, rdb_storage_of, study_id, take_waiting, trial_id
from tuner.search.storage import PatientStorage

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        storage = rdb_storage_of(study)
        self.engine: sa.Engine = storage.engine
        self.study_id = study_id(study)
        # A database restart is waited out here as in Optuna's own calls (one transaction per call).
        self.wait_out: Callable[[Callable[[], T]], T] = (
            storage.wait_out if isinstance(storage, PatientStorage) else lambda call: call()
        )
        _metadata.create_all(self.engine, checkfirst=True)

    def add(self, n: int, *, others_running: bool) -> int:
        """Allow ``n`` more trial starts. Starts left over from an interrupted run are dropped
        unless other workers are running now (then they are theirs to use)."""
        return self.wait_out(lambda: self._add(n, others_running))

    def _add(self, n: int, others_running: bool) -> int:
        with self.engine.begin() as con:
            row = con.execute(sa.select(_budget).where(_budget.c.study_id == self.study_id)).first()
            if row is None:
                con.execute(sa.insert(_budget).values(study_id=self.study_id, target=n, claimed=0))
                return n
            base = max(row.target, row.claimed) if others_running else row.claimed
            con.execute(sa.update(_budget).where(_budget.c.study_id == self.study_id).values(target=base + n))
            return base + n

    def claim(self) -> bool:
        return self.wait_out(self._claim)

    def _claim(self) -> bool:
        with self.engine.begin() as con:
            result = con.execute(
                sa.update(_budget)
                .where(_budget.c.study_id == self.study_id, _budget.c.claimed < _budget.c.target)
                .values(claimed=_budget.c.claimed + 1)
            )
            return result.rowcount == 1

    def give_back(self, *, stopping: bool = False) -> None:
        """Return one claimed start. ``stopping`` (Ctrl-C, SIGTERM): wait a few seconds for the database at
        most; should it be busy or away, nothing is lost, as the next run's ``add`` drops starts that no one
        is using."""
        if not stopping:
            self.wait_out(self._give_back)
            return
        try:
            self._give_back(busy_timeout=3000)
        except sa.exc.OperationalError as err:
            log.warning("could not give the interrupted trial's start back (%s); the next run drops it", err.orig)

    def _give_back(self, busy_timeout: int | None = None) -> None:
        with self.engine.begin() as con:
            if busy_timeout is not None and self.engine.dialect.name == "sqlite":
                con.exec_driver_sql(f"PRAGMA busy_timeout = {busy_timeout}")
            con.execute(
                sa.update(_budget)
                .where(_budget.c.study_id == self.study_id, _budget.c.claimed > 0)
                .values(claimed=_budget.c.claimed - 1)
            )

    def left(self) -> int:
        return self.wait_out(self._left)

    def _left(self) -> int:
        with self.engine.connect() as con:
            row = con.execute(sa.select(_budget).where(_budget.c.study_id == self.study_id)).first()
            return 0 if row is None else max(0, row.target - row.claimed)


ORPHAN_GRACE_SECONDS = 10.0


def drop_orphans(study: optuna.Study, budget: TrialBudget, seen: dict[int, float]) -> None:
    """WAITING trials that no start is left to run while nothing runs, seen so for ``ORPHAN_GRACE_SECONDS``
    (not just between a retry's re-queue and its start's return): the total was reached without them.
    Failed with that reason, so no worker waits for them for ever; the finished total stays exact."""
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or budget.left() > 0:
        seen.clear()
        return
    now = time.monotonic()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if now - seen.setdefault(trial_id(trial), now) < ORPHAN_GRACE_SECONDS:
            continue
        # Taken first, the way a worker takes a queued trial: a trial a worker took between the read above
        # and now is left to run, never failed under it.
        if take_waiting(study, trial) and fail_trial(study, trial, "not run: the planned total was reached"):
            log.warning("trial %d was waiting with no start left to run it; marked failed", trial.number)


def open_trials(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))
