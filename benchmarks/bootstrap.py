"""Bootstrap CIs: every resample at once (a binary, ungrouped test set) against one resample at a time.

    python benchmarks/bootstrap.py

The one-at-a-time path is the one grouped and multiclass test sets take; one image per group draws the same
resamples through it, so both sides compute the same intervals (checked here) on 400 test images, 1,000
resamples, one seed. The two sides alternate; medians with their range.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from tuner.final.evaluation import bootstrap_ci


def main(repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    target = torch.from_numpy((rng.random(400) < 0.1).astype(np.int64))
    score = np.clip(0.4 * target.numpy() + rng.random(400) * 0.6, 0, 1)
    probs = [torch.from_numpy(np.stack([1 - score, score], 1)).float()]
    sides = {"one at a time": {"groups": np.arange(400)}, "all at once": {}}
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for _ in range(repeats):
        for name, kw in sides.items():
            start = time.perf_counter()
            results[name] = bootstrap_ci(probs, target, positive_index=1, thresholds=0.5, **kw)
            times[name].append(time.perf_counter() - start)
    assert results["one at a time"]["auroc"] == results["all at once"]["auroc"]
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")
    ratio = statistics.median(times["one at a time"]) / statistics.median(times["all at once"])
    print(f"all at once is {ratio:.1f} x faster")


if __name__ == "__main__":
    main()
