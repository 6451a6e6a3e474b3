"""Refit the chosen trial on train+validation and evaluate it once on the locked test split.

Rule for the number of epochs: the trial's best epoch (where its validation
metric peaked). The LR schedule is planned over the trial's ``max_epochs``
exactly as in the trial, so those epochs follow the same per-epoch schedule;
with no validation data left, early stopping is off and ``plateau`` watches the
training loss. The decision threshold is the one the trial chose on validation,
frozen, or (with folds) chosen on the recipe's own out-of-fold probabilities.
The test set is read through :mod:`tuner.evaluation`, which records every read.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner.data import Dataset, DeviceData, Normalize, TensorSplit, assign_folds, pooled
from tuner.errors import TunerError
from tuner.final.evaluation import (
    bootstrap_ci,
    check_test_reuse,
    load_test_data,
    prepare_out_dir,
    record_test_read,
    summarize,
    test_metric_fn,
    test_probabilities,
    test_reads,
    write_predictions,
)
from tuner.final.report import write_report
from tuner.search import (
    STUDIES_DIR,
    Objective,
    SearchSpace,
    StudyKey,
    ThresholdSettings,
    TrialData,
    TrialKey,
    best_trial,
    parse_space,
    prepare,
    ranked_trials,
    space_at_size,
    suggest,
    train_settings,
)
from tuner.train import (
    BEFORE_ADDED,
    TTA_VIEWS,
    Classifier,
    Hyperparameters,
    TrainSettings,
    average_probabilities,
    choose_threshold,
    model_normalization,
    plot_confusion,
    plot_history,
    plot_roc_pr,
    renamed,
    resolve_device,
    save_model,
    train_model,
    upgrade_stored,
)

log = logging.getLogger(__name__)

SEED_STRIDE = 1000


def pick_trial(study: optuna.Study, trial_number: int | None) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if trial_number is None:
        return best_trial(study)  # within study.constraints
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
    stored = upgrade_stored(trial.user_attrs.get(TrialKey.HPARAMS) or {})
    hparams = suggest(optuna.trial.FixedTrial(renamed(trial.params)), space)
    hparams = hparams.model_copy(update={k: stored[k] for k in BEFORE_ADDED if k in stored})
    replayed = hparams.model_dump(mode="json")
    defaults = Hyperparameters().model_dump(mode="json")
    if any(stored.get(key, defaults[key]) != value for key, value in replayed.items()):
        changed = sorted(k for k, v in replayed.items() if stored.get(k, defaults[k]) != v)
        raise TunerError(
            f"trial {trial.number}'s parameters no longer replay to the hyperparameters it trained with "
            f"(differs: {', '.join(changed)})"
        )
    return hparams


def study_space(study: optuna.Study, data_override: str | None = None) -> SearchSpace:
    stored = study.user_attrs.get(StudyKey.SPACE)
    if stored is None:
        raise TunerError(f"study {study.study_name!r} was not created by tuner (no stored space)")
    return parse_space(stored, f"study {study.study_name}", {"data.source": data_override}, stored=True)


RESCORE_STRIDE = 7919


def rescore(
    study: optuna.Study,
    space: SearchSpace,
    dataset: Dataset,
    device: torch.device,
    *,
    top_k: int,
    seeds: int,
    cache_dir: Path = STUDIES_DIR / "cache",
) -> tuple[FrozenTrial, list[dict]]:
    """Re-train the ``top_k`` best trials with ``seeds`` fresh seeds each, on validation only (never test),
    and pick the one with the best mean: a remedy for the winner's curse of one noisy validation score."""
    maximize = study.direction.name == "MAXIMIZE"
    top = ranked_trials(study)[:top_k]
    sizes = TrialData(space, dataset, device, cache_dir)
    data, folds = sizes.at(None)
    objective = Objective(space, data, dataset.class_names, None, folds, sizes=sizes)
    rows: list[dict[str, Any]] = []
    for trial in top:
        hparams = replay_hparams(trial, space)
        values = []
        for j in range(seeds):
            try:
                values.append(
                    objective.run(
                        optuna.trial.FixedTrial(renamed(trial.params)),
                        hparams,
                        seed=int(trial.user_attrs[TrialKey.SEED]) + RESCORE_STRIDE * (j + 1),
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
    study.set_user_attr(StudyKey.RESCORING, {"top_k": top_k, "seeds": seeds, "rows": rows, "chosen": best["trial"]})
    return next(t for t in top if t.number == best["trial"]), rows


def refit_settings(space: SearchSpace) -> TrainSettings:
    """The trials' settings, but with no validation left: no early stopping, and ``plateau`` watches the
    training loss."""
    return replace(train_settings(space), patience=None, monitor="train_loss", mode="min")


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
    save_refit_model(
        path,
        [model],
        hparams,
        dataset,
        normalize,
        space=space,
        threshold=threshold,
        seeds=[seed],
        provenance={"study": study.study_name, "trial": trial.number},
    )
    return test_probabilities([model], dataset, normalize, data_tv.train.images.device)


def save_refit_model(
    path: Path,
    models: list[Classifier],
    hparams: Hyperparameters,
    dataset: Dataset,
    normalize: Normalize,
    *,
    space: SearchSpace,
    threshold: float | None,
    seeds: list[int],
    provenance: dict,
    tta: str = "none",
) -> None:
    """A model that ``tuner evaluate`` / ``predict`` rebuild alone, with where it came from."""
    save_model(
        path,
        models,
        tta=tta,
        hparams=hparams,
        space=space.model_dump(mode="json"),
        class_names=dataset.class_names,
        image_size=dataset.image_size,
        channels=dataset.channels,
        normalize=normalize,
        threshold=threshold,
        positive_index=dataset.positive_index,
        seed=seeds[0],
        provenance={**provenance, "seeds": seeds, "data_fingerprint": dataset.fingerprint},
    )


@dataclass
class SeedRun:
    """What one seed of the recipe gives: its networks, their test probabilities averaged (with TTA),
    the first network's alone (no TTA), and out-of-fold probabilities on train+val (with folds)."""

    models: list[Classifier]
    normalize: Normalize
    test_probs: torch.Tensor
    single_test_probs: torch.Tensor
    oof_probs: torch.Tensor | None


def run_seed(
    hparams: Hyperparameters,
    space: SearchSpace,
    dataset: Dataset,
    device: torch.device,
    *,
    seed: int,
    epochs: int,
    folds: int | None,
    tta: str,
    on_model: Callable[[], None] | None = None,
    feature_cache: Path | None = None,
) -> SeedRun:
    """Train the recipe with ``seed``: on all of train+val, or on ``folds`` folds of it (each network
    on all folds but one, which it then predicts: the out-of-fold probabilities)."""
    images = np.concatenate([dataset.train.images, dataset.val.images])
    labels = np.concatenate([dataset.train.labels, dataset.val.labels])
    tags = pooled(dataset.train.tags, dataset.val.tags)
    if folds is None:
        parts = [np.ones(len(labels), dtype=bool)]
        fold = None
    else:
        fold = assign_folds(labels, pooled(dataset.train.groups, dataset.val.groups), k=folds, seed=seed)
        parts = [fold != f for f in range(folds)]
    settings = replace(refit_settings(space), feature_cache=feature_cache)
    models, oof = [], None
    normalize = None
    for f, train_mask in enumerate(parts):
        data = DeviceData.build(
            dataset,
            device,
            train=(images[train_mask], labels[train_mask]),
            val=None,
            train_tags=None if tags is None else tags[train_mask],
        )
        model, _ = train_model(hparams, data, settings, seed=seed + f, epochs=epochs)
        normalize = model_normalization(model, hparams.model, dataset.channels)
        models.append(model)
        if fold is not None:
            held = fold == f
            probs = average_probabilities(
                [model],
                TensorSplit.from_numpy(images[held], labels[held], device),
                normalize=normalize,
                num_classes=dataset.num_classes,
                positive_index=dataset.positive_index,
                tta=tta,
            )
            if oof is None:
                oof = torch.zeros(len(labels), probs.shape[1])
            oof[torch.from_numpy(held)] = probs
        if on_model is not None:
            on_model()
    assert normalize is not None
    return SeedRun(
        models=models,
        normalize=normalize,
        test_probs=test_probabilities(models, dataset, normalize, device, tta),
        single_test_probs=test_probabilities(models[:1], dataset, normalize, device),
        oof_probs=oof,
    )


def check_refit_options(
    *, seeds: int, folds: int | None, tta: str, top_k: int | None, trial_number: int | None
) -> None:
    if seeds < 1:
        raise TunerError(f"seeds must be at least 1, but got seeds={seeds}")
    if folds is not None and not 2 <= folds <= 20:
        raise TunerError(f"folds must be between 2 and 20, but got folds={folds}")
    if tta not in TTA_VIEWS:
        raise TunerError(f"tta must be one of {', '.join(TTA_VIEWS)}, but got tta={tta!r}")
    if top_k is not None and (top_k < 1 or trial_number is not None):
        raise TunerError(f"--top-k must be at least 1 and cannot be combined with --trial, but got top_k={top_k}")


def train_val_labels(dataset: Dataset) -> torch.Tensor:
    """Train+val labels in the order :func:`run_seed` pools them (train first): the out-of-fold rows' order."""
    return torch.from_numpy(np.concatenate([dataset.train.labels, dataset.val.labels]))


@dataclass
class RefitScores:
    """The refit's test figures. Per seed: that seed's networks averaged (with TTA) at its threshold,
    with mean, sd and CI over seeds; the final model: every network averaged at one threshold; one
    network alone (each seed's first, no TTA), so that what averaging adds is final minus this."""

    per_seed: list[dict]
    summary: dict
    final: dict
    final_summary: dict
    final_probs: torch.Tensor
    single_network: dict | None


def score_runs(
    runs: list[SeedRun],
    seed_list: list[int],
    dataset: Dataset,
    *,
    frozen: float | None,
    rule: ThresholdSettings,
    n_bootstrap: int,
    with_single: bool,
) -> RefitScores:
    """Score the seeds' runs on the test split. Thresholds: the study's rule on out-of-fold
    probabilities when the runs have them (per seed, and averaged over seeds for the final model),
    else ``frozen`` (the trial's own)."""
    assert dataset.test is not None
    positive = dataset.positive_index
    binary = positive is not None and dataset.num_classes == 2
    target = torch.from_numpy(dataset.test.labels)
    tv_target = train_val_labels(dataset)

    def chosen_threshold(oof: torch.Tensor | None) -> float | None:
        if not binary or oof is None:
            return frozen
        assert positive is not None
        return choose_threshold(oof, tv_target, positive_index=positive, rule=rule.rule, recall=rule.recall)

    thresholds = [chosen_threshold(run.oof_probs) for run in runs]
    metric_fns = [test_metric_fn(dataset.class_names, positive, t) for t in thresholds]
    per_seed = [
        {"seed": seed, "threshold": t, **fn(run.test_probs, target)}
        for seed, t, fn, run in zip(seed_list, thresholds, metric_fns, runs, strict=True)
    ]
    groups = dataset.test.groups
    ci = bootstrap_ci(
        [r.test_probs for r in runs], target, metric_fn=metric_fns, groups=groups, n_resamples=n_bootstrap
    )
    oofs = [r.oof_probs for r in runs if r.oof_probs is not None]
    final_threshold = chosen_threshold(torch.stack(oofs).mean(0) if oofs else None)
    final_fn = test_metric_fn(dataset.class_names, positive, final_threshold)
    final_probs = torch.stack([r.test_probs for r in runs]).mean(0) if len(runs) > 1 else runs[0].test_probs
    final = {
        "networks": sum(len(r.models) for r in runs),
        "threshold": final_threshold,
        **final_fn(final_probs, target),
    }
    final_summary = summarize(
        [final], bootstrap_ci([final_probs], target, metric_fn=final_fn, groups=groups, n_resamples=n_bootstrap)
    )
    single = None
    if with_single:
        single = summarize([fn(r.single_test_probs, target) for fn, r in zip(metric_fns, runs, strict=True)], {})
    return RefitScores(per_seed, summarize(per_seed, ci), final, final_summary, final_probs, single)


def write_refit_predictions(out_dir: Path, dataset: Dataset, seed_list: list[int], runs: list[SeedRun], final_probs):
    """Test probabilities per seed and of the final model; out-of-fold ones on train+val with folds."""
    assert dataset.test is not None
    seeds = [f"seed {s}" for s in seed_list]
    write_predictions(
        out_dir / "predictions.csv",
        torch.from_numpy(dataset.test.labels),
        "model",
        [*zip(seeds, [r.test_probs for r in runs], strict=True), ("final", final_probs)],
        dataset.class_names,
    )
    oofs = [(name, r.oof_probs) for name, r in zip(seeds, runs, strict=True) if r.oof_probs is not None]
    if oofs:
        write_predictions(
            out_dir / "oof_predictions.csv", train_val_labels(dataset), "model", oofs, dataset.class_names
        )


def run_refit(
    study: optuna.Study,
    *,
    trial_number: int | None = None,
    seeds: int = 1,
    folds: int | None = None,
    tta: str = "none",
    out_dir: Path | None = None,
    data: str | None = None,
    cache_dir: Path = STUDIES_DIR / "cache",
    device: str | None = None,
    allow_test_reuse: bool = False,
    force: bool = False,
    n_bootstrap: int = 1000,
    on_model: Callable[[int, int], None] | None = None,
    top_k: int | None = None,
) -> dict[str, Any]:
    """Retrain ``trial`` on train+val with ``seeds`` seeds, evaluate once on test, write the report.

    With ``folds`` K, each seed trains K networks, each on all folds of train+val but one, and the
    binary threshold is chosen by the study's rule on their out-of-fold probabilities (the same
    recipe's, so it fits the refit networks, unlike the trial's threshold); without, each seed trains
    one network on all of train+val and the trial's threshold is kept. ``tta`` averages each network
    over flipped views. The final model, saved as ``model.pt``, averages every network trained.

    With ``top_k``, the ``top_k`` best trials are first re-scored with ``seeds`` seeds on validation
    and the best mean is refit (see :func:`rescore`).
    """
    check_refit_options(seeds=seeds, folds=folds, tta=tta, top_k=top_k, trial_number=trial_number)
    trial = pick_trial(study, trial_number)
    space = study_space(study, data)
    torch_device = resolve_device(device or space.train.device)
    rescored = None
    if top_k:
        dataset = prepare(space, cache_dir=cache_dir)
        trial, rescored = rescore(study, space, dataset, torch_device, top_k=top_k, seeds=seeds, cache_dir=cache_dir)
    hparams = replay_hparams(trial, space)
    warning = check_test_reuse(study, trial.number, allow_test_reuse)
    out_dir = out_dir or STUDIES_DIR / study.study_name / "refit"
    prepare_out_dir(out_dir, force)
    if warning:
        log.warning("%s", warning)

    dataset = load_test_data(study, space_at_size(space, hparams.image_size), cache_dir)
    assert dataset.test is not None
    epochs = int(trial.user_attrs[TrialKey.BEST_EPOCH])
    positive = dataset.positive_index
    binary = positive is not None and dataset.num_classes == 2
    frozen = trial.user_attrs.get(TrialKey.THRESHOLD)
    if binary and frozen is None:
        frozen = 0.5
    seed_list = [int(trial.user_attrs[TrialKey.SEED]) + SEED_STRIDE * k for k in range(seeds)]
    n_models, done = seeds * (folds or 1), 0

    def model_done() -> None:
        nonlocal done
        done += 1
        if on_model is not None:
            on_model(done, n_models)

    runs = [
        run_seed(
            hparams,
            space,
            dataset,
            torch_device,
            seed=seed,
            epochs=epochs,
            folds=folds,
            tta=tta,
            on_model=model_done,
            feature_cache=cache_dir,
        )
        for seed in seed_list
    ]
    record_test_read(
        study,
        {"trial": trial.number, "seeds": seed_list, "command": shlex.join(["tuner", *sys.argv[1:]]), "what": "refit"},
    )
    rule = space.study.threshold
    scores = score_runs(
        runs,
        seed_list,
        dataset,
        frozen=frozen,
        rule=rule,
        n_bootstrap=n_bootstrap,
        with_single=bool(folds) or tta != "none",
    )
    final_threshold = scores.final["threshold"]
    save_refit_model(
        out_dir / "model.pt",
        [m for r in runs for m in r.models],
        hparams,
        dataset,
        runs[0].normalize,
        space=space,
        threshold=final_threshold,
        seeds=seed_list,
        provenance={"study": study.study_name, "trial": trial.number, "folds": folds},
        tta=tta,
    )
    report = {
        "study": study.study_name,
        "trial": trial.number,
        "params": trial.params,
        "hparams": hparams.model_dump(mode="json"),
        "validation_value": trial.value,
        "metric": space.study.metric,
        "constraint_values": trial.user_attrs.get(TrialKey.CONSTRAINT_VALUES),  # the trial's, within study.constraints
        "data": dataset.description,
        "class_names": list(dataset.class_names),
        "positive_class": None if positive is None else dataset.class_names[positive],
        "threshold": final_threshold,
        "threshold_rule": (
            f"{rule.rule} on the out-of-fold probabilities of train+val ({folds} folds)"
            if folds and binary
            else f"{rule.rule} on validation, for the trial's own model (frozen)"
        ),
        "epochs": epochs,
        "epochs_rule": "the trial's best epoch; LR schedule planned over the trial's max_epochs",
        "seeds": seed_list,
        "folds": folds,
        "tta": tta,
        "rescoring": rescored,
        "n_train": len(dataset.train.labels) + len(dataset.val.labels),
        "n_test": len(dataset.test.labels),
        "bootstrap": {"resamples": n_bootstrap, "grouped": dataset.test.groups is not None},
        "summary": scores.summary,
        "per_seed": scores.per_seed,
        "single_network": scores.single_network,
        "final": scores.final,  # what model.pt holds and evaluate / predict reproduce
        "final_summary": scores.final_summary,
        "test_set_reads": test_reads(study),
    }
    write_refit_predictions(out_dir, dataset, seed_list, runs, scores.final_probs)
    _plots(
        out_dir,
        trial,
        space.study.metric,
        scores.final,
        scores.final_probs,
        torch.from_numpy(dataset.test.labels),
        dataset.class_names,
        positive,
        final_threshold,
    )
    write_report(out_dir, report, title=f"Refit of trial {trial.number} of study {study.study_name}")
    return report


def _plots(out_dir, trial, metric, first, probs, target, class_names, positive, threshold) -> None:
    if trial.user_attrs.get(TrialKey.HISTORY):
        plot_history(trial.user_attrs[TrialKey.HISTORY], metric, out_dir / "trial_curves.png")
    plot_confusion(first["confusion_matrix"], class_names, out_dir / "confusion_matrix.png")
    if positive is not None and len(class_names) == 2:
        plot_roc_pr(probs, target, positive_index=positive, threshold=threshold or 0.5, path=out_dir / "roc_pr.png")
