from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tests.conftest import invoke, tiny_space, write_space
from tuner.study import open_storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def _space(name: str, n_trials: int, epochs: int = 6) -> dict:
    # Trials of a few seconds each, so that a worker can be killed in the middle of one.
    return tiny_space(
        study={"name": name, "n_trials": n_trials, "pruner": {"name": "none"}, "artifacts": False},
        data={"image_size": 24, "synthetic": {"n_images": 300, "minority_fraction": 0.2}},
        train={"max_epochs": epochs},
    )


def _tuner(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _study(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def _wait_for_running(name: str, url: str, timeout: float = 120) -> int:
    """The process id of a worker whose trial is running and past its first epoch (so mid-trial,
    with its heartbeat recorded)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            running = _study(name, url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                if trial.intermediate_values:
                    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        except Exception:  # noqa: BLE001 - the study or its tables may not exist yet
            pass
        time.sleep(0.3)
    pytest.fail("no trial started")


def _check_outcome(study: optuna.Study, total: int, epochs: int = 6) -> None:
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == total, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's trial should have failed"
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in finished} - {None}
    assert {t.number for t in failed} <= retried, "every killed trial was retried"
    for t in finished:
        history = t.user_attrs["history"]
        assert len(history["val_auroc"]) == len(history["train_loss"]) == t.user_attrs["epochs_run"] == epochs


def test_three_workers_on_postgres_survive_a_kill_and_finish_exactly(postgres_url, workdir):
    path = write_space(workdir / "s.yaml", _space("pg", 12))
    proc = _tuner(
        "optimize", "--space", str(path), "--storage", postgres_url, "--workers", "3", "--heartbeat", "1", cwd=workdir
    )
    try:
        victim = _wait_for_running("pg", postgres_url)
        workers = _children(proc.pid)
        workers = [pid for pid in workers if Path(f"/proc/{pid}/cmdline").read_bytes().find(b"spawn_main") >= 0]
        assert len(workers) == 3 and victim in workers, (victim, workers)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, output
    _check_outcome(_study("pg", postgres_url), 12)


def test_sqlite_worker_killed_and_restarted_finishes_exactly(workdir):
    # Long trials, killed as soon as one runs: one worker has no other trial to be between.
    path = write_space(workdir / "s.yaml", _space("lite", 4, epochs=15))
    url = f"sqlite:///{workdir}/studies/lite.db"
    first = _tuner("optimize", "--space", str(path), "--heartbeat", "1", cwd=workdir)
    try:
        assert _wait_for_running("lite", url) == first.pid
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    assert _study("lite", url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)), "killed mid-trial"
    restart = _tuner("optimize", "--space", str(path), "--heartbeat", "1", "--join", cwd=workdir)
    output, _ = restart.communicate(timeout=600)
    assert restart.returncode == 0, output
    _check_outcome(_study("lite", url), 4, epochs=15)


def test_several_workers_on_sqlite_are_refused_with_the_alternatives(workdir):
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", tiny_space()), "--workers", "2")
    assert result.exit_code == 2
    assert "needs a database server" in result.stderr and "postgresql://" in result.stderr
