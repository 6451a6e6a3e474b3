"""Scoring a refit on the locked test split: per seed, the final model and one network alone, with
thresholds frozen from the trial or chosen on the recipe's own out-of-fold probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner.data import Dataset
from tuner.final.evaluation import (
    bootstrap_ci,
    summarize,
    test_metric_fn,
    write_predictions,
)
from tuner.final.replay import SeedRun
from tuner.final.results import Summary
from tuner.search import (
    ThresholdSettings,
)
from tuner.train import (
    choose_threshold,
)


def train_val_labels(dataset: Dataset) -> torch.Tensor:
    """Train+val labels in the order :func:`run_seed` pools them (train first): the out-of-fold rows' order."""
    return torch.from_numpy(np.concatenate([dataset.train.labels, dataset.val.labels]))


@dataclass
class RefitScores:
    """The refit's test figures. Per seed: that seed's networks averaged (with TTA) at its threshold,
    with mean, sd and CI over seeds; the final model: every network averaged at one threshold; one
    network alone (each seed's first, no TTA), so that what averaging adds is final minus this."""

    per_seed: list[dict]
    summary: Summary
    final: dict
    final_summary: Summary
    final_probs: torch.Tensor
    single_network: Summary | None


def score_runs(
    runs: list[SeedRun],
    seed_list: list[int],
    dataset: Dataset,
    *,
    frozen: float | None,
    rule: ThresholdSettings,
    bootstrap: int,
    with_single: bool,
) -> RefitScores:
    """Score the seeds' runs on the test split. Thresholds: the study's rule on out-of-fold
    probabilities when the runs have them (per seed, and averaged over seeds for the final model),
    else ``frozen`` (the trial's own)."""
    assert dataset.test is not None
    positive = dataset.positive_index
    binary = positive is not None and dataset.num_classes == 2
    target = torch.from_numpy(dataset.test.labels)
    tv_target = train_val_labels(dataset)

    def chosen_threshold(oof: torch.Tensor | None) -> float | None:
        if not binary or oof is None:
            return frozen
        assert positive is not None
        return choose_threshold(oof, tv_target, positive_index=positive, rule=rule.rule, recall=rule.recall)

    thresholds = [chosen_threshold(run.oof_probs) for run in runs]
    metric_fns = [test_metric_fn(dataset.class_names, positive, t) for t in thresholds]
    per_seed = [
        {"seed": seed, "threshold": t, **fn(run.test_probs, target)}
        for seed, t, fn, run in zip(seed_list, thresholds, metric_fns, runs, strict=True)
    ]
    groups = dataset.test.groups
    ci = bootstrap_ci(
        [r.test_probs for r in runs],
        target,
        positive_index=positive,
        thresholds=thresholds,
        groups=groups,
        bootstrap=bootstrap,
    )
    oofs = [r.oof_probs for r in runs if r.oof_probs is not None]
    final_threshold = chosen_threshold(torch.stack(oofs).mean(0) if oofs else None)
    final_fn = test_metric_fn(dataset.class_names, positive, final_threshold)
    final_probs = torch.stack([r.test_probs for r in runs]).mean(0) if len(runs) > 1 else runs[0].test_probs
    final = {
        "networks": sum(len(r.models) for r in runs),
        "threshold": final_threshold,
        **final_fn(final_probs, target),
    }
    final_summary = summarize(
        [final],
        bootstrap_ci(
            [final_probs],
            target,
            positive_index=positive,
            thresholds=final_threshold,
            groups=groups,
            bootstrap=bootstrap,
        ),
    )
    single = None
    if with_single:
        single = summarize([fn(r.single_test_probs, target) for fn, r in zip(metric_fns, runs, strict=True)], {})
    return RefitScores(per_seed, summarize(per_seed, ci), final, final_summary, final_probs, single)


def write_refit_predictions(out_dir: Path, dataset: Dataset, seed_list: list[int], runs: list[SeedRun], final_probs):
    """Test probabilities per seed and of the final model; out-of-fold ones on train+val with folds."""
    assert dataset.test is not None
    seeds = [f"seed {s}" for s in seed_list]
    write_predictions(
        out_dir / "predictions.csv",
        torch.from_numpy(dataset.test.labels),
        "model",
        [*zip(seeds, [r.test_probs for r in runs], strict=True), ("final", final_probs)],
        dataset.class_names,
    )
    oofs = [(name, r.oof_probs) for name, r in zip(seeds, runs, strict=True) if r.oof_probs is not None]
    if oofs:
        write_predictions(
            out_dir / "oof_predictions.csv", train_val_labels(dataset), "model", oofs, dataset.class_names
        )
