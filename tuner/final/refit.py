"""Refit the chosen trial on train+validation and evaluate it once on the locked test split.

The steps: pick the trial (or re-score the top ones, :mod:`tuner.final.rescore`), replay its
hyperparameters and train each seed's networks (:mod:`tuner.final.replay`), read the test split once and
score (:mod:`tuner.final.scoring`), save ``model.pt`` and the report. The decision threshold is the one
the trial chose on validation, frozen, or (with folds) chosen on the recipe's own out-of-fold
probabilities. The test set is read through :mod:`tuner.final.evaluation`, which records every read.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from tuner.data import Dataset
from tuner.errors import TunerError
from tuner.final.evaluation import (
    check_test_reuse,
    load_test_data,
    prepare_out_dir,
    record_test_read,
    test_reads,
)
from tuner.final.explain import error_gallery
from tuner.final.model_card import write_model_card
from tuner.final.replay import SEED_STRIDE, pick_trial, replay_hparams, run_seed, save_refit_model, study_space
from tuner.final.report import write_report
from tuner.final.rescore import rescore
from tuner.final.results import RefitReport
from tuner.final.scoring import score_runs, write_refit_predictions
from tuner.search import (
    STUDIES_DIR,
    TrialKey,
    first_value,
    prepare,
    space_at_size,
)
from tuner.train import (
    TTA_VIEWS,
    SavedModel,
    plot_confusion,
    plot_history,
    plot_roc_pr,
    resolve_device,
    versions,
)

log = logging.getLogger(__name__)


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
    bootstrap: int = 1000,
    on_model: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int, int, int, dict[str, float]], None] | None = None,
    top_k: int | None = None,
) -> RefitReport:
    """Retrain the chosen trial (``trial_number``, else the best) on train+val with ``seeds`` seeds, evaluate once on test, write the report.

    With ``folds`` K, each seed trains K networks, each on all folds of train+val but one, and the
    binary threshold is chosen by the study's rule on their out-of-fold probabilities (the same
    recipe's, so it fits the refit networks, unlike the trial's threshold); without, each seed trains
    one network on all of train+val and the trial's threshold is kept. ``tta`` averages each network
    over flipped views. The final model, saved as ``model.pt``, averages every network trained.

    With ``top_k``, the ``top_k`` best trials are first re-scored with ``seeds`` seeds on validation
    and the best mean is refit (see :func:`rescore`).

    ``on_model`` is told (networks done, networks) and ``on_epoch`` (network, networks, epoch, epochs,
    training metrics), counting networks from 1 over every seed and fold.
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

    def epoch_done(k: int, fold: int, epoch: int, metrics: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(k * (folds or 1) + fold + 1, n_models, epoch, epochs, metrics)

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
            on_epoch=functools.partial(epoch_done, k),
            feature_cache=cache_dir,
        )
        for k, seed in enumerate(seed_list)
    ]
    record_test_read(
        study,
        {"trial": trial.number, "seeds": seed_list, "what": "refit"},
    )
    rule = space.study.threshold
    scores = score_runs(
        runs,
        seed_list,
        dataset,
        frozen=frozen,
        rule=rule,
        bootstrap=bootstrap,
        with_single=bool(folds) or tta != "none",
    )
    final_threshold = scores.final["threshold"]
    saved = save_refit_model(
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
    report = RefitReport(
        study=study.study_name,
        trial=trial.number,
        params=trial.params,
        hparams=hparams.model_dump(mode="json"),
        validation_value=first_value(trial),
        metric=space.study.metric,
        constraint_values=trial.user_attrs.get(TrialKey.CONSTRAINT_VALUES),
        data=dataset.description,
        class_names=list(dataset.class_names),
        positive_class=None if positive is None else dataset.class_names[positive],
        threshold=final_threshold,
        threshold_rule=(
            f"{rule.rule} on the out-of-fold probabilities of train+val ({folds} folds)"
            if folds and binary
            else f"{rule.rule} on validation, for the trial's own model (frozen)"
        ),
        epochs=epochs,
        epochs_rule="the trial's best epoch; LR schedule planned over the trial's max_epochs",
        seeds=seed_list,
        folds=folds,
        tta=tta,
        networks=scores.final["networks"],
        rescoring=rescored,
        n_train=len(dataset.train.labels) + len(dataset.val.labels),
        n_test=len(dataset.test.labels),
        bootstrap={"resamples": bootstrap, "grouped": dataset.test.groups is not None},
        summary=scores.summary,
        per_seed=scores.per_seed,
        single_network=scores.single_network,
        final=scores.final,
        final_summary=scores.final_summary,
        test_set_reads=test_reads(study),
        description=space.study.description,
        objectives=dict(zip(space.study.objectives, trial.values, strict=True))
        if space.study.multi_objective
        else None,
        costs_measured_on=trial.user_attrs.get(TrialKey.COSTS_MEASURED_ON),
        data_fingerprint=dataset.fingerprint,
        class_counts={
            split: part.class_counts(dataset.num_classes)
            for split, part in (("train", dataset.train), ("validation", dataset.val), ("test", dataset.test))
        },
        image_size=dataset.image_size,
        versions=versions(),
    )
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
    _errors(out_dir, dataset, saved, scores.final_probs)
    write_report(out_dir, report.to_json(), title=f"Refit of trial {trial.number} of study {study.study_name}")
    write_model_card(out_dir, report)
    return report


def _errors(out_dir: Path, dataset: Dataset, saved: SavedModel, probs: torch.Tensor) -> None:
    """``errors.png``: the final model's most confident test errors, with where it looked (Grad-CAM)."""
    assert dataset.test is not None
    try:
        error_gallery(saved, dataset.test.images, dataset.test.labels, probs, out_dir / "errors.png")
    except TunerError as err:  # a network without feature maps (mlp): the refit stands without the gallery
        log.info("no error gallery: %s", err)


def _plots(out_dir, trial, metric, first, probs, target, class_names, positive, threshold) -> None:
    if trial.user_attrs.get(TrialKey.HISTORY):
        plot_history(trial.user_attrs[TrialKey.HISTORY], metric, out_dir / "trial_curves.png")
    plot_confusion(first["confusion_matrix"], class_names, out_dir / "confusion_matrix.png")
    if positive is not None and len(class_names) == 2:
        plot_roc_pr(probs, target, positive_index=positive, threshold=threshold or 0.5, path=out_dir / "roc_pr.png")
