"""Disk faults, for real: a folder on a full file system (a small tmpfs filled to the last byte) and a cache
entry cut short. Each is one clear line naming the path; no trial loses its result; nothing corrupt is used."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import invoke, start_tuner, tiny_space, unavailable, write_space
from tuner.data.cache import cached_array
from tuner.search.storage import open_storage


@pytest.fixture
def small_disk(tmp_path: Path):
    """A folder on a file system of its own, 8 MiB (a small tmpfs), to be filled by :func:`fill`."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        unavailable("mounting a small tmpfs (root)", "run the tests as root, as CI does")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write ``folder/filler`` until the file system has no byte left (ENOSPC on any write after it)."""
    with pytest.raises(OSError, match="No space left"), (folder / "filler").open("wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 65536 if fh.tell() < 1 << 20 else b"\0" * 512)
    return folder / "filler"


@pytest.fixture
def full_disk(small_disk: Path) -> Path:
    """A folder on a file system with no byte left (ENOSPC on any write)."""
    fill(small_disk)
    return small_disk


def _study(root: Path) -> optuna.Study:
    return _study_at(f"sqlite:///{root / 'studies'}/tiny.db")


def test_a_full_disk_under_the_cache_and_the_artifacts_costs_no_trial(workdir, full_disk):
    space = write_space(workdir / "s.yaml", tiny_space(study={"n_trials": 2}))
    result = invoke(
        "optimize", "--space", space, "--cache-dir", full_disk / "cache", "--artifacts", full_disk / "artifacts"
    )
    assert result.exit_code == 0, result.output
    assert f"could not write the cache entry {full_disk / 'cache'}/" in result.stderr
    assert "No space left on device" in result.stderr
    for number in (0, 1):  # drawn after the trial ended: its result is in already
        assert f"could not write the dashboard files of trial {number} in {full_disk / 'artifacts'}" in result.stderr
    assert "Traceback" not in result.output
    trials = _study(workdir).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.value is not None and len(t.user_attrs["history"]["val_auroc"]) == 2 for t in trials)


def test_a_study_database_whose_disk_fills_mid_trial_stops_in_one_line_and_the_same_command_goes_on(
    workdir, small_disk
):
    """The study's SQLite file on a disk that fills while a trial runs: the run stops with one line naming
    the database (exit 2, no traceback), the file passes SQLite's integrity check with the trials finished
    before it, and once there is space the same command recovers the trial left running at once (its
    process is gone) and finishes the exact total."""
    space = write_space(
        workdir / "s.yaml",
        tiny_space(
            study={"n_trials": 3, "pruner": {"name": "none"}, "artifacts": False},
            data={"image_size": 24, "synthetic": {"n_images": 300, "minority_fraction": 0.2}},
            train={"max_epochs": 6},
        ),
    )
    url = f"sqlite:///{small_disk}/tiny.db"
    proc = start_tuner("optimize", "--space", str(space), "--storage", url, cwd=workdir)
    try:
        while not _running_past_epoch_one(url):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        filler = fill(small_disk)
        output, _ = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 2, output
    said = " ".join(output.split())
    assert f"error: the study database {url} refused a write (database or disk is full)" in said, output
    assert "add --join to the same command" in said
    assert "Traceback" not in output and "Trial 0 failed" not in output
    with sqlite3.connect(small_disk / "tiny.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    left = [t.number for t in _study_at(url).get_trials(states=(TrialState.RUNNING,))]
    assert len(left) == 1, "the trial whose write was refused is left as it was: RUNNING"

    filler.unlink()
    result = invoke("optimize", "--space", space, "--storage", url, "--join")
    assert result.exit_code == 0, result.output
    for number in left:
        assert f"trial {number} was left running by process" in " ".join(result.stderr.split())
    trials = _study_at(url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == left, "only the trial left running failed"
    assert all(len(t.user_attrs["history"]["val_auroc"]) == 6 for t in trials if t.state == TrialState.COMPLETE)


def test_a_read_only_folder_is_one_line_naming_it(workdir, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    space = write_space(workdir / "s.yaml", tiny_space(study={"n_trials": 1}))
    result = invoke(
        "optimize", "--space", space, "--cache-dir", small_disk / "cache", "--artifacts", small_disk / "artifacts"
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert f"could not write the cache entry {small_disk / 'cache'}/" in said and "(Read-only file system)" in said
    assert f"could not create the trials' folder {small_disk / 'artifacts'} (Read-only file system)" in said
    assert [t.state for t in _study(workdir).get_trials()] == [TrialState.COMPLETE]

    url = f"sqlite:///{small_disk}/tiny.db"
    result = invoke("optimize", "--space", space, "--storage", url)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot open the study storage {url}: OperationalError (unable to open database file)"
    )


def _study_at(url: str) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(url))


def _running_past_epoch_one(url: str) -> bool:
    try:
        return any(t.intermediate_values for t in _study_at(url).get_trials(states=(TrialState.RUNNING,)))
    except Exception:  # noqa: BLE001 - the study or its tables may not exist yet
        return False


def test_a_cache_entry_cut_short_is_rebuilt_not_mapped(tmp_path, caplog):
    images = np.arange(4 * 3 * 8 * 8, dtype=np.uint8).reshape(4, 3, 8, 8)
    built = []

    def build() -> np.ndarray:
        built.append(1)
        return images

    first, hit = cached_array(tmp_path, "entry", build)
    assert not hit and np.array_equal(first, images)
    again, hit = cached_array(tmp_path, "entry", build)
    assert hit and len(built) == 1  # a whole entry is used as it is

    path = tmp_path / "entry.npy"
    whole = path.stat().st_size
    with path.open("r+b") as fh:  # a copy killed half-way, a quota reached mid-write
        fh.truncate(whole - 100)
    with caplog.at_level(logging.WARNING, logger="tuner.data.cache"):
        rebuilt, hit = cached_array(tmp_path, "entry", build)
    assert not hit and len(built) == 2 and np.array_equal(rebuilt, images)
    assert f"the cache entry {path} is damaged (it has {whole - 100} bytes where {whole} were written)" in caplog.text
    assert path.stat().st_size == whole

    with path.open("r+b") as fh:  # same size, one byte changed
        fh.seek(whole - 1)
        last = fh.read(1)[0]
        fh.seek(whole - 1)
        fh.write(bytes([last ^ 0xFF]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuner.data.cache"):
        rebuilt, hit = cached_array(tmp_path, "entry", build)
    assert not hit and "its checksum does not match" in caplog.text and np.array_equal(rebuilt, images)


def test_a_cache_entry_cut_short_under_a_study_is_decoded_again(workdir):
    space = write_space(workdir / "s.yaml", tiny_space(study={"n_trials": 1, "artifacts": False}))
    assert invoke("optimize", "--space", space).exit_code == 0
    [entry, *_] = sorted((workdir / "studies" / "cache").glob("*.npy"), key=lambda p: -p.stat().st_size)
    with entry.open("r+b") as fh:
        fh.truncate(entry.stat().st_size // 2)
    result = invoke("optimize", "--space", space)
    assert result.exit_code == 0, result.output
    assert f"the cache entry {entry.relative_to(workdir)} is damaged" in result.stderr
    assert [t.state for t in _study(workdir).get_trials()] == [TrialState.COMPLETE] * 2


def test_a_preempted_trials_state_that_cannot_be_written_leaves_nothing_behind(full_disk, caplog):
    import torch

    from tuner.search.preemption import SavedTrials
    from tuner.train import Hyperparameters, Snapshot
    from tuner.train.snapshot import Progress

    trial = optuna.create_study().ask()
    snapshot = Snapshot(
        progress=Progress(epoch=3),
        model={"weight": torch.zeros(100_000)},
        optimizer={},
        schedule={},
        average=None,
        scaler=None,
        generator=None,
        torch_rng=torch.get_rng_state(),
        cuda_rng=None,
    )
    saved = SavedTrials(full_disk / "resume")
    with caplog.at_level(logging.WARNING, logger="tuner.search.preemption"):
        path = saved.save(trial, seed=0, hparams=Hyperparameters(), snapshot=snapshot)
    assert path is None
    assert f"could not save trial 0's state to {full_disk / 'resume' / 'trial-0.pt'}" in caplog.text
    assert "No space left on device" in caplog.text and "starts again from epoch 1" in caplog.text
    assert list((full_disk / "resume").iterdir()) == []  # no half-written file
    assert saved.load(trial, Hyperparameters()) is None
