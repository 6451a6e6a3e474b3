"""A data set's splits on the training device, and the pool one trial trains on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tuner.data.dataset import Dataset
from tuner.data.imbalance import SYNTHESIZING, synthesize
from tuner.data.loader import TensorSplit
from tuner.errors import TunerError

if TYPE_CHECKING:
    from tuner.train import Hyperparameters


@dataclass(frozen=True)
class DeviceData:
    """A data set's train and validation splits moved to the training device once."""

    train: TensorSplit
    val: TensorSplit | None  # None for a refit on train+val
    train_labels: np.ndarray
    num_classes: int
    positive_index: int | None
    channels: int
    image_size: int
    class_names: tuple[str, ...] = ()
    train_tags: np.ndarray | None = None  # hard-example column values of the training items
    extra: TensorSplit | None = None  # training-only extra images (data.extra_train)
    extra_labels: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        device: torch.device,
        *,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray] | None,
        train_tags: np.ndarray | None = None,
    ) -> DeviceData:
        """Move ``(images, labels)`` for training (and validation, if any) to ``device``."""
        extra = dataset.extra
        return cls(
            train=TensorSplit.from_numpy(*train, device),
            val=None if val is None else TensorSplit.from_numpy(*val, device),
            train_labels=train[1],
            num_classes=dataset.num_classes,
            positive_index=dataset.positive_index,
            channels=dataset.channels,
            image_size=dataset.image_size,
            class_names=dataset.class_names,
            train_tags=train_tags,
            extra=None if extra is None else TensorSplit.from_numpy(extra.images, extra.labels, device),
            extra_labels=None if extra is None else extra.labels,
        )

    @classmethod
    def from_dataset(cls, dataset: Dataset, device: torch.device) -> DeviceData:
        return cls.build(
            dataset,
            device,
            train=(dataset.train.images, dataset.train.labels),
            val=(dataset.val.images, dataset.val.labels),
            train_tags=dataset.train.tags,
        )

    @classmethod
    def train_and_val(cls, dataset: Dataset, device: torch.device) -> DeviceData:
        """Train and validation together as the training split (refit), no validation."""
        images = np.concatenate([dataset.train.images, dataset.val.images])
        labels = np.concatenate([dataset.train.labels, dataset.val.labels])
        tags = pooled(dataset.train.tags, dataset.val.tags)
        return cls.build(dataset, device, train=(images, labels), val=None, train_tags=tags)

    def class_index(self, name: str, hparam: str) -> int:
        if name not in self.class_names:
            raise TunerError(f"{hparam} names class {name!r}, but the classes are {', '.join(self.class_names)}")
        return self.class_names.index(name)


def pooled(*parts: np.ndarray | None) -> np.ndarray | None:
    """Per-item arrays (groups, tags) of several splits joined; None unless every split has one."""
    present = [p for p in parts if p is not None]
    return np.concatenate(present) if len(present) == len(parts) else None


def _extra_indices(extra_labels: np.ndarray, train_labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Per class, ``ratio`` extra images per real training image (as many as there are), drawn at random."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(extra_labels):
        members = np.flatnonzero(extra_labels == cls)
        n = min(len(members), round(ratio * int((train_labels == cls).sum())))
        chosen.append(np.sort(rng.choice(members, size=n, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def training_pool(hparams: Hyperparameters, data: DeviceData, seed: int) -> tuple[TensorSplit, np.ndarray]:
    """What one trial trains on: the training split less the hard examples it drops, plus its share of
    the extra images and any SMOTE / ADASYN images. Validation is never touched."""
    split, labels = data.train, data.train_labels
    if hparams.drop_hard:
        if data.train_tags is None:
            raise TunerError("drop_hard needs data.hard_example_column, a column of the CSV manifest")
        keep = np.flatnonzero(~np.isin(data.train_tags.astype(str), list(hparams.drop_hard)))
        if len(np.unique(labels[keep])) < 2:
            raise TunerError(f"drop_hard={list(hparams.drop_hard)} leaves fewer than two classes to train on")
        split, labels = split.take(keep), labels[keep]
    if hparams.extra_ratio > 0:
        if data.extra is None or data.extra_labels is None:
            raise TunerError("extra_ratio needs data.extra_train, a folder of extra training images")
        chosen = _extra_indices(data.extra_labels, labels, hparams.extra_ratio, seed)
        split, labels = split.join(data.extra.take(chosen)), np.concatenate([labels, data.extra_labels[chosen]])
    if hparams.imbalance in SYNTHESIZING:
        images, new_labels = synthesize(
            split.images.cpu().numpy(), labels, hparams.imbalance, ratio=hparams.ratio, seed=seed
        )
        split = split.join(TensorSplit.from_numpy(images, new_labels, split.images.device))
        labels = np.concatenate([labels, new_labels])
    return split, labels
