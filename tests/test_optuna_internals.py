"""What tuner.search.optuna_internals relies on in Optuna, pinned on real studies in a real SQLite file.

An Optuna release that renames a private attribute or changes what a storage call returns fails here,
with the function that needs mending named, instead of deep inside a worker.
"""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage as open_storage
from optuna.trial import TrialState

from tuner.search import optuna_internals as oi


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'pinned.db'}"


def test_the_engine_and_ids_are_those_of_the_study_in_the_database(url):
    study = optuna.create_study(study_name="pinned", storage=open_storage(url))
    loaded = optuna.load_study(study_name="pinned", storage=url)  # a plain URL: Optuna's cached wrapper
    for s in (study, loaded):
        engine = oi.engine_of(s)
        assert isinstance(engine, sa.Engine) and str(engine.url) == url
        with engine.connect() as con:
            rows = con.exec_driver_sql("SELECT study_id, study_name FROM studies").all()
        assert rows == [(oi.study_id(s), "pinned")]
    trial = study.ask()
    study.tell(trial, 1.0)
    frozen = study.trials[0]
    assert oi.trial_id(frozen) == trial._trial_id and oi.reread(study, frozen).value == 1.0
    assert oi.storage_of(loaded).get_study_id_from_name("pinned") == oi.study_id(study)


def test_a_waiting_trial_is_taken_once(url):
    study = optuna.create_study(storage=open_storage(url))
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(url))
    study.enqueue_trial({"x": 1})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert oi.take_waiting(study, waiting) is True
    assert oi.take_waiting(other, waiting) is False  # the compare-and-set: a second taker loses
    assert oi.reread(study, waiting).state == TrialState.RUNNING


def test_another_process_s_running_trial_can_be_failed_once_with_a_reason(url):
    study = optuna.create_study(storage=open_storage(url))
    running = study.ask()
    frozen = study.get_trials(states=(TrialState.RUNNING,))[0]
    assert oi.fail_trial(study, frozen, "worker h:1 died") is True
    again = oi.reread(study, frozen)
    assert again.state == TrialState.FAIL and again.system_attrs["fail_reason"] == "worker h:1 died"
    assert oi.fail_trial(study, frozen, "twice") is False  # already finished: nothing changes
    assert oi.reread(study, frozen).system_attrs["fail_reason"] == "worker h:1 died"
    assert running.number == frozen.number


@pytest.mark.parametrize(
    ("distribution", "inside", "outside"),
    [
        (IntDistribution(1, 8), 3, 9),
        (FloatDistribution(1e-4, 1e-1, log=True), 1e-3, 0.5),
        (CategoricalDistribution(["adam", "sgd"]), "sgd", "adamw"),
        (IntDistribution(16, 64, step=16), 32, 40),
    ],
)
def test_contains_tells_inside_from_outside(distribution, inside, outside):
    assert oi.contains(distribution, inside) is True
    assert oi.contains(distribution, outside) is False


def test_every_storage_method_that_opens_a_session_waits_out_a_database_restart():
    """tuner's storage wraps, by name, each method of Optuna's RDB storage that opens a database session; a
    new one in an Optuna release would otherwise fail at the first restart of the database."""
    import inspect

    from tuner.search.storage import PatientStorage

    opening = {
        name
        for name, method in inspect.getmembers(optuna.storages.RDBStorage, inspect.isfunction)
        if method.__qualname__.startswith("RDBStorage.") and "_create_scoped_session(" in inspect.getsource(method)
    }
    assert opening == set(oi.STORAGE_CALLS)
    assert all(getattr(PatientStorage, name) is not getattr(optuna.storages.RDBStorage, name) for name in opening)
