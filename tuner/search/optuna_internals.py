"""The few Optuna internals tuner relies on, in one place.

Optuna's public API runs and finishes a trial from the process that asked for it. Supervising workers
needs three things it does not offer: the database engine under a study (for the trial-budget table
beside Optuna's own), changing the state of a trial that another (dead) process was running, and
taking a queued trial the way a worker does (the storage's compare-and-set on WAITING). Warm start
also asks whether a value lies inside a distribution, which Optuna checks privately.

Every use of a private attribute is here, and ``tests/test_optuna_internals.py`` pins the behaviour
each function relies on, so an Optuna upgrade that changes one fails there and not in a worker.
"""

from __future__ import annotations

import contextlib
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from tuner.search.keys import TrialKey

# Every method of Optuna's RDB storage that opens a database session (the others call these), public and
# private (its caching wrapper calls the private ones): what tuner's storage makes wait out a restart.
STORAGE_CALLS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "_create_new_trial",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "record_heartbeat",
    "_get_stale_trial_ids",
)


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a loaded study reads and writes through (``Study._storage``)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's row id in its storage (``Study._study_id``), the key of tuner's budget table."""
    return study._study_id


def rdb_storage_of(study: optuna.Study) -> Any:
    """The RDB storage of a study. Optuna wraps ``RDBStorage`` in a caching storage
    (``_CachedStorage._backend``) when it loads a study."""
    storage: Any = storage_of(study)
    return getattr(storage, "_backend", storage)


def engine_of(study: optuna.Study) -> sa.Engine:
    """The SQLAlchemy engine of a study on an RDB storage."""
    return rdb_storage_of(study).engine


def trial_id(trial: FrozenTrial) -> int:
    """A trial's row id (``FrozenTrial._trial_id``): what the storage's per-trial calls take."""
    return trial._trial_id


def reread(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial:
    """The trial as the storage has it now."""
    return storage_of(study).get_trial(trial_id(trial))


def take_waiting(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Move a WAITING trial to RUNNING, as a worker does when it takes a queued trial: True if this call
    took it, False if another process had already (the storage's compare-and-set)."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        return storage_of(study).set_trial_state_values(trial_id(trial), state=TrialState.RUNNING)
    return False


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Fail another process's RUNNING trial with ``reason`` (a system attribute, since its user attributes
    belong to its worker). False if it had finished meanwhile (a heartbeat check elsewhere got there first)."""
    storage = storage_of(study)
    try:
        storage.set_trial_system_attr(trial_id(trial), TrialKey.FAIL_REASON, reason)
        return storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one ``distribution`` can suggest (``BaseDistribution._contains``)."""
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False
