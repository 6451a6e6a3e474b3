"""Every shipped search space runs: one trial of one epoch on tiny data at a tiny size, so no file rots.

Each file gets data of the shape it expects: the built-in lesions, a three-class folder for the
normal / benign / cancer spaces, an MHIST-style annotations.csv for the MHIST spaces, and a folder
of extra minority images where the space adds some to training.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from optuna.trial import TrialState
from PIL import Image

from tests.conftest import make_image_folder
from tuner.data.synthetic import make_synthetic
from tuner.search import run_optimize
from tuner.search.space import iter_specs, parse_space

SPACES = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
MHIST_AGREEMENT = "Number of Annotators who Selected SSA (Out of 7)"


def make_mhist(root: Path) -> Path:
    """MHIST's layout: images/*.png and annotations.csv with its own column names and partition."""
    images, labels = make_synthetic(90, image_size=32, minority_fraction=0.35, seed=3)
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        name = f"MHIST_{i:03d}.png"
        Image.fromarray(img.transpose(1, 2, 0)).save(root / "images" / name)
        votes = int(rng.integers(4, 8)) if label else int(rng.integers(0, 4))
        rows.append(
            {
                "Image Name": name,
                "Majority Vote Label": "SSA" if label else "HP",
                MHIST_AGREEMENT: str(votes),
                "Partition": "test" if i % 4 == 0 else "train",
            }
        )
    path = root / "annotations.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data_kinds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("space-data")
    return {
        "mhist": make_mhist(root / "mhist"),
        "three_class": make_image_folder(root / "three", {"normal": 40, "benign": 40, "cancer": 30}),
        "extra": make_image_folder(root / "extra", {"malignant": 30}, seed=4) / "malignant",
    }


def data_overrides(raw: dict, kinds: dict[str, Path]) -> dict:
    """Point a space at tiny data of the kind it expects."""
    data = raw.get("data", {})
    if data.get("csv"):
        out = {"data.source": str(kinds["mhist"])}
    elif data.get("positive_class") == "cancer":
        out = {"data.source": str(kinds["three_class"])}
    else:
        out = {"data.source": "synthetic", "data.synthetic": {"n_images": 120, "minority_fraction": 0.25}}
    if data.get("extra_train"):
        out["data.extra_train"] = {**data["extra_train"], "source": str(kinds["extra"])}
    return out


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_space_file_runs_one_trial(path, workdir, data_kinds):
    raw = yaml.safe_load(path.read_text())
    assert raw["study"]["name"] == path.stem, "a space's study is named after its file"
    assert path.read_text().startswith("# "), "a space file opens with what it reproduces"
    space = _space_for_tests(path, data_kinds)  # pretrained: false, as no weights are here (see test_models.py)
    space = space.model_copy(
        update={
            "study": space.study.model_copy(update={"n_trials": 1, "artifacts": False}),
            "train": space.train.model_copy(update={"max_epochs": 1}),
        }
    )
    study = run_optimize(space, storage_url=f"sqlite:///{workdir}/s.db", cache_dir=workdir / "cache")
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["epochs_run"] == 1


class Variant:
    """A stand-in for an Optuna trial that takes option ``k`` of every categorical (its last, if it has
    fewer) and the low (even ``k``) or high (odd ``k``) end of every range."""

    def __init__(self, k: int) -> None:
        self.k = k

    def suggest_categorical(self, name, choices):
        return choices[min(self.k, len(choices) - 1)]

    def suggest_int(self, name, low, high, **_):
        return high if self.k % 2 else low

    def suggest_float(self, name, low, high, **_):
        return high if self.k % 2 else low


def _without_weights(node: Any) -> Any:
    """``pretrained: false`` wherever the space sets it, under a choice too."""
    if isinstance(node, dict):
        return {k: False if k == "pretrained" else _without_weights(v) for k, v in node.items()}
    return node


def _space_for_tests(path: Path, kinds: dict[str, Path]):
    raw = yaml.safe_load(path.read_text())
    overrides = {
        **data_overrides(raw, kinds),
        "data.image_size": 64 if "alexnet" in path.read_text() else 32,
        "train.device": "cpu",
    }
    return parse_space({**raw, "params": _without_weights(raw["params"])}, str(path), overrides)


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_choice_of_every_space_builds_and_takes_a_step(path, workdir, data_kinds):
    """Each option of each categorical builds its model, training pool, loss, optimizer and schedule."""
    from tuner.data.device import DeviceData
    from tuner.search.objective import run_settings
    from tuner.search.space import Choice, suggest
    from tuner.search.trial_data import prepare
    from tuner.train.build import build_components

    space = _space_for_tests(path, data_kinds)
    data = DeviceData.from_dataset(prepare(space, cache_dir=workdir / "cache"), torch.device("cpu"))
    widest = max([len(s.options) for s, _ in iter_specs(space.specs) if isinstance(s, Choice)], default=1)
    for k in range(max(widest, 2)):
        hparams = suggest(Variant(k), space)
        c = build_components(hparams, data, run_settings(space), seed=k)
        x = c.normalize(torch.index_select(c.pool.images, 0, torch.arange(4)).float())
        c.model.train()
        loss = c.loss_fn(c.model(x), c.pool.labels[:4])
        loss.backward()
        c.optimizer.step()
        c.schedule.after_step()
        assert torch.isfinite(loss), hparams


@pytest.mark.parametrize("balancing", ["smote", "adasyn"])
def test_mhist_space_with_pixel_smote_and_hard_examples_left_out(workdir, data_kinds, balancing):
    from tests.conftest import invoke
    from tuner.search.storage import load_existing_study

    result = invoke(
        "optimize",
        "--space",
        Path(__file__).parents[1] / "search_spaces" / "fcnn.yaml",
        "--data",
        data_kinds["mhist"],
        "--n-trials",
        "2",
        "--max-epochs",
        "2",
        "--device",
        "cpu",
        "--set",
        "data.image_size=24",
        "--set",
        f"params.imbalance={balancing}",
        "--set",
        'params.drop_hard=["3", "4"]',
    )
    assert result.exit_code == 0, result.output
    study = load_existing_study("fcnn", "sqlite:///studies/fcnn.db")
    assert study.user_attrs["data"]["class_names"] == ["HP", "SSA"]
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        assert trial.user_attrs["hparams"]["imbalance"] == balancing
        assert trial.user_attrs["hparams"]["drop_hard"] == ["3", "4"]
        counts = trial.user_attrs["train_counts"]  # SMOTE / ADASYN balanced what was left
        assert set(counts) == {"HP", "SSA"} and abs(counts["HP"] - counts["SSA"]) <= 0.1 * counts["HP"]
    refit = invoke("refit", "--study", "fcnn", "--storage", "sqlite:///studies/fcnn.db", "--bootstrap", "20")
    assert refit.exit_code == 0, refit.output
    assert "test set" in refit.stdout
