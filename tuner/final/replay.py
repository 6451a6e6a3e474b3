"""What a refit retrains: the chosen trial, its hyperparameters rebuilt from its parameters, and the
recipe trained on train+validation (all of it, or K folds of it) with a seed.

Rule for the number of epochs: the trial's best epoch (where its validation metric peaked). The LR
schedule is planned over the trial's ``max_epochs`` exactly as in the trial, so those epochs follow the
same per-epoch schedule; with no validation data left, early stopping is off and ``plateau`` watches
the training loss.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner.data import Dataset, DeviceData, Normalize, TensorSplit, assign_folds, pooled
from tuner.errors import TunerError
from tuner.final.evaluation import (
    test_probabilities,
)
from tuner.search import (
    SearchSpace,
    StudyKey,
    TrialKey,
    best_trial,
    parse_space,
    run_settings,
    suggest,
)
from tuner.train import (
    BEFORE_ADDED,
    Classifier,
    Hyperparameters,
    RunSettings,
    SavedModel,
    average_probabilities,
    model_normalization,
    renamed,
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


def refit_settings(space: SearchSpace) -> RunSettings:
    """The trials' settings, but with no validation left: no early stopping, and ``plateau`` watches the
    training loss."""
    return replace(run_settings(space), patience=None, monitor="train_loss", mode="min")


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
) -> SavedModel:
    """A model that ``tuner evaluate`` / ``predict`` rebuild alone, with where it came from; returned as
    saved, holding ``models``."""
    return save_model(
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
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    feature_cache: Path | None = None,
) -> SeedRun:
    """Train the recipe with ``seed``: on all of train+val, or on ``folds`` folds of it (each network
    on all folds but one, which it then predicts: the out-of-fold probabilities). ``on_epoch`` is told
    (network of this seed, epoch, training metrics) after each epoch."""
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
        told = None if on_epoch is None else functools.partial(on_epoch, f)
        model, _ = train_model(hparams, data, settings, seed=seed + f, epochs=epochs, on_epoch=told)
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
