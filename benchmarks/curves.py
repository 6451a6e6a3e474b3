"""Record a learning-curve table: configurations drawn at random from a space, each trained to the end.

Every configuration is trained for ``train.max_epochs`` epochs with no pruner and no early stopping
(``patience`` = ``max_epochs``), through ``tuner.optimize`` itself (random sampler), and its per-epoch
validation values of the study's metric and its seconds per epoch go into a JSON table of numbers
only. ``benchmarks/search.py`` replays searches from the table (samplers x pruners x seeds) without
training anything. The study lives in ``benchmarks/_data/curves/`` (not committed), so a run that is
stopped goes on where it stopped when started again with the same arguments; the table is rewritten
from the study after every run.

    python benchmarks/curves.py --space search_spaces/breast.yaml --data ../shared/data/breastmnist.npz --configs 300
    python benchmarks/curves.py --space search_spaces/quickstart.yaml --configs 100
    python benchmarks/curves.py --space search_spaces/breast64_pretrained.yaml \
        --data ../shared/data/breastmnist_64.npz --configs 24
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import optuna
import torch

import tuner
from tuner.search.keys import TrialKey

HERE = Path(__file__).parent
TABLES = HERE / "curves"


def record(space_path: str, data: str | None, configs: int, threads: int, name: str) -> Path:
    space = tuner.load_space(space_path, {"data.source": data})
    max_epochs = space.train.max_epochs
    store = HERE / "_data" / "curves"
    store.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{store / name}.db"
    done = len(_recorded(storage))
    if done < configs:
        print(f"{name}: {done} of {configs} configurations recorded; training {configs - done} more", flush=True)
        start = time.perf_counter()
        tuner.optimize(
            space_path,
            data=data,
            # a run that goes on from an earlier one is a study of its own, with a new sampler seed (so it
            # draws new configurations); the table gathers every study in the database
            study=f"{name}.{done}",
            storage=storage,
            n_trials=configs - done,
            threads=threads,
            progress=False,
            set={
                "study.sampler": {"name": "random", "seed": done},
                "study.pruner": {"name": "none"},
                "study.stop": None,
                "study.timeout": None,
                "study.artifacts": False,
                "train.patience": max_epochs,
            },
        )
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return write_table(space_path, data, storage, name)


def _recorded(storage: str) -> list[optuna.trial.FrozenTrial]:
    """Every finished trial of every study in the database, in the order they were recorded."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials += study.get_trials(deepcopy=False, states=states)
    return sorted(trials, key=lambda t: t.datetime_start)


def write_table(space_path: str, data: str | None, storage: str, name: str) -> Path:
    """The study's trials as numbers: parameters, the metric per epoch, seconds per epoch."""
    space = tuner.load_space(space_path, {"data.source": data})
    metric = space.study.metric
    rows = []
    distributions: dict[str, str] = {}
    for trial in _recorded(storage):
        for key, dist in trial.distributions.items():
            distributions.setdefault(key, optuna.distributions.distribution_to_json(dist))
        curve = trial.user_attrs.get(TrialKey.HISTORY, {}).get(metric, [])
        rows.append(
            {
                "params": trial.params,
                "values": [round(v, 6) for v in curve],
                # why a configuration stopped before max_epochs (a diverged loss, out of memory)
                "stopped": trial.user_attrs.get(TrialKey.PRUNE_REASON),
                "seconds_per_epoch": trial.user_attrs.get(TrialKey.SECONDS_PER_EPOCH),
            }
        )
    table = {
        "space": str(Path(space_path).resolve().relative_to(HERE.parent.resolve())),
        "data": space.data.source,
        "image_size": space.data.image_size,
        "metric": metric,
        "direction": space.study.resolved_direction,
        "max_epochs": space.train.max_epochs,
        "patience": space.train.patience,
        "distributions": distributions,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}, tuner {tuner.__version__}",
        "configs": rows,
    }
    TABLES.mkdir(exist_ok=True)
    out = TABLES / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    tmp.replace(out)
    print(f"{out}: {len(rows)} configurations", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True)
    parser.add_argument("--data", default=None, help="the data set (default: the space's data.source)")
    parser.add_argument("--configs", type=int, default=300, help="configurations to record in all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="the table's name (default: the space file's stem)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record(args.space, args.data, args.configs, args.threads, args.name or Path(args.space).stem)


if __name__ == "__main__":
    main()
