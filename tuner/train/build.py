"""From one trial's hyperparameters to everything it trains with: model, training pool and how each epoch
draws from it, class-weighted loss, optimizer, LR schedule and augmentation (:func:`build_components`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner.data import (
    SYNTHESIZING,
    BatchAugment,
    DeviceData,
    Normalize,
    TensorSplit,
    balanced_class_weights,
    target_counts,
    training_pool,
)
from tuner.train.hparams import Hyperparameters
from tuner.train.losses import build_loss, num_outputs
from tuner.train.mixing import MixingLoss
from tuner.train.models import BUILTIN_MODELS, Classifier, build_model
from tuner.train.optim import LRSchedule, build_optimizer, build_scheduler


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch; returns the seed so callers can store it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def loss_class_weights(hparams: Hyperparameters, data: DeviceData, labels: np.ndarray) -> np.ndarray | None:
    """Explicit per-class weights (1 where unnamed), scikit-learn's balanced ones, or none."""
    if isinstance(hparams.class_weights, dict):
        weights = np.ones(data.num_classes)
        for name, value in hparams.class_weights.items():
            weights[data.class_index(name, "class_weights")] = value
        return weights
    if hparams.class_weights == "balanced":
        return balanced_class_weights(labels, data.num_classes)
    return None


@dataclass(frozen=True)
class RunSettings:
    """How the loop runs, the same for every trial of a study (from the space's ``train`` section);
    what varies per trial is in its :class:`~tuner.train.hparams.Hyperparameters`."""

    max_epochs: int
    patience: int | None
    monitor: str
    mode: str  # "max" or "min"
    amp: bool = True  # mixed precision on CUDA (bf16, else fp16 with a gradient scaler)
    channels_last: bool = True  # on CUDA and CPU, where convolutions run faster in it
    eval_batch_size: int = 512
    min_batch_size: int = 8  # out of memory: retry at half the batch size down to this
    # Autocast on the CPU too (bf16): for CPUs with bf16 units, and to run the CUDA code path in tests.
    amp_on_cpu: bool = False
    # Trials with a frozen pretrained backbone and nothing that changes an image train only the head on
    # features computed once (see tuner.train.features), kept in this folder (None: in memory, per run).
    reuse_features: bool = True
    feature_cache: Path | None = None
    epoch_images: int | None = None  # an epoch is this many training images, not a whole pass (None: a pass)

    def uses_amp(self, device: torch.device) -> bool:
        return self.amp and (device.type == "cuda" or (device.type == "cpu" and self.amp_on_cpu))

    def uses_channels_last(self, device: torch.device) -> bool:
        # oneDNN's CPU convolutions are faster on NHWC too (docs/results.md); MPS support for it is uneven.
        return self.channels_last and device.type in ("cuda", "cpu")


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
        batch_norm=hparams.batch_norm,
        pooling=hparams.pooling,
        hidden_sizes=hparams.hidden_sizes,
        dropout=hparams.dropout,
        dropout_layers=hparams.dropout_layers,
        drop_path=hparams.drop_path,
        pos_dropout=hparams.pos_dropout,
        block_dropout=hparams.block_dropout,
        dropout_blocks=hparams.dropout_blocks,
        pretrained=hparams.pretrained,
        freeze_backbone=hparams.freeze_backbone,
    )


@dataclass(frozen=True)
class Components:
    """Everything one trial trains with, built from its hyperparameters."""

    model: Classifier
    normalize: Normalize
    pool: TensorSplit  # the training images this trial draws its epochs from
    pool_labels: np.ndarray
    strategy: str  # how each epoch draws from the pool
    multipliers: dict[int, float]
    epoch_size: int  # images one epoch draws (the LR schedule's steps are planned from it)
    epoch_images: int | None  # an epoch is a slice of this many images of a stream of passes (None: one pass)
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    augment: BatchAugment


def build_components(hparams: Hyperparameters, data: DeviceData, settings: RunSettings, seed: int) -> Components:
    """Model, training pool and sampler, loss, optimizer, LR schedule and augmentation, on the data's device."""
    seed_everything(seed)
    device = data.train.images.device
    channels_last = settings.uses_channels_last(device)
    model = build_classifier(hparams, num_classes=data.num_classes, channels=data.channels, image_size=data.image_size)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)  # type: ignore[call-overload]

    pool, pool_labels = training_pool(hparams, data, seed)
    weights = loss_class_weights(hparams, data, pool_labels)
    loss_fn = build_loss(
        hparams.loss,
        num_classes=data.num_classes,
        positive_index=data.positive_index,
        class_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
        label_smoothing=hparams.label_smoothing,
        focal_gamma=hparams.focal_gamma,
    ).to(device)
    if hparams.mixup_alpha > 0 or hparams.cutmix_alpha > 0:
        loss_fn = MixingLoss(loss_fn)
    # The new head learns at lr, a pretrained backbone at lr * backbone_lr_ratio (discriminative fine-tuning).
    optimizer = build_optimizer(
        hparams.optimizer,
        [(model.head, hparams.lr), (model.backbone, hparams.lr * hparams.backbone_lr_ratio)],
        weight_decay=hparams.weight_decay,
        weight_decay_1d=hparams.weight_decay_1d,
        momentum=hparams.momentum,
    )
    # SMOTE / ADASYN images are already in the pool; each epoch then takes the pool as it is.
    strategy = "none" if hparams.imbalance in SYNTHESIZING else hparams.imbalance
    multipliers = {data.class_index(name, "class_multipliers"): m for name, m in hparams.class_multipliers.items()}
    one_pass = sum(target_counts(pool_labels, strategy, hparams.ratio, multipliers).values())
    limit = settings.epoch_images if settings.epoch_images is not None and settings.epoch_images < one_pass else None
    epoch_size = limit or one_pass
    steps_per_epoch = math.ceil(math.ceil(epoch_size / hparams.batch_size) / hparams.accumulate_steps)
    schedule = build_scheduler(
        hparams.scheduler,
        optimizer,
        max_epochs=settings.max_epochs,
        steps_per_epoch=steps_per_epoch,
        step_size=hparams.step_size,
        gamma=hparams.gamma,
        milestones=hparams.milestones,
        plateau_patience=hparams.plateau_patience,
        plateau_factor=hparams.plateau_factor,
        mode=settings.mode,
        warmup_epochs=hparams.warmup_epochs,
    )
    return Components(
        model=model,
        normalize=model_normalization(model, hparams.model, data.channels),
        pool=pool,
        pool_labels=pool_labels,
        strategy=strategy,
        multipliers=multipliers,
        epoch_size=epoch_size,
        epoch_images=limit,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        augment=BatchAugment.from_name(hparams.augment),
    )
