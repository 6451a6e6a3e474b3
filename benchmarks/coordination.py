"""How far the coordination of many workers on one PostgreSQL study goes on this machine.

    python benchmarks/coordination.py [--workers 4 16 32] [--trials 200] [--storage postgresql://...]

Trials that train almost nothing (a one-block CNN of width 2 on 8 px synthetic images, one epoch,
random sampler, no artifacts), so what is measured is the coordination: claiming trials from the
budget, Optuna's storage calls, heartbeats, process start-up. For each worker count, one
``tuner optimize --workers N --threads 1`` run adds ``--trials`` trials to a fresh study on one
PostgreSQL server (a throw-away one on loopback unless ``--storage`` is given). Prints the wall
time, trials per second, the exact total, the peak number of database connections, and where the
workers' time went: inside trials, or before the first trial (process start, imports, data) and
between trials (claiming, sampling, storage).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def space(name: str, trials: int) -> dict:
    return {
        "study": {
            "name": name,
            "n_trials": trials,
            "sampler": {"name": "random"},
            "pruner": {"name": "none"},
            "artifacts": False,
        },
        "data": {"source": "synthetic", "image_size": 8, "synthetic": {"n_images": 60}},
        "train": {"max_epochs": 1, "patience": None, "device": "cpu"},
        "params": {"model": "small_cnn", "width": 2, "depth": 1, "lr": {"low": 1e-3, "high": 1e-2}, "batch_size": 64},
    }


class ConnectionWatch(threading.Thread):
    """The peak number of client connections to the database, polled every 0.2 s."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.NullPool)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        while not self.done.is_set():
            with contextlib.suppress(Exception), self.engine.connect() as con:
                self.peak = max(self.peak, int(con.execute(query).scalar()) - 1)  # not this connection
            time.sleep(0.2)


def measure(url: str, workers: int, trials: int, folder: Path) -> dict:
    name = f"coord{workers}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space(name, trials)))
    watch = ConnectionWatch(url)
    watch.start()
    start = time.time()
    command = [sys.executable, "-m", "tuner", "optimize", "--space", str(path), "--storage", url]
    command += ["--workers", str(workers), "--threads", "1", "--quiet", "--heartbeat", "10"]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    wall = time.time() - start
    watch.done.set()
    watch.join()
    if result.returncode != 0:
        raise SystemExit(f"tuner optimize failed:\n{result.stdout}\n{result.stderr}")
    done = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    finished = [t for t in done if t.state.name in ("COMPLETE", "PRUNED")]
    inside = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
    first = min(t.datetime_start.timestamp() for t in finished)
    return {
        "workers": workers,
        "wall": wall,
        "finished": len(finished),
        "states": {s: sum(t.state.name == s for t in done) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
        "rate": len(finished) / wall,
        "connections": watch.peak,
        "inside": inside / (wall * workers),
        "startup": first - start,
        # once the first trial started: finished trials per second, and each trial's worker-seconds
        # spent outside training (claiming, sampling, storage writes, waiting for a core)
        "steady": len(finished) / (wall - (first - start)),
        "outside": ((wall - (first - start)) * workers - inside) / len(finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--storage", default=None, help="A PostgreSQL URL; default: a throw-away server")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.storage is None:
            from tests.servers import postgres_server

            url = stack.enter_context(postgres_server(max_connections=300))
        else:
            url = args.storage
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print(f"{args.trials} trials per run, one PostgreSQL study each; this machine: {os.cpu_count()} cores")
        header = "workers  wall s  trials/s  finished (complete/pruned/fail/running)  peak db connections  "
        print(header + "in trials  until first trial  steady trials/s  worker-s outside a trial, per trial")
        for n in args.workers:
            r = measure(url, n, args.trials, folder)
            s = r["states"]
            print(
                f"{n:>7}  {r['wall']:6.1f}  {r['rate']:8.2f}  {r['finished']:>8} ({s['COMPLETE']}/{s['PRUNED']}/"
                f"{s['FAIL']}/{s['RUNNING']})               {r['connections']:>19}  {r['inside']:>8.0%}  "
                f"{r['startup']:>8.1f} s  {r['steady']:>15.2f}  {r['outside']:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
