"""Warm start: the best configurations of an earlier study become the first trials of a new one.

Each donor configuration is replayed through the new space's own suggestions, so conditional
parameters are matched the way the new space draws them. A parameter the new space does not draw
is dropped; one it draws that the donor lacks is left to the sampler; a donor whose value falls
outside the new space (a range it left, a choice it removed) is skipped with the reason. Each of
these is said once. The configurations kept are enqueued (Optuna's ``enqueue_trial``), best first,
and each trial records where it came from (``warm_start_from``).
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tuner.errors import TunerError
from tuner.search.keys import TrialKey
from tuner.search.optuna_internals import contains
from tuner.search.space import SearchSpace, suggest
from tuner.search.study import ranked_trials
from tuner.train import renamed


class _OutsideTheSpace(Exception):
    pass


class _Replay:
    """Stands in for a trial: answers each suggestion with the donor's value when the new space allows it."""

    def __init__(self, donor: dict[str, Any]) -> None:
        self.donor = donor
        self.params: dict[str, Any] = {}
        self.new: list[str] = []

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False, step: float | None = None) -> Any:
        return self._take(name, FloatDistribution(low, high, log=log, step=step), low)

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False, step: int = 1) -> Any:
        return self._take(name, IntDistribution(low, high, log=log, step=step), low)

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._take(name, CategoricalDistribution(choices), choices[0])

    def _take(self, name: str, distribution: BaseDistribution, placeholder: Any) -> Any:
        if name not in self.donor:
            self.new.append(name)
            return placeholder  # only to walk on through the space; the sampler draws it in the trial
        value = self.donor[name]
        if not contains(distribution, value):
            raise _OutsideTheSpace(f"{name}={value!r} is outside this space's {distribution}")
        self.params[name] = value
        return value


def warm_start(study: optuna.Study, space: SearchSpace, donor: optuna.Study, *, top_k: int) -> list[str]:
    """Enqueue ``donor``'s ``top_k`` best completed configurations into ``study``; returns what was said."""
    if top_k < 1:
        raise TunerError(f"--top-k must be at least 1, but got --top-k {top_k}")
    # The donor's best by its value, whatever its own constraints: the new study judges feasibility anew.
    best = ranked_trials(donor, feasible_only=False)[:top_k]
    if not best:
        raise TunerError(f"study {donor.study_name!r} has no completed trial to warm-start from")
    said: list[str] = []
    dropped: set[str] = set()
    new: set[str] = set()
    enqueued = 0
    for trial in best:
        params = renamed(trial.params)  # in today's names
        replay = _Replay(params)
        try:
            suggest(replay, space)
        except _OutsideTheSpace as err:
            said.append(f"trial {trial.number} of {donor.study_name} skipped: {err}")
            continue
        except (ValueError, TypeError) as err:  # the donor's combination fails this space's own checks
            said.append(f"trial {trial.number} of {donor.study_name} skipped: {err}")
            continue
        dropped |= set(params) - set(replay.params)
        new |= set(replay.new)
        study.enqueue_trial(
            replay.params,
            user_attrs={TrialKey.WARM_START_FROM: f"{donor.study_name}#{trial.number}"},
            skip_if_exists=True,
        )
        enqueued += 1
    said += [f"{name}: not in this space, dropped from the warm-start trials" for name in sorted(dropped)]
    said += [f"{name}: new in this space, drawn by the sampler in the warm-start trials" for name in sorted(new)]
    said.append(f"warm start: the {enqueued} best trial(s) of {donor.study_name} run first")
    return said
