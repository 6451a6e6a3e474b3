"""study.stop's rule on real Optuna trials: when it stops and when it must not."""

from __future__ import annotations

import optuna
import pytest

from tuner.search.stop import MinDeltaStagnation


def _study(values: list[float | None], direction: str = "maximize") -> optuna.Study:
    """A study whose trials finish in order with these values (None: pruned)."""
    study = optuna.create_study(direction=direction)
    for value in values:
        trial = study.ask()
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return study


def _stops(study: optuna.Study, patience: int, min_delta: float, began: int = 0) -> bool:
    return MinDeltaStagnation(patience, min_delta, began=began).evaluate(study.trials, study.direction) < 0


@pytest.mark.parametrize(
    ("values", "stops"),
    [
        ([0.8, 0.7, 0.75, 0.79], True),  # three trials after the best, none beat it
        ([0.8, 0.7, 0.75, 0.81], False),  # the last one beats 0.8 by 0.01
        ([0.8, 0.805, 0.809, 0.809], True),  # gains, but each under min_delta of 0.8
        ([0.8, 0.806, 0.806, 0.812], False),  # small gains that add up past min_delta
        ([0.8, None, None, None], True),  # pruned trials did not improve
        ([0.8, 0.7, 0.7], False),  # only two trials since the best
    ],
)
def test_stops_after_patience_trials_without_a_gain_of_min_delta(values, stops):
    assert _stops(_study(values), patience=3, min_delta=0.01) is stops


def test_minimising_and_this_run_only():
    assert _stops(_study([0.5, 0.6, 0.55, 0.51], "minimize"), patience=3, min_delta=0.01)
    assert not _stops(_study([0.5, 0.6, 0.55, 0.45], "minimize"), patience=3, min_delta=0.01)
    # The stagnant trials belong to an earlier run: this run has not yet had its patience's worth.
    assert not _stops(_study([0.8, 0.7, 0.75, 0.79]), patience=3, min_delta=0.01, began=2)


def test_trials_outside_the_constraints_are_no_best_to_beat():
    """study.stop judges values within study.constraints only: a high value that broke a constraint is no
    best the later trials failed to beat, so its study goes on; counted, it would stop it."""
    study = optuna.create_study(direction="maximize")
    for value, violation in [(0.9, 0.2), (0.7, 0.0), (0.72, 0.0), (0.74, 0.0)]:
        study.add_trial(optuna.trial.create_trial(value=value, system_attrs={"constraints": [violation]}))
    assert not _stops(study, patience=2, min_delta=0.01)
    unconstrained = _study([0.9, 0.7, 0.72, 0.74])
    assert _stops(unconstrained, patience=2, min_delta=0.01)
