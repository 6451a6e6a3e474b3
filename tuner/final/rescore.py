"""``refit --top-k``: re-train the best trials with fresh seeds on validation (never test) and refit the
best mean, a remedy for the winner's curse of one noisy validation score."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from tuner.data import Dataset
from tuner.errors import TunerError
from tuner.final.replay import replay_hparams
from tuner.search import (
    STUDIES_DIR,
    Objective,
    SearchSpace,
    StudyKey,
    TrialData,
    TrialKey,
    first_value,
    maximizes,
    ranked_trials,
)
from tuner.train import (
    renamed,
)

log = logging.getLogger(__name__)

RESCORE_STRIDE = 7919


def rescore(
    study: optuna.Study,
    space: SearchSpace,
    dataset: Dataset,
    device: torch.device,
    *,
    top_k: int,
    seeds: int,
    cache_dir: Path = STUDIES_DIR / "cache",
) -> tuple[FrozenTrial, list[dict]]:
    """Re-train the ``top_k`` best trials with ``seeds`` fresh seeds each, on validation only (never test),
    and pick the one with the best mean: a remedy for the winner's curse of one noisy validation score."""
    maximize = maximizes(study)
    top = ranked_trials(study)[:top_k]
    trial_data = TrialData(space, dataset, device, cache_dir)
    data, folds = trial_data.at(None)
    objective = Objective(space, data, dataset.class_names, None, folds, trial_data=trial_data)
    rows: list[dict[str, Any]] = []
    for trial in top:
        hparams = replay_hparams(trial, space)
        values = []
        for j in range(seeds):
            try:
                value = objective.run(
                    optuna.trial.FixedTrial(renamed(trial.params)),
                    hparams,
                    seed=int(trial.user_attrs[TrialKey.SEED]) + RESCORE_STRIDE * (j + 1),
                )
                values.append(value[0] if isinstance(value, tuple) else value)  # the metric: the first objective
            except (optuna.TrialPruned, RuntimeError) as err:
                log.warning("re-scoring trial %d, seed %d: %s", trial.number, j, err)
                values.append(math.nan)
        finite = [v for v in values if math.isfinite(v)]
        rows.append(
            {
                "trial": trial.number,
                "value": first_value(trial),
                "rescored": values,
                "mean": float(np.mean(finite)) if finite else math.nan,
                "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            }
        )
    scored = [r for r in rows if math.isfinite(r["mean"])]
    if not scored:
        raise TunerError("re-scoring failed for every one of the top trials")
    best = (max if maximize else min)(scored, key=lambda r: r["mean"])
    study.set_user_attr(StudyKey.RESCORING, {"top_k": top_k, "seeds": seeds, "rows": rows, "chosen": best["trial"]})
    return next(t for t in top if t.number == best["trial"]), rows
