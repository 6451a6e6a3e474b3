"""The Slurm path, for real: a one-node Slurm cluster on loopback runs docker/slurm.sbatch as a 3-task
array on one PostgreSQL study; one task's process is killed with SIGKILL in the middle of a trial, and
another is cancelled with ``scancel --signal=TERM`` in the middle of one (its trial resumes elsewhere)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import invoke, write_space
from tests.test_workers import _check_outcome, _kill_mid_trial, _space, _study
from tuner.search.keys import TrialKey

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).parents[1] / "docker" / "slurm.sbatch"


def _squeue(env: dict) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-o", "%i %t"], env=env, capture_output=True, text=True, check=True)
    return result.stdout.split("\n") if result.stdout.strip() else []


def _preempt_mid_trial(name: str, url: str, job: str, env: dict, spare: int) -> tuple[int, str]:
    """``scancel --signal=TERM`` the array task whose worker (not ``spare``) runs a trial with two to four of
    its six epochs done; wait for it to save and leave. Returns the trial's number and the task's index.

    The worker is stopped first and the trial read again (its epochs take a fraction of a second): the
    signal then waits for it, and lands in the middle of that trial, not after it."""
    deadline = time.time() + 180
    while time.time() < deadline:
        for trial in _study(name, url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" not in trial.user_attrs:
                continue  # just created: its worker has not written its attributes yet
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            if pid == spare:
                continue
            os.kill(pid, signal.SIGSTOP)
            now = _study(name, url).trials[trial.number]
            if now.state != TrialState.RUNNING or not 2 <= len(now.intermediate_values) <= 4:
                os.kill(pid, signal.SIGCONT)
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            task = next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"SLURM_ARRAY_TASK_ID="))
            subprocess.run(["scancel", "--signal=TERM", "--full", f"{job}_{task}"], env=env, check=True)
            os.kill(pid, signal.SIGCONT)
            while Path(f"/proc/{pid}").exists() and time.time() < deadline:
                time.sleep(0.2)
            return trial.number, task
        time.sleep(0.05)
    pytest.fail("no trial to preempt")


def test_a_slurm_array_joins_one_study_and_survives_a_killed_task(slurm_cluster, postgres_url, workdir):
    path = write_space(workdir / "s.yaml", _space("slurm", 12))
    planned = invoke("optimize", "--space", path, "--storage", postgres_url, "--plan")
    assert planned.exit_code == 0 and "planned study slurm: 12 trials" in planned.stdout, planned.output
    assert _study("slurm", postgres_url).get_trials() == []  # planned, none run

    env = {**slurm_cluster, "TUNER_STORAGE": postgres_url, "TUNER_SPACE": str(path), "TUNER_HEARTBEAT": "1"}
    # This machine has no GPU: the template's --gres=gpu:1 is replaced on the command line, as sbatch allows.
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", "--gres=none", "--cpus-per-task=1", str(TEMPLATE)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]

    # The task's tuner process (the template execs it); a task that dies at start fails the test at once.
    victim = _kill_mid_trial("slurm", postgres_url, timeout=180, alive=lambda: bool(_squeue(env)))
    preempted, task = _preempt_mid_trial("slurm", postgres_url, job, env, spare=victim)
    deadline = time.time() + 600
    while _squeue(env) and time.time() < deadline:
        time.sleep(1)
    assert not _squeue(env), "the array did not finish"

    study = _study("slurm", postgres_url)
    _check_outcome(study, 12)
    workers = {t.user_attrs["worker"] for t in study.get_trials(deepcopy=False) if "worker" in t.user_attrs}
    assert len(workers) == 3 and any(w.endswith(f":{victim}") for w in workers), workers
    # the task cancelled with SIGTERM saved its trial, which another task resumed after the saved epoch
    stopped = study.trials[preempted]
    saved = stopped.user_attrs[TrialKey.PREEMPTED]["epoch"]
    assert stopped.state == TrialState.FAIL and saved >= 1
    [resumed] = [t for t in study.trials if t.user_attrs.get(TrialKey.RETRY_OF) == preempted]
    assert resumed.state == TrialState.COMPLETE and resumed.user_attrs[TrialKey.RESUMED_AT] == saved
    assert "stopped by SIGTERM" in (workdir / "studies" / f"slurm-{job}_{task}.out").read_text()
    outputs = sorted((workdir / "studies").glob(f"slurm-{job}_*.out"))
    assert [p.name for p in outputs] == [f"slurm-{job}_{i}.out" for i in range(3)]
    for output in outputs:  # --quiet workers: nothing but warnings, and no traceback
        assert "Traceback" not in output.read_text(), output.read_text()
