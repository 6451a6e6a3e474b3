"""What SMOTE / ADASYN on pixels cost per trial, against one training epoch on the same data.

    python benchmarks/resampling.py [--n 2000] [--size 64] [--minority 0.3]

Both are measured in this one run, on the built-in synthetic lesions: making the new images
(once per trial) and one epoch of the default small CNN over the resampled training split.
"""

from __future__ import annotations

import argparse
import time

import torch

from tuner.data.device import DeviceData
from tuner.data.imbalance import synthesize
from tuner.data.loader import TensorSplit
from tuner.data.synthetic import make_synthetic
from tuner.train.build import RunSettings
from tuner.train.hparams import Hyperparameters
from tuner.train.run import train_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--minority", type=float, default=0.3)
    args = parser.parse_args()
    images, labels = make_synthetic(args.n, image_size=args.size, minority_fraction=args.minority, seed=0)
    print(
        f"{args.n} images of 3x{args.size}x{args.size}, {labels.mean():.0%} minority, {torch.get_num_threads()} threads"
    )

    seconds = {}
    for strategy in ("smote", "adasyn"):
        start = time.perf_counter()
        new, _ = synthesize(images, labels, strategy, seed=0)
        seconds[strategy] = time.perf_counter() - start
        print(f"{strategy}: {len(new)} new images in {seconds[strategy]:.2f} s")

    device = torch.device("cpu")
    data = DeviceData(
        train=TensorSplit.from_numpy(images, labels, device),
        val=TensorSplit.from_numpy(images[:256], labels[:256], device),
        train_labels=labels,
        num_classes=2,
        positive_index=1,
        channels=3,
        image_size=args.size,
        class_names=("benign", "malignant"),
    )
    settings = RunSettings(max_epochs=1, patience=None, monitor="val_auroc", mode="max")
    _, result = train_model(Hyperparameters(imbalance="oversample"), data, settings, seed=0)
    epoch = result.seconds_per_epoch
    print(f"one epoch of small_cnn over the balanced split: {epoch:.2f} s")
    for strategy, s in seconds.items():
        print(f"{strategy} costs {s / epoch:.2f} epochs, once per trial")


if __name__ == "__main__":
    main()
