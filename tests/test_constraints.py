"""study.constraints: only trials meeting every bound count as the best, for best, trials, refit and report."""

from __future__ import annotations

import json

from tests.conftest import invoke, tiny_space, write_space
from tuner.final.ensemble import pick_members
from tuner.search import feasible, load_existing_study


def _space(lesion_npz, name: str, constraints: dict | None = None) -> dict:
    study = {"name": name, "n_trials": 8, "sampler": {"name": "random", "seed": 3}, "artifacts": False}
    return tiny_space(
        study={**study, **({"constraints": constraints} if constraints else {})},
        data={"source": str(lesion_npz), "image_size": 16, "label_aliases": {"0": "benign", "1": "malignant"}},
        train={"max_epochs": 3},
        params={**tiny_space()["params"], "dropout": {"low": 0.0, "high": 0.6}},
    )


def test_best_and_refit_pick_the_best_trial_within_the_constraints(workdir, lesion_npz):
    free = invoke("optimize", "--space", write_space(workdir / "free.yaml", _space(lesion_npz, "free")))
    assert free.exit_code == 0, free.output
    done = [t for t in load_existing_study("free", None).trials if t.state.name == "COMPLETE"]
    overall = max(done, key=lambda t: t.value)
    # A bound the best trial misses and another trial meets, on whichever operating-point metric allows one.
    metric, bound = next(
        (m, (overall.user_attrs["val_at_threshold"][m] + higher) / 2)
        for m in ("recall", "specificity", "precision", "f1")
        for higher in [max(t.user_attrs["val_at_threshold"][m] for t in done)]
        if higher > overall.user_attrs["val_at_threshold"][m]
    )
    constraints = {f"val_{metric}": {"min": bound}}
    space = write_space(workdir / "bounded.yaml", _space(lesion_npz, "bounded", constraints))
    result = invoke("optimize", "--space", space)
    assert result.exit_code == 0, result.output

    bounded = load_existing_study("bounded", None)
    trials = [t for t in bounded.trials if t.state.name == "COMPLETE"]
    assert [t.value for t in trials] == [t.value for t in done]  # the same trials, seeded, now judged
    for t in trials:  # handed to Optuna's constraint mechanism, which TPE and GP sample with
        met = t.user_attrs["val_at_threshold"][metric] >= bound
        assert feasible(t) is met and (t.constraints[f"val_{metric}"] <= 0) is met
        assert "feasible" not in t.user_attrs  # stored once: Optuna's constraints
    expected = max((t for t in trials if feasible(t)), key=lambda t: t.value)
    assert expected.number != overall.number

    best = invoke("best", "--study", "bounded", "--json")
    assert best.exit_code == 0 and json.loads(best.stdout)["number"] == expected.number
    shown = invoke("best", "--study", "bounded")
    assert "within study.constraints" in shown.stdout
    table = invoke("trials", "--study", "bounded")
    assert "outside study.constraints" in table.stdout
    refit = invoke("refit", "--study", "bounded", "--best", "--bootstrap", "50")
    assert refit.exit_code == 0, refit.output
    report = json.loads((workdir / "studies" / "bounded" / "refit" / "report.json").read_text())
    assert report["trial"] == expected.number and report["constraint_values"][f"val_{metric}"] >= bound
    # --top-k rescoring draws its candidates from within the constraints too.
    feasible_ranked = [t.number for t in sorted((t for t in trials if feasible(t)), key=lambda t: -t.value)]
    top = invoke(
        "refit", "--study", "bounded", "--top-k", "2", "--bootstrap", "20", "--out", "topk", "--allow-test-reuse"
    )
    assert top.exit_code == 0, top.output
    rescored = json.loads((workdir / "topk" / "report.json").read_text())["rescoring"]
    assert [r["trial"] for r in rescored] == feasible_ranked[:2]
    # So do an ensemble's members: each study's K best within its constraints, or with --per-model each
    # architecture's best (one architecture here).
    free_study = load_existing_study("free", None)
    members = pick_members([bounded, free_study], top_k=3, per_model=False)
    assert [m.trial.number for m in members if m.study is bounded] == feasible_ranked[:3]
    per_model = pick_members([bounded, free_study], top_k=3, per_model=True)
    assert [m.trial.number for m in per_model] == [expected.number, overall.number]
    study_report = invoke("report", "--study", "bounded")
    assert study_report.exit_code == 0
    top = json.loads((workdir / "studies" / "bounded" / "report" / "report.json").read_text())["top_trials"]
    assert top[0]["number"] == expected.number and overall.number in [t["number"] for t in top if not t["feasible"]]


def test_no_feasible_trial_is_said_plainly(workdir, lesion_npz):
    space = _space(lesion_npz, "impossible", {"val_recall": {"min": 1.01}})
    space["study"]["n_trials"] = 2
    assert invoke("optimize", "--space", write_space(workdir / "s.yaml", space)).exit_code == 0
    for command in (("best", "--study", "impossible"), ("refit", "--study", "impossible", "--best")):
        result = invoke(*command)
        assert result.exit_code == 2
        assert "none of the 2 completed trials of study 'impossible' meets its constraints (val_recall >= 1.01)" in (
            result.stderr
        )
    assert not (workdir / "studies" / "impossible" / "refit").exists()


def test_a_constraint_needs_a_bound(workdir, lesion_npz):
    space = _space(lesion_npz, "bad", {"val_recall": {}})
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 2 and "study.constraints.val_recall" in result.stderr
    assert "a constraint needs min, max or both" in result.stderr
