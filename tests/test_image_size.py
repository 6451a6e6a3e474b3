"""image_size as a hyperparameter: each size decoded once, trials at each size, refit at the trial's size."""

from __future__ import annotations

import json

from tests.conftest import invoke, tiny_space, write_space
from tuner.search.storage import load_existing_study
from tuner.train.checkpoint import load_model


def test_searched_image_size_decodes_each_size_once_and_refits_at_the_trials_size(workdir, lesion_npz):
    space = tiny_space(
        study={"n_trials": 6, "sampler": {"name": "random", "seed": 1}, "artifacts": False},
        data={"source": str(lesion_npz), "image_size": 16, "label_aliases": {"0": "benign", "1": "malignant"}},
        params={**tiny_space()["params"], "image_size": {"choices": [16, 24]}},
    )
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    study = load_existing_study("tiny", None)
    sizes = [t.user_attrs["hparams"]["image_size"] for t in study.trials]
    assert sorted(set(sizes)) == [16, 24] and len(sizes) == 6

    # One decode per split and size, whatever the number of trials and epochs: train and val at 16 and
    # at 24 (never the test split), each announced once.
    decodes = [line for line in result.stderr.splitlines() if "once into the cache" in line]
    assert len(decodes) == 4, result.stderr
    assert sum("at 24px" in line for line in decodes) == 2 and not any("test" in line for line in decodes)
    cached = sorted((workdir / "studies" / "cache").glob("*.npy"))
    again = invoke("optimize", "--space", workdir / "s.yaml", "--n-trials", "2")
    assert again.exit_code == 0, again.output
    assert "once into the cache" not in again.stderr and sorted((workdir / "studies" / "cache").glob("*.npy")) == cached

    # Refit a trial that ran at 24 px: it trains, tests and saves at 24 px.
    at_24 = next(t.number for t in study.trials if t.user_attrs["hparams"]["image_size"] == 24)
    refit = invoke("refit", "--study", "tiny", "--trial", str(at_24), "--bootstrap", "50")
    assert refit.exit_code == 0, refit.output
    out = workdir / "studies" / "tiny" / "refit"
    assert load_model(out / "model.pt").image_size == 24
    evaluated = invoke("evaluate", "--model", out / "model.pt", "--data", lesion_npz, "--bootstrap", "50")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((out / "report.json").read_text())
    ev = json.loads((out / "evaluate" / "report.json").read_text())
    assert ev["metrics"]["auroc"] == report["final"]["auroc"]
