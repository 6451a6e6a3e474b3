from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.conftest import invoke, tiny_space, write_lesion_npz, write_space
from tuner.data import load_dataset
from tuner.search.storage import load_existing_study
from tuner.train.checkpoint import load_model
from tuner.train.metrics import choose_threshold


def _space(npz: Path, **study) -> dict:
    return tiny_space(
        study={"n_trials": 3, "threshold": {"rule": "max_f1"}, "save_checkpoints": True, **study},
        data={"source": str(npz), "image_size": 16, "label_aliases": {"0": "benign", "1": "malignant"}},
        train={"max_epochs": 3},
    )


@pytest.fixture(scope="module")
def optimized_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small study for the whole module, made as a user would; each test gets its own copy of it."""
    root = tmp_path_factory.mktemp("optimized")
    space = write_space(root / "s.yaml", _space(write_lesion_npz(root / "lesions.npz")))
    here = os.getcwd()
    os.chdir(root)  # studies/ lands here
    try:
        result = invoke("optimize", "--space", space)
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def optimized(optimized_once: Path, workdir: Path) -> optuna.Study:
    """The module's study, copied into this test's folder: refits and test-set reads stay the test's own."""
    shutil.copytree(optimized_once / "studies", workdir / "studies")
    return load_existing_study("tiny", None)


def _read_predictions(path: Path) -> dict[str, np.ndarray]:
    """Probabilities per model: ``seed N`` rows per seed, ``final`` for the saved model."""
    rows: dict[str, list] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["model"], []).append(row)
    return {name: np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in rs]) for name, rs in rows.items()}


def test_refit_reads_the_test_set_once_and_reports_honestly(optimized, workdir, lesion_npz, monkeypatch):
    assert optimized.user_attrs["test_set_reads"] == []
    best = optimized.best_trial
    typed = ["refit", "--study", "tiny", "--best", "--seeds", "2", "--bootstrap", "200"]
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/tuner", *typed])  # as the console script sets it
    began = datetime.now(timezone.utc).replace(microsecond=0)
    result = invoke(*typed)
    assert result.exit_code == 0, result.output
    assert "test set, n=70" in result.stdout and "auroc" in result.stdout

    out = workdir / "studies" / "tiny" / "refit"
    report = json.loads((out / "report.json").read_text())
    # The refit replays exactly the trial's hyperparameters, epochs and threshold.
    assert report["trial"] == best.number and report["hparams"] == best.user_attrs["hparams"]
    assert report["params"] == best.params and report["epochs"] == best.user_attrs["best_epoch"]
    assert report["threshold"] == best.user_attrs["threshold"]
    predictions = _read_predictions(out / "predictions.csv")
    final = predictions.pop("final")
    np.testing.assert_allclose(final, np.mean(list(predictions.values()), 0), atol=2e-6)
    target = (np.load(lesion_npz)["test_labels"][:, 0] == 1).astype(int)
    assert report["final"]["auroc"] == pytest.approx(roc_auc_score(target, final[:, 1]), abs=1e-4)
    assert report["final"]["networks"] == 2 and report["final"]["threshold"] == best.user_attrs["threshold"]
    assert "final model = the 2 networks averaged (2 seed(s))" in result.stdout
    assert report["seeds"] == [best.user_attrs["seed"], best.user_attrs["seed"] + 1000]
    assert report["n_train"] == 290 and report["n_test"] == 70
    for name in ("auroc", "auprc", "recall", "specificity", "f1", "mcc"):
        s = report["summary"][name]
        assert s["sd"] >= 0 and (name == "mcc" or s["ci_low"] <= s["ci_high"])
    for file in ("model.pt", "predictions.csv", "report.md", "confusion_matrix.png", "roc_pr.png", "trial_curves.png"):
        assert (out / file).exists(), file

    # AUROC in the report equals scikit-learn's on the saved predictions.
    test = np.load(lesion_npz)["test_labels"][:, 0]
    for name, probs in predictions.items():
        per_seed = next(m for m in report["per_seed"] if f"seed {m['seed']}" == name)
        assert per_seed["auroc"] == pytest.approx(roc_auc_score(test == 1, probs[:, 1]), abs=1e-4)

    # The audit shows exactly one read of the test labels, by this refit.
    reads = load_existing_study("tiny", None).user_attrs["test_set_reads"]
    assert len(reads) == 1 and reads[0]["trial"] == best.number and reads[0]["what"] == "refit"
    assert reads[0]["command"] == "tuner " + " ".join(typed) and reads[0]["seeds"] == report["seeds"]
    assert began <= datetime.fromisoformat(reads[0]["when"]) <= datetime.now(timezone.utc)

    # Output is never overwritten silently.
    again = invoke("refit", "--study", "tiny", "--bootstrap", "50")
    assert again.exit_code == 2 and "already holds an earlier output" in again.stderr


def test_refitting_another_trial_is_test_set_reuse(optimized, workdir):
    best = optimized.best_trial.number
    other = next(t.number for t in optimized.trials if t.number != best)
    assert invoke("refit", "--study", "tiny", "--bootstrap", "50").exit_code == 0
    refused = invoke("refit", "--study", "tiny", "--trial", str(other), "--out", "studies/other", "--bootstrap", "50")
    assert refused.exit_code == 2
    assert f"already used to evaluate trial(s) {best}" in refused.stderr and "--allow-test-reuse" in refused.stderr
    assert not (workdir / "studies" / "other").exists()
    allowed = invoke(
        "refit",
        "--study",
        "tiny",
        "--trial",
        str(other),
        "--out",
        "studies/other",
        "--allow-test-reuse",
        "--bootstrap",
        "50",
    )
    assert allowed.exit_code == 0, allowed.output
    assert [r["trial"] for r in load_existing_study("tiny", None).user_attrs["test_set_reads"]] == [best, other]


def test_threshold_is_chosen_on_validation(optimized, lesion_npz, workdir):
    """Rebuild each trial's best-epoch model from its checkpoint artifact and redo the choice on validation."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    from tuner.train.build import build_classifier
    from tuner.train.hparams import Hyperparameters

    store = FileSystemArtifactStore(optimized.user_attrs["artifact_dir"])
    ds = load_dataset(
        str(lesion_npz),
        image_size=16,
        cache_dir=workdir / "studies" / "cache",
        label_aliases={"0": "benign", "1": "malignant"},
    )
    for trial in optimized.trials:
        meta = {m.filename: m for m in get_all_artifact_meta(trial, storage=optimized._storage)}
        assert {
            "curves.png",
            "val_roc_pr.png",
            "val_confusion_matrix.png",
            "val_per_class.csv",
            "best_checkpoint.pt",
        } <= set(meta)
        path = workdir / f"ckpt{trial.number}.pt"
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta["best_checkpoint.pt"].artifact_id)
        ckpt = torch.load(path, weights_only=True)
        model = build_classifier(Hyperparameters(**ckpt["hparams"]), num_classes=2, channels=3, image_size=16)
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        with torch.no_grad():
            x = (torch.from_numpy(np.array(ds.val.images)).float() / 255 - 0.5) / 0.5
            probs = model(x).softmax(1)
        expected = choose_threshold(probs, torch.from_numpy(ds.val.labels), positive_index=1, rule="max_f1")
        assert trial.user_attrs["threshold"] == pytest.approx(expected, abs=1e-5)
    assert any(t.user_attrs["threshold"] != 0.5 for t in optimized.trials)


def test_saved_model_evaluates_and_predicts_identically_after_reload(optimized, workdir, lesion_npz, tmp_path):
    assert invoke("refit", "--study", "tiny", "--bootstrap", "50").exit_code == 0
    out = workdir / "studies" / "tiny" / "refit"
    saved = load_model(out / "model.pt")
    test = np.load(lesion_npz)
    images = test["test_images"].transpose(0, 3, 1, 2)
    reloaded = saved.probabilities(images).numpy()
    written = _read_predictions(out / "predictions.csv")
    np.testing.assert_allclose(reloaded, written["final"], atol=2e-6)
    np.testing.assert_allclose(reloaded, written[f"seed {saved.info['seed']}"], atol=2e-6)  # one seed: one network

    evaluated = invoke(
        "evaluate", "--model", out / "model.pt", "--data", lesion_npz, "--out", "evaluation", "--bootstrap", "50"
    )
    assert evaluated.exit_code == 0, evaluated.output
    ev = json.loads((workdir / "evaluation" / "report.json").read_text())
    refit_report = json.loads((out / "report.json").read_text())
    assert ev["split"] == "test" and ev["metrics"]["auroc"] == pytest.approx(
        refit_report["per_seed"][0]["auroc"], abs=1e-6
    )
    assert ev["metrics"]["confusion_matrix"] == refit_report["per_seed"][0]["confusion_matrix"]
    auroc_row = next(line for line in evaluated.stdout.splitlines() if line.startswith("│ auroc"))
    assert [c.strip() for c in auroc_row.split("│")[1:-1]][1] == f"{ev['metrics']['auroc']:.4f}"
    assert "value" in evaluated.stdout and " sd " not in evaluated.stdout, "one model: a value, not a spread"

    from PIL import Image

    files = []
    for i in range(4):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(test["test_images"][i]).save(files[-1])
    predicted = invoke("predict", "--model", out / "model.pt", *files)
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader(predicted.stdout.splitlines()))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row, expected in zip(rows, reloaded[:4], strict=True):
        assert float(row["p_malignant"]) == pytest.approx(expected[1], abs=1e-5)
        assert row["label"] == ("malignant" if expected[1] >= saved.threshold else "benign")


def test_fold_ensemble_with_tta_is_saved_and_reproduced_by_evaluate(optimized, workdir, lesion_npz, tmp_path):
    """--folds K --tta flip: K networks per seed, a threshold from their out-of-fold predictions, and one
    saved model (every network, every view) that evaluate and predict reproduce to the last digit."""
    result = invoke("refit", "--study", "tiny", "--seeds", "2", "--folds", "3", "--tta", "flip", "--bootstrap", "100")
    assert result.exit_code == 0, result.output
    out = workdir / "studies" / "tiny" / "refit"
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["networks"] == 6 and report["folds"] == 3 and report["tta"] == "flip"
    assert "final model = the 6 networks averaged (3 folds × 2 seeds, TTA flip)" in result.stdout
    assert "out-of-fold" in report["threshold_rule"]

    # Every train+val item has one out-of-fold probability per seed; the thresholds are the study's
    # rule (max_f1) applied to them: per seed, and to their mean for the final model.
    oof = _read_predictions(out / "oof_predictions.csv")
    ds = load_dataset(
        str(lesion_npz),
        image_size=16,
        cache_dir=workdir / "studies" / "cache",
        label_aliases={"0": "benign", "1": "malignant"},
    )
    tv_target = torch.from_numpy(np.concatenate([ds.train.labels, ds.val.labels]))
    assert {len(v) for v in oof.values()} == {len(tv_target)} == {report["n_train"]}
    positive = ds.class_names.index("malignant")
    for row in report["per_seed"]:
        probs = torch.from_numpy(oof[f"seed {row['seed']}"]).float()
        expected = choose_threshold(probs, tv_target, positive_index=positive, rule="max_f1")
        assert row["threshold"] == pytest.approx(expected, abs=1e-5)
    mean_oof = torch.from_numpy(np.mean(list(oof.values()), 0)).float()
    expected = choose_threshold(mean_oof, tv_target, positive_index=positive, rule="max_f1")
    assert report["threshold"] == report["final"]["threshold"] == pytest.approx(expected, abs=1e-5)

    # The saved model is the final one: all six networks, flip TTA, the final threshold.
    saved = load_model(out / "model.pt")
    assert len(saved.models) == 6 and saved.tta == "flip" and saved.threshold == report["threshold"]
    images = np.load(lesion_npz)["test_images"].transpose(0, 3, 1, 2)
    final = _read_predictions(out / "predictions.csv")["final"]
    np.testing.assert_allclose(saved.probabilities(images).numpy(), final, atol=2e-6)
    flipped = saved.probabilities(images[..., ::-1].copy()).numpy()  # TTA flip: left-right symmetric
    np.testing.assert_allclose(flipped, final, atol=1e-5)

    evaluated = invoke(
        "evaluate", "--model", out / "model.pt", "--data", lesion_npz, "--out", "evaluation", "--bootstrap", "100"
    )
    assert evaluated.exit_code == 0, evaluated.output
    ev = json.loads((workdir / "evaluation" / "report.json").read_text())
    for name in ("auroc", "auprc", "recall", "specificity", "f1", "confusion_matrix"):
        assert ev["metrics"][name] == report["final"][name], name
    # The averaged networks beat nothing by construction, but they are reported beside one network alone.
    assert set(report["single_network"]) >= {"auroc", "recall"}

    from PIL import Image

    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.load(lesion_npz)["test_images"][i]).save(files[-1])
    predicted = invoke("predict", "--model", out / "model.pt", *files)
    assert predicted.exit_code == 0, predicted.output
    for row, expected_row in zip(csv.DictReader(predicted.stdout.splitlines()), final[:3], strict=True):
        assert float(row["p_malignant"]) == pytest.approx(expected_row[1], abs=1e-5)


def test_refit_with_tta_flips_averages_the_four_flipped_views(optimized, workdir, lesion_npz):
    """--tta flips: the saved model's probability for an image is the mean of its network's probabilities
    for the image as it is, flipped left-right, up-down and both (computed here with numpy's flips)."""
    import dataclasses

    result = invoke("refit", "--study", "tiny", "--tta", "flips", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    saved = load_model(workdir / "studies" / "tiny" / "refit" / "model.pt")
    assert saved.tta == "flips" and len(saved.models) == 1
    images = np.load(lesion_npz)["test_images"][:16].transpose(0, 3, 1, 2)
    plain = dataclasses.replace(saved, tta="none")
    views = [images, images[..., ::-1], images[..., ::-1, :], images[..., ::-1, ::-1]]
    by_hand = torch.stack([plain.probabilities(np.ascontiguousarray(v)) for v in views]).mean(0)
    torch.testing.assert_close(saved.probabilities(images), by_hand, atol=1e-6, rtol=0)
    assert not torch.allclose(plain.probabilities(images), by_hand, atol=1e-4)  # the views do differ


def test_one_seed_of_folds_is_shown_as_the_final_model_beside_one_network(optimized, workdir):
    result = invoke("refit", "--study", "tiny", "--folds", "2", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "metric" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["metric", "final (2 networks)", "95% CI", "one network"]
    report = json.loads((workdir / "studies" / "tiny" / "refit" / "report.json").read_text())
    auroc = next(line for line in result.stdout.splitlines() if line.startswith("│ auroc"))
    cells = [c.strip() for c in auroc.split("│")[1:-1]]
    assert cells[1] == f"{report['final_summary']['auroc']['mean']:.4f}" == f"{report['summary']['auroc']['mean']:.4f}"
    assert cells[3] == f"{report['single_network']['auroc']['mean']:.4f}"


def test_refit_rejects_bad_folds_and_tta(optimized):
    for args, message in (
        (("--folds", "1"), "folds must be between 2 and 20, but got folds=1"),
        (("--tta", "rotate"), "tta must be one of none, flip, flips, but got tta='rotate'"),
    ):
        result = invoke("refit", "--study", "tiny", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert load_existing_study("tiny", None).user_attrs["test_set_reads"] == []


def test_study_report(optimized, workdir):
    result = invoke("report", "--study", "tiny")
    assert result.exit_code == 0, result.output
    folder = workdir / "studies" / "tiny" / "report"
    summary = json.loads((folder / "report.json").read_text())
    assert summary["top_trials"][0]["number"] == optimized.best_trial.number
    assert (folder / "optimization_history.png").exists() and (folder / "report.md").exists()
    # This study searches lr alone: all of the importance is its.
    assert summary["importances"] == {"lr": pytest.approx(1.0)} and (folder / "importances.png").exists()


def test_study_report_ranks_the_parameter_that_decides_the_value_first(tmp_path):
    """On a study whose value is x alone (y is noise), the report's importances (Optuna's fANOVA) give x
    nearly all of it; they are drawn and tabled."""
    from tuner.final.report import study_report

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0 * t.suggest_float("y", 0, 1), n_trials=20)
    summary = study_report(study, tmp_path)
    importances = summary["importances"]
    assert set(importances) == {"x", "y"} and importances["x"] > 0.9, importances
    assert sum(importances.values()) == pytest.approx(1.0, abs=1e-6)
    table = (tmp_path / "report.md").read_text()
    assert all(f"| {name} | {value:.3f} |" in table for name, value in importances.items())
    assert (tmp_path / "importances.png").exists()


def test_cross_validated_objective_reports_per_fold(workdir, lesion_npz):
    space = _space(lesion_npz, cv_folds=3, pruner={"name": "wilcoxon", "n_startup_steps": 1})
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    study = load_existing_study("tiny", None)
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            folds = trial.user_attrs["fold_values"]
            assert len(folds) == 3 and trial.value == pytest.approx(float(np.mean(folds)))
            assert sorted(trial.intermediate_values) == [0, 1, 2]
            assert trial.user_attrs["best_epoch"] == int(np.median(trial.user_attrs["fold_best_epochs"]))
            assert 0 < trial.user_attrs["threshold"] < 1
    assert invoke("refit", "--study", "tiny", "--bootstrap", "50").exit_code == 0


def test_top_k_rescoring_picks_by_the_mean_over_new_seeds(optimized, workdir):
    result = invoke("refit", "--study", "tiny", "--top-k", "2", "--seeds", "2", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "studies" / "tiny" / "refit" / "report.json").read_text())
    rows = report["rescoring"]
    assert len(rows) == 2 and all(len(r["rescored"]) == 2 for r in rows)
    chosen = max(rows, key=lambda r: r["mean"])
    assert report["trial"] == chosen["trial"] and "<- chosen" in result.stdout
    ranked = sorted(optimized.trials, key=lambda t: -t.value)[:2]
    assert [r["trial"] for r in rows] == [t.number for t in ranked]
    assert load_existing_study("tiny", None).user_attrs["rescoring"]["chosen"] == chosen["trial"]


def test_ensemble_of_two_studies_reports_members_and_their_average(optimized, workdir, lesion_npz):
    mlp = _space(lesion_npz, name="mlp")
    mlp["data"]["image_size"] = 20  # members may differ in image size; the test items stay the same
    mlp["params"] = {"model": "mlp", "hidden_sizes": [32], "lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    assert invoke("optimize", "--space", write_space(workdir / "mlp.yaml", mlp)).exit_code == 0

    result = invoke("ensemble", "--study", "tiny", "--study", "mlp", "--top-k", "2", "--bootstrap", "50")
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.stdout and "tiny#" in result.stdout and "mlp#" in result.stdout

    out = workdir / "studies" / "tiny" / "ensemble"
    report = json.loads((out / "report.json").read_text())
    members = report["members"]
    assert [m["study"] for m in members] == ["tiny", "tiny", "mlp", "mlp"]
    assert {m["model"] for m in members} == {"small_cnn", "mlp"}
    for m in members:  # each member is its trial, replayed exactly (CPU), and at its own frozen threshold
        study = load_existing_study(m["study"], None)
        trial = study.trials[m["trial"]]
        assert m["replayed_validation_value"] == pytest.approx(trial.value, abs=1e-6)
        assert m["threshold"] == trial.user_attrs["threshold"]
        assert study.user_attrs["test_set_reads"][-1]["what"] == "ensemble"

    rows: dict[str, list] = {}
    with (out / "predictions.csv").open() as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["model"], []).append(float(row["p_malignant"]))
    probs = {name: np.array(v) for name, v in rows.items()}
    np.testing.assert_allclose(probs["ensemble"], np.mean([probs[m["name"]] for m in members], 0), atol=1e-5)
    target = (np.load(lesion_npz)["test_labels"][:, 0] == 1).astype(int)
    assert report["ensemble"]["metrics"]["auroc"] == pytest.approx(roc_auc_score(target, probs["ensemble"]), abs=1e-4)
    assert "## Members and ensemble on the test split" in (out / "report.md").read_text()

    # A member's saved model is the refit model: evaluating it alone gives its row's test AUROC.
    first = members[0]
    model = out / f"model-{first['study']}-{first['trial']}.pt"
    evaluated = invoke("evaluate", "--model", model, "--data", lesion_npz, "--out", "ev", "--bootstrap", "20")
    assert evaluated.exit_code == 0, evaluated.output
    ev = json.loads((workdir / "ev" / "report.json").read_text())
    assert ev["metrics"]["auroc"] == pytest.approx(first["metrics"]["auroc"], abs=1e-6)

    # The test set has now judged these trials: another ensemble (or refit) of others needs consent.
    again = invoke("ensemble", "--study", "tiny", "--study", "mlp", "--top-k", "3", "--force", "--bootstrap", "20")
    assert again.exit_code == 2 and "test-set reuse" in again.stderr


def test_ensemble_refuses_studies_on_different_data(optimized, workdir):
    other = write_space(workdir / "o.yaml", tiny_space(study={"name": "other"}))
    assert invoke("optimize", "--space", other).exit_code == 0
    result = invoke("ensemble", "--study", "tiny", "--study", "other", "--top-k", "1")
    assert result.exit_code == 2
    assert "was not run on the same data, split and classes" in result.stderr


def test_replay_accepts_hyperparameters_added_since_at_their_defaults_only():
    from optuna.distributions import FloatDistribution

    from tuner.errors import TunerError
    from tuner.final.replay import replay_hparams
    from tuner.search.space import parse_space
    from tuner.train.hparams import Hyperparameters

    space = parse_space(tiny_space())
    stored = Hyperparameters(width=4, depth=2, batch_size=32, lr=0.005).model_dump(mode="json")
    del stored["pooling"]  # as if the trial ran before tuner had this hyperparameter
    trial = optuna.trial.create_trial(
        params={"lr": 0.005},
        distributions={"lr": FloatDistribution(1e-3, 1e-2, log=True)},
        value=0.9,
        user_attrs={"hparams": stored},
    )
    assert replay_hparams(trial, space).lr == 0.005
    changed = parse_space(tiny_space(params={"pooling": "max"}))
    with pytest.raises(TunerError, match=r"differs: pooling"):
        replay_hparams(trial, changed)
