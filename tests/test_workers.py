from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tests.conftest import invoke, start_tuner, tiny_space, write_space
from tests.servers import pause_postgres, postgres_down
from tuner.search.keys import TrialKey
from tuner.search.resources import process_gone, process_space, worker_name
from tuner.search.storage import open_storage

pytestmark = pytest.mark.slow


def _space(name: str, n_trials: int, epochs: int = 6) -> dict:
    # Trials of a few seconds each, so that a worker can be killed in the middle of one.
    return tiny_space(
        study={"name": name, "n_trials": n_trials, "pruner": {"name": "none"}, "artifacts": False},
        data={"image_size": 24, "synthetic": {"n_images": 300, "minority_fraction": 0.2}},
        train={"max_epochs": epochs},
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _workers(pid: int) -> list[int]:
    """The worker processes of ``tuner optimize --workers N`` running as ``pid``: forked by its fork server."""
    servers = [c for c in _children(pid) if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return [worker for server in servers for worker in _children(server)]


def _study(name: str, url: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def _kill_mid_trial(name: str, url: str, timeout: float = 120, check=lambda pid: None, alive=lambda: True) -> int:
    """SIGKILL a worker whose trial is running and past its first epoch (so mid-trial, with its heartbeat
    recorded), and return its process id. The worker is stopped first and its trial read again: a trial that
    finished between the read and the signal would leave nothing for the kill to interrupt."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            running = _study(name, url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - the study or its tables may not exist yet
            running = []
        for trial in running:
            if not trial.intermediate_values:
                continue
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGSTOP)
            now = {t.number: t.state for t in _study(name, url).get_trials(deepcopy=False)}
            if now[trial.number] == TrialState.RUNNING:
                check(pid)
                os.kill(pid, signal.SIGKILL)
                return pid
            os.kill(pid, signal.SIGCONT)
        if not alive():
            pytest.fail("the workers ended before a trial ran")
        time.sleep(0.3)
    pytest.fail("no trial started")


def _check_outcome(study: optuna.Study, total: int, epochs: int = 6) -> None:
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == total, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the killed worker's trial should have failed"
    # Retried by the heartbeat's callback (killed), or re-queued by its own worker (preempted); a retry may
    # itself be killed or preempted and retried in turn: every chain of retries ends in a finished trial.
    retry = {}
    for t in trials:
        of = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        of = t.user_attrs.get(TrialKey.RETRY_OF) if of is None else of
        if of is not None:
            retry[of] = t
    state = {t.number: t.state for t in trials}
    for t in failed:
        number = t.number
        while number in retry:
            number = retry[number].number
        assert number != t.number, f"killed trial {t.number} was not retried"
        assert state[number] in (TrialState.COMPLETE, TrialState.PRUNED), (t.number, number, state[number])
    for t in finished:
        history = t.user_attrs["history"]
        assert len(history["val_auroc"]) == len(history["train_loss"]) == t.user_attrs["epochs_run"] == epochs


def test_three_workers_on_postgres_survive_a_kill_and_a_database_restart_and_finish_exactly(postgres_url, workdir):
    """Three workers on one PostgreSQL study: one is SIGKILLed mid-trial, then the database is stopped (open
    connections cut, as ``pg_ctl restart -m fast`` does) for 5 s while the others train. The dead worker's
    trial is failed, re-queued and run by a replacement; every storage call waits for the database; the
    command exits 0, says once how long the database was away, and the study ends with exactly 9 finished
    trials, the killed one the only failure, every history whole."""
    path = write_space(workdir / "s.yaml", _space("pg", 9))
    proc = start_tuner("optimize", "--space", str(path), "--storage", postgres_url, "--workers", "3", cwd=workdir)
    try:

        def is_one_of_three_workers(victim: int) -> None:
            workers = _workers(proc.pid)
            assert len(workers) == 3 and victim in workers, (victim, workers)

        deadline = time.time() + 300
        # Three worker processes up (under load the third may start after the others took the first trials).
        while len(_workers(proc.pid)) < 3 or not _started("pg", postgres_url):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"three workers did not start:\n{proc.communicate(timeout=60)[0]}")
            time.sleep(0.2)
        victim = _kill_mid_trial("pg", postgres_url, check=is_one_of_three_workers)
        pause_postgres(postgres_url, 5)
        output, _ = proc.communicate(timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Error" not in output, output
    said = " ".join(output.split())  # log lines are wrapped
    assert f"pid {victim}) died with exit code -9" in said, output
    away = [line for line in output.splitlines() if "unreachable" in line]
    assert len(away) == 1 and away[0].startswith("the study database was unreachable for "), output
    assert int(away[0].split(" for ")[1].split()[0]) >= 4, away  # the 5 s it was down, as the parent saw it
    study = _study("pg", postgres_url)
    _check_outcome(study, 9)
    assert len([t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]) == 1


def test_past_its_patience_a_call_stops_with_one_line_and_the_next_success_resets_it(postgres_url):
    from tuner.search.outage import DatabaseAway, outages

    study = optuna.create_study(study_name="patience", storage=open_storage(postgres_url, patience=2))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with postgres_down(postgres_url):
        began = time.monotonic()
        with pytest.raises(DatabaseAway) as away:
            study.get_trials(deepcopy=False)
        assert 2 <= time.monotonic() - began < 10
        assert str(away.value).startswith(f"the study database {postgres_url} was unreachable for 2 s")
        assert "\n" not in str(away.value) and outages.gave_up
        began = time.monotonic()
        with pytest.raises(DatabaseAway):
            study.get_trials(deepcopy=False)  # having given up, the process does not wait again
        assert time.monotonic() - began < 1
    assert len(study.get_trials(deepcopy=False)) == 1 and not outages.gave_up


def _started(name: str, url: str) -> list:
    try:
        return [t for t in _study(name, url).get_trials(deepcopy=False) if t.intermediate_values]
    except Exception:  # noqa: BLE001 - the study or its tables may not exist yet
        return []


def test_two_workers_on_the_default_storage_survive_a_kill_at_once(workdir):
    """No database server: two local workers on sqlite:///studies/<study>.db. The parent sees a worker die
    and fails, re-queues and replaces at once; the heartbeat (60 s by default) is never waited for."""
    path = write_space(workdir / "s.yaml", _space("local", 6))
    url = f"sqlite:///{workdir}/studies/local.db"
    proc = start_tuner("optimize", "--space", str(path), "--workers", "2", cwd=workdir)
    try:

        def is_a_worker(victim: int) -> None:
            assert victim in _workers(proc.pid)

        victim = _kill_mid_trial("local", url, check=is_a_worker)
        killed_at = datetime.now()
        output, _ = proc.communicate(timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, output
    said = " ".join(output.split())  # log lines are wrapped
    assert f"pid {victim}) died with exit code -9" in said, output
    # The parent fails and re-queues the trial, unless the other worker, sweeping for trials of ended
    # processes before its next trial, got there first: either way once, at once.
    by_parent = "failed and re-queued" in said
    by_worker = re.search(r"trial \d+ was left running by process \S+, which has ended; re-queued", said)
    assert by_parent != bool(by_worker), output
    assert "Warning" not in said, output
    study = _study("local", url)
    _check_outcome(study, 6)
    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert all((t.datetime_complete - killed_at).total_seconds() < 15 for t in failed), (
        "failed at once, not by heartbeat"
    )
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert {t.user_attrs["threads"] for t in finished} == {1}, "two workers on two cores: one thread each"


def test_workers_per_gpu_each_see_only_their_gpu(workdir):
    """--gpus 0,1 --workers-per-gpu 2: four workers, two per GPU, each with CUDA_VISIBLE_DEVICES set to its
    own GPU, as the trials it ran recorded from its environment (trained on the CPU here: no GPU)."""
    path = write_space(workdir / "s.yaml", _space("gpus", 8, epochs=2))
    proc = start_tuner(
        "optimize", "--space", str(path), "--gpus", "0,1", "--workers-per-gpu", "2", "--device", "cpu", cwd=workdir
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    trials = _study("gpus", f"sqlite:///{workdir}/studies/gpus.db").get_trials(deepcopy=False)
    assert len(trials) == 8
    gpu_of: dict[str, set[str]] = {}
    for t in trials:
        gpu_of.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["visible_gpus"])
        assert t.user_attrs["threads"] == 1  # four workers share two cores
    assert all(len(gpus) == 1 for gpus in gpu_of.values()), gpu_of  # a worker never changes GPU
    seen = [next(iter(g)) for g in gpu_of.values()]
    # Three or four of the workers ran trials: both GPUs are used, neither by more than its two workers.
    assert 3 <= len(gpu_of) <= 4 and set(seen) == {"0", "1"}, gpu_of
    assert all(seen.count(g) <= 2 for g in ("0", "1")), gpu_of


def test_workers_must_match_the_gpu_slots(workdir):
    path = write_space(workdir / "s.yaml", tiny_space())
    result = invoke("optimize", "--space", path, "--gpus", "0,1", "--workers-per-gpu", "2", "--workers", "3")
    assert result.exit_code == 2
    assert "--workers 3 does not match" in result.stderr and "4 workers" in result.stderr
    result = invoke("optimize", "--space", path, "--workers-per-gpu", "2")
    assert result.exit_code == 2 and "needs --gpus" in result.stderr


def test_a_local_study_moves_to_postgres_with_one_command(postgres_url, workdir):
    path = write_space(workdir / "s.yaml", tiny_space(study={"name": "moving", "n_trials": 2, "artifacts": False}))
    assert invoke("optimize", "--space", path).exit_code == 0
    copy = start_tuner("copy", "--study", "moving", "--to", postgres_url, cwd=workdir)
    output, _ = copy.communicate(timeout=120)
    assert copy.returncode == 0, output
    assert output.startswith("copied study moving (2 trials) to postgresql://"), output  # and nothing else
    assert len(output.strip().splitlines()) <= 2, output  # one sentence, wrapped at most once
    local, moved = _study("moving", f"sqlite:///{workdir}/studies/moving.db"), _study("moving", postgres_url)

    def content(study: optuna.Study) -> list:
        return [(t.number, t.state, t.value, t.params, t.user_attrs, t.intermediate_values) for t in study.trials]

    assert content(moved) == content(local) and moved.user_attrs == local.user_attrs
    # It carries on there: the same space is recognised and trials are added after the copied ones.
    result = invoke("optimize", "--space", path, "--storage", postgres_url, "--n-trials", "1")
    assert result.exit_code == 0, result.output
    assert [t.number for t in _study("moving", postgres_url).trials] == [0, 1, 2]
    again = invoke("copy", "--study", "moving", "--to", postgres_url)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_a_retry_is_waiting_before_its_start_is_given_back(workdir):
    """The race a Slurm run once lost: a worker claiming the start a stale trial gave back must find that
    trial's retry already WAITING, or it creates a new trial and the retry waits for ever."""
    from tuner.search.budget import TrialBudget
    from tuner.search.storage import OnStaleTrial
    from tuner.search.workers import AfterTrial

    study = optuna.create_study(storage=open_storage(f"sqlite:///{workdir}/race.db"))
    budget = TrialBudget(study)
    budget.add(2, others_running=False)
    waiting_when_given_back = []
    original_give_back = budget.give_back

    def give_back(**kwargs) -> None:
        waiting_when_given_back.append(len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
        original_give_back(**kwargs)

    budget.give_back = give_back  # type: ignore[method-assign]
    for callback in (OnStaleTrial(lambda s, t: budget.give_back()), AfterTrial(budget)):
        assert budget.claim()
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        callback(study, study._storage.get_trial(trial._trial_id))
    # each retry enqueued before its start came back (the second ask() ran the first retry); the other
    # order would give [0, 0]
    assert waiting_when_given_back == [1, 1]


def test_a_waiting_trial_with_no_start_left_is_not_waited_for_for_ever(workdir, monkeypatch):
    from tuner.search import budget as budgets

    study = optuna.create_study(storage=open_storage(f"sqlite:///{workdir}/orphan.db"))
    budget = budgets.TrialBudget(study)
    budget.add(1, others_running=False)
    study.enqueue_trial({"x": 0.5})
    seen: dict[int, float] = {}
    budgets.drop_orphans(study, budget, seen)  # a start is left: the waiting trial will run
    assert study.get_trials(deepcopy=False)[0].state == TrialState.WAITING and not seen
    assert budget.claim()  # the start is taken (by a trial that then ran elsewhere)
    budgets.drop_orphans(study, budget, seen)  # seen, but within the grace period: left alone
    assert study.get_trials(deepcopy=False)[0].state == TrialState.WAITING
    monkeypatch.setattr(budgets, "ORPHAN_GRACE_SECONDS", 0.0)
    budgets.drop_orphans(study, budget, seen)
    orphan = study.get_trials(deepcopy=False)[0]
    assert orphan.state == TrialState.FAIL and "planned total was reached" in orphan.system_attrs["fail_reason"]


def test_a_waiting_trial_claimed_while_orphans_are_dropped_is_left_to_run(workdir, monkeypatch):
    from tuner.search import budget

    url = f"sqlite:///{workdir}/orphan.db"
    study = optuna.create_study(storage=open_storage(url))
    other_worker = optuna.load_study(study_name=study.study_name, storage=open_storage(url))
    study.enqueue_trial({"x": 0.5})
    read = study.get_trials

    def read_then_claimed_elsewhere(*args, **kwargs):  # a worker takes the trial right after the read
        trials = read(*args, **kwargs)
        if kwargs.get("states") == (TrialState.WAITING,) and trials:
            assert other_worker._pop_waiting_trial_id() == trials[0]._trial_id
        return trials

    monkeypatch.setattr(study, "get_trials", read_then_claimed_elsewhere)
    monkeypatch.setattr(budget, "ORPHAN_GRACE_SECONDS", 0.0)
    budget.drop_orphans(study, budget.TrialBudget(study), {})
    claimed = read(deepcopy=False)[0]
    assert claimed.state == TrialState.RUNNING and "fail_reason" not in claimed.system_attrs


def test_the_default_storage_is_sqlite_in_write_ahead_log_mode(tmp_path):
    """Readers (the dashboard, the parent's progress) never block a writing worker: WAL, kept in the file."""
    import sqlite3

    url = f"sqlite:///{tmp_path}/studies/wal.db"
    optuna.create_study(study_name="wal", storage=open_storage(url))
    with sqlite3.connect(tmp_path / "studies" / "wal.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_missing_postgresql_driver_names_the_extra_to_install():
    from tuner.errors import StorageError

    with pytest.raises(StorageError) as missing:
        open_storage("postgresql+pg8000://tuner:s3cret@127.0.0.1:1/tuner")  # a driver tuner does not install
    said = str(missing.value)
    assert "its driver (pg8000) is not installed: pip install -e '.[postgres]'" in said
    assert "s3cret" not in said and "postgresql+pg8000://tuner:***@127.0.0.1:1/tuner" in said


def test_the_command_recorded_with_a_test_set_read_hides_storage_passwords():
    from tuner.search.storage import redacted_command

    argv = ["refit", "--study", "x", "--storage", "postgresql://u:pw@db/t", "--storage=postgresql://u:pw@db/t"]
    assert redacted_command(argv) == (
        "tuner refit --study x --storage 'postgresql://u:***@db/t' '--storage=postgresql://u:***@db/t'"
    )


def test_threads_per_worker_precedence_and_errors(monkeypatch):
    """--threads, then an explicit OMP_NUM_THREADS, then the worker's share of the cores (at least one)."""
    from tuner.errors import TunerError
    from tuner.search.resources import available_cores, threads_per_worker

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_worker(2, 5) == 5
    assert threads_per_worker(2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", " ")
    assert threads_per_worker(1) == available_cores()
    assert threads_per_worker(available_cores() * 4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "four")
    with pytest.raises(TunerError, match="OMP_NUM_THREADS must be a whole number, but got OMP_NUM_THREADS='four'"):
        threads_per_worker(1)
    with pytest.raises(TunerError, match="threads must be at least 1, but got threads=0"):
        threads_per_worker(1, 0)


def test_a_worker_that_keeps_dying_is_replaced_three_times_per_slot_then_not(tmp_path):
    """The supervisor's watch on real processes that die at once: each slot is started 1 + MAX_RESPAWNS times."""
    import multiprocessing

    from tuner.search.budget import TrialBudget
    from tuner.search.supervisor import MAX_RESPAWNS, _watch

    study = optuna.create_study(study_name="dying", storage=open_storage(f"sqlite:///{tmp_path}/dying.db"))
    budget = TrialBudget(study)
    budget.add(5, others_running=False)
    started: list[tuple[int, int]] = []

    def start(slot: int, respawn: int):
        started.append((slot, respawn))
        proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(1,))
        proc.start()
        return proc

    running = {0: start(0, 0), 1: start(1, 0)}
    _watch(study, budget, running, dict.fromkeys(running, 0), set(), start, [], None)
    assert MAX_RESPAWNS == 3 and sorted(started) == [(slot, n) for slot in (0, 1) for n in range(4)]


def test_a_process_is_judged_gone_only_where_its_pid_means_it():
    ended = subprocess.Popen(["true"])
    ended.wait()
    here = process_space()
    assert process_gone(f"{socket.gethostname()}:{ended.pid}", here)
    assert not process_gone(worker_name(), here)  # this very process
    assert not process_gone(f"{socket.gethostname()}:{ended.pid}", "another-boot/pid:[1]")  # another container
    assert not process_gone("", here) and not process_gone("host:", here)
