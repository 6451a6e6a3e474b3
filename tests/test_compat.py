"""Files an earlier tuner wrote (tests/fixtures/tuner-0.1.0) still load: its study and its model.pt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import invoke
from tuner.data import load_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "tuner-0.1.0"


@pytest.fixture
def legacy(workdir: Path) -> Path:
    """A copy of the old files in the working folder (tests never write into the repository)."""
    for file in FIXTURES.iterdir():
        shutil.copy(file, workdir / file.name)
    return workdir


def _old_test_split_as_folder(folder: Path) -> Path:
    """The old study's test split (the built-in synthetic data, as its space file made it) as a PNG folder."""
    data = yaml.safe_load((folder / "space.yaml").read_text())["data"]
    dataset = load_dataset(
        "synthetic",
        image_size=data["image_size"],
        synthetic_options=data["synthetic"],
        cache_dir=folder / "cache",
        include_test=True,
    )
    assert dataset.test is not None
    root = folder / "old_test"
    for i, (image, label) in enumerate(zip(dataset.test.images, dataset.test.labels, strict=True)):
        (root / dataset.class_names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / dataset.class_names[label] / f"{i:03d}.png")
    return root


def test_an_old_model_pt_evaluates_to_the_numbers_its_refit_reported(legacy: Path):
    images = _old_test_split_as_folder(legacy)
    result = invoke("evaluate", "--model", legacy / "model.pt", "--data", images, "--out", legacy / "ev")
    assert result.exit_code == 0, result.output
    old = json.loads((legacy / "report.json").read_text())["final"]
    new = json.loads((legacy / "ev" / "report.json").read_text())["metrics"]
    assert new["auroc"] == pytest.approx(old["auroc"], abs=1e-6)
    assert new["confusion_matrix"] == old["confusion_matrix"]


def test_an_old_study_lists_ranks_and_refits(legacy: Path):
    storage = f"sqlite:///{legacy / 'legacy.db'}"
    listed = invoke("trials", "--study", "legacy", "--storage", storage)
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.count("COMPLETE") == 3, listed.stdout
    best = invoke("best", "--study", "legacy", "--storage", storage, "--json")
    assert best.exit_code == 0, best.output
    assert json.loads(best.stdout)["number"] == 1
    out = legacy / "refit"
    refit = invoke("refit", "--trial", "1", "--study", "legacy", "--storage", storage, "--seeds", "2", "--out", out)
    assert refit.exit_code == 0, refit.output
    report = json.loads((out / "report.json").read_text())
    assert report["trial"] == 1 and report["params"]["optimizer"] == "sgd"
    assert len(report["test_set_reads"]) == 2  # the old refit's read is still on record, and this one is added
    # The trial replays as it trained (weight decay on every parameter, as tuner 0.1 did), so the same
    # seeds give the same networks and the same test figures as the old refit.
    assert report["hparams"]["weight_decay_1d"] is True
    old = json.loads((legacy / "report.json").read_text())
    assert report["seeds"] == old["seeds"]
    assert [s["auroc"] for s in report["per_seed"]] == pytest.approx([s["auroc"] for s in old["per_seed"]], abs=1e-6)
    assert report["final"]["auroc"] == pytest.approx(old["final"]["auroc"], abs=1e-6)


def test_an_old_study_goes_on_from_its_own_space_file(legacy: Path):
    # Keys added to the space schema since (left unset here) must not make it "a different search space".
    storage = f"sqlite:///{legacy / 'legacy.db'}"
    more = invoke("optimize", "--space", legacy / "space.yaml", "--storage", storage, "--n-trials", "1")
    assert more.exit_code == 0, more.output
    listed = invoke("trials", "--study", "legacy", "--storage", storage)
    assert listed.stdout.count("COMPLETE") == 4, listed.stdout
