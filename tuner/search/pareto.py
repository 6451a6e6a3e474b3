"""Multi-objective studies (``study.metrics``): pruning against cheaper trials, the Pareto front, picking from it.

Optuna does not prune multi-objective trials (``Trial.report`` is single-objective only), so tuner judges
them itself, on the first objective's curve, against the finished trials that are at least as cheap on
every cost objective (``COST_METRICS``, measured before training): at each epoch past the pruner's
warm-up, once ``n_startup_trials`` such trials exist, a trial below their median (or the pruner's
percentile) at the same epoch is pruned. A slow network must beat what cheaper networks had reached at
that epoch, or it is on its way to being dominated; the cheapest networks have nothing to be measured
against and run to the end. Without cost objectives every finished trial is a peer (median pruning).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import TunerError
from tuner.metric_names import COST_METRICS
from tuner.search.keys import TrialKey
from tuner.search.study import maximizes


@dataclass(frozen=True)
class PruneRule:
    """The space's median or percentile pruner's settings, applied to a multi-objective trial."""

    percentile: float = 50.0
    n_startup_trials: int = 3
    n_warmup_steps: int = 2
    interval_steps: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> PruneRule | None:
        if settings.name == "none":
            return None
        percentile = settings.percentile if settings.name == "percentile" else 50.0
        return cls(percentile, settings.n_startup_trials, settings.n_warmup_steps, settings.interval_steps)


def at_least_as_cheap(mine: dict[str, float], theirs: dict[str, float], signs: dict[str, float]) -> bool:
    """Whether ``theirs`` costs no more than ``mine`` on every cost (``signs``: +1 where larger is better)."""
    return all(signs[k] * theirs[k] >= signs[k] * mine[k] for k in signs)


def judge(
    value: float,
    epoch: int,
    costs: dict[str, float],
    peers: Sequence[tuple[dict[str, float], Sequence[float]]],
    *,
    rule: PruneRule,
    sign: float,
    cost_signs: dict[str, float],
) -> str | None:
    """Why the trial should stop at ``epoch`` with ``value`` (its first objective), or None to go on.

    ``peers``: each finished trial's costs and first-objective curve; ``sign``: +1 when the first
    objective is maximised."""
    if epoch <= rule.n_warmup_steps or (epoch - rule.n_warmup_steps - 1) % rule.interval_steps:
        return None
    cheaper = [
        curve[epoch - 1]
        for their_costs, curve in peers
        if len(curve) >= epoch and math.isfinite(curve[epoch - 1]) and at_least_as_cheap(costs, their_costs, cost_signs)
    ]
    if len(cheaper) < max(1, rule.n_startup_trials):
        return None
    # the pruner's percentile of the peers, counted from the good end (as Optuna's PercentilePruner)
    cut = float(np.percentile(np.asarray(cheaper) * sign, 100.0 - rule.percentile)) * sign
    if math.isfinite(value) and sign * value >= sign * cut:
        return None
    kind = "median" if rule.percentile == 50.0 else f"{rule.percentile:g}th percentile"
    return (
        f"pruned at epoch {epoch}: worse than the {kind} {cut:.4f} of the {len(cheaper)} trials at least as cheap "
        f"({', '.join(cost_signs) or 'no cost objective'}) at that epoch"
    )


def peers_of(study: optuna.Study, metric: str, exclude: int) -> list[tuple[dict[str, float], list[float]]]:
    """The completed trials' costs and curves of ``metric`` (a trial's own history, kept as a user attribute)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # as Optuna's own pruners
        costs = t.user_attrs.get(TrialKey.COSTS)
        curve = t.user_attrs.get(TrialKey.HISTORY, {}).get(metric)
        if t.number != exclude and costs is not None and curve:
            out.append((costs, curve))
    return out


def cost_signs(objectives: Sequence[str], directions: Sequence[str]) -> dict[str, float]:
    return {
        m: 1.0 if d == "maximize" else -1.0 for m, d in zip(objectives, directions, strict=True) if m in COST_METRICS
    }


# ---------------------------------------------------------------- choosing from the front

_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>|==)\s*([-+0-9.eE]+)\s*$")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
}


def parse_pick(text: str, objectives: Sequence[str]) -> list[tuple[str, str, float]]:
    """``'latency_ms<=20, val_recall>=0.9'`` -> [(metric, operator, number), ...]; a clear error otherwise."""
    out = []
    for part in text.split(","):
        match = _CONDITION.match(part)
        if match is None:
            raise TunerError(
                f"--pick {text!r}: each condition is <objective><op><number>, e.g. 'latency_ms<=20' "
                f"(op: <=, >=, <, >, ==), but got {part.strip()!r}"
            )
        name, op, number = match.groups()
        if name not in objectives:
            raise TunerError(f"--pick {text!r}: {name!r} is not an objective of this study ({', '.join(objectives)})")
        out.append((name, op, float(number)))
    return out


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal completed trials (within study.constraints), best first objective first."""
    sign = -1.0 if maximizes(study) else 1.0
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def pick(study: optuna.Study, objectives: Sequence[str], text: str | None) -> FrozenTrial:
    """The front's trial with the best first objective among those meeting ``text``'s conditions."""
    trials = front(study)
    if not trials:
        raise TunerError(f"study {study.study_name!r} has no completed trial (within its constraints) yet")
    conditions = parse_pick(text, objectives) if text else []
    index = {name: i for i, name in enumerate(objectives)}
    chosen = [t for t in trials if all(_OPERATORS[op](t.values[index[n]], x) for n, op, x in conditions)]
    if not chosen:
        described = "; ".join(
            f"trial {t.number}: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(objectives, t.values, strict=True))
            for t in trials
        )
        raise TunerError(f"no trial on the Pareto front meets --pick {text!r}; the front: {described}")
    return chosen[0]
