"""Replay searches from a learning-curve table: every sampler with every pruner, over many seeds.

The table (``benchmarks/curves.py``) holds configurations drawn at random from a space, each with its
validation curve to ``max_epochs``. A replayed search is a real Optuna study with the real sampler and
pruner (built by tuner's own registries, from the space's settings): its objective draws a trial's
parameters with tuner's own ``suggest``, looks up the table's configuration nearest to them (same
choices first, then the closest numbers on each range's own scale, log or linear), and reports that
curve epoch by epoch to the pruner, stopping early after ``patience`` epochs without improvement as
tuner's training loop does. Nothing is trained, so a search costs what Optuna's bookkeeping costs.

For each sampler x pruner it prints, over the seeds: the best validation value reached (median and
quartiles) at fractions of the budget, the epochs the median search needs to reach random search
without pruning's final median best, how often the pruner stopped the best configuration the
search had drawn (best when trained to the end), the trials, and the share of trials that drew a table
configuration not drawn before (a sampler that concentrates its draws meets the same curve again
where real training would have met a new one). It draws best-value-against-epochs with quartile
bands to ``docs/search/<table>.png``.

    python benchmarks/search.py benchmarks/curves/breast.json      # random, tpe, cmaes x five pruners
    python benchmarks/search.py benchmarks/curves/breast.json --samplers gp --pruners none,median --seeds 10
    python benchmarks/search.py benchmarks/curves/breast.json --samplers random,tpe --pruners wilcoxon --seeds 3

Replays are kept in ``benchmarks/replays/`` beside the tables (one file per table, keyed on the table's
contents, the space's sampler and pruner settings and the budget), so the docs' tables and plots come back
in seconds from a clone, a later run adds samplers or pruners to what is kept, and ``--fresh`` replays the
requested ones again. The summary covers everything kept for the table.

The best value is the best trial's recorded validation value, as a study reports it: the more trials a
search finishes, the more its maximum is lifted by validation noise (one training seed per
configuration), which favours pruners that finish many trials a little.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

import tuner
from tuner.search.samplers import build_pruner, build_sampler
from tuner.search.space import SearchSpace, suggest

ROOT = Path(__file__).parents[1]
SAMPLERS = ("random", "tpe", "gp", "cmaes")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon")
# Replayed only when asked (--samplers / --pruners): GP fits a Gaussian process at every trial and scipy's
# Wilcoxon test on tied AUROCs is a permutation test, so each search costs minutes where the others cost
# seconds (docs/search.md has the times).
SLOW = ("gp", "wilcoxon")
SAVE_EVERY = 60.0  # seconds between writes of the kept replays during a run
FRACTIONS = (0.25, 0.5, 1.0)


class Table:
    """A learning-curve table, with its configurations as numbers for the nearest-neighbour lookup."""

    def __init__(self, path: Path) -> None:
        raw = json.loads(path.read_text())
        self.name = path.stem
        self.raw = raw
        self.max_epochs: int = raw["max_epochs"]
        self.patience: int | None = raw["patience"]
        self.sign = 1.0 if raw["direction"] == "maximize" else -1.0
        self.curves = [np.asarray(c["values"], dtype=float) for c in raw["configs"]]
        self.distributions = {k: optuna.distributions.json_to_distribution(v) for k, v in raw["distributions"].items()}
        self.names = sorted(self.distributions)
        # One column per parameter: categoricals as the choice's index (compared for equality), numbers
        # on [0, 1] of their range; a parameter a configuration does not have (conditional) is NaN.
        self.matrix = np.array([[self._coord(k, c["params"].get(k)) for k in self.names] for c in raw["configs"]])
        self.categorical = np.array(
            [isinstance(self.distributions[k], optuna.distributions.CategoricalDistribution) for k in self.names]
        )
        self.full_value = np.array([self.sign * self.outcome(c)[0] for c in self.curves])  # trained to the end

    def _coord(self, name: str, value: Any) -> float:
        if value is None:
            return math.nan
        dist = self.distributions[name]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return float(dist.choices.index(value))
        low, high, value = float(dist.low), float(dist.high), float(value)
        if dist.log:
            low, high, value = math.log(low), math.log(high), math.log(value)
        return (value - low) / (high - low) if high > low else 0.0

    def nearest(self, params: dict[str, Any]) -> int:
        point = np.array([self._coord(k, params.get(k)) for k in self.names])
        missing = np.isnan(self.matrix) != np.isnan(point)
        both = ~np.isnan(self.matrix) & ~np.isnan(point)
        diff = np.where(both, np.abs(self.matrix - point), 0.0)
        # a different choice outweighs any distance on the ranges
        mismatch = (self.categorical & both & (diff > 0)) | missing
        numeric = np.where(self.categorical, 0.0, diff)
        score = mismatch.sum(axis=1) * 100.0 + numeric.sum(axis=1)
        return int(np.argmin(score))

    def outcome(self, curve: np.ndarray) -> tuple[float, int]:
        """The value at the best epoch and the epochs run, with the loop's early stopping applied."""
        best, best_epoch, since = -math.inf, 0, 0
        for epoch, value in enumerate(curve, 1):
            if self.sign * value > best:
                best, best_epoch, since = self.sign * value, epoch, 0
            else:
                since += 1
            if self.patience is not None and since >= self.patience:
                return float(curve[best_epoch - 1]), epoch
        return (float(curve[best_epoch - 1]) if best_epoch else math.nan), len(curve)


@dataclass
class Trace:  # kept compactly: see to_json / from_json
    sampler: str
    pruner: str
    seed: int
    epochs: list[int]  # epochs consumed after each trial
    best: list[float]  # the best finished trial's value after each trial
    pruned_the_best: bool  # the best configuration drawn (trained to the end) was pruned
    trials: int
    seconds: float
    configs: int | None = None  # distinct table configurations drawn (a repeat replays the same curve)


def space_for(table: Table) -> SearchSpace:
    return tuner.load_space(ROOT / table.raw["space"], require_data=False)


def make_pruner(space: SearchSpace, name: str, max_epochs: int) -> Any:
    """The pruner ``name`` (``median:n_warmup_steps=10`` sets its options), as tuner builds it from a space."""
    own = space.study.pruner
    name, _, options = name.partition(":")
    if options:  # the space's own settings of that pruner, with these changed
        base = own.model_dump() if own.name == name else {"name": name}
        changed = dict(option.split("=") for option in options.split(","))
        settings = {**base, **{k: float(v) if "." in v else int(v) for k, v in changed.items()}}
        return build_pruner(
            tuner.load_space(space, set={"study.pruner": settings}, require_data=False).study.pruner, max_epochs
        )
    if name == own.name:
        return build_pruner(own, max_epochs)
    settings: dict[str, Any] = {"name": name}
    if name == "percentile" and own.name == "median":  # the same patience before it judges, a stricter cut
        settings |= {"n_startup_trials": own.n_startup_trials, "n_warmup_steps": own.n_warmup_steps}
    patched = tuner.load_space(space, set={"study.pruner": settings}, require_data=False)
    return build_pruner(patched.study.pruner, max_epochs)


def replay(table: Table, sampler: str, pruner: str, seed: int, budget: int) -> Trace:
    space = space_for(table)
    settings = space.study.sampler.model_copy(update={"name": sampler, "seed": seed})
    study = optuna.create_study(
        study_name=f"replay-{seed}",  # Hyperband assigns brackets by a hash of the name: the same each run
        direction=table.raw["direction"],
        sampler=build_sampler(settings),
        pruner=make_pruner(space, pruner, table.max_epochs),
    )
    consumed = 0
    epochs: list[int] = []
    best: list[float] = []
    drawn: dict[int, bool] = {}  # configuration -> pruned
    start = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        nonlocal consumed
        suggest(trial, space)
        index = table.nearest(trial.params)
        curve = table.curves[index]
        value, run = table.outcome(curve)
        drawn.setdefault(index, False)
        for epoch, v in enumerate(curve[:run], 1):
            consumed += 1
            trial.report(float(v), epoch)
            if trial.should_prune():
                drawn[index] = True
                raise optuna.TrialPruned()
        if len(curve) < table.max_epochs and run == len(curve):  # it stopped in training (diverged)
            raise optuna.TrialPruned()
        return value

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        epochs.append(consumed)
        so_far = best[-1] if best else math.nan
        if trial.state == optuna.trial.TrialState.COMPLETE and not table.sign * trial.value <= table.sign * so_far:
            so_far = trial.value  # the first finished trial, or a better one (NaN compares false)
        best.append(so_far)
        if consumed >= budget:
            study.stop()

    study.optimize(objective, n_trials=100_000, callbacks=[after])
    top = max(drawn, key=lambda i: table.full_value[i])
    seconds = time.perf_counter() - start
    return Trace(sampler, pruner, seed, epochs, best, drawn[top], len(study.trials), seconds, len(drawn))


def to_json(trace: Trace) -> dict[str, Any]:
    """The epochs each trial ran and the best value only where it changed: a fraction of the plain form."""
    kept = asdict(trace)
    kept["epochs"] = np.diff(trace.epochs, prepend=0).tolist()
    kept["best"] = [[i, v] for i, v in enumerate(trace.best) if i == 0 or v != trace.best[i - 1]]
    return kept


def from_json(kept: dict[str, Any]) -> Trace:
    best, changes = [], dict(kept["best"])
    for i in range(len(kept["epochs"])):
        best.append(changes.get(i, best[-1] if best else math.nan))
    return Trace(**{**kept, "epochs": np.cumsum(kept["epochs"]).tolist(), "best": best})


def best_at(trace: Trace, grid: np.ndarray) -> np.ndarray:
    """The best value reached by each number of epochs consumed (NaN before the first finished trial)."""
    at = np.searchsorted(np.asarray(trace.epochs), grid, side="right") - 1
    values = np.asarray(trace.best, dtype=float)
    return np.where(at >= 0, values[np.clip(at, 0, None)], np.nan)


def kept_path(path: Path, budget: int, space: SearchSpace) -> Path:
    """Where replays of this table (its exact contents), with the space's sampler and pruner settings as they
    are now, at this budget are kept between runs."""
    settings = json.dumps(space.study.model_dump(mode="json", include={"sampler", "pruner"}), sort_keys=True)
    digest = hashlib.sha1(path.read_bytes() + settings.encode()).hexdigest()[:12]
    return ROOT / "benchmarks" / "replays" / f"{path.stem}-{digest}-{budget}.json"


def replay_key(sampler: str, pruner: str, seed: int) -> str:
    """A replay's key in the kept file."""
    return f"{sampler}|{pruner}|{seed}"


def save(cache: Path, kept: dict[str, Any]) -> None:
    """Write the kept replays whole or not at all, and drop the files of an older table or space."""
    table, _, budget = cache.stem.split("-")  # as kept_path names it
    for stale in cache.parent.glob(f"{table}-*-{budget}.json"):
        if stale != cache:
            stale.unlink()
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    partial.write_text(json.dumps(kept, separators=(",", ":")) + "\n")
    partial.replace(cache)


def _run(args: tuple[Path, str, str, int, int]) -> Trace:
    path, sampler, pruner, seed, budget = args
    warnings.simplefilter("ignore")  # CMA-ES on categoricals, experimental samplers and pruners
    torch.set_num_threads(1)  # the GP sampler's torch: one process per core
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return replay(Table(path), sampler, pruner, seed, budget)


def summarise(table: Table, traces: list[Trace], budget: int, out_dir: Path) -> str:
    space = space_for(table)
    default = (space.study.sampler.name, space.study.pruner.name)
    grid = np.arange(1, budget + 1)
    groups: dict[tuple[str, str], list[Trace]] = {}
    for t in traces:
        groups.setdefault((t.sampler, t.pruner), []).append(t)
    curves = {key: np.stack([best_at(t, grid) for t in mine]) for key, mine in groups.items()}
    pruned = {key: float(np.mean([t.pruned_the_best for t in mine])) for key, mine in groups.items()}
    # The median over seeds, larger is better: a search with no finished trial yet has reached nothing,
    # the worst value rather than a missing one. Both the ranking and "epochs to random's final median" use it.
    signed = {k: np.median(np.where(np.isnan(v), -np.inf, table.sign * v), axis=0) for k, v in curves.items()}
    reference = signed.get(("random", "none"))
    target = reference[-1] if reference is not None else math.nan
    order = sorted(curves, key=lambda k: (SAMPLERS.index(k[0]), PRUNERS.index(k[1].partition(":")[0]), k[1]))
    lines = [
        f"### {table.name}: {len(table.curves)} configurations of `{table.raw['space']}`, "
        f"{table.raw['metric']}, budget {budget} epochs",
        "",
        "| sampler | pruner | "
        + " | ".join(f"best at {f:.0%}" for f in FRACTIONS)
        + " | epochs to random's final median | best config pruned | trials | new configs | seeds |",
        "|---|---|" + "---|" * (len(FRACTIONS) + 5),
    ]
    for key in order:
        cells = []
        for f in FRACTIONS:
            column = curves[key][:, int(f * budget) - 1]
            q1, q2, q3 = np.nanpercentile(column, [25, 50, 75])
            cells.append(f"{q2:.4f} [{q1:.4f}, {q3:.4f}]")
        reached = np.nonzero(signed[key] >= target)[0]
        epochs = f"{grid[reached[0]]}" if len(reached) else (f"> {budget}" if reference is not None else "n/a")
        mine = groups[key]
        trials = np.median([t.trials for t in mine])
        new = [t.configs / t.trials for t in mine if t.configs is not None]
        mark = " (default)" if key == default else ""
        lines.append(
            f"| {key[0]}{mark} | {key[1]} | "
            + " | ".join(cells)
            + f" | {epochs} | {pruned[key]:.0%} | {trials:.0f} | "
            + (f"{np.median(new):.0%}" if new else "n/a")
            + f" | {len(curves[key])} |"
        )
    ranked = sorted(order, key=lambda k: -signed[k][-1])
    place = f"{ranked.index(default) + 1} of {len(ranked)}" if default in ranked else "not replayed"
    lines += [
        "",
        f"Median best at the full budget, ranked: default {default[0]} + {default[1]} is {place}; "
        f"first {ranked[0][0]} + {ranked[0][1]}.",
    ]
    _plot(table, curves, order, default, grid, out_dir / f"{table.name}.png")
    return "\n".join(lines)


def _plot(table, curves, order, default, grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    samplers = [s for s in SAMPLERS if any(k[0] == s for k in order)]
    fig, axes = plt.subplots(
        1, len(samplers), figsize=(4.2 * len(samplers) + 2.2, 3.6), sharey=True, squeeze=False, layout="constrained"
    )

    def label(pruner: str) -> str:
        return f"{pruner} (the space's settings)" if pruner == default[1] else pruner

    # one colour per pruner in every panel (not every pruner is replayed with every sampler)
    pruners = sorted({k[1] for k in order}, key=lambda p: (PRUNERS.index(p.partition(":")[0]), p))
    colours = {p: f"C{i}" for i, p in enumerate(pruners)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for ax, sampler in zip(axes[0], samplers, strict=True):
            for key in [k for k in order if k[0] == sampler]:
                q1, q2, q3 = np.nanpercentile(curves[key], [25, 50, 75], axis=0)
                few = np.mean(~np.isnan(curves[key]), axis=0) < 0.5  # drawn once most searches have a best
                q1, q2, q3 = (np.where(few, np.nan, q) for q in (q1, q2, q3))
                ax.plot(grid, q2, color=colours[key[1]], lw=2.2 if key == default else 1.2)
                ax.fill_between(grid, q1, q3, color=colours[key[1]], alpha=0.12)
            ax.set_title(sampler)
            ax.set_xlabel("epochs consumed")
            ax.grid(alpha=0.3)
    low = np.nanpercentile(np.concatenate([c[:, len(grid) // 10 :] for c in curves.values()]), 5)
    axes[0][0].set_ylim(bottom=low)
    axes[0][0].set_ylabel(f"best {table.raw['metric']} (median, quartiles)")
    fig.legend(
        [Line2D([], [], color=colours[p], lw=2.2 if p == default[1] else 1.2) for p in pruners],
        [label(p) for p in pruners],
        fontsize=8,
        loc="outside right center",
    )
    fig.suptitle(f"{table.name}: replayed searches ({len(table.curves)} recorded configurations)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--samplers", default=",".join(s for s in SAMPLERS if s not in SLOW))
    parser.add_argument("--pruners", default=",".join(p for p in PRUNERS if p not in SLOW))
    parser.add_argument(
        "--budget", type=int, default=None, help="epochs per search (default: 2 x n_trials x max_epochs)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--fresh", action="store_true", help="replay again what is kept in benchmarks/replays/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "search")
    args = parser.parse_args()
    for path in args.tables:
        table = Table(path)
        space = space_for(table)
        budget = args.budget or 2 * space.study.n_trials * table.max_epochs
        tasks = [
            (path, sampler, pruner, seed, budget)
            for sampler in args.samplers.split(",")
            for pruner in args.pruners.split(",")
            for seed in range(args.seeds)
        ]
        cache = kept_path(path, budget, space)
        kept = json.loads(cache.read_text()) if cache.exists() else {}
        todo = [t for t in tasks if args.fresh or replay_key(*t[1:4]) not in kept]
        start = time.perf_counter()
        if todo:
            saved = time.perf_counter()
            with ProcessPoolExecutor(args.jobs) as pool:
                for task, trace in zip(todo, pool.map(_run, todo, chunksize=4), strict=True):
                    kept[replay_key(*task[1:4])] = to_json(trace)
                    if time.perf_counter() - saved > SAVE_EVERY:  # a stopped run keeps what it replayed
                        save(cache, kept)
                        saved = time.perf_counter()
            save(cache, kept)
        # every replay kept for this table and budget (earlier runs' other samplers and pruners too)
        traces = [from_json(t) for t in kept.values()]
        print(summarise(table, traces, budget, args.out))
        slowest = max({t.sampler for t in traces}, key=lambda s: sum(t.seconds for t in traces if t.sampler == s))
        print(
            f"\n{len(todo)} searches replayed in {time.perf_counter() - start:.0f} s, {len(traces) - len(todo)} "
            f"kept from earlier runs in {cache.relative_to(ROOT)} (slowest sampler: {slowest})\n"
        )


if __name__ == "__main__":
    main()
