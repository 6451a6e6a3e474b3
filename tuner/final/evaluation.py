"""The locked test set: its guard (every read recorded; judging a second trial refused unless
allowed), its data and probabilities, the report statistics (bootstrap CIs over test items), and
``tuner evaluate`` of a saved model. ``refit`` and ``ensemble`` read the test set only through here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import optuna
import torch

from tuner.data import Dataset, Normalize, TensorSplit, load_labelled_images
from tuner.errors import TunerError
from tuner.final.report import write_report
from tuner.final.results import Estimate, EvaluationReport, Summary
from tuner.metric_names import METRIC_NAMES, REPORT_ORDER
from tuner.search import STUDIES_DIR, DataSettings, SearchSpace, StudyKey, prepare, redacted_command
from tuner.train import (
    SavedModel,
    average_probabilities,
    binary_metrics,
    classification_metrics,
    evaluation_report,
    load_model,
    plot_confusion,
    plot_roc_pr,
)


def test_reads(study: optuna.Study) -> list[dict]:
    return list(study.user_attrs.get(StudyKey.TEST_SET_READS, []))


def check_test_reuse(study: optuna.Study, trial_number: int, allow: bool) -> str | None:
    """A warning when the test set already judged another trial; an error unless ``allow``."""
    earlier = sorted({r["trial"] for r in test_reads(study) if r.get("trial") != trial_number})
    if not earlier:
        return None
    message = (
        f"the test set of study {study.study_name!r} was already used to evaluate trial(s) "
        f"{', '.join(map(str, earlier))}; evaluating trial {trial_number} on it too is test-set reuse, "
        "and choosing between them on test results overfits the test set"
    )
    if not allow:
        raise TunerError(message + "; pass --allow-test-reuse to do it anyway (it is recorded)")
    return message


def record_test_read(study: optuna.Study, entry: dict) -> None:
    """Add ``entry`` to the study's audit of test-set reads, with when (UTC) and the command (no password)."""
    entry = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry, "command": redacted_command()}
    study.set_user_attr(StudyKey.TEST_SET_READS, [*test_reads(study), entry])


def bootstrap_ci(
    probs_per_seed: list[torch.Tensor],
    target: torch.Tensor,
    *,
    positive_index: int | None,
    thresholds: float | None | Sequence[float | None],
    groups: np.ndarray | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% CIs of the seed-averaged headline metrics, resampling test items (whole groups when
    given). ``thresholds``: one for all seeds, or one per seed (each at its own; None is 0.5). A resample's
    metrics are :func:`classification_metrics`' (the report's other figures have no CI); binary ones of
    ungrouped items are computed for all resamples at once (:func:`binary_metrics`), with the same values."""
    if not isinstance(thresholds, Sequence):
        thresholds = [thresholds] * len(probs_per_seed)
    levels = [0.5 if t is None else t for t in thresholds]
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(target))]
    else:
        units = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    resamples = [np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))]) for _ in range(bootstrap)]
    target_np = target.numpy()
    resamples = [r for r in resamples if len(np.unique(target_np[r])) > 1]  # one class: no AUROC
    values: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    if resamples and probs_per_seed[0].shape[1] == 2 and groups is None:
        # Every resample has the test set's length: all of them in one call per seed.
        pos = 1 if positive_index is None else positive_index
        idx = torch.from_numpy(np.stack(resamples))
        is_pos = (target[idx] == pos).long()
        batched = [binary_metrics(p[:, pos][idx], is_pos, t) for p, t in zip(probs_per_seed, levels, strict=True)]
        for name in METRIC_NAMES:
            values[name] = torch.stack([m[name] for m in batched]).mean(0).tolist()
    else:
        for r in resamples:
            idx = torch.from_numpy(r)
            per_seed = [
                classification_metrics(p[idx], target[idx], positive_index=positive_index, threshold=t)
                for p, t in zip(probs_per_seed, levels, strict=True)
            ]
            for name in METRIC_NAMES:
                values[name].append(float(np.mean([m[name] for m in per_seed])))
    out = {}
    for name, vals in values.items():
        finite = [v for v in vals if math.isfinite(v)]
        out[name] = (
            (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if finite else (math.nan, math.nan)
        )
    return out


def summarize(per_seed: list[dict], ci: dict[str, tuple[float, float]]) -> Summary:
    """Each metric's mean and sd over ``per_seed`` (one dict of metrics per seed), with its CI from ``ci``."""
    summary = {}
    for name in REPORT_ORDER:
        if name not in per_seed[0]:
            continue
        vals = [m[name] for m in per_seed]
        low, high = ci.get(name, (None, None))
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        summary[name] = Estimate(mean=float(np.mean(vals)), sd=sd, ci_low=low, ci_high=high)
    return summary


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise TunerError(
            f"{out_dir} already holds an earlier output; choose another --out, move it away, or pass --force to overwrite"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def write_predictions(
    path: Path, target: torch.Tensor, key: str, labelled: list[tuple[Any, torch.Tensor]], class_names
) -> None:
    """One row per (model, test item): ``key`` names what tells the models apart (a seed, a member)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, "index", "target", *[f"p_{c}" for c in class_names]])
        for label, probs in labelled:
            for i, (t, row) in enumerate(zip(target.tolist(), probs.tolist(), strict=True)):
                writer.writerow([label, i, class_names[t], *[f"{p:.6f}" for p in row]])


def write_image_predictions(
    fh: TextIO,
    paths: Sequence[Any],
    probs: Sequence[Sequence[float]],
    labels: Sequence[str],
    class_names: Sequence[str],
) -> None:
    """One row per image, as ``tuner predict`` writes them: its path, each class's probability, its label."""
    writer = csv.writer(fh)
    writer.writerow(["path", *[f"p_{c}" for c in class_names], "label"])
    for path, row, label in zip(paths, probs, labels, strict=True):
        writer.writerow([str(path), *[f"{p:.6f}" for p in row], label])


def test_metric_fn(class_names, positive_index: int | None, threshold: float | None) -> Callable:
    """The test-set report for probabilities, at the frozen threshold (0.5 when none was chosen)."""
    return partial(
        evaluation_report,
        class_names=class_names,
        positive_index=positive_index,
        threshold=0.5 if threshold is None else threshold,
    )


def load_test_data(study: optuna.Study, space: SearchSpace, cache_dir: Path) -> Dataset:
    """The study's data with its test split, refusing data other than what the study ran on."""
    dataset = prepare(space, cache_dir=cache_dir, include_test=True)
    if dataset.fingerprint != study.user_attrs[StudyKey.DATA]["fingerprint"]:
        raise TunerError(
            f"{dataset.description} is not the data study {study.study_name!r} was run on "
            "(its content fingerprint differs)"
        )
    if dataset.test is None:
        raise TunerError(f"{dataset.description} has no test split to evaluate on")
    return dataset


def test_probabilities(
    models: Sequence[torch.nn.Module], dataset: Dataset, normalize: Normalize, device: torch.device, tta: str = "none"
) -> torch.Tensor:
    assert dataset.test is not None
    split = TensorSplit.from_numpy(dataset.test.images, dataset.test.labels, device)
    return average_probabilities(
        models,
        split,
        normalize=normalize,
        num_classes=dataset.num_classes,
        positive_index=dataset.positive_index,
        tta=tta,
    )


def evaluate(
    model_path: Path,
    *,
    data: str,
    out_dir: Path | None = None,
    cache_dir: Path = STUDIES_DIR / "cache",
    force: bool = False,
    bootstrap: int = 1000,
    saved: SavedModel | None = None,
) -> EvaluationReport:
    """Evaluate a saved model on a data source: its test split if it has one, else all of it.
    ``saved``: the model already loaded from ``model_path``."""
    saved = saved or load_model(model_path)
    split, names, description, which = load_labelled_images(
        data,
        image_size=saved.image_size,
        channels=saved.channels,
        label_aliases=saved.info["space"]["data"]["label_aliases"],
        columns=DataSettings.model_validate(saved.info["space"]["data"]).csv_columns(),
        cache_dir=cache_dir,
    )
    unknown = [c for c in names if c not in saved.class_names]
    if unknown:
        raise TunerError(
            f"{description} has classes the model does not know: {', '.join(unknown)}; "
            f"it knows {', '.join(saved.class_names)} (label_aliases in the space file map names)"
        )
    remap = np.array([saved.class_names.index(c) for c in names])
    target = torch.from_numpy(remap[split.labels])
    probs = saved.probabilities(split.images)
    threshold = saved.threshold if saved.threshold is not None else 0.5
    metric_fn = test_metric_fn(saved.class_names, saved.positive_index, threshold)
    metrics = metric_fn(probs, target)
    ci = bootstrap_ci(
        [probs],
        target,
        positive_index=saved.positive_index,
        thresholds=threshold,
        groups=split.groups,
        bootstrap=bootstrap,
    )
    out_dir = out_dir or model_path.parent / "evaluate"
    prepare_out_dir(out_dir, force)
    report = EvaluationReport(
        model=str(model_path),
        data=description,
        split=which,
        n_test=len(target),
        threshold=saved.threshold,
        positive_class=None if saved.positive_index is None else saved.class_names[saved.positive_index],
        metrics=metrics,
        summary=summarize([metrics], ci),
    )
    plot_confusion(metrics["confusion_matrix"], saved.class_names, out_dir / "confusion_matrix.png")
    if saved.positive_index is not None and len(saved.class_names) == 2:
        plot_roc_pr(
            probs, target, positive_index=saved.positive_index, threshold=threshold, path=out_dir / "roc_pr.png"
        )
    write_predictions(out_dir / "predictions.csv", target, "seed", [(saved.info["seed"], probs)], saved.class_names)
    write_report(out_dir, report.to_json(), title=f"Evaluation of {model_path} on {description}")
    return report
