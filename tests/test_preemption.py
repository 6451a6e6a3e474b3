"""Preemption: a run stopped between batches goes on from the last complete epoch and ends exactly as if
never stopped (same history, same weights), and a study's trial stopped by SIGTERM resumes at its epoch."""

from __future__ import annotations

import math
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import invoke, tiny_space, write_space
from tuner.search.keys import TrialKey
from tuner.search.resources import use_threads
from tuner.search.storage import open_storage
from tuner.train import Hyperparameters, Interrupted, RunSettings, Snapshot, train_model

SETTINGS = RunSettings(max_epochs=5, patience=None, monitor="val_auroc", mode="max")

RECIPES = {
    "plain": {},
    # every kind of state a resume must carry: dropout (torch's RNG), augmentation and the order (the
    # data generator), momentum (the optimizer), a per-step schedule, a moving average, accumulation
    "everything": {
        "dropout": 0.3,
        "hidden_sizes": (16,),
        "augment": "light",
        "optimizer": "sgd",
        "scheduler": "onecycle",
        "ema_decay": 0.9,
        "accumulate_steps": 2,
        "imbalance": "oversample",
        "mixup_alpha": 0.4,
    },
    "plateau": {"scheduler": "plateau", "plateau_patience": 0, "plateau_factor": 0.5, "optimizer": "adamw"},
}


def _without_timing(history: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: v for k, v in history.items() if k not in ("epoch_seconds", "validate_seconds")}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize(
    ("recipe", "stop_at_batch"), [("everything", 3), ("everything", 9), ("plain", 9), ("plateau", 9)]
)
def test_a_run_stopped_between_batches_ends_as_if_never_stopped(tiny_device_data, recipe, stop_at_batch, tmp_path):
    hp = Hyperparameters(width=8, depth=2, batch_size=32, **RECIPES[recipe])
    _, whole = train_model(hp, tiny_device_data, SETTINGS, seed=4)

    batches = 0

    def stop() -> bool:
        nonlocal batches
        batches += 1
        return batches > stop_at_batch

    with pytest.raises(Interrupted) as stopped:
        train_model(hp, tiny_device_data, SETTINGS, seed=4, stop=stop)
    snapshot = stopped.value.snapshot
    done = snapshot.progress.epoch
    assert (done == 0) == (stop_at_batch == 3)  # four batches or more per epoch: the first, or a later one
    assert {k: len(v) for k, v in snapshot.progress.history.items()} == {k: done for k in snapshot.progress.history}

    # through a file, as a preempted trial's state goes
    torch.save(snapshot.to_dict(), tmp_path / "state.pt")
    snapshot = Snapshot.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    _, resumed = train_model(hp, tiny_device_data, SETTINGS, seed=4, start=snapshot)
    a, b = _without_timing(whole.history), _without_timing(resumed.history)
    assert a.keys() == b.keys()
    for key in a:
        assert all(_same(x, y) for x, y in zip(a[key], b[key], strict=True)), key
    assert resumed.best_epoch == whole.best_epoch
    for name, tensor in whole.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name


def _epochs_reported(db: Path) -> int:
    """How many epochs the study's trials have reported (read-only: no race with the schema's creation)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM trial_intermediate_values").fetchone()[0]
    except sqlite3.Error:
        return 0


def _study(name: str, root: Path) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{root / 'studies' / name}.db"))


def test_sigterm_mid_trial_saves_it_and_the_retry_ends_as_if_never_stopped(workdir):
    """``tuner optimize`` SIGTERMed in epoch 3 of a trial: it exits 143 within seconds, the trial is failed
    and queued again at once; ``--join`` resumes it after its last epoch, with the original's seed, and
    the trial ends with the same curve and value as the same trial never stopped."""
    space = tiny_space(
        study={"n_trials": 1, "pruner": {"name": "none"}},
        data={"image_size": 24, "synthetic": {"n_images": 400, "minority_fraction": 0.2}},
        train={"max_epochs": 5},
        params={"dropout": {"low": 0.1, "high": 0.5}, "augment": "light", "hidden_sizes": [16]},
    )
    path = write_space(workdir / "s.yaml", space)
    # one thread each, so the three runs below add their floats in the same order
    proc = subprocess.Popen(
        ["tuner", "optimize", "--space", str(path), "--threads", "1"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and _epochs_reported(workdir / "studies" / "tiny.db") < 2:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert took < 10
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM: trial 0 saved after epoch" in stderr and "--join" in stderr
    listed = invoke("trials", "--study", "tiny")
    assert listed.exit_code == 0 and "preempted after epoch" in listed.stdout, listed.output
    stopped, queued = _study("tiny", workdir).get_trials()
    assert (stopped.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)  # re-queued at once
    saved_epoch = stopped.user_attrs[TrialKey.PREEMPTED]["epoch"]
    assert saved_epoch >= 2
    assert Path(stopped.user_attrs[TrialKey.PREEMPTED]["state"]).exists()

    threads = torch.get_num_threads()
    try:
        joined = invoke("optimize", "--space", path, "--join", "--threads", "1")
        reference = dict(space, study={**space["study"], "name": "whole"})  # the same trial, never stopped
        whole = invoke("optimize", "--space", write_space(workdir / "whole.yaml", reference), "--threads", "1")
    finally:
        use_threads(threads)  # in this process: the tests after this one keep theirs
    assert joined.exit_code == 0, joined.output
    assert whole.exit_code == 0, whole.output
    first_epoch_run = min(int(e) for e in re.findall(r"trial 1 epoch (\d+)/5", joined.stderr))
    assert first_epoch_run == saved_epoch + 1  # nothing trained twice but the interrupted epoch
    stopped, resumed = _study("tiny", workdir).get_trials()
    assert resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs[TrialKey.RETRY_OF] == 0 and resumed.user_attrs[TrialKey.RESUMED_AT] == saved_epoch
    assert not Path(stopped.user_attrs[TrialKey.PREEMPTED]["state"]).exists()  # spent

    # the same trial, never stopped: a study of its own draws the same parameters and seed
    [never_stopped] = _study("whole", workdir).get_trials()
    assert resumed.params == never_stopped.params
    assert resumed.user_attrs[TrialKey.SEED] == never_stopped.user_attrs[TrialKey.SEED]
    assert resumed.intermediate_values == never_stopped.intermediate_values
    assert _without_timing(resumed.user_attrs[TrialKey.HISTORY]) == _without_timing(
        never_stopped.user_attrs[TrialKey.HISTORY]
    )
    assert resumed.value == never_stopped.value
