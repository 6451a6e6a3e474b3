"""Every shipped search space runs: one trial of one epoch on tiny data at a tiny size, so no file rots."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from tuner.space import load_space
from tuner.workers import run_optimize

SPACES = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_space_file_runs_one_trial(path, workdir):
    space = load_space(
        path,
        {
            "data.source": "synthetic",
            "data.image_size": 32,
            "data.synthetic": {"n_images": 120, "minority_fraction": 0.25},
            "study.n_trials": 1,
            "study.artifacts": False,
            "train.max_epochs": 1,
            "train.device": "cpu",
            "params.pretrained": False,  # no weights here; loading them is tested in test_models.py
        },
    )
    study = run_optimize(space, storage_url=f"sqlite:///{workdir}/s.db", cache_dir=workdir / "cache")
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["epochs_run"] == 1
