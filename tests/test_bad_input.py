"""Bad input of every kind: one clear line on stderr, exit code 2, nothing written, no secret shown."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import invoke, make_image_folder, tiny_space, write_space


def _one_class(root: Path) -> str:
    return str(make_image_folder(root / "one", {"benign": 6}))


def _empty_class(root: Path) -> str:
    folder = make_image_folder(root / "empty", {"benign": 6, "malignant": 4})
    (folder / "nevus").mkdir()
    return str(folder)


def _corrupt(root: Path) -> str:
    folder = make_image_folder(root / "corrupt", {"benign": 6, "malignant": 4})
    (folder / "malignant" / "scan_17.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return str(folder)


def _csv_missing_columns(root: Path) -> str:
    path = root / "m.csv"
    path.write_text("file,diagnosis\na.png,benign\n")
    return str(path)


def _csv_bad_split(root: Path) -> str:
    make_image_folder(root / "imgs", {"benign": 2, "malignant": 2})
    path = root / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerow(["imgs/benign/benign_000.png", "benign", "training"])
    return str(path)


def _csv_missing_image(root: Path) -> str:
    path = root / "m.csv"
    path.write_text("path,label\nnot_there.png,benign\n")
    return str(path)


def _npz_missing_keys(root: Path) -> str:
    path = root / "d.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.uint8))
    return str(path)


def _npz_not_an_archive(root: Path) -> str:
    path = root / "d.npz"
    path.write_text("hello")
    return str(path)


PASSWORD = "s3cr3t-Pa55"

# (id, extra CLI args or a data maker, space changes, expected text in the single error line)
CASES = [
    ("unknown key", [], {"study": {"nmae": "x"}}, "study.nmae: unknown key 'nmae'; did you mean 'name'?"),
    ("misspelled param", [], {"params": {"learning_rate": 0.1}}, "params.learning_rate: unknown hyperparameter"),
    ("wrong type", [], {"data": {"image_size": "large"}}, "data.image_size: Input should be a valid integer"),
    ("low > high", [], {"params": {"lr": {"low": 0.1, "high": 0.001}}}, "low must be below high"),
    (
        "log low <= 0",
        [],
        {"params": {"weight_decay": {"low": 0, "high": 0.1, "log": True}}},
        "a log range must have low > 0",
    ),
    (
        "unknown model",
        [],
        {"params": {"model": "resnet_50x"}},
        "model must be a built-in (small_cnn, mlp), a timm or a torchvision model name",
    ),
    ("unknown optimizer", [], {"params": {"optimizer": "rmsprop"}}, "Input should be 'adam', 'adamw' or 'sgd'"),
    ("unknown pruner", [], {"study": {"pruner": {"name": "early"}}}, "study.pruner.name: must be one of median"),
    ("zero trials", [], {"study": {"n_trials": 0}}, "study.n_trials: Input should be greater than or equal to 1"),
    ("missing data path", ["--data", "no/such/folder"], {}, "data source no/such/folder does not exist"),
    ("one class", _one_class, {}, "must hold one sub-folder per class, at least two, but found: benign"),
    ("empty class", _empty_class, {}, "class folder"),
    ("corrupt image", _corrupt, {}, "cannot decode image"),
    (
        "csv missing columns",
        _csv_missing_columns,
        {},
        "must have columns path, label[, split], but is missing path, label",
    ),
    ("csv bad split", _csv_bad_split, {}, "split must be one of train, val, test, but got split='training'"),
    ("csv missing image", _csv_missing_image, {}, "not_there.png does not exist"),
    ("npz missing keys", _npz_missing_keys, {}, "must hold train_images and train_labels"),
    ("npz not an archive", _npz_not_an_archive, {}, "cannot read"),
    (
        "group column on a folder",
        [],
        {"data": {"group_column": "patient"}},
        "group_column='patient' needs a CSV manifest",
    ),
    (
        "positive class unknown",
        [],
        {"data": {"positive_class": "melanoma"}},
        "positive_class must be one of the classes benign, malignant",
    ),
    (
        "unknown class in class_weights",
        [],
        {"params": {"class_weights": {"melanoma": 2.0}}},
        "params.class_weights: unknown class(es) melanoma; the data's classes are benign, malignant",
    ),
    ("drop_hard without a column", [], {"params": {"drop_hard": ["3/7"]}}, "needs data.hard_example_column"),
    ("extra_ratio without images", [], {"params": {"extra_ratio": 1.0}}, "needs data.extra_train"),
    (
        "extra images folder missing",
        [],
        {"data": {"extra_train": {"source": "no/such/dir", "label": "malignant"}}},
        "data.extra_train.source no/such/dir must be an image folder",
    ),
    (
        "hard-example column on a folder",
        [],
        {"data": {"hard_example_column": "agreement"}},
        "hard_example_column='agreement' needs a CSV manifest",
    ),
    (
        "the plateau's patience under its old name",
        [],
        {"params": {"scheduler": "plateau", "patience": 2}},
        "params.patience: outdated spelling: 'patience' is now 'plateau_patience'",
    ),
    (
        "class weights as an imbalance strategy",
        [],
        {"params": {"imbalance": {"choices": ["none", "class_weight"]}}},
        "imbalance: class_weight is no longer read; write imbalance: none with class_weights: balanced",
    ),
    ("--set without =", ["--set", "params.lr"], {}, "expected key=value such as params.lr=0.001"),
    ("--set unknown key", ["--set", "params.learnrate=0.1"], {}, "params.learnrate: unknown hyperparameter"),
    ("malformed storage URL", ["--storage", "postgres//nohost"], {}, "storage must be an SQLAlchemy URL"),
    (
        "unreachable storage",
        ["--storage", f"postgresql://tuner:{PASSWORD}@127.0.0.1:9/tuner"],
        {},
        "cannot open the study storage postgresql://tuner:***@127.0.0.1:9/tuner",
    ),
    ("bad --gpus", ["--gpus", "zero,one"], {}, "--gpus must be comma-separated GPU ids"),
    ("workers per GPU without GPUs", ["--workers-per-gpu", "2"], {}, "--workers-per-gpu needs --gpus"),
    ("no threads", ["--threads", "0"], {}, "threads must be at least 1, but got threads=0"),
    ("workers against GPU slots", ["--gpus", "0", "--workers", "2"], {}, "--workers 2 does not match --gpus"),
    ("join a study that does not exist", ["--join"], {}, "no study 'tiny' to join"),
]


@pytest.mark.parametrize(("args", "changes", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(workdir, args, changes, message):
    if callable(args):
        args = ["--data", args(workdir)]
    space = write_space(workdir / "space.yaml", tiny_space(**changes) if changes else tiny_space())
    result = invoke("optimize", "--space", space, *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr  # (progress lines such as "decoding … into the cache" may precede it)
    assert message in errors[0]
    assert "Traceback" not in result.output and PASSWORD not in result.output
    assert not list(workdir.glob("studies/*.db")), "nothing may be written"
    assert not list(workdir.glob("studies/*.artifacts"))


def test_a_study_name_reused_with_another_space(workdir):
    assert (
        invoke("optimize", "--space", write_space(workdir / "a.yaml", tiny_space(study={"n_trials": 1}))).exit_code == 0
    )
    other = write_space(workdir / "b.yaml", tiny_space(study={"n_trials": 1}, params={"batch_size": 16}))
    result = invoke("optimize", "--space", other)
    assert result.exit_code == 2
    assert "was created from a different search space" in result.stderr and "another --study name" in result.stderr


def test_the_password_never_reaches_logs_either(workdir, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    space = write_space(workdir / "s.yaml", tiny_space())
    result = invoke(
        "optimize", "--space", space, "-vv", "--storage", f"postgresql://tuner:{PASSWORD}@127.0.0.1:9/tuner"
    )
    assert result.exit_code == 2
    assert PASSWORD not in result.output and PASSWORD not in caplog.text
    for command in (["trials"], ["best"], ["report"], ["refit"], ["dashboard"]):
        res = invoke(*command, "--study", "x", "--storage", f"postgresql://tuner:{PASSWORD}@127.0.0.1:9/tuner")
        assert res.exit_code == 2 and PASSWORD not in res.output, (command, res.output)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty; a space file needs at least data.source"),
        ("# only a comment\n", "is empty; a space file needs at least data.source"),
        ("- a list\n- not a mapping\n", "must be a mapping with keys study, data, train, params, but got list"),
        ("just a string\n", "must be a mapping with keys study, data, train, params, but got str"),
        ("params: {lr: 0.001}\n", "data.source: missing: name the data"),
        ("data: {image_size: 32}\n", "data.source: missing: name the data"),
    ],
    ids=["empty", "comment only", "a list", "a string", "no data section", "no data source"],
)
def test_a_space_file_without_a_usable_body_fails_at_once(workdir, text, message):
    """An empty file, a file that is no mapping, or one without a data source (and no --data) never
    starts a study on the built-in synthetic images."""
    path = workdir / "space.yaml"
    path.write_text(text)
    result = invoke("optimize", "--space", path)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.output
    assert not (workdir / "studies").exists(), "nothing may be written"
    if "data.source: missing" in message:
        # A valid space that leaves the data to --data: `space check` accepts it, anything that loads data does not.
        assert invoke("space", "check", path).exit_code == 0
        inspected = invoke("data", "inspect", "--space", path)
        assert inspected.exit_code == 2 and "data.source: missing" in inspected.stderr
