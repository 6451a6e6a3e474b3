"""The space's data for trials: loaded and checked against the space once, per image size, and split
into cross-validation folds when the study asks for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tuner.data import Dataset, DeviceData, assign_folds, load_dataset, pooled
from tuner.errors import SpaceError
from tuner.search.space import SearchSpace, class_names_used, iter_specs


def prepare(space: SearchSpace, *, cache_dir: Path, include_test: bool = False) -> Dataset:
    """Load the train and validation splits; the test split only with ``include_test`` (refit).

    Also checks what the space says about the data (class names, a hard-example column) against
    the data itself, so a typo fails here, before any trial, and not in every trial.
    """
    d = space.data
    dataset = load_dataset(
        d.source,
        image_size=d.image_size,
        channels=d.channels,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
        columns=d.csv_columns(),
        label_aliases=d.label_aliases,
        positive_class=d.positive_class,
        synthetic_options=d.synthetic.model_dump(),
        extra_train=None if d.extra_train is None else (d.extra_train.source, d.extra_train.label),
        cache_dir=cache_dir,
        include_test=include_test,
    )
    check_space_against_data(space, dataset)
    return dataset


def check_space_against_data(space: SearchSpace, dataset: Dataset) -> None:
    """Class names in per-class hyperparameters, focus metrics, drop_hard and extra_ratio need the data to match."""
    problems: list[tuple[str, str]] = []
    for name, used in class_names_used(space.specs).items():
        unknown = sorted(used - set(dataset.class_names))
        if unknown:
            classes = ", ".join(dataset.class_names)
            problems.append(
                (f"params.{name}", f"unknown class(es) {', '.join(unknown)}; the data's classes are {classes}")
            )
    for key, metric in (
        ("study.metric", space.study.metric),
        ("train.checkpoint_metric", space.train.checkpoint_metric),
    ):
        if metric and metric.startswith("val_focus_") and dataset.positive_index is None:
            classes = ", ".join(dataset.class_names)
            problems.append((key, f"{metric} needs data.positive_class, the class to focus on ({classes})"))
    names = {spec.name for spec, _ in iter_specs(space.specs)}
    if "drop_hard" in names and space.data.hard_example_column is None:
        problems.append(("params.drop_hard", "needs data.hard_example_column (a CSV column) to be set"))
    if "extra_ratio" in names and space.data.extra_train is None:
        problems.append(("params.extra_ratio", "needs data.extra_train (a folder of extra images) to be set"))
    if problems:
        raise SpaceError("search space", problems)


def cv_folds(dataset: Dataset, k: int, seed: int, device: torch.device) -> list[DeviceData]:
    """Train and validation pooled, then k stratified (grouped, when there are groups) folds."""
    labels = np.concatenate([dataset.train.labels, dataset.val.labels])
    images = np.concatenate([dataset.train.images, dataset.val.images])
    groups = pooled(dataset.train.groups, dataset.val.groups)
    tags = pooled(dataset.train.tags, dataset.val.tags)
    fold = assign_folds(labels, groups, k=k, seed=seed)
    return [
        DeviceData.build(
            dataset,
            device,
            train=(images[fold != f], labels[fold != f]),
            val=(images[fold == f], labels[fold == f]),
            train_tags=None if tags is None else tags[fold != f],
        )
        for f in range(k)
    ]


def space_at_size(space: SearchSpace, image_size: int | None) -> SearchSpace:
    """``space`` with its data at ``image_size`` (None: as it is)."""
    if image_size is None or image_size == space.data.image_size:
        return space
    return space.model_copy(update={"data": space.data.model_copy(update={"image_size": image_size})})


class TrialData:
    """A worker's data at each image size its trials ask for: decoded once per size into the disk cache,
    moved to the device once per size, kept for the trials after (never resized per epoch)."""

    def __init__(self, space: SearchSpace, dataset: Dataset, device: torch.device, cache_dir: Path) -> None:
        self.space, self.device, self.cache_dir = space, device, cache_dir
        self._by_size: dict[int, tuple[DeviceData, list[DeviceData]]] = {}
        self._add(dataset)

    def _add(self, dataset: Dataset) -> tuple[DeviceData, list[DeviceData]]:
        k = self.space.study.cv_folds
        folds = cv_folds(dataset, k, self.space.data.split_seed, self.device) if k else []
        self._by_size[dataset.image_size] = (DeviceData.from_dataset(dataset, self.device), folds)
        return self._by_size[dataset.image_size]

    def at(self, image_size: int | None) -> tuple[DeviceData, list[DeviceData]]:
        """Hold-out data and the cross-validation folds (empty without ``study.cv_folds``)."""
        size = image_size or self.space.data.image_size
        if size in self._by_size:
            return self._by_size[size]
        return self._add(prepare(space_at_size(self.space, size), cache_dir=self.cache_dir))
