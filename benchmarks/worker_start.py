"""Several workers: the fork server started first thing (its imports beside the parent's own) against started
with the first worker (after them). Four workers (--gpus 0,1 --workers-per-gpu 2, trained on the CPU), eight
trials of two epochs on 300 synthetic images at 24 px, through the Python API; the two sides alternate.

    python benchmarks/worker_start.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPACE = {
    "study": {"name": "start", "n_trials": 8, "pruner": {"name": "none"}, "artifacts": False},
    "data": {"source": "synthetic", "image_size": 24, "synthetic": {"n_images": 300, "minority_fraction": 0.2}},
    "train": {"max_epochs": 2, "patience": None, "device": "cpu"},
    "params": {"model": "small_cnn", "width": 4, "depth": 2, "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
}
RUN = """
import sys
import tuner.search.worker_server as server
if sys.argv[1] == "late":
    server.start_worker_server = lambda: None  # the server starts when the first worker does
import tuner
tuner.optimize("space.yaml", study=sys.argv[2], gpus=[0, 1], workers_per_gpu=2, progress=False)
"""


def main(repeats: int = 3) -> None:
    folder = Path(tempfile.mkdtemp())
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    times: dict[str, list[float]] = {"late": [], "early": []}
    for i in range(repeats):
        for side in times:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", RUN, side, f"{side}{i}"], cwd=folder, check=True, capture_output=True)
            times[side].append(time.perf_counter() - start)
    for side, values in times.items():
        print(f"server started {side}: median {statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
