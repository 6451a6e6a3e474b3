"""The Slurm path, for real: a one-node Slurm cluster on loopback runs docker/slurm.sbatch as a 3-task
array on one PostgreSQL study; one task's process is killed with SIGKILL in the middle of a trial."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import invoke, write_space
from tests.test_workers import _check_outcome, _kill_mid_trial, _space, _study

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).parents[1] / "docker" / "slurm.sbatch"


def _squeue(env: dict) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-o", "%i %t"], env=env, capture_output=True, text=True, check=True)
    return result.stdout.split("\n") if result.stdout.strip() else []


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
    deadline = time.time() + 600
    while _squeue(env) and time.time() < deadline:
        time.sleep(1)
    assert not _squeue(env), "the array did not finish"

    study = _study("slurm", postgres_url)
    _check_outcome(study, 12)
    workers = {t.user_attrs["worker"] for t in study.get_trials(deepcopy=False) if "worker" in t.user_attrs}
    assert len(workers) == 3 and any(w.endswith(f":{victim}") for w in workers), workers
    outputs = sorted((workdir / "studies").glob(f"slurm-{job}_*.out"))
    assert [p.name for p in outputs] == [f"slurm-{job}_{i}.out" for i in range(3)]
    for output in outputs:  # --quiet workers: nothing but warnings, and no traceback
        assert "Traceback" not in output.read_text(), output.read_text()
