"""What fixed-size epochs (``train.epoch_images``) buy a search on a large set, at a fixed time budget.

Two studies of the same space on the same data, each given ``--budget`` seconds (``study.timeout``):
today's epochs (one pass over the training images each) against epochs of ``--epoch-images`` images.
In the second, ``max_epochs`` and ``patience`` are scaled so a trial that runs to the end sees the same
images and stops after the same images without improvement, while the pruner's warm-up stays the
space's number of epochs: the pruner first judges a trial after that many fixed-size epochs instead of
that many passes, which is the saving (and the risk: an earlier judgement). The arms alternate
(``--rounds``), each round with new sampler seeds, one study at a time. It prints trials per hour
(finished: completed and pruned), the best validation value at the budget, and per finished trial the
epochs it ran and the share of their seconds spent validating (every epoch validates on the whole
validation split, so short epochs validate more often). With ``--refit-seeds N``
each study's best trial is also refit on train + validation with N seeds and read once on the test
split, so a higher best validation value can be checked against test AUROC (the study itself never
reads the test labels).

    python benchmarks/fidelity.py --space search_spaces/quickstart.yaml --set data.synthetic.n_images=5000 \\
        --budget 900 --epoch-images 600 --rounds 2
    python benchmarks/fidelity.py --space search_spaces/breast.yaml --data ../shared/data/breastmnist.npz \\
        --budget 300 --epoch-images 128 --rounds 2 --refit-seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

import tuner
from tuner.search import best_value, prepare


@dataclass(frozen=True)
class Outcome:
    trials_per_hour: float
    best: float | None  # the best validation value
    epochs: float  # per finished trial, median
    validation_share: float  # of the finished trials' epoch seconds, together
    test: float | None  # the best trial refit, test AUROC averaged over the refit seeds (--refit-seeds)


def run(
    space_path: str,
    data: str | None,
    sets: list[str],
    root: Path,
    name: str,
    budget: float,
    seed: int,
    refit_seeds: int,
    **train,
) -> Outcome:
    overrides = [*sets, f"study.sampler.seed={seed}", f"study.timeout={budget}", "study.n_trials=100000"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    start = time.perf_counter()
    study = tuner.optimize(
        space_path,
        data=data,
        study=name,
        storage=f"sqlite:///{root}/{name}.db",
        cache_dir=root / "cache",
        set=overrides,
        progress=False,
    )
    seconds = time.perf_counter() - start
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    best, test = best_value(study), None
    if refit_seeds and best is not None:
        model = tuner.refit(
            study, seeds=refit_seeds, out_dir=root / name, cache_dir=root / "cache", bootstrap=0, progress=False
        )
        test = statistics.mean(m["auroc"] for m in model.report.per_seed)
    histories = [t.user_attrs.get("history", {}) for t in finished]
    epochs = statistics.median(len(h.get("train_loss", [])) for h in histories) if finished else math.nan
    validating = sum(sum(h.get("validate_seconds", [])) for h in histories)
    spent = sum(sum(h.get("epoch_seconds", [])) for h in histories)
    share = validating / spent if spent else math.nan  # no finished epoch: no share, not 0 %
    return Outcome(len(finished) / seconds * 3600, best, epochs, share, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--set", action="append", default=[], help="key=value, as tuner optimize --set")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per study")
    parser.add_argument("--epoch-images", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--refit-seeds", type=int, default=0, help="refit each study's best; 0: no test read")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = tuner.load_space(args.space, {"data.source": args.data}, args.set)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    n_train = len(prepare(space, cache_dir=root / "cache").train.labels)
    scale = max(1, round(n_train / args.epoch_images))
    t = space.train
    arms = {
        "one pass per epoch": {},
        f"{args.epoch_images} images per epoch": {
            "epoch_images": args.epoch_images,
            "max_epochs": t.max_epochs * scale,
            **({"patience": t.patience * scale} if t.patience else {}),
        },
    }
    print(f"{n_train} training images; fixed-size epochs: {args.epoch_images} images, x{scale} epochs", flush=True)
    results: dict[str, list[Outcome]] = {arm: [] for arm in arms}
    with tmp:
        for r in range(args.rounds):
            for i, (arm, train) in enumerate(arms.items()):
                name = f"arm{i}r{r}"
                out = run(args.space, args.data, args.set, root, name, args.budget, r, args.refit_seeds, **train)
                results[arm].append(out)
                tested = f", test AUROC {out.test:.4f}" if out.test is not None else ""
                print(
                    f"round {r}: {arm}: {out.trials_per_hour:.0f} trials/hour, best {out.best}{tested}; per trial: "
                    f"{out.epochs:g} epochs (median), {out.validation_share:.0%} of their seconds validating",
                    flush=True,
                )

    def median(values: list[float | None]) -> float:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else float("nan")

    print(f"\n{'arm':<28} {'trials/hour':>12} {'best val (median)':>18} {'test AUROC (median)':>20} {'validating':>11}")
    for arm, rows in results.items():
        print(
            f"{arm:<28} {median([o.trials_per_hour for o in rows]):>12.0f} {median([o.best for o in rows]):>18.4f} "
            f"{median([o.test for o in rows]):>20.4f} {median([o.validation_share for o in rows]):>11.0%}"
        )


if __name__ == "__main__":
    main()
