"""Reference point: a plain, hand-written Optuna script on BreastMNIST.

Written the way optuna-examples' pytorch_simple.py is: tensors in memory, a
DataLoader over a TensorDataset, a small CNN, at most 20 epochs, median pruning
on validation AUROC (from probabilities, scikit-learn). It searches the same
knobs as search_spaces/breast.yaml minus those that plain script lacks
(imbalance strategies, augmentation, schedulers), so `tuner optimize` on that
space can be compared with it in wall time per trial and best value.

    python benchmarks/plain_optuna.py --data ../shared/data/breastmnist.npz --n-trials 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optuna
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_model(width: int, dropout: float, hidden: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for i in range(3):
        out = width * 2**i
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1))
        channels = out
    head: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
    if hidden:
        head += [nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout)]
        channels = hidden
    return nn.Sequential(*layers, *head, nn.Linear(channels, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/breastmnist.npz")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    npz = np.load(args.data)
    x_train = torch.tensor(npz["train_images"], dtype=torch.float32)[:, None] / 255
    y_train = torch.tensor(npz["train_labels"][:, 0], dtype=torch.long)
    x_val = (torch.tensor(npz["val_images"], dtype=torch.float32)[:, None] / 255 - 0.5) / 0.5
    y_val = npz["val_labels"][:, 0]
    x_train = (x_train - 0.5) / 0.5
    positive = 0  # malignant

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(trial.number)
        width = trial.suggest_categorical("width", [16, 32])
        hidden = trial.suggest_categorical("hidden", [0, 128])
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        opt_name = trial.suggest_categorical("optimizer", ["adam", "adamw"])
        lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
        batch_size = trial.suggest_categorical("batch_size", [32, 64])
        model = make_model(width, dropout, hidden)
        if opt_name == "adamw":
            wd = trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
        best = 0.0
        for epoch in range(args.epochs):
            model.train()
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                probs = model(x_val).softmax(1)[:, positive].numpy()
            auroc = roc_auc_score(y_val == positive, probs)
            best = max(best, auroc)
            trial.report(auroc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=6),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=4),
    )
    start = time.perf_counter()
    study.optimize(objective, n_trials=args.n_trials)
    seconds = time.perf_counter() - start
    states = [t.state.name for t in study.trials]
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    print(f"plain optuna: {args.n_trials} trials in {seconds:.1f} s, {states.count('PRUNED')} pruned")
    print(f"{epochs} epochs trained, {seconds / epochs:.3f} s per epoch (training + validation)")
    print(f"best val AUROC {study.best_value:.4f} (trial {study.best_trial.number}) {study.best_params}")


if __name__ == "__main__":
    main()
