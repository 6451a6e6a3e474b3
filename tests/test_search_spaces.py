"""Every shipped search space runs: one trial of one epoch on tiny data at a tiny size, so no file rots.

Each file gets data of the shape it expects: the built-in lesions, a three-class folder for the
normal / benign / cancer spaces, an MHIST-style annotations.csv for the MHIST spaces, and a folder
of extra minority images where the space adds some to training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from optuna.trial import TrialState
from PIL import Image

from tests.conftest import make_image_folder
from tuner.data.synthetic import make_synthetic
from tuner.models import build_model
from tuner.space import iter_specs, load_space
from tuner.workers import run_optimize

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
    space = load_space(
        path,
        {
            **data_overrides(raw, data_kinds),
            "data.image_size": 64 if "alexnet" in path.read_text() else 32,
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


MODELS = sorted(
    {
        str(value)
        for path in SPACES
        for spec, _ in iter_specs(load_space(path, {"params.pretrained": False}).specs)
        if spec.name == "model"
        for value in ([spec.value] if hasattr(spec, "value") else [o.value for o in spec.options])
    }
)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_a_space_names_builds_and_runs(name):
    model = build_model(name, num_outputs=2, in_chans=3, image_size=64, hidden_sizes=(16,), dropout=0.1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)


@pytest.mark.parametrize("balancing", ["smote", "adasyn"])
def test_mhist_space_with_pixel_smote_and_hard_examples_left_out(workdir, data_kinds, balancing):
    from tests.conftest import invoke
    from tuner.study import load_existing_study

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
