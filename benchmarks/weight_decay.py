"""Weight decay on norms and biases or not: the same fine-tuning run both ways, same seeds.

    pip install -e ".[weights]"
    python benchmarks/weight_decay.py [--data ../shared/data/breastmnist_64.npz] [--seeds 3]

The recipe is ``search_spaces/breast64_pretrained.yaml`` at the configuration its search chose
(docs/results.md: AdamW lr 1e-3, backbone at 0.37 x that, weight decay 0.031, dropout 0.04, flips and
rotation; the other keys at the space's first choice), EfficientNet-Lite0 from its ImageNet weights,
trained on the training split and scored on validation (the test split is not read). Each seed runs
both ways, alternating, in this one process: ``weight_decay_1d: true`` (every parameter decayed, as
tuner did before) and ``false`` (norm weights and biases not decayed, timm's rule and today's default).
Prints each network's best validation AUROC and epoch, and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tuner.search import load_space, prepare, run_settings
from tuner.search.trial_data import TrialData
from tuner.train import Hyperparameters, train_model

SPACE = Path(__file__).parents[1] / "search_spaces" / "breast64_pretrained.yaml"
CHOSEN = {
    "lr": 1.0e-3,
    "backbone_lr_ratio": 0.37,
    "weight_decay": 0.031,
    "dropout": 0.04,
    "augment": "flip_rotate",
    "label_smoothing": 0.0,
    "class_weights": "none",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/breastmnist_64.npz")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    space = load_space(SPACE, {"data.source": args.data, "train.device": "cpu"})
    fixed = {k: v.value for k, v in ((s.name, s) for s in space.specs) if hasattr(v, "value")}
    base = Hyperparameters(**{**fixed, **CHOSEN})
    dataset = prepare(space, cache_dir=Path("studies/cache"))
    data, _ = TrialData(space, dataset, torch.device("cpu"), Path("studies/cache")).at(None)
    settings = run_settings(space)
    print(
        f"{dataset.description}: {len(dataset.train)} train / {len(dataset.val)} val; {torch.get_num_threads()} threads"
    )
    rows: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(args.seeds):
        for decay_1d in (True, False) if seed % 2 == 0 else (False, True):
            hparams = base.model_copy(update={"weight_decay_1d": decay_1d})
            began = time.perf_counter()
            _, result = train_model(hparams, data, settings, seed=seed)
            value = result.history[space.study.metric][result.best_epoch - 1]
            rows[decay_1d].append(value)
            print(
                f"seed {seed} weight_decay_1d={str(decay_1d).lower():<5} {space.study.metric} {value:.4f} "
                f"(best epoch {result.best_epoch}, {time.perf_counter() - began:.0f} s)",
                flush=True,
            )
    for decay_1d, values in rows.items():
        label = "every parameter decayed (before)" if decay_1d else "norms and biases not decayed (now)"
        print(f"{label}: median {statistics.median(values):.4f}, values {', '.join(f'{v:.4f}' for v in values)}")
    diffs = [b - a for a, b in zip(rows[True], rows[False], strict=True)]
    print(f"now - before, per seed: {', '.join(f'{d:+.4f}' for d in diffs)}; median {statistics.median(diffs):+.4f}")


if __name__ == "__main__":
    main()
