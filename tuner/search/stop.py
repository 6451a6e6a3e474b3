"""``study.stop``: end a search that stopped improving, built on ``optuna.terminator``.

Optuna's :class:`~optuna.terminator.BestValueStagnationEvaluator` counts completed trials since the best
one. tuner's rule asks a little more of a trial before it counts as progress, so the evaluator below
extends it: the last ``patience`` finished trials of this run (pruned ones included: a pruned trial is
one that did not improve) must beat the best value found before them by ``min_delta``, and only trials
within ``study.constraints`` count as values.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.study import StudyDirection
from optuna.terminator import BestValueStagnationEvaluator, StaticErrorEvaluator, Terminator
from optuna.trial import FrozenTrial, TrialState

from tuner.search.keys import StudyKey
from tuner.search.space import SearchSpace
from tuner.search.study import FINISHED, feasible


class MinDeltaStagnation(BestValueStagnationEvaluator):
    """Best-value stagnation with a minimum gain, over the finished trials numbered ``began`` or later.

    :meth:`evaluate` returns ``patience - 1 - k`` for the longest run of ``k`` latest finished trials none
    of which beat the best value before them by ``min_delta``; Optuna's :class:`Terminator` stops when
    it falls below its error evaluator's 0, that is after ``patience`` such trials.
    """

    def __init__(self, patience: int, min_delta: float, *, began: int = 0) -> None:
        super().__init__(max_stagnation_trials=patience)
        self.patience, self.min_delta, self.began = patience, min_delta, began
        self.best_before: float | None = None  # the best value the stagnant trials did not beat

    def evaluate(self, trials: list[FrozenTrial], study_direction: StudyDirection) -> float:
        sign = 1.0 if study_direction == StudyDirection.MAXIMIZE else -1.0
        finished = sorted(
            (t for t in trials if t.state in FINISHED and t.datetime_complete is not None),
            key=lambda t: t.datetime_complete,  # type: ignore[arg-type,return-value]
        )
        values = [
            sign * t.value if t.state == TrialState.COMPLETE and t.value is not None and feasible(t) else None
            for t in finished
        ]
        stagnant = 0
        for k in range(1, min(len(finished), self.patience) + 1):
            if finished[-k].number < self.began:  # judged on this run's trials only
                break
            earlier = [v for v in values[:-k] if v is not None]
            recent = [v for v in values[-k:] if v is not None]
            if not earlier or (recent and max(recent) - max(earlier) >= self.min_delta):
                break
            stagnant, self.best_before = k, sign * max(earlier)
        return float(self.patience - 1 - stagnant)


def stagnation(study: optuna.Study, space: SearchSpace) -> str | None:
    """Why the study should stop (``study.stop``), or None."""
    stop = space.study.stop
    if stop is None:
        return None
    began = int(study.user_attrs.get(StudyKey.RUN_BEGAN_AT, 0))
    with warnings.catch_warnings():  # experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        evaluator = MinDeltaStagnation(stop.patience, stop.min_delta, began=began)
        terminator = Terminator(evaluator, StaticErrorEvaluator(constant=0.0), min_n_trials=1)
        if not terminator.should_terminate(study):
            return None
    return (
        f"{space.study.metric} did not improve by {stop.min_delta} in the last {stop.patience} finished trials "
        f"(best {evaluator.best_before:.4g})"
    )
