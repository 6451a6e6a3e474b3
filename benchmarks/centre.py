"""Does the search beat a fixed recipe on test? The search's choice against the space's centre.

The centre configuration takes each range's midpoint (geometric for a log range, rounded for
integers) and each choice's first value (with that option's own parameters at their centres). It is
enqueued as trial 0 of an ordinary study of ``n_trials`` trials, so it is trained exactly as the search's
trials are. Then the best trial and trial 0 are each refit with the same settings and the same seeds
and tested once; per-seed test AUROCs are paired by seed. (When the search's best is trial 0 itself,
the two rows are the same refit.)

    python benchmarks/centre.py --space search_spaces/breast.yaml --data ../shared/data/breastmnist.npz --seeds 5
    python benchmarks/centre.py --space search_spaces/breast64_pretrained.yaml \
        --data ../shared/data/breastmnist_64.npz --seeds 3
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from scipy import stats

import tuner
from tuner.final import run_refit
from tuner.search import best_trial, run_optimize
from tuner.search.keys import TrialKey
from tuner.search.space import suggest


class Centre:
    """Stands in for an Optuna trial in tuner's ``suggest``: answers every question with the middle."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False, step: float | None = None):
        value = math.sqrt(low * high) if log else (low + high) / 2
        if step:
            value = low + round((value - low) / step) * step
        self.params[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False, step: int = 1) -> int:
        value = math.sqrt(low * high) if log else (low + high) / 2
        self.params[name] = low + round((value - low) / step) * step
        return self.params[name]

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.params[name] = choices[0]
        return choices[0]


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-trials", type=int, default=None, help="default: the space's n_trials")
    args = parser.parse_args()

    overrides = {"data.source": args.data, "study.n_trials": args.n_trials, "study.name": "centre"}
    space = tuner.load_space(args.space, overrides)
    centre = Centre()
    suggest(centre, space)
    print("centre configuration:", centre.params, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        storage = f"sqlite:///{root}/centre.db"
        optuna.create_study(study_name="centre", storage=storage, direction=space.study.resolved_direction)
        optuna.load_study(study_name="centre", storage=storage).enqueue_trial(centre.params)
        start = time.perf_counter()
        study = run_optimize(space, storage_url=storage, cache_dir=root / "cache")
        searched = time.perf_counter() - start
        best = best_trial(study)
        print(f"search's best: trial {best.number}, {best.params}", flush=True)
        rows = []
        reports = {}
        for label, number in (("search's best", best.number), ("centre (trial 0)", 0)):
            start = time.perf_counter()
            report = reports.get(number) or run_refit(
                study,
                trial_number=number,
                seeds=args.seeds,
                out_dir=root / f"refit{number}",
                cache_dir=root / "cache",
                allow_test_reuse=True,  # the benchmark reads the test set once per recipe, on purpose
                bootstrap=200,
            )
            reports[number] = report
            per_seed = [m["auroc"] for m in report.per_seed]
            trial = study.trials[number]
            threads = trial.user_attrs.get(TrialKey.THREADS)
            rows.append((label, number, trial.value, report.epochs, threads, per_seed))

    print(f"\nsearch: {len(study.trials)} trials in {searched:.0f} s; refit with seeds 0..{args.seeds - 1}")
    # The refit trains for the trial's best epoch, which depends on the trial's thread count (the order of
    # floating-point sums): the same configuration searched at another thread count can refit differently.
    print(
        f"{'configuration':<18} {'trial':>5} {'val':>7} {'epochs':>6} {'threads':>7} "
        f"{'test AUROC mean ± sd':>22}  per seed"
    )
    for label, number, value, epochs, threads, per_seed in rows:
        print(
            f"{label:<18} {number:>5} {value:>7.4f} {epochs:>6} {threads!s:>7} "
            f"{np.mean(per_seed):>13.4f} ± {np.std(per_seed, ddof=1):.4f}  " + " ".join(f"{v:.4f}" for v in per_seed)
        )
    diff = np.asarray(rows[0][-1]) - np.asarray(rows[1][-1])
    half = stats.t.ppf(0.975, len(diff) - 1)
    se = np.std(diff, ddof=1) / math.sqrt(len(diff))
    print(f"paired difference (search - centre): {diff.mean():+.4f} ± {half * se:.4f} (95% CI over seeds)")


if __name__ == "__main__":
    main()
