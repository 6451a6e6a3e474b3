"""Refit the chosen trial on train+validation and evaluate it once on the locked test split.

Rule for the number of epochs: the trial's best epoch (where its validation
metric peaked). The LR schedule is planned over the trial's ``max_epochs``
exactly as in the trial, so those epochs follow the same per-epoch schedule;
with no validation data left, early stopping is off and ``plateau`` watches the
training loss. The decision threshold is the one the trial chose on validation,
frozen. Every read of the test labels is recorded in the study, and evaluating
a second trial on the same test set is refused unless explicitly allowed.
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner.checkpoint import load_model, save_model
from tuner.data import Dataset
from tuner.data.dataset import load_labelled_images
from tuner.data.loader import TensorSplit, iterate_batches
from tuner.engine import predict, resolve_device
from tuner.errors import TunerError
from tuner.hparams import Hyperparameters
from tuner.losses import logits_to_probs
from tuner.metrics import evaluation_report
from tuner.report import plot_confusion, plot_history, plot_roc_pr, write_report
from tuner.space import DataSettings, SearchSpace, parse_space, suggest
from tuner.study import STUDIES_DIR, Objective, cv_folds, prepare
from tuner.training import DeviceData, TrainSettings, model_normalization, train_model

log = logging.getLogger(__name__)

BOOTSTRAP_METRICS = ("auroc", "auprc", "recall", "specificity", "precision", "f1", "balanced_accuracy", "accuracy")
SEED_STRIDE = 1000


def pick_trial(study: optuna.Study, trial_number: int | None) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if trial_number is None:
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise TunerError(f"study {study.study_name!r} has no completed trial to refit")
        return study.best_trial
    match = [t for t in trials if t.number == trial_number]
    if not match:
        raise TunerError(f"study {study.study_name!r} has no trial {trial_number}; it has trials 0..{len(trials) - 1}")
    if match[0].state != TrialState.COMPLETE:
        raise TunerError(
            f"trial {trial_number} is {match[0].state.name}, not COMPLETE; only completed trials can be refit"
        )
    return match[0]


def replay_hparams(trial: FrozenTrial, space: SearchSpace) -> Hyperparameters:
    """The trial's hyperparameters, rebuilt from its parameters; an error if they no longer match what it
    trained with. Hyperparameters added to tuner after the trial ran must be at their defaults."""
    hparams = suggest(optuna.trial.FixedTrial(trial.params), space)
    replayed, stored = hparams.model_dump(mode="json"), trial.user_attrs.get("hparams") or {}
    defaults = Hyperparameters().model_dump(mode="json")
    if any(stored.get(key, defaults[key]) != value for key, value in replayed.items()):
        changed = sorted(k for k, v in replayed.items() if stored.get(k, defaults[k]) != v)
        raise TunerError(
            f"trial {trial.number}'s parameters no longer replay to the hyperparameters it trained with "
            f"(differs: {', '.join(changed)})"
        )
    return hparams


def study_space(study: optuna.Study, data_override: str | None = None) -> SearchSpace:
    stored = study.user_attrs.get("space")
    if stored is None:
        raise TunerError(f"study {study.study_name!r} was not created by tuner (no stored space)")
    return parse_space(stored, f"study {study.study_name}", {"data.source": data_override})


def test_reads(study: optuna.Study) -> list[dict]:
    return list(study.user_attrs.get("test_set_reads", []))


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
    entry = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
    study.set_user_attr("test_set_reads", [*test_reads(study), entry])


def bootstrap_ci(
    probs_per_seed: list[torch.Tensor],
    target: torch.Tensor,
    *,
    metric_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% CIs of the seed-averaged metrics, resampling test items (whole groups when given)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(target))]
    else:
        units = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    values: dict[str, list[float]] = {name: [] for name in BOOTSTRAP_METRICS}
    target_np = target.numpy()
    for _ in range(n_resamples):
        idx = torch.from_numpy(np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))]))
        if len(np.unique(target_np[idx.numpy()])) < 2:
            continue  # a resample with one class has no AUROC
        per_seed = [metric_fn(p[idx], target[idx]) for p in probs_per_seed]
        for name in BOOTSTRAP_METRICS:
            values[name].append(float(np.mean([m[name] for m in per_seed])))
    out = {}
    for name, vals in values.items():
        finite = [v for v in vals if math.isfinite(v)]
        out[name] = (
            (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if finite else (math.nan, math.nan)
        )
    return out


def summarize(per_seed: list[dict], ci: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    summary = {}
    for name in ("focus_recall", "focus_precision", *BOOTSTRAP_METRICS, "mcc"):
        if name not in per_seed[0]:
            continue
        vals = [m[name] for m in per_seed]
        low, high = ci.get(name, (None, None))
        summary[name] = {
            "mean": float(np.mean(vals)),
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "ci_low": low,
            "ci_high": high,
        }
    return summary


RESCORE_STRIDE = 7919


def rescore(
    study: optuna.Study, space: SearchSpace, dataset: Dataset, device: torch.device, *, top_k: int, seeds: int
) -> tuple[FrozenTrial, list[dict]]:
    """Re-train the ``top_k`` best trials with ``seeds`` fresh seeds each, on validation only (never test),
    and pick the one with the best mean: a remedy for the winner's curse of one noisy validation score."""
    maximize = study.direction.name == "MAXIMIZE"
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    top = sorted(completed, key=lambda t: -t.value if maximize else t.value)[:top_k]
    folds = cv_folds(dataset, space.study.cv_folds, space.data.split_seed, device) if space.study.cv_folds else None
    objective = Objective(space, DeviceData.from_dataset(dataset, device), dataset.class_names, None, folds)
    rows = []
    for trial in top:
        hparams = replay_hparams(trial, space)
        values = []
        for j in range(seeds):
            try:
                values.append(
                    objective.run(
                        optuna.trial.FixedTrial(trial.params),
                        hparams,
                        seed=int(trial.user_attrs["seed"]) + RESCORE_STRIDE * (j + 1),
                    )
                )
            except (optuna.TrialPruned, RuntimeError) as err:
                log.warning("re-scoring trial %d, seed %d: %s", trial.number, j, err)
                values.append(math.nan)
        finite = [v for v in values if math.isfinite(v)]
        rows.append(
            {
                "trial": trial.number,
                "value": trial.value,
                "rescored": values,
                "mean": float(np.mean(finite)) if finite else math.nan,
                "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            }
        )
    scored = [r for r in rows if math.isfinite(r["mean"])]
    if not scored:
        raise TunerError("re-scoring failed for every one of the top trials")
    best = (max if maximize else min)(scored, key=lambda r: r["mean"])
    study.set_user_attr("rescoring", {"top_k": top_k, "seeds": seeds, "rows": rows, "chosen": best["trial"]})
    return next(t for t in top if t.number == best["trial"]), rows


def refit_settings(space: SearchSpace) -> TrainSettings:
    """No validation left: no early stopping, and ``plateau`` watches the training loss."""
    return TrainSettings(
        max_epochs=space.train.max_epochs,
        patience=None,
        monitor="train_loss",
        mode="min",
        amp=space.train.amp,
        channels_last=space.train.channels_last,
        eval_batch_size=space.train.eval_batch_size,
        min_batch_size=space.train.min_batch_size,
    )


def refit_one(
    path: Path,
    hparams: Hyperparameters,
    study: optuna.Study,
    trial: FrozenTrial,
    space: SearchSpace,
    dataset: Dataset,
    data_tv: DeviceData,
    *,
    seed: int,
    epochs: int,
    threshold: float | None,
) -> torch.Tensor:
    """Train ``trial`` on train+val (``data_tv``) for ``epochs`` with ``seed``, save the model to ``path``
    and return its test-split probabilities."""
    model, _ = train_model(hparams, data_tv, refit_settings(space), seed=seed, epochs=epochs)
    normalize = model_normalization(model, hparams.model, dataset.channels)
    _save_refit_model(path, model, hparams, study, trial, space, dataset, normalize, threshold, seed)
    return test_probabilities(model, dataset, normalize, data_tv.train.images.device)


def _save_refit_model(
    path: Path,
    model: torch.nn.Module,
    hparams: Hyperparameters,
    study: optuna.Study,
    trial: FrozenTrial,
    space: SearchSpace,
    dataset: Dataset,
    normalize: Any,
    threshold: float | None,
    seed: int,
) -> None:
    """A model that ``tuner evaluate`` / ``predict`` rebuild alone, with where it came from."""
    save_model(
        path,
        model,
        hparams=hparams,
        space=space.model_dump(mode="json"),
        class_names=dataset.class_names,
        image_size=dataset.image_size,
        channels=dataset.channels,
        normalize=normalize,
        threshold=threshold,
        positive_index=dataset.positive_index,
        seed=seed,
        provenance={"study": study.study_name, "trial": trial.number, "data_fingerprint": dataset.fingerprint},
    )


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
    if dataset.fingerprint != study.user_attrs["data"]["fingerprint"]:
        raise TunerError(
            f"{dataset.description} is not the data study {study.study_name!r} was run on "
            "(its content fingerprint differs)"
        )
    if dataset.test is None:
        raise TunerError(f"{dataset.description} has no test split to evaluate on")
    return dataset


def test_probabilities(model: torch.nn.Module, dataset: Dataset, normalize, device: torch.device) -> torch.Tensor:
    assert dataset.test is not None
    split = TensorSplit.from_numpy(dataset.test.images, dataset.test.labels, device)
    batches = iterate_batches(split, torch.arange(len(split)), 512, normalize=normalize)
    to_probs = partial(logits_to_probs, num_classes=dataset.num_classes, positive_index=dataset.positive_index)
    probs, _, _ = predict(model, batches, to_probs=to_probs)
    return probs.cpu()


def refit(
    study: optuna.Study,
    *,
    trial_number: int | None = None,
    seeds: int = 1,
    out_dir: Path | None = None,
    data: str | None = None,
    cache_dir: Path = STUDIES_DIR / "cache",
    device: str | None = None,
    allow_test_reuse: bool = False,
    force: bool = False,
    n_bootstrap: int = 1000,
    on_seed: Callable[[int, int], None] | None = None,
    top_k: int | None = None,
) -> dict[str, Any]:
    """Retrain ``trial`` on train+val with ``seeds`` seeds, evaluate once on test, write the report.

    With ``top_k``, the ``top_k`` best trials are first re-scored with ``seeds`` seeds on validation
    and the best mean is refit (see :func:`rescore`).
    """
    if seeds < 1:
        raise TunerError(f"seeds must be at least 1, but got seeds={seeds}")
    if top_k is not None and (top_k < 1 or trial_number is not None):
        raise TunerError(f"--top-k must be at least 1 and cannot be combined with --trial, but got top_k={top_k}")
    trial = pick_trial(study, trial_number)
    space = study_space(study, data)
    rescored = None
    if top_k:
        dataset = prepare(space, cache_dir=cache_dir)
        trial, rescored = rescore(
            study, space, dataset, resolve_device(device or space.train.device), top_k=top_k, seeds=seeds
        )
    hparams = replay_hparams(trial, space)
    warning = check_test_reuse(study, trial.number, allow_test_reuse)
    out_dir = out_dir or STUDIES_DIR / study.study_name / "refit"
    prepare_out_dir(out_dir, force)
    if warning:
        log.warning("%s", warning)

    dataset = load_test_data(study, space, cache_dir)
    assert dataset.test is not None
    torch_device = resolve_device(device or space.train.device)
    data_tv = DeviceData.train_and_val(dataset, torch_device)
    epochs = int(trial.user_attrs["best_epoch"])
    threshold = trial.user_attrs.get("threshold")
    positive = dataset.positive_index
    if positive is not None and dataset.num_classes == 2 and threshold is None:
        threshold = 0.5
    seed_list = [int(trial.user_attrs["seed"]) + SEED_STRIDE * k for k in range(seeds)]
    target = torch.from_numpy(dataset.test.labels)
    metric_fn = test_metric_fn(dataset.class_names, positive, threshold)

    probs_per_seed, per_seed = [], []
    for k, seed in enumerate(seed_list):
        name = "model.pt" if k == 0 else f"model-seed{seed}.pt"
        probs = refit_one(
            out_dir / name,
            hparams,
            study,
            trial,
            space,
            dataset,
            data_tv,
            seed=seed,
            epochs=epochs,
            threshold=threshold,
        )
        probs_per_seed.append(probs)
        per_seed.append({"seed": seed, **metric_fn(probs, target)})
        if on_seed is not None:
            on_seed(k + 1, seeds)

    record_test_read(
        study,
        {"trial": trial.number, "seeds": seed_list, "command": shlex.join(["tuner", *sys.argv[1:]]), "what": "refit"},
    )
    ci = bootstrap_ci(probs_per_seed, target, metric_fn=metric_fn, groups=dataset.test.groups, n_resamples=n_bootstrap)
    report = {
        "study": study.study_name,
        "trial": trial.number,
        "params": trial.params,
        "hparams": hparams.model_dump(mode="json"),
        "validation_value": trial.value,
        "metric": space.study.metric,
        "data": dataset.description,
        "class_names": list(dataset.class_names),
        "positive_class": None if positive is None else dataset.class_names[positive],
        "threshold": threshold,
        "threshold_rule": space.study.threshold.rule,
        "epochs": epochs,
        "epochs_rule": "the trial's best epoch; LR schedule planned over the trial's max_epochs",
        "seeds": seed_list,
        "rescoring": rescored,
        "n_train": len(data_tv.train),
        "n_test": len(target),
        "bootstrap": {"resamples": n_bootstrap, "grouped": dataset.test.groups is not None},
        "summary": summarize(per_seed, ci),
        "per_seed": per_seed,
        # the N refit models as one: the mean of their probabilities, at the same frozen threshold
        "seed_ensemble": metric_fn(torch.stack(probs_per_seed).mean(0), target) if seeds > 1 else None,
        "test_set_reads": test_reads(study),
    }
    write_predictions(
        out_dir / "predictions.csv",
        target,
        "seed",
        list(zip(seed_list, probs_per_seed, strict=True)),
        dataset.class_names,
    )
    _plots(
        out_dir,
        trial,
        space.study.metric,
        per_seed[0],
        probs_per_seed[0],
        target,
        dataset.class_names,
        positive,
        threshold,
    )
    write_report(out_dir, report, title=f"Refit of trial {trial.number} of study {study.study_name}")
    return report


def _plots(out_dir, trial, metric, first, probs, target, class_names, positive, threshold) -> None:
    if trial.user_attrs.get("history"):
        plot_history(trial.user_attrs["history"], metric, out_dir / "trial_curves.png")
    plot_confusion(first["confusion_matrix"], class_names, out_dir / "confusion_matrix.png")
    if positive is not None and len(class_names) == 2:
        plot_roc_pr(probs, target, positive_index=positive, threshold=threshold or 0.5, path=out_dir / "roc_pr.png")


def evaluate(
    model_path: Path,
    *,
    data: str,
    out_dir: Path | None = None,
    cache_dir: Path = STUDIES_DIR / "cache",
    force: bool = False,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Evaluate a saved model on a data source: its test split if it has one, else all of it."""
    saved = load_model(model_path)
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
    ci = bootstrap_ci([probs], target, metric_fn=metric_fn, groups=split.groups, n_resamples=n_bootstrap)
    out_dir = out_dir or model_path.parent / "evaluate"
    prepare_out_dir(out_dir, force)
    report = {
        "model": str(model_path),
        "data": description,
        "split": which,
        "n_test": len(target),
        "threshold": saved.threshold,
        "positive_class": None if saved.positive_index is None else saved.class_names[saved.positive_index],
        "metrics": metrics,
        "summary": summarize([metrics], ci),
    }
    plot_confusion(metrics["confusion_matrix"], saved.class_names, out_dir / "confusion_matrix.png")
    if saved.positive_index is not None and len(saved.class_names) == 2:
        plot_roc_pr(
            probs, target, positive_index=saved.positive_index, threshold=threshold, path=out_dir / "roc_pr.png"
        )
    write_predictions(out_dir / "predictions.csv", target, "seed", [(saved.info["seed"], probs)], saved.class_names)
    write_report(out_dir, report, title=f"Evaluation of {model_path} on {description}")
    return report
