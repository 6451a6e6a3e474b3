"""The model tuner hands back on BreastMNIST+ 64 px, beside the published baselines.

    pip install -e ".[weights]"
    python benchmarks/quality.py [--workdir DIR] [--folds 5] [--seeds 3] [--tta flip]

Runs the README's two commands as a user types them, in DIR (default: a new temporary folder):

    tuner optimize --space search_spaces/breast64_pretrained.yaml --data ../shared/data/breastmnist_64.npz
    tuner refit --best --study breast64_pretrained --seeds 3 --folds 5 --tta flip

and prints the wall time of each and of both, the best trial's validation AUROC, the test AUROC
of the saved (final) model with its bootstrap CI, the per-seed mean ± sd, one network alone, the
validation -> test gap, and the published rows on the same test split. ``--skip-optimize`` refits a
study already in DIR (its optimize time is then not counted); ``--report-only`` prints the figures of
a refit already there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "breast64_pretrained.yaml"
DATA = (REPO / ".." / "shared" / "data" / "breastmnist_64.npz").resolve()
PUBLISHED = [
    ("MedMNIST v2, ResNet-18 (28 px), from scratch, one run", 0.901),
    ("MedMNIST v2, Google AutoML Vision", 0.919),
    ("MedMNIST+, best at 64 px (ImageNet-pretrained, mean of 3 seeds)", 0.906),
    ("MedMNIST+, best at 128 px (AlexNet)", 0.940),
]


def run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tta", default="flip")
    parser.add_argument("--skip-optimize", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="Print the figures of a refit already in DIR.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuner-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tuner = [sys.executable, "-m", "tuner"]
    optimize = refit = 0.0
    if args.report_only:
        return show(workdir, optimize, refit)
    if not args.skip_optimize:
        optimize = run([*tuner, "optimize", "--space", str(SPACE), "--data", str(args.data)], workdir)
    refit = run(
        [
            *tuner,
            "refit",
            "--best",
            "--study",
            "breast64_pretrained",
            "--seeds",
            str(args.seeds),
            *(["--folds", str(args.folds)] if args.folds > 1 else []),
            "--tta",
            args.tta,
            "--force",
        ],
        workdir,
    )
    show(workdir, optimize, refit)


def show(workdir: Path, optimize: float, refit: float) -> None:
    report = json.loads((workdir / "studies" / "breast64_pretrained" / "refit" / "report.json").read_text())
    final, per_seed = report["final_summary"]["auroc"], report["summary"]["auroc"]
    print()
    print(f"workdir {workdir}")
    if optimize or refit:
        total = (optimize + refit) / 60
        print(f"wall: optimize {optimize / 60:.1f} min, refit {refit / 60:.1f} min, total {total:.1f} min")
    print(f"best trial {report['trial']}: validation AUROC {report['validation_value']:.4f}")
    print(
        f"final model ({report['final']['networks']} networks, folds {report['folds']}, TTA {report['tta']}): "
        f"test AUROC {final['mean']:.4f} (95% CI {final['ci_low']:.3f}-{final['ci_high']:.3f})"
    )
    print(f"per seed (its folds averaged): {per_seed['mean']:.4f} ± {per_seed['sd']:.4f}")
    single = report.get("single_network")
    if single:
        print(f"one network alone (no TTA): {single['auroc']['mean']:.4f} ± {single['auroc']['sd']:.4f}")
    print(f"validation -> test gap: {report['validation_value'] - final['mean']:+.4f}")
    recall = report["summary"]["recall"]
    print(
        f"recall at the out-of-fold threshold, per seed: {recall['mean']:.3f} ± {recall['sd']:.3f}; "
        f"final model {report['final']['recall']:.3f} at threshold {report['final']['threshold']:.3f}"
    )
    print("published, same test split:")
    for name, value in PUBLISHED:
        print(f"  {value:.3f}  {name}")


if __name__ == "__main__":
    main()
