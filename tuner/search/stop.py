"""``study.stop``: end a search that stopped improving.

The rule is Optuna's best-value stagnation (``BestValueStagnationEvaluator`` of its terminator) with a
minimum gain: the search stops once the last ``patience`` finished trials of this run (pruned ones
included: a pruned trial is one that did not improve) did not beat the best value found before them by
``min_delta``; only trials within ``study.constraints`` count as values. It is written here, in the
shape of Optuna's improvement evaluators, rather than on ``optuna.terminator``: that module is
deprecated since Optuna 4.9 and goes in 6.0 (optuna/optuna#6668), and its OptunaHub port is fetched
over the network when loaded, which a study on an offline cluster node cannot do.
"""

from __future__ import annotations

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner.search.keys import StudyKey
from tuner.search.space import SearchSpace
from tuner.search.study import FINISHED, feasible


class MinDeltaStagnation:
    """Best-value stagnation with a minimum gain, over the finished trials numbered ``began`` or later.

    :meth:`evaluate` returns the room left, ``patience - 1 - k``, for the longest run of ``k`` latest
    finished trials none of which beat the best value before them by ``min_delta``; as with Optuna's
    improvement evaluators, the search should stop once it falls below 0, after ``patience`` such trials.
    """

    def __init__(self, patience: int, min_delta: float, *, began: int = 0) -> None:
        self.patience, self.min_delta, self.began = patience, min_delta, began
        self.best_before: float | None = None  # the best value the stagnant trials did not beat

    def evaluate(self, trials: list[FrozenTrial], study_direction: StudyDirection) -> float:
        sign = 1.0 if study_direction == StudyDirection.MAXIMIZE else -1.0
        finished = sorted(
            (t for t in trials if t.state in FINISHED and t.datetime_complete is not None),
            key=lambda t: t.datetime_complete,  # type: ignore[arg-type,return-value]
        )
        values = [
            sign * t.values[0] if t.state == TrialState.COMPLETE and t.values and feasible(t) else None
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
    evaluator = MinDeltaStagnation(stop.patience, stop.min_delta, began=began)
    if evaluator.evaluate(study.get_trials(deepcopy=False), study.directions[0]) >= 0:
        return None
    return (
        f"{space.study.metric} did not improve by {stop.min_delta} in the last {stop.patience} finished trials "
        f"(best {evaluator.best_before:.4g})"
    )
