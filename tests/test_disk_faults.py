"""Disk faults, for real: a folder on a full file system (a small tmpfs filled to the last byte) and a cache
entry cut short. Each is one clear line naming the path; no trial loses its result; nothing corrupt is used."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import invoke, tiny_space, unavailable, write_space
from tuner.data.cache import cached_array
from tuner.search.storage import open_storage


@pytest.fixture
def full_disk(tmp_path: Path):
    """A folder on a file system with no byte left (ENOSPC on any write)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        unavailable("mounting a small tmpfs (root)", "run the tests as root, as CI does")
    try:
        with pytest.raises(OSError), (folder / "filler").open("wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{root / 'studies'}/tiny.db"))


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
