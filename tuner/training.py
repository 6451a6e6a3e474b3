"""Builds every component from one trial's hyperparameters and trains.

The Optuna objective and refit both call :func:`train_model`: one code path
from hyperparameters to a trained model, so refit replays a trial exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from tuner.data.augment import BatchAugment
from tuner.data.dataset import Dataset
from tuner.data.imbalance import balanced_class_weights, epoch_indices, target_counts
from tuner.data.loader import Normalize, TensorSplit, iterate_batches
from tuner.engine import FitResult, fit
from tuner.hparams import Hyperparameters
from tuner.losses import build_loss, logits_to_probs, num_outputs
from tuner.metrics import classification_metrics
from tuner.models import BUILTIN_MODELS, Classifier, build_model
from tuner.optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch; returns the seed so callers can store it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


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

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        device: torch.device,
        *,
        train: tuple[np.ndarray, np.ndarray],
        val: tuple[np.ndarray, np.ndarray] | None,
    ) -> DeviceData:
        """Move ``(images, labels)`` for training (and validation, if any) to ``device``."""
        return cls(
            train=TensorSplit.from_numpy(*train, device),
            val=None if val is None else TensorSplit.from_numpy(*val, device),
            train_labels=train[1],
            num_classes=dataset.num_classes,
            positive_index=dataset.positive_index,
            channels=dataset.channels,
            image_size=dataset.image_size,
        )

    @classmethod
    def from_dataset(cls, dataset: Dataset, device: torch.device) -> DeviceData:
        return cls.build(
            dataset,
            device,
            train=(dataset.train.images, dataset.train.labels),
            val=(dataset.val.images, dataset.val.labels),
        )

    @classmethod
    def train_and_val(cls, dataset: Dataset, device: torch.device) -> DeviceData:
        """Train and validation together as the training split (refit), no validation."""
        images = np.concatenate([dataset.train.images, dataset.val.images])
        labels = np.concatenate([dataset.train.labels, dataset.val.labels])
        return cls.build(dataset, device, train=(images, labels), val=None)


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int
    patience: int | None
    monitor: str
    mode: str  # "max" or "min"
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = 512


def model_normalization(model: Classifier, name: str, channels: int) -> Normalize:
    """The backbone's own mean/std (timm's pretrained config); 0.5 for the built-in networks."""
    if name in BUILTIN_MODELS:
        return Normalize((0.5,) * channels, (0.5,) * channels)
    cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
    if channels == 1:
        return Normalize((float(np.mean(mean)),), (float(np.mean(std)),))
    return Normalize(tuple(mean), tuple(std))


def build_classifier(hparams: Hyperparameters, *, num_classes: int, channels: int, image_size: int) -> Classifier:
    return build_model(
        hparams.model,
        num_outputs=num_outputs(hparams.loss, num_classes),
        in_chans=channels,
        image_size=image_size,
        width=hparams.width,
        depth=hparams.depth,
        hidden_sizes=hparams.hidden_sizes,
        dropout=hparams.dropout,
        drop_path=hparams.drop_path,
        pretrained=hparams.pretrained,
        freeze_backbone=hparams.freeze_backbone,
    )


def train_model(
    hparams: Hyperparameters,
    data: DeviceData,
    settings: TrainSettings,
    *,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    epochs: int | None = None,
) -> tuple[Classifier, FitResult]:
    """Build model, sampler, loss, optimizer, schedule and augmentation from ``hparams``; train; return both.

    ``epochs`` stops training early (refit) while the LR schedule stays planned over
    ``settings.max_epochs``, so those epochs follow exactly the trial's schedule.
    """
    seed_everything(seed)
    device = data.train.images.device
    channels_last = settings.channels_last and device.type == "cuda"
    model = build_classifier(hparams, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    normalize = model_normalization(model, hparams.model, data.channels)

    weights = None
    if hparams.imbalance == "class_weight":
        weights = torch.tensor(
            balanced_class_weights(data.train_labels, data.num_classes), dtype=torch.float32, device=device
        )
    loss_fn = build_loss(
        hparams.loss,
        num_classes=data.num_classes,
        positive_index=data.positive_index,
        class_weights=weights,
        label_smoothing=hparams.label_smoothing,
        focal_gamma=hparams.focal_gamma,
    ).to(device)
    to_probs = partial(logits_to_probs, num_classes=data.num_classes, positive_index=data.positive_index)

    optimizer = build_optimizer(
        hparams.optimizer,
        model.parameters(),
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        momentum=hparams.momentum,
    )
    epoch_size = sum(target_counts(data.train_labels, hparams.imbalance, hparams.ratio).values())
    steps_per_epoch = math.ceil(math.ceil(epoch_size / hparams.batch_size) / hparams.accumulate_steps)
    schedule = build_scheduler(
        hparams.scheduler,
        optimizer,
        max_epochs=settings.max_epochs,
        steps_per_epoch=steps_per_epoch,
        step_size=hparams.step_size,
        gamma=hparams.gamma,
        milestones=hparams.milestones,
        patience=hparams.patience,
        factor=hparams.factor,
        mode=settings.mode,
    )
    augment = BatchAugment.from_name(hparams.augment)
    generator = torch.Generator().manual_seed(seed)

    def train_batches(epoch: int):  # noqa: ANN202
        indices = epoch_indices(data.train_labels, hparams.imbalance, ratio=hparams.ratio, seed=seed * 1009 + epoch)
        order = torch.from_numpy(indices)[torch.randperm(len(indices), generator=generator)]
        return iterate_batches(
            data.train,
            order,
            hparams.batch_size,
            normalize=normalize,
            augment=augment,
            generator=generator,
            channels_last=channels_last,
        )

    def val_batches():  # noqa: ANN202
        assert data.val is not None
        order = torch.arange(len(data.val))
        return iterate_batches(
            data.val, order, settings.eval_batch_size, normalize=normalize, channels_last=channels_last
        )

    result = fit(
        model,
        train_batches=train_batches,
        val_batches=val_batches if data.val is not None else None,
        loss_fn=loss_fn,
        to_probs=to_probs,
        metrics_fn=partial(classification_metrics, positive_index=data.positive_index),
        optimizer=optimizer,
        schedule=schedule,
        max_epochs=epochs or settings.max_epochs,
        monitor=settings.monitor,
        mode=settings.mode,
        patience=settings.patience,
        accumulate_steps=hparams.accumulate_steps,
        grad_clip=hparams.grad_clip,
        amp=settings.amp,
        on_epoch=on_epoch,
    )
    return model, result
