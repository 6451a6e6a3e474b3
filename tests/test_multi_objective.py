"""Multi-objective studies (``study.metrics``): costs measured per trial, pruning against cheaper trials, the
Pareto front in ``trials`` / ``best``, ``refit --pick`` choosing from it, constraints and the stagnation stop.

The end-to-end studies run on a folder of lesions whose two classes differ in colour: a network learning
at lr 1e-2 brings its validation loss far below 0.69 within two epochs, one at lr 1e-5 stays at chance.
Configurations are enqueued, so which trial is cheaper and which learns is known in advance, and the cost
objective is ``params_m`` (exact), not latency (noisy at this size).
"""

from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml

from tests.conftest import invoke, make_image_folder, tiny_space, write_space
from tuner.search.keys import StudyKey, TrialKey
from tuner.search.pareto import PruneRule, judge, parse_pick
from tuner.search.storage import load_existing_study

CHEAP, MIDDLE, COSTLY = 4, 8, 32  # widths: parameters grow with them


def _space(folder, name: str, n_trials: int, **study) -> dict:
    space = tiny_space(
        study={
            "name": name,
            "metrics": ["val_loss", "params_m"],
            "n_trials": n_trials,
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
            **study,
        },
        data={"source": str(folder), "image_size": 16},
        train={"max_epochs": 4, "patience": None, "device": "cpu"},
        params={"model": "small_cnn", "width": {"choices": [CHEAP, MIDDLE, COSTLY]}, "depth": 2, "batch_size": 32},
    )
    space["params"]["lr"] = {"choices": [1e-5, 1e-2]}
    return space


def _enqueued(workdir, space: dict, configs: list[tuple[int, float]]) -> str:
    """The study created with these (width, lr) first, as a user would with optuna's enqueue_trial."""
    path = write_space(workdir / f"{space['study']['name']}.yaml", space)
    storage = f"sqlite:///{workdir}/studies/{space['study']['name']}.db"
    (workdir / "studies").mkdir(exist_ok=True)
    study = optuna.create_study(study_name=space["study"]["name"], storage=storage, directions=["minimize"] * 2)
    for width, lr in configs:
        study.enqueue_trial({"width": width, "lr": lr})
    return str(path)


@pytest.fixture
def lesions(tmp_path):
    return make_image_folder(tmp_path / "lesions", {"benign": 60, "malignant": 60})


def _front_by_hand(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        t.number
        for t in done
        if not any(all(a <= b for a, b in zip(o.values, t.values, strict=True)) and o.values != t.values for o in done)
    }


def test_a_slow_trial_worse_than_cheaper_ones_is_pruned_the_cheapest_is_kept_and_refit_picks_from_the_front(
    workdir, lesions
):
    configs = [(MIDDLE, 1e-2), (MIDDLE, 1e-2), (MIDDLE, 1e-2), (COSTLY, 1e-5), (CHEAP, 1e-5)]
    path = _enqueued(workdir, _space(lesions, "mo", len(configs)), configs)
    result = invoke("optimize", "--space", path)
    assert result.exit_code == 0, result.output
    study = load_existing_study("mo", None)
    states = [t.state.name for t in study.trials]
    # The costly network that learns nothing is worse at epoch 2 than the median of the three cheaper ones:
    # on its way to being dominated, it stops. The cheapest is just as bad, but nothing cheaper exists: kept.
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"], [
        (t.number, t.state.name, t.user_attrs.get(TrialKey.PRUNE_REASON)) for t in study.trials
    ]
    reason = study.trials[3].user_attrs[TrialKey.PRUNE_REASON]
    assert reason.startswith("pruned at epoch 2: worse than the median") and "3 trials at least as cheap" in reason
    for t in study.trials:  # each network's size, measured before it trained; the value the study holds
        assert t.user_attrs[TrialKey.COSTS]["params_m"] > 0
        if t.values:
            assert t.values[1] == t.user_attrs[TrialKey.COSTS]["params_m"]
            assert t.values[0] == t.user_attrs[TrialKey.HISTORY]["val_loss"][t.user_attrs[TrialKey.BEST_EPOCH] - 1]
    front = _front_by_hand(study.trials)
    assert 4 in front and len(front) == 2  # the cheapest, and the best of the learners
    learner = (front - {4}).pop()
    assert "Pareto front: 2 trial(s) on val_loss (minimize), params_m (minimize)" in result.stdout

    table = invoke("trials", "--study", "mo")
    assert table.exit_code == 0 and table.stdout.count("Pareto front") == 2 and "params_m" in table.stdout
    report = invoke("report", "--study", "mo")
    assert report.exit_code == 0 and "Pareto front: 2 trial(s)" in report.stdout
    assert (workdir / "studies/mo/report/pareto_front.png").stat().st_size > 10_000
    assert [t["number"] for t in json.loads((workdir / "studies/mo/report/report.json").read_text())["front"]] == [
        learner,
        4,
    ]
    best = json.loads(invoke("best", "--study", "mo", "--json").stdout)
    assert [t["number"] for t in best["front"]] == [learner, 4] and best["number"] == learner
    assert best["objectives"] == ["val_loss", "params_m"]

    cheapest = study.trials[4].values[1]
    picked = invoke("refit", "--study", "mo", "--pick", f"params_m<={cheapest * 1.01}", "--out", "pick1")
    assert picked.exit_code == 0, picked.output
    report = json.loads((workdir / "pick1" / "report.json").read_text())
    assert report["trial"] == 4 and report["objectives"] == dict(
        zip(["val_loss", "params_m"], study.trials[4].values, strict=True)
    )
    card = (workdir / "pick1" / "MODEL_CARD.md").read_text()
    assert "objectives of the chosen trial (a multi-objective study's Pareto front): val_loss " in card
    assert f"params_m {study.trials[4].values[1]:.4f}; costs measured on cpu" in card
    # a second read of the test set, said so (the study records both)
    picked = invoke("refit", "--study", "mo", "--pick", "params_m<=1", "--out", "pick2", "--allow-test-reuse")
    assert picked.exit_code == 0, picked.output
    assert json.loads((workdir / "pick2" / "report.json").read_text())["trial"] == learner  # best loss within it

    nothing = invoke("refit", "--study", "mo", "--pick", "params_m<=0.00001")
    assert nothing.exit_code == 2 and "no trial on the Pareto front meets --pick" in nothing.stderr
    assert f"trial {learner}: val_loss=" in nothing.stderr and not (workdir / "studies/mo/refit").exists()
    for bad, says in [
        ("latency_ms<=3", "'latency_ms' is not an objective of this study (val_loss, params_m)"),
        ("params_m=3", "each condition is <objective><op><number>"),
    ]:
        res = invoke("refit", "--study", "mo", "--pick", bad)
        assert res.exit_code == 2 and says in res.stderr, res.output
    both = invoke("refit", "--study", "mo", "--pick", "params_m<=1", "--trial", "0")
    assert both.exit_code == 2 and "not two" in both.stderr


def test_constraints_keep_trials_off_the_front_and_the_stagnation_stop_ends_the_study(workdir, lesions):
    # val_loss <= 0.6 at the trial's operating point: only the learners meet it. After trial 0, two trials
    # in a row bring nothing within the constraints: stop.patience 2 ends the study at 3 of 5 trials.
    configs = [(MIDDLE, 1e-2), (CHEAP, 1e-5), (CHEAP, 1e-5), (MIDDLE, 1e-2), (MIDDLE, 1e-2)]
    space = _space(lesions, "bounded", 5, constraints={"val_loss": {"max": 0.6}}, stop={"patience": 2})
    result = invoke("optimize", "--space", _enqueued(workdir, space, configs))
    assert result.exit_code == 0, result.output
    study = load_existing_study("bounded", None)
    ran = [t.number for t in study.trials if t.state.is_finished()]
    assert ran == [0, 1, 2] and "stopped early" in result.stdout, result.stdout  # 3 and 4 stay queued
    assert study.user_attrs[StudyKey.STOPPED]
    assert [t.number for t in study.best_trials] == [0]  # the cheaper trials are outside the constraints
    assert "Pareto front: 1 trial(s)" in result.stdout
    res = invoke("refit", "--study", "bounded", "--pick", "params_m<=0.001")
    assert res.exit_code == 2 and "the front: trial 0:" in res.stderr


def test_latency_is_measured_on_the_training_device_with_its_threads_through_the_python_api(workdir):
    import tuner

    space = tiny_space(
        study={"name": "fast", "metrics": ["val_auroc", "latency_ms", "flops_g"], "n_trials": 2},
        params={"width": {"choices": [4, 16]}},
    )
    study = tuner.optimize(space, progress=False)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    for t in study.trials:
        costs = t.user_attrs[TrialKey.COSTS]
        # one image and one batch of 32, size and FLOPs: all measured, two of them objectives
        assert set(costs) == {"latency_ms", "batch_latency_ms", "params_m", "flops_g"}
        assert 0 < costs["latency_ms"] < costs["batch_latency_ms"] and costs["flops_g"] > 0
        assert t.values[1:] == [costs["latency_ms"], costs["flops_g"]]
        assert t.user_attrs[TrialKey.COSTS_MEASURED_ON] == f"cpu, {t.user_attrs[TrialKey.THREADS]} thread(s), batch 32"
    assert yaml.safe_dump(space)  # the space was a plain dict


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"metrics": ["latency_ms", "val_auroc"]}, "the first of metrics is the validation metric"),
        ({"metrics": ["val_auroc"]}, "metrics needs two or more different metrics"),
        ({"metrics": ["val_auroc", "speed"]}, "study.metrics.1: Input should be"),
        ({"metrics": ["val_auroc", "latency_ms"], "metric": "val_f1"}, "give metric or metrics, not both"),
        ({"metrics": ["val_auroc", "latency_ms"], "directions": ["maximize"]}, "directions needs one entry per metric"),
        ({"directions": ["maximize"]}, "directions go with metrics"),
        ({"metrics": ["val_auroc", "latency_ms"], "pruner": {"name": "hyperband"}}, "prunes with median, percentile"),
        ({"metrics": ["val_auroc", "latency_ms"], "sampler": {"name": "cmaes"}}, "sampler cmaes optimises one"),
        ({"metrics": ["val_auroc", "latency_ms"], "cv_folds": 3}, "cv_folds is not available with metrics"),
    ],
)
def test_a_bad_multi_objective_space_is_one_clear_error(workdir, study, message):
    space = tiny_space()
    space["study"] = {k: v for k, v in {**space["study"], **study}.items() if k != "metric" or "metric" in study}
    result = invoke("optimize", "--space", write_space(workdir / "bad.yaml", space))
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert "Traceback" not in result.output and not list(workdir.glob("studies/*.db"))


def test_pick_needs_a_multi_objective_study(workdir):
    assert (
        invoke("optimize", "--space", write_space(workdir / "s.yaml", tiny_space(study={"n_trials": 1}))).exit_code == 0
    )
    res = invoke("refit", "--study", "tiny", "--pick", "val_auroc>=0.5")
    assert res.exit_code == 2 and "has one objective" in res.stderr


RULE = PruneRule(percentile=50.0, n_startup_trials=2, n_warmup_steps=1)
SIGNS = {"latency_ms": -1.0}


def _peers(*rows: tuple[float, list[float]]) -> list[tuple[dict[str, float], list[float]]]:
    return [({"latency_ms": cost}, curve) for cost, curve in rows]


def test_judge_compares_with_the_trials_at_least_as_cheap_at_the_same_epoch() -> None:
    peers = _peers((1.0, [0.6, 0.8, 0.9]), (2.0, [0.6, 0.7, 0.9]), (9.0, [0.9, 0.95, 0.99]))
    kw = {"rule": RULE, "sign": 1.0, "cost_signs": SIGNS}
    # Slow (5 ms): two cheaper peers, median 0.75 at epoch 2.
    assert judge(0.7, 2, {"latency_ms": 5.0}, peers, **kw) is not None
    assert judge(0.75, 2, {"latency_ms": 5.0}, peers, **kw) is None  # as good as the median: kept
    assert judge(0.1, 1, {"latency_ms": 5.0}, peers, **kw) is None  # warm-up
    # Fast (1.5 ms): one cheaper peer, fewer than n_startup_trials: kept however bad.
    assert judge(0.0, 2, {"latency_ms": 1.5}, peers, **kw) is None
    # The slowest sees all three; a NaN is never good enough once peers exist.
    assert judge(math.nan, 3, {"latency_ms": 10.0}, peers, **kw) is not None
    # Minimising the first objective (a loss): larger is worse.
    assert judge(0.8, 2, {"latency_ms": 5.0}, peers, **{**kw, "sign": -1.0}) is not None
    assert judge(0.7, 2, {"latency_ms": 5.0}, peers, **{**kw, "sign": -1.0}) is None


def test_percentile_keeps_the_best_quarter_as_optunas_percentile_pruner() -> None:
    peers = _peers(*[(1.0, [v]) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    rule = PruneRule(percentile=25.0, n_startup_trials=1, n_warmup_steps=0)
    kw = {"rule": rule, "cost_signs": SIGNS}
    pruner = optuna.pruners.PercentilePruner(25.0, n_startup_trials=1, n_warmup_steps=0)
    for sign, direction in ((1.0, "maximize"), (-1.0, "minimize")):
        study = optuna.create_study(direction=direction, pruner=pruner)
        for _, curve in peers:
            study.add_trial(
                optuna.trial.create_trial(
                    value=curve[0], intermediate_values={1: curve[0]}, params={}, distributions={}
                )
            )
        for value in (0.15, 0.35, 0.42, 0.45):
            trial = study.ask()
            trial.report(value, 1)
            ours = judge(value, 1, {"latency_ms": 2.0}, peers, sign=sign, **kw) is not None
            assert ours == trial.should_prune(), (direction, value)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def test_pick_conditions_parse() -> None:
    assert parse_pick("latency_ms<=20, val_recall>=0.9", ["val_auroc", "latency_ms", "val_recall"]) == [
        ("latency_ms", "<=", 20.0),
        ("val_recall", ">=", 0.9),
    ]
