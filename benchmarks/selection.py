"""How far does the validation score of the chosen trial overstate its test score?

With 78 validation images (BreastMNIST) the best of 20 noisy validation scores
is optimistic: the winner's curse. This compares, on one space and one data set,

  (1) hold-out: the best trial of a study, refit with seeds, tested;
  (2) top-k re-scoring: the k best trials of that study re-trained with new seeds
      on validation, the best mean refit and tested;
  (3) k-fold CV: a study whose objective is the mean over k folds of train+val,
      its best trial refit and tested.

For each it prints the selection score, the test AUROC (mean ± sd over the refit
seeds) and the gap. The test set is read once per protocol, on purpose: this is
the measurement of the gap, which is what the audit in a real study prevents.

    python benchmarks/selection.py --data ../shared/data/breastmnist.npz
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

from tuner.final import run_refit
from tuner.search import run_optimize
from tuner.search.space import load_space


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/breastmnist.npz")
    parser.add_argument("--space", default=str(Path(__file__).parents[1] / "search_spaces" / "breast.yaml"))
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = {"data.source": args.data, "study.n_trials": args.n_trials, "study.artifacts": False}

        def run(name: str, **overrides):
            space = load_space(args.space, {**common, "study.name": name, **overrides})
            start = time.perf_counter()
            study = run_optimize(space, storage_url=f"sqlite:///{root}/{name}.db", cache_dir=root / "cache")
            return study, time.perf_counter() - start

        def tested(study, label: str, seconds: float, **kwargs) -> None:
            start = time.perf_counter()
            report = run_refit(
                study,
                seeds=args.seeds,
                out_dir=root / label,
                cache_dir=root / "cache",
                allow_test_reuse=True,
                bootstrap=200,
                **kwargs,
            )
            rescoring = report.rescoring
            chosen = next((r["mean"] for r in rescoring if r["trial"] == report.trial), None) if rescoring else None
            selection = chosen if chosen is not None else report.validation_value
            auroc = report.summary["auroc"]
            rows.append((label, report.trial, selection, auroc.mean, auroc.sd, seconds + time.perf_counter() - start))

        holdout, seconds = run("holdout")
        tested(holdout, "hold-out best trial", seconds)
        tested(holdout, f"top-{args.top_k} re-scored x{args.seeds}", 0.0, top_k=args.top_k)
        cv, seconds = run("cv", **{"study.cv_folds": args.folds})
        tested(cv, f"{args.folds}-fold CV objective", seconds)

    print(f"{'protocol':<26} {'trial':>5} {'selection':>9} {'test AUROC':>16} {'gap':>7} {'seconds':>8}")
    for label, trial, selection, mean, sd, seconds in rows:
        print(
            f"{label:<26} {trial:>5} {selection:>9.4f} {mean:>9.4f} ± {sd:.4f} {selection - mean:>7.4f} {seconds:>8.0f}"
        )


if __name__ == "__main__":
    main()
