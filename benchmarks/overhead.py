"""Does tuner cost more than a hand-written Optuna script doing the same training?

One fixed configuration, both ways, as separate processes (start-up included):

- plain: the optuna-examples way: tensors in memory, a TensorDataset and a
  DataLoader, the network written out by hand, AUROC from scikit-learn, an
  in-memory SQLite study;
- tuner: ``tuner optimize`` on ``benchmarks/overhead.yaml`` (the same network,
  optimizer, batch size, epochs and trials), with everything it does by
  default: all validation metrics, the per-epoch history and timings in a
  SQLite file, the threshold and the trial plots for the dashboard.

The two sides alternate within one run (the machine's noise hits both) and the
median of the per-round ratios is printed with its range.

    python benchmarks/overhead.py --data ../shared/data/breastmnist.npz --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plain(data: str, n_trials: int, epochs: int) -> None:
    """The hand-written side: the same small CNN (3 conv-BN-ReLU blocks from width 32, global average pool)."""
    import numpy as np
    import optuna
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    npz = np.load(data)
    x_train = (torch.tensor(npz["train_images"], dtype=torch.float32)[:, None] / 255 - 0.5) / 0.5
    y_train = torch.tensor(npz["train_labels"][:, 0], dtype=torch.long)
    x_val = (torch.tensor(npz["val_images"], dtype=torch.float32)[:, None] / 255 - 0.5) / 0.5
    y_val = npz["val_labels"][:, 0]
    positive = 0  # malignant

    def make_model() -> nn.Module:
        layers: list[nn.Module] = []
        channels = 1
        for i in range(3):
            out = 32 * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(1))
            channels = out
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, 2))

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(trial.number)
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
        best = 0.0
        for epoch in range(epochs):
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
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", storage="sqlite:///:memory:")
    study.optimize(objective, n_trials=n_trials)
    print(f"plain: best val AUROC {study.best_value:.4f}")


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/breastmnist.npz")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--side", choices=["plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    if args.side == "plain":
        plain(data, args.trials, args.epochs)
        return

    work = Path(tempfile.mkdtemp(prefix="tuner-overhead-"))
    plain_cmd = [sys.executable, str(Path(__file__).resolve()), "--side", "plain", "--data", data]
    plain_cmd += ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    tuner_cmd = [sys.executable, "-m", "tuner", "optimize", "--space", str(HERE / "overhead.yaml"), "--data", data]
    tuner_cmd += ["--n-trials", str(args.trials), "--max-epochs", str(args.epochs)]
    # Decode once, as any second run of a study finds it: the cache is part of tuner's design.
    inspect = [sys.executable, "-m", "tuner", "data", "inspect", "--space", str(HERE / "overhead.yaml"), "--data", data]
    subprocess.run(inspect, cwd=work, check=True, capture_output=True)
    ratios, rows = [], []
    try:
        for round_ in range(args.rounds):
            for leftover in (work / "studies").glob("overhead*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            order = ("plain", "tuner") if round_ % 2 == 0 else ("tuner", "plain")
            seconds = {side: timed(plain_cmd if side == "plain" else tuner_cmd, work) for side in order}
            ratios.append(seconds["tuner"] / seconds["plain"])
            rows.append(seconds)
            print(
                f"round {round_ + 1}: plain {seconds['plain']:.1f} s, tuner {seconds['tuner']:.1f} s, "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{args.trials} trials x {args.epochs} epochs, {args.rounds} rounds: "
        f"plain median {statistics.median(r['plain'] for r in rows):.1f} s, "
        f"tuner median {statistics.median(r['tuner'] for r in rows):.1f} s"
    )
    print(f"tuner / plain: median ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
