"""Seconds per trained epoch of a finished study, from what its trials stored.

    python benchmarks/study_speed.py --study breast [--storage URL]

Pairs with plain_optuna.py: both print seconds per epoch (training plus
validation), which compares the pipelines whatever the pruner decided.
"""

from __future__ import annotations

import argparse

from optuna.trial import TrialState

from tuner.search.storage import load_existing_study


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage")
    args = parser.parse_args()
    study = load_existing_study(args.study, args.storage)
    trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    epochs = sum(len(t.user_attrs.get("history", {}).get("val_loss", [])) for t in trials)
    seconds = sum(t.duration.total_seconds() for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    print(f"{args.study}: {len(trials)} trials ({pruned} pruned) in {seconds:.1f} s of trial time")
    print(f"{epochs} epochs trained, {seconds / epochs:.3f} s per epoch (training + validation)")
    print(f"best value {study.best_value:.4f} (trial {study.best_trial.number})")


if __name__ == "__main__":
    main()
