"""Does a threshold chosen on the recipe's out-of-fold predictions hold the operating point steadier across
refit seeds than the trial's frozen threshold? The commands a user types, in a scratch folder:

    python benchmarks/operating_point.py [--data ../shared/data/breastmnist.npz] [--trials 6] [--max-epochs 20]
        [--seeds 5] [--folds 3]

``tuner optimize`` on ``search_spaces/breast.yaml`` (with --trials and --max-epochs), then ``tuner refit
--best --seeds S`` (frozen threshold) and ``tuner refit --best --seeds S --folds K`` (out-of-fold
threshold). Prints, for each, the standard deviation over seeds of test recall and of specificity and
their sum. Both refits read the test set: a measurement of the rule, not a way to choose a model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "breastmnist.npz"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    space = yaml.safe_load((ROOT / "search_spaces" / "breast.yaml").read_text())
    space["study"]["n_trials"] = args.trials
    space["train"]["max_epochs"] = args.max_epochs
    space["data"]["source"] = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "breast.yaml").write_text(yaml.safe_dump(space))
        subprocess.run(["tuner", "optimize", "--space", "breast.yaml", "-q"], cwd=folder, check=True)
        for name, extra in (("frozen", []), ("out-of-fold", ["--folds", str(args.folds)])):
            command = ["tuner", "refit", "--study", "breast", "--seeds", str(args.seeds), "--out", name, *extra]
            subprocess.run(command, cwd=folder, check=True, capture_output=True)
            summary = json.loads((folder / name / "report.json").read_text())["summary"]
            recall, specificity = summary["recall"]["sd"], summary["specificity"]["sd"]
            print(
                f"{name:>12}: sd over {args.seeds} seeds of test recall {recall:.3f}, "
                f"specificity {specificity:.3f}, sum {recall + specificity:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
