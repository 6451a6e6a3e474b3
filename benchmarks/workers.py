"""Trials per hour on this machine: one worker using every core's thread, or one single-threaded worker
per core, both on the default SQLite storage.

Each side is a fresh ``tuner optimize`` process (start-up included) in its own folder; the sides
alternate within one run and the medians are printed with the per-round ratio. On
``benchmarks/overhead.yaml`` (one fixed configuration) both sides do identical work; on a searched
space the sampler draws different configurations when trials run in parallel, so the work differs.

    python benchmarks/workers.py --space benchmarks/overhead.yaml --data ../shared/data/breastmnist.npz
    python benchmarks/workers.py --space search_spaces/breast.yaml --data ../shared/data/breastmnist.npz --trials 20
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

import optuna
from optuna.trial import TrialState

from tuner.search.resources import available_cores


def run(space: Path, data: str, trials: int, workers: int, threads: int, folder: Path, cache: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "tuner", "optimize", "--space", str(space), "--data", data, "-q"]
    cmd += ["--n-trials", str(trials), "--workers", str(workers), "--threads", str(threads), "--study", "bench"]
    cmd += ["--cache-dir", str(cache)]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/studies/bench.db")
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    epochs = sum(len(t.intermediate_values) for t in finished)
    return {"seconds": seconds, "finished": len(finished), "epochs": epochs, "best": study.best_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path(__file__).parent / "overhead.yaml")
    parser.add_argument("--data", default="../shared/data/breastmnist.npz")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    cores = available_cores()
    sides = {f"1 worker x {cores} threads": (1, cores), f"{cores} workers x 1 thread": (cores, 1)}
    work = Path(tempfile.mkdtemp(prefix="tuner-workers-"))
    cache = work / "cache"
    inspect = [sys.executable, "-m", "tuner", "data", "inspect", "--space", str(args.space), "--data", data]
    subprocess.run([*inspect, "--cache-dir", str(cache)], check=True, capture_output=True)  # decode once
    results: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                workers, threads = sides[name]
                r = run(args.space.resolve(), data, args.trials, workers, threads, work / "run", cache)
                results[name].append(r)
                print(
                    f"round {round_ + 1} {name}: {r['seconds']:.1f} s, {r['finished']} trials finished, "
                    f"{r['epochs']} epochs, best {r['best']:.4f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.space.name}, {args.trials} trials per run, {args.rounds} rounds, {cores} cores:")
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(r["seconds"] for r in rows)
        print(f"  {name}: median {medians[name]:.1f} s = {3600 * args.trials / medians[name]:.0f} trials per hour")
    one, many = (results[name] for name in sides)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(one, many, strict=True)]
    print(
        f"  one worker / {cores} workers wall time: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
