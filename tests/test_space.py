from __future__ import annotations

import re

import optuna
import pytest
from pydantic import ValidationError

from tests.conftest import invoke, tiny_space, write_space
from tuner.errors import SpaceError
from tuner.search.space import Choice, Fixed, Range, parse_space, suggest
from tuner.train.hparams import Hyperparameters

SPACE = {
    "study": {"name": "s", "sampler": {"seed": 3}},
    "params": {
        "lr": {"low": 1e-4, "high": 1e-1, "log": True},
        "batch_size": {"low": 16, "high": 128, "log": True},
        "hidden_sizes": {"choices": [[], [64, 32]]},
        "optimizer": {"choices": {"adam": {}, "sgd": {"momentum": {"low": 0.8, "high": 0.99}}}},
        "scheduler": {
            "choices": {
                "none": None,
                "step": {"step_size": {"low": 2, "high": 5}, "gamma": {"low": 0.1, "high": 0.5}},
                "exponential": {"gamma": {"low": 0.8, "high": 0.99}},
            }
        },
        "dropout": 0.25,
    },
}


def test_kinds_come_from_the_hyperparameter():
    specs = {s.name: s for s in parse_space(SPACE).specs}
    assert specs["lr"] == Range("lr", "float", 1e-4, 1e-1, log=True)
    assert specs["batch_size"].kind == "int"
    assert isinstance(specs["optimizer"], Choice) and isinstance(specs["dropout"], Fixed)


def test_conditional_parameters_only_when_their_choice_is_drawn():
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        hp = suggest(trial, space)
        assert ("momentum" in trial.params) == (hp.optimizer == "sgd")
        assert ("step_size" in trial.params) == (hp.scheduler == "step")
        assert ("gamma" in trial.params) == (hp.scheduler in ("step", "exponential"))
        assert isinstance(hp.batch_size, int) and 16 <= hp.batch_size <= 128
        assert hp.hidden_sizes in ((), (64, 32))
        assert hp.dropout == 0.25
        seen.add(hp.scheduler)
        study.tell(trial, 0.0)
    assert seen == {"none", "step", "exponential"}


def test_fixed_trial_replays_a_trial_exactly():
    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    drawn = suggest(trial, space)
    replayed = suggest(optuna.trial.FixedTrial(trial.params), space)
    assert replayed == drawn
    assert isinstance(replayed, Hyperparameters)


def test_fingerprint_ignores_budget_but_not_the_experiment():
    a = parse_space(SPACE)
    assert a.fingerprint() == parse_space(SPACE, overrides={"study.n_trials": 99, "train.device": "cpu"}).fingerprint()
    assert a.fingerprint() != parse_space(SPACE, overrides={"data.image_size": 32}).fingerprint()


def test_direction_follows_the_metric():
    assert parse_space({"study": {"metric": "val_loss"}}).study.resolved_direction == "minimize"
    assert parse_space({"study": {"metric": "val_f1"}}).study.resolved_direction == "maximize"


# Each malformed space gives exactly one error line naming the key path, and exit code 2.
MALFORMED = [
    ({"study": {"nmae": "x"}}, "study.nmae: unknown key 'nmae'; did you mean 'name'?"),
    ({"studdy": {}}, "studdy: unknown key 'studdy'; did you mean 'study'?"),
    ({"study": {"metric": "val_aucroc"}}, "study.metric: Input should be"),
    ({"study": {"n_trials": 0}}, "study.n_trials: Input should be greater than or equal to 1, but got n_trials=0"),
    (
        {"study": {"pruner": {"name": "medain"}}},
        "study.pruner.name: must be one of median, percentile, successive_halving, hyperband, wilcoxon, none, but got name='medain'",
    ),
    (
        {"study": {"pruner": {"name": "percentile", "percentile": 120}}},
        "study.pruner.percentile: Input should be less than 100",
    ),
    (
        {"study": {"sampler": {"name": "grid"}}},
        "study.sampler.name: Input should be 'tpe', 'random', 'gp', 'cmaes' or 'nsga2'",
    ),
    ({"data": {"image_size": "big"}}, "data.image_size: Input should be a valid integer"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction: Input should be less than 0.9"),
    ({"train": {"device": "gpu"}}, "train.device: String should match pattern"),
    ({"params": {"lrr": 0.1}}, "params.lrr: unknown hyperparameter 'lrr'; did you mean 'lr'?"),
    ({"params": {"lr": {"low": 0.1, "high": 0.01}}}, "params.lr: low must be below high, but got low=0.1, high=0.01"),
    ({"params": {"lr": {"low": 0.0, "high": 0.01, "log": True}}}, "params.lr.low: Input should be greater than 0"),
    (
        {"params": {"weight_decay": {"low": 0.0, "high": 0.01, "log": True}}},
        "params.weight_decay.low: a log range must have low > 0",
    ),
    (
        {"params": {"lr": {"low": 0.1, "hgh": 0.2}}},
        "params.lr: must be a fixed value, {low, high[, log][, step]} or {choices: ...}",
    ),
    (
        {"params": {"optimizer": "adamm"}},
        "params.optimizer: Input should be 'adam', 'adamw' or 'sgd', but got optimizer='adamm'",
    ),
    (
        {"params": {"optimizer": {"choices": ["adam", "lbfgs"]}}},
        "params.optimizer.choices.lbfgs: Input should be 'adam', 'adamw' or 'sgd'",
    ),
    (
        {"params": {"model": "resnet_18"}},
        "params.model: model must be a built-in (small_cnn, mlp), a timm or a torchvision model name, but got model='resnet_18'",
    ),
    ({"params": {"batch_size": {"low": 8.5, "high": 64}}}, "params.batch_size.low: Input should be a valid integer"),
    ({"params": {"dropout": 1.0}}, "params.dropout: Input should be less than 1, but got dropout=1.0"),
    (
        {"params": {"scheduler": {"choices": {"step": {"gama": 0.5}}}}},
        "params.scheduler.choices.step.gama: unknown hyperparameter 'gama'",
    ),
    ({"params": {"optimizer": {"choices": []}}}, "params.optimizer.choices: must list at least one choice"),
    (
        {"params": {"augment": {"low": 1, "high": 2}}},
        "params.augment: 'augment' is a str, so it takes a fixed value or choices, not a range",
    ),
    (
        {"params": {"gamma": 0.5, "scheduler": {"choices": {"step": {"gamma": 0.1}}}}},
        "params.gamma: is set both at an outer level and under a choice",
    ),
    (["not", "a", "mapping"], "must be a mapping with keys study, data, train, params"),
]


@pytest.mark.parametrize(("raw", "message"), MALFORMED, ids=[m[1].split(":")[0][:40] for m in MALFORMED])
def test_malformed_space_gives_one_clear_error_and_exit_2(workdir, raw, message):
    path = workdir / "space.yaml"
    write_space(path, raw) if isinstance(raw, dict) else path.write_text("- not\n- a\n- mapping\n")
    result = invoke("space", "check", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_yaml_syntax_error_names_the_line(workdir):
    path = workdir / "space.yaml"
    path.write_text("study:\n  name: x\n params: [\n")
    result = invoke("space", "check", path)
    assert result.exit_code == 2
    assert f"error: {path}: line 3" in result.stderr


def test_missing_space_file(workdir):
    result = invoke("space", "check", workdir / "nope.yaml")
    assert result.exit_code == 2
    assert "cannot read the space file" in result.stderr


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpaceError) as err:
        parse_space({"params": {"lrr": 1, "dropout": 2.0}})
    assert [p for p, _ in err.value.problems] == ["params.lrr", "params.dropout"]


def test_space_check_prints_the_resolved_space(workdir):
    path = write_space(
        workdir / "space.yaml", tiny_space(params={"optimizer": {"choices": {"sgd": {"momentum": 0.9}}}})
    )
    result = invoke("space", "check", path)
    assert result.exit_code == 0, result.output
    assert "is valid" in result.stdout
    assert "momentum" in result.stdout and "optimizer=sgd" in result.stdout
    assert not (workdir / "studies").exists(), "space check must write nothing"


def test_shipped_spaces_are_valid_or_name_the_weights_they_need():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("search_spaces/*.yaml")):
        result = invoke("space", "check", path)
        if result.exit_code != 0:  # only allowed: pretrained weights absent on this machine
            assert result.exit_code == 2 and "are not on this machine" in result.stderr, (path, result.output)


def test_per_class_values_are_searched_entry_by_entry_and_replay():
    from tuner.search.space import class_names_used

    space = parse_space(
        {
            "params": {
                "class_weights": {"benign": 0.5, "malignant": {"low": 0.5, "high": 0.85}},
                "imbalance": "multiply",
                "class_multipliers": {"cancer": {"low": 10, "high": 16}, "benign": {"choices": [5, 10]}},
            }
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    hp = suggest(trial, space)
    assert set(trial.params) == {"class_weights.malignant", "class_multipliers.cancer", "class_multipliers.benign"}
    assert hp.class_weights["benign"] == 0.5 and 0.5 <= hp.class_weights["malignant"] <= 0.85
    assert 10 <= hp.class_multipliers["cancer"] <= 16 and hp.class_multipliers["benign"] in (5, 10)
    assert suggest(optuna.trial.FixedTrial(trial.params), space) == hp
    assert class_names_used(space.specs) == {
        "class_weights": {"benign", "malignant"},
        "class_multipliers": {"cancer", "benign"},
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"class_weights": {"a": -1}}, "params.class_weights.a: Input should be greater than 0"),
        ({"class_weights": "bal"}, "params.class_weights: Input should be 'none' or 'balanced'"),
        ({"class_weights": {"a": {"low": 2, "high": 1}}}, "params.class_weights.a: low must be below high"),
        ({"class_multipliers": {"a": {"mean": 2}}}, "params.class_multipliers.a: must be a number"),
        ({"class_multipliers": 3}, "params.class_multipliers: Input should be a valid dictionary"),
    ],
)
def test_per_class_errors_name_the_class(params, message):
    with pytest.raises(SpaceError, match=re.escape(message)):
        parse_space({"params": params})


def test_every_sampler_and_pruner_name_in_the_schema_builds_and_no_other():
    """The schema's names come from the registries: each builds its Optuna object, and the pruner
    settings' discriminated union names exactly the registry's pruners."""
    from typing import get_args

    import optuna

    from tuner.search.samplers import PRUNERS, SAMPLERS, build_pruner, build_sampler
    from tuner.search.space import PrunerSettings, SamplerSettings

    union = get_args(get_args(PrunerSettings)[0])
    assert {get_args(cls.model_fields["name"].annotation)[0] for cls in union} == set(PRUNERS)
    for cls in union:
        settings = cls(name=get_args(cls.model_fields["name"].annotation)[0])
        assert isinstance(build_pruner(settings, max_epochs=10), optuna.pruners.BasePruner)
    for name in SAMPLERS:  # cmaes too: its package is in the test extra
        assert isinstance(build_sampler(SamplerSettings(name=name)), optuna.samplers.BaseSampler)
    with pytest.raises(ValidationError):
        SamplerSettings(name="bayes")


def test_a_study_stored_with_older_spellings_still_replays(tmp_path):
    """A space file with a retired spelling is refused; a study an older tuner stored with it still
    replays (refit, evaluate) to the hyperparameters it trained with, in today's names."""
    from optuna.distributions import CategoricalDistribution

    from tuner.final.replay import replay_hparams, study_space

    old = tiny_space(
        params={
            "scheduler": "plateau",
            "patience": 2,
            "factor": 0.5,
            "imbalance": {"choices": ["none", "class_weight"]},
        }
    )
    with pytest.raises(SpaceError) as err:
        parse_space(old, "old.yaml")
    assert "params.patience" in str(err.value) and "params.factor" in str(err.value)
    assert "params.imbalance.choices.class_weight" in str(err.value)

    trained = Hyperparameters(model="small_cnn", width=4, depth=2, lr=0.004, batch_size=32, scheduler="plateau")
    then = {
        {"plateau_patience": "patience", "plateau_factor": "factor"}.get(k, k): v
        for k, v in trained.model_dump(mode="json").items()
    }
    then.update(patience=2, factor=0.5, imbalance="class_weight")
    study = optuna.create_study(study_name="old", storage=f"sqlite:///{tmp_path}/old.db", direction="maximize")
    study.set_user_attr("space", old)
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.004, "imbalance": "class_weight"},
            distributions={
                "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
                "imbalance": CategoricalDistribution(["none", "class_weight"]),
            },
            value=0.9,
            user_attrs={"hparams": then, "seed": 0},
        )
    )
    replayed = replay_hparams(study.best_trial, study_space(study))
    assert (replayed.plateau_patience, replayed.plateau_factor) == (2, 0.5)
    assert (replayed.imbalance, replayed.class_weights) == ("none", "balanced")
    assert replayed.lr == 0.004
