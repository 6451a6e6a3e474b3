"""The Python API as a notebook uses it: a space as a dict, a study and a final model as Python objects,
images in every form a notebook holds them, errors as exceptions; and the same numbers the commands give."""

from __future__ import annotations

import csv
import json
import logging
import runpy
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

import tuner
from tests.conftest import invoke, tiny_space
from tuner.final import EvaluationReport, RefitReport

ROOT = Path(__file__).parents[1]


def _space(npz) -> dict:
    return tiny_space(
        study={"n_trials": 2, "artifacts": False, "description": "Triage of dermoscopic lesions (test fixture)."},
        data={"source": str(npz), "image_size": 16, "label_aliases": {"0": "benign", "1": "malignant"}},
        train={"max_epochs": 2},
    )


def test_a_notebook_optimizes_refits_and_predicts_through_the_api(workdir, lesion_npz, caplog):
    space = _space(lesion_npz)
    with caplog.at_level(logging.INFO):
        study = tuner.optimize(space)
    assert isinstance(study, optuna.Study) and study.study_name == "tiny"
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    # Off a terminal and a notebook, every epoch is a log line (a long cell's log is never silent).
    assert "trial 0 epoch 2/2 val_auroc=" in caplog.text
    stored = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db")
    assert len(stored.get_trials()) == 2, "stored where the command stores it"
    assert len(tuner.optimize(space, n_trials=1, progress=False).get_trials()) == 3, "each call adds trials"

    caplog.clear()
    with caplog.at_level(logging.INFO):
        model = tuner.refit(study, seeds=2, bootstrap=50)
    assert "network 2/2 epoch 2/2 train_loss=" in caplog.text
    assert isinstance(model, tuner.FinalModel)
    assert model.path.resolve() == workdir / "studies" / "tiny" / "refit" / "model.pt"
    assert model.classes == ("benign", "malignant") and model.positive_class == "malignant"
    report = model.report
    assert isinstance(report, RefitReport) and len(report.seeds) == 2 and report.networks == 2
    assert report.threshold == model.threshold and report.final_summary["auroc"].ci_low is not None
    [read] = optuna.load_study(study_name="tiny", storage="sqlite:///studies/tiny.db").user_attrs["test_set_reads"]
    assert read["command"] == "tuner.refit('tiny', seeds=2, bootstrap=50)", "the audit names the Python call"

    test = np.load(lesion_npz)["test_images"]  # N×H×W×C, as MedMNIST and PIL hold images
    probs = model.predict_proba(test)
    with (model.path.parent / "predictions.csv").open() as fh:
        written = [[float(r["p_benign"]), float(r["p_malignant"])] for r in csv.DictReader(fh) if r["model"] == "final"]
    np.testing.assert_allclose(probs, written, atol=2e-6)
    assert probs.shape == (len(test), 2) and np.allclose(probs.sum(1), 1, atol=1e-6)

    files = []
    for i in range(3):
        files.append(workdir / f"img{i}.png")
        Image.fromarray(test[i]).save(files[-1])
    as_pil = [Image.open(f) for f in files]
    mixed = [files[0], as_pil[1], test[2]]  # a path, a PIL image and one H×W×C array
    for form in (files, [str(f) for f in files], as_pil, mixed, test[:3]):
        np.testing.assert_allclose(model.predict_proba(form), probs[:3], atol=1e-6)
    predicted = invoke("predict", "--model", model.path, *files)
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader(predicted.stdout.splitlines()))
    assert model.predict(files) == [r["label"] for r in rows]
    np.testing.assert_allclose([float(r["p_malignant"]) for r in rows], probs[:3, 1], atol=1e-5)
    expected = ["malignant" if p >= model.threshold else "benign" for p in probs[:, 1]]
    assert model.predict(test) == expected

    _check_card_against_report(model.path.parent)

    loaded = tuner.load_model(model.path)
    assert loaded.report == report, "report.json beside model.pt is read back as the same typed report"
    np.testing.assert_array_equal(loaded.predict_proba(test), probs)
    evaluation = loaded.evaluate(lesion_npz, bootstrap=50)
    assert isinstance(evaluation, EvaluationReport) and evaluation.split == "test"
    assert evaluation.summary["auroc"].mean == pytest.approx(report.final_summary["auroc"].mean, abs=1e-6)

    with pytest.raises(tuner.DataError, match="image file\\(s\\) not found: .*missing.png"):
        model.predict_proba([files[0], workdir / "missing.png"])
    with pytest.raises(tuner.TunerError, match="image arrays must be uint8"):
        model.predict_proba(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(tuner.TunerError, match="channels last"):
        model.predict_proba(np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(tuner.TunerError, match="not int"):
        model.predict_proba([3])  # type: ignore[list-item]


def test_api_mistakes_are_exceptions_with_the_commands_message(workdir, lesion_npz, tmp_path):
    space = _space(lesion_npz)
    with pytest.raises(tuner.SpaceError, match=r"<dict>: params\.lr"):
        tuner.optimize({**space, "params": {**space["params"], "lr": {"low": 1.0}}}, progress=False)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(tuner.DataError, match="data source does/not/exist does not exist"):
        tuner.optimize(space, data="does/not/exist", progress=False)
    assert signal.getsignal(signal.SIGINT) is handler, "the caller's Ctrl-C handler is given back"
    with pytest.raises(tuner.StorageError, match="no study 'nothing'"):
        tuner.refit("nothing", progress=False)
    assert not list(workdir.glob("studies/*.db")), "nothing half-written"

    fixed = tuner.load_space(space, set=["params.lr=0.005", "study.n_trials=1"])
    assert fixed.study.n_trials == 1 and fixed.params["lr"] == 0.005
    as_dict = tuner.load_space(space, set={"params.lr": 0.005, "study.n_trials": 1})
    assert as_dict.fingerprint() == fixed.fingerprint()


def test_the_example_script_runs_as_the_readme_says(workdir, capsys):
    runpy.run_path(str(ROOT / "examples" / "api.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "best trial" in printed and "test AUROC" in printed and "2 networks" in printed
    assert len(optuna.load_study(study_name="api_example", storage="sqlite:///studies/api_example.db").trials) == 3


def test_the_quickstart_notebook_runs_with_small_budgets(workdir):
    """examples/quickstart.ipynb as committed (no outputs), executed by a Jupyter kernel with its tagged
    parameters cell replaced by small budgets: any error in any cell fails here."""
    import nbformat
    import yaml
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "committed without outputs"
    [parameters] = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert 'space = "../search_spaces/quickstart.yaml"' in parameters.source
    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    space["data"].update(image_size=32, synthetic={"n_images": 600})
    (workdir / "small.yaml").write_text(yaml.safe_dump(space))
    parameters.source = 'space = "small.yaml"\nn_trials = 3\nmax_epochs = 2\nseeds = 1'

    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()

    outputs = [[o for o in cell.outputs if o.output_type != "stream" or o.name == "stdout"] for cell in code]
    warnings = [o.text for cell in code for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not [w for w in warnings if "Warning" in w], warnings
    data = [{key for o in cell_outputs for key in o.get("data", {})} for cell_outputs in outputs]
    assert "text/html" in data[code.index(parameters) + 2], "the trials as a DataFrame"
    assert sum("image/png" in kinds for kinds in data) == 6, (
        "three Optuna plots, the confusion matrix, the gallery, the maps"
    )
    assert (workdir / "studies" / "quickstart" / "refit" / "model.pt").is_file()
    assert len(optuna.load_study(study_name="quickstart", storage="sqlite:///studies/quickstart.db").trials) == 3


def _check_card_against_report(folder: Path) -> None:
    """MODEL_CARD.md says what report.json holds: each figure as the report has it."""
    card = (folder / "MODEL_CARD.md").read_text()
    report = json.loads((folder / "report.json").read_text())
    assert "## Intended use\n\nTriage of dermoscopic lesions (test fixture)." in card
    for section in ("Data", "Model", "Operating point", "Test results", "Test-set reads", "Versions"):
        assert f"\n## {section}\n" in card
    assert f"- fingerprint: `{report['data_fingerprint']}`" in card and len(report["data_fingerprint"]) >= 8
    for split, counts in report["class_counts"].items():
        assert f"| {split} | {' | '.join(map(str, counts))} |" in card
    assert sum(report["class_counts"]["test"]) == report["n_test"]
    assert f"Threshold {report['threshold']:.4f} on the probability of malignant" in card
    for name, value in report["params"].items():  # significant digits: a small learning rate is not 0.0000
        assert f"| {name} | {value:.4g} |" in card
    for name, e in report["final_summary"].items():
        ci = "" if e["ci_low"] is None else f"{e['ci_low']:.4f} – {e['ci_high']:.4f}"
        assert f"| {name} | {e['mean']:.4f} | {ci} |" in card, name
    for name, c in report["final"]["per_class"].items():
        assert f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']} |" in card
    gap = report["final_summary"]["auroc"]["mean"] - report["validation_value"]
    assert (
        f"against auroc {report['final_summary']['auroc']['mean']:.4f} (the final model, on test): {gap:+.4f}" in card
    )
    assert f"were read {len(report['test_set_reads'])} time(s)" in card
    assert all(f"(`{read['command']}`)" in card for read in report["test_set_reads"])
    assert all(f"- {k}: {v}" in card for k, v in report["versions"].items()) and "- torch: " in card


@pytest.mark.parametrize("logger", ["tuner.optimize", "tuner.refit"])
def test_off_a_terminal_a_script_without_logging_still_sees_each_epoch(logger, monkeypatch, capsys, caplog):
    from tuner.progress import NetworkProgress, StudyProgress

    space = tuner.load_space(tiny_space())
    monkeypatch.setattr(logging.getLogger(logger), "propagate", False)  # as in a script: no handler anywhere
    for quiet in (False, True):
        with StudyProgress(space, total=1, quiet=quiet) as study, NetworkProgress(what="networks", quiet=quiet) as nets:
            study.epoch(0, 1, 0.75)
            nets.epoch(1, 2, 1, 3, {"train_loss": 0.5})
        said = capsys.readouterr().err
        line = (
            "trial 0 epoch 1/2 val_auroc=0.75" if logger == "tuner.optimize" else "network 1/2 epoch 1/3 train_loss=0.5"
        )
        assert (line in said) is not quiet, said  # progress=False (quiet): nothing
    assert logger not in caplog.text, "printed, not logged"
