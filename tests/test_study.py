from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import invoke, tiny_space, write_space
from tuner.search import run_optimize
from tuner.search.space import parse_space
from tuner.search.storage import open_storage

HISTORY_KEYS = {"train_loss", "val_loss", "val_auroc", "val_auprc", "val_f1", "val_recall", "val_specificity", "lr"}


def load(name: str, root: Path) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{root / 'studies' / name}.db"))


def test_optimize_end_to_end_stores_every_trial(workdir):
    space = write_space(workdir / "s.yaml", tiny_space())
    result = invoke("optimize", "--space", space)
    assert result.exit_code == 0, result.output
    assert "best trial" in result.stdout and "optuna-dashboard 'sqlite:///studies/tiny.db'" in result.stdout
    assert "tuner dashboard --study tiny" in result.stdout

    study = load("tiny", workdir)
    assert study.user_attrs["space_fingerprint"] == parse_space(tiny_space()).fingerprint()
    assert study.user_attrs["tuner_version"] and study.user_attrs["test_set_reads"] == []
    assert study.user_attrs["data"]["class_names"] == ["benign", "malignant"]
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        attrs = t.user_attrs
        assert HISTORY_KEYS <= set(attrs["history"]) and len(attrs["history"]["val_auroc"]) == attrs["epochs_run"] == 2
        assert t.value == max(attrs["history"]["val_auroc"]) == attrs["history"]["val_auroc"][attrs["best_epoch"] - 1]
        assert attrs["seconds_per_epoch"] > 0 and attrs["images_per_second"] > 0 and attrs["peak_memory_mb"] > 0
        history = attrs["history"]
        assert all(0 < v < e for v, e in zip(history["validate_seconds"], history["epoch_seconds"], strict=True))
        assert attrs["seed"] == t.number and attrs["hparams"]["lr"] == t.params["lr"]
        assert sorted(t.intermediate_values) == [1, 2]
    # Progress inside each trial: not a terminal here, so one log line per epoch with the trial's best so far.
    said = " ".join(result.stderr.split())
    for t in trials:
        values = t.user_attrs["history"]["val_auroc"]
        for epoch, value in enumerate(values, 1):
            best = max(values[:epoch])
            assert f"trial {t.number} epoch {epoch}/2 val_auroc={value:.4g} (trial best {best:.4g})" in said, said
    quiet = invoke("optimize", "--space", space, "-q", "--n-trials", "1")
    assert quiet.exit_code == 0 and "epoch 1/2" not in quiet.stderr


def test_checkpoint_metric_picks_the_epoch_and_the_study_metric_values_it(workdir):
    space = parse_space(
        tiny_space(
            study={"n_trials": 2, "artifacts": False},
            train={"max_epochs": 4, "patience": 2, "checkpoint_metric": "val_recall"},
            params={"lr": 0.05},
        )
    )
    study = run_optimize(space, storage_url="sqlite:///studies/ck.db", cache_dir=workdir / "cache")
    for t in study.get_trials():
        history, best = t.user_attrs["history"], t.user_attrs["best_epoch"]
        assert history["val_recall"][best - 1] == max(history["val_recall"])
        assert history["val_recall"].index(max(history["val_recall"])) == best - 1  # the first epoch at the max
        assert t.value == history["val_auroc"][best - 1]


def test_resume_adds_trials_and_a_changed_space_is_refused(workdir):
    space = write_space(workdir / "s.yaml", tiny_space(study={"n_trials": 2}))
    assert invoke("optimize", "--space", space).exit_code == 0
    assert invoke("optimize", "--space", space, "--n-trials", "1").exit_code == 0
    assert len(load("tiny", workdir).get_trials()) == 3

    changed = write_space(workdir / "s2.yaml", tiny_space(params={"lr": 0.01}))
    result = invoke("optimize", "--space", changed)
    assert result.exit_code == 2
    assert "study 'tiny' in sqlite:///studies/tiny.db was created from a different search space" in result.stderr
    assert len(load("tiny", workdir).get_trials()) == 3


def test_same_seed_gives_identical_trial_values(workdir):
    space = parse_space(
        tiny_space(
            params={"augment": {"choices": ["none", "affine"]}, "imbalance": {"choices": ["none", "oversample"]}}
        )
    )
    values = []
    for name in ("a", "b"):
        run = space.model_copy(update={"study": space.study.model_copy(update={"name": name})})
        study = run_optimize(run, storage_url=f"sqlite:///studies/{name}.db", cache_dir=workdir / "cache")
        values.append([(t.params, t.value) for t in study.get_trials()])
    assert values[0] == values[1]


def test_nan_trial_is_pruned_with_its_reason_and_the_study_goes_on(workdir):
    space = tiny_space(
        study={"n_trials": 4, "sampler": {"name": "random", "seed": 1}},
        params={
            "model": "mlp",
            "hidden_sizes": [256, 256, 256, 256],
            "optimizer": "sgd",
            "momentum": 0.99,
            "lr": {"choices": [10.0, 0.001]},
            "batch_size": 16,
        },
    )
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    trials = load("tiny", workdir).get_trials()
    diverged = [t for t in trials if t.params["lr"] == 10.0]
    assert diverged and all(t.state == TrialState.PRUNED for t in diverged)
    assert all("non-finite" in t.user_attrs["prune_reason"] for t in diverged)
    assert any(t.state == TrialState.COMPLETE for t in trials)
    assert "non-finite" in result.output


def test_optimize_never_reads_the_test_split(workdir):
    rng = np.random.default_rng(0)
    np.savez(
        workdir / "locked.npz",
        train_images=rng.integers(0, 255, (60, 12, 12), dtype=np.uint8),
        train_labels=np.array([0] * 45 + [1] * 15, dtype=np.uint8).reshape(-1, 1),
        val_images=rng.integers(0, 255, (20, 12, 12), dtype=np.uint8),
        val_labels=np.array([0] * 15 + [1] * 5, dtype=np.uint8).reshape(-1, 1),
        # Reading these needs allow_pickle=True, which tuner never passes: any read would fail the run.
        test_images=np.array([object()] * 4, dtype=object),
        test_labels=np.array([object()] * 4, dtype=object),
    )
    space = write_space(
        workdir / "s.yaml", tiny_space(data={"source": "locked.npz", "image_size": 12}, study={"n_trials": 1})
    )
    result = invoke("optimize", "--space", space)
    assert result.exit_code == 0, result.output
    assert load("tiny", workdir).user_attrs["test_set_reads"] == []


def test_trials_and_best_commands(workdir):
    space = write_space(workdir / "s.yaml", tiny_space())
    assert invoke("optimize", "--space", space).exit_code == 0
    table = invoke("trials", "--study", "tiny")
    assert table.exit_code == 0, table.output
    study = load("tiny", workdir)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.stdout.splitlines()]
    rows = [r for r in rows if r and r[0].isdigit()]
    header = next(line for line in table.stdout.splitlines() if "state" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]][:5] == ["#", "state", "val_auroc", "best epoch", "lr"]
    by_number = {t.number: t for t in study.trials}
    assert sorted(int(r[0]) for r in rows) == sorted(by_number), "one row per trial"
    assert [int(r[0]) for r in rows][0] == study.best_trial.number, "best first"
    for number, state, value, epoch, lr, *_ in rows:
        trial = by_number[int(number)]
        assert state == trial.state.name and float(value) == pytest.approx(trial.value, abs=5e-5)
        assert int(epoch) == trial.user_attrs["best_epoch"]
        assert float(lr) == pytest.approx(trial.params["lr"], rel=1e-3)
    best = invoke("best", "--study", "tiny", "--json")
    assert best.exit_code == 0, best.output
    data = json.loads(best.stdout)
    assert data["number"] == study.best_trial.number and data["value"] == study.best_value
    assert data["params"] == study.best_trial.params and data["best_epoch"] in (1, 2)
    missing = invoke("best", "--study", "nope")
    assert missing.exit_code == 2 and "no study 'nope'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "does/not/exist"], "data source does/not/exist does not exist"),
        (
            ["--storage", "postgresql://tuner:s3cret@127.0.0.1:9/tuner"],
            "cannot open the study storage postgresql://tuner:***@127.0.0.1:9/tuner",
        ),
        (["--storage", "not a url"], "storage must be an SQLAlchemy URL"),
    ],
)
def test_bad_input_exits_2_and_writes_no_study(workdir, args, message):
    space = write_space(workdir / "s.yaml", tiny_space())
    result = invoke("optimize", "--space", space, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert "s3cret" not in result.output
    assert not list(workdir.glob("studies/*.db"))


def _has_running_trial(db: Path) -> bool:
    """Read-only look at the database (opening Optuna's storage here would race its table creation)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_ctrl_c_leaves_no_trial_running_and_the_same_command_goes_on(workdir):
    space = tiny_space(
        study={"n_trials": 50},
        data={"image_size": 24, "synthetic": {"n_images": 240, "minority_fraction": 0.2}},
        train={"max_epochs": 200, "patience": 3},
    )
    path = write_space(workdir / "s.yaml", space)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner", "optimize", "--space", str(path)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        db = workdir / "studies" / "tiny.db"
        while time.time() < deadline and not _has_running_trial(db):
            time.sleep(0.3)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # the fault handler prints where every thread is stuck
            pytest.fail("optimize did not exit after Ctrl-C:\n" + proc.communicate(timeout=30)[1])
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted: the running trial was marked FAILED; run the same command again to resume" in stderr
    before = load("tiny", workdir).get_trials()
    # The trial Ctrl-C landed in failed (or, landing between two trials, none), every other one finished.
    assert before and before[-1].state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in before[:-1])
    # The same command (here with one trial to add) goes on with the study: its trials kept, one more run.
    again = invoke("optimize", "--space", path, "--n-trials", "1")
    assert again.exit_code == 0, again.output
    after = load("tiny", workdir).get_trials()
    assert [t.state for t in after[: len(before)]] == [t.state for t in before]
    assert len(after) == len(before) + 1 and after[-1].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_interrupted_exit_is_not_held_up_by_a_thread_nothing_will_stop():
    code = (
        "import threading, tuner.cli as cli\n"
        "threading.Thread(target=threading.Event().wait).start()  # a non-daemon thread that never ends\n"
        "cli._exit_interrupted()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr


def test_a_space_where_every_trial_fails_stops_with_the_reason(workdir):
    # bce needs two classes; three classes make every trial fail with the same, deterministic reason
    root = workdir / "three"
    from tests.conftest import make_image_folder

    make_image_folder(root, {"benign": 12, "malignant": 12, "nevus": 12})
    space = tiny_space(study={"n_trials": 3}, data={"source": str(root)}, params={"loss": "bce"})
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 2
    assert "5 trials in a row failed, the last with: loss='bce' needs exactly two classes" in result.stderr
    states = [t.state for t in load("tiny", workdir).get_trials()]
    assert states == [TrialState.FAIL] * 5


def test_warm_start_replays_the_best_configurations_of_an_earlier_study(workdir):
    donor_space = tiny_space(
        study={"name": "donor", "n_trials": 5, "artifacts": False},
        params={"width": {"choices": [4, 8]}, "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    )
    assert invoke("optimize", "--space", write_space(workdir / "donor.yaml", donor_space)).exit_code == 0
    donor = load("donor", workdir)
    ranked = sorted((t for t in donor.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:3]
    limit = sorted(t.params["lr"] for t in ranked)[1]  # the new space keeps two of the three, not the third
    new_space = tiny_space(
        study={"name": "warm", "n_trials": 3, "artifacts": False},
        params={"width": 4, "dropout": {"low": 0.0, "high": 0.5}, "lr": {"low": 1e-3, "high": limit, "log": True}},
    )
    path = write_space(workdir / "warm.yaml", new_space)
    result = invoke("optimize", "--space", path, "--warm-start", "donor", "--top-k", "3")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    kept = [t for t in ranked if t.params["lr"] <= limit]
    skipped = [t for t in ranked if t.params["lr"] > limit]
    assert len(kept) == 2 and len(skipped) == 1
    assert f"trial {skipped[0].number} of donor skipped: lr={skipped[0].params['lr']!r} is outside" in said
    assert "width: not in this space, dropped" in said and "dropout: new in this space, drawn by the sampler" in said
    assert "the 2 best trial(s) of donor run first" in said
    warm = load("warm", workdir).trials
    for trial, source in zip(warm, kept, strict=False):  # the donor's best first, in its order
        assert trial.user_attrs["warm_start_from"] == f"donor#{source.number}"
        assert trial.params["lr"] == source.params["lr"] and "width" not in trial.params
        assert 0.0 <= trial.params["dropout"] <= 0.5
    assert "warm_start_from" not in warm[2].user_attrs and len(warm) == 3
    missing = invoke("optimize", "--space", path, "--warm-start", "nope")
    assert missing.exit_code == 2 and "no study 'nope'" in missing.stderr


def test_a_study_that_stopped_improving_stops_by_itself_with_its_reason(workdir):
    # No trial can beat the best by 0.5 AUROC: after one trial to beat, three without improvement end the study.
    space = tiny_space(
        study={"name": "stale", "n_trials": 10, "artifacts": False, "stop": {"patience": 3, "min_delta": 0.5}}
    )
    path = write_space(workdir / "s.yaml", space)
    result = invoke("optimize", "--space", path)
    assert result.exit_code == 0, result.output
    study = load("stale", workdir)
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    reason = study.user_attrs["stopped"]
    assert reason.startswith("val_auroc did not improve by 0.5 in the last 3 finished trials (best ")
    assert f"stopped early: {reason}" in " ".join(result.stdout.split())
    # A new run judges its own trials: it runs at least `patience` of them before it may stop again.
    again = invoke("optimize", "--space", path, "--n-trials", "2")
    assert again.exit_code == 0 and "stopped early" not in again.stdout
    assert len(load("stale", workdir).trials) == 6 and load("stale", workdir).user_attrs["stopped"] is None
    # Which trial sequences must stop and which must not: tests/test_stop.py, on the rule itself.


def test_cmaes_sampler_runs_a_study(workdir):
    """sampler: cmaes (its package in the test extra): after one random start, CMA-ES draws the trials."""
    space = tiny_space(
        study={"n_trials": 2, "artifacts": False, "sampler": {"name": "cmaes", "seed": 0, "n_startup_trials": 1}},
        params={"dropout": {"low": 0.0, "high": 0.5}},
    )
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    first, second = load("tiny", workdir).get_trials()
    assert first.state == second.state == TrialState.COMPLETE
    assert "cma:generation" not in first.system_attrs and "cma:generation" in second.system_attrs


def _model_that(fails_with: BaseException):
    """A built-in model name whose forward pass raises ``fails_with``."""
    from tuner.train.models import SmallCNN

    class Failing(SmallCNN):
        def forward(self, x):  # noqa: ANN001, ANN202
            raise fails_with

    def build(in_chans, image_size, *, width, depth, batch_norm, pooling):  # noqa: ANN001, ANN202
        return Failing(in_chans, width=width, depth=depth, batch_norm=batch_norm, pooling=pooling)

    return build


@pytest.mark.parametrize("fault", ["crash", "deterministic"])
def test_a_crashed_trial_is_retried_twice_with_its_parameters_and_a_deterministic_fault_never(
    workdir, monkeypatch, fault
):
    from tuner.errors import TunerError
    from tuner.train.models import BUILTIN_MODELS

    error = RuntimeError("driver hiccup") if fault == "crash" else TunerError("this combination cannot work")
    monkeypatch.setitem(BUILTIN_MODELS, "failing", _model_that(error))
    space = tiny_space(study={"n_trials": 1, "artifacts": False}, params={"model": "failing"})
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 2 and "5 trials in a row failed" in result.stderr, result.output
    trials = load("tiny", workdir).get_trials(deepcopy=False)
    assert [t.state for t in trials[:5]] == [TrialState.FAIL] * 5
    retry_of = [t.user_attrs.get("retry_of") for t in trials]
    if (
        fault == "crash"
    ):  # 0, its two retries, then a new draw, its first retry and (queued for the next run) its second
        assert retry_of == [None, 0, 0, None, 3, 3] and trials[5].state == TrialState.WAITING
        assert [t.user_attrs.get("crash_retries") for t in trials] == [None, 1, 2, None, 1, 2]
        assert trials[0].params == trials[1].params == trials[2].params != trials[3].params
    else:
        assert len(trials) == 5
        assert retry_of == [None] * 5
        assert all(t.user_attrs["fail_reason"] == "this combination cannot work" for t in trials)


def test_timeout_cache_dir_and_a_key_removed_with_set_null(workdir):
    """--timeout stops starting trials once it has passed; --cache-dir is where the decoded images go;
    --set params.dropout=null removes the searched dropout, so no trial suggests it."""
    space = tiny_space(study={"n_trials": 50, "artifacts": False}, params={"dropout": {"low": 0.0, "high": 0.5}})
    path = write_space(workdir / "s.yaml", space)
    began = time.monotonic()
    result = invoke(
        "optimize", "--space", path, "--timeout", "2", "--cache-dir", "decoded", "--set", "params.dropout=null"
    )
    assert result.exit_code == 0, result.output
    trials = load("tiny", workdir).get_trials(deepcopy=False)
    assert 1 <= len(trials) < 50 and time.monotonic() - began < 60
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "dropout" not in t.params for t in trials), [
        (t.state, t.params) for t in trials
    ]
    assert list((workdir / "decoded").glob("*.npy")) and not (workdir / "studies" / "cache").exists()
