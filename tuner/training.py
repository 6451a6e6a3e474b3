"""Builds every component from one trial's hyperparameters and trains.

The Optuna objective and refit both call :func:`train_model`: one code path
from hyperparameters to a trained model, so refit replays a trial exactly.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tuner.data.augment import BatchAugment
from tuner.data.dataset import Dataset
from tuner.data.imbalance import SYNTHESIZING, balanced_class_weights, epoch_indices, synthesize, target_counts
from tuner.data.loader import Normalize, TensorSplit, iterate_batches
from tuner.engine import FitResult, default_amp_dtype, fit
from tuner.errors import TunerError
from tuner.features import cached_features, uses_cached_features
from tuner.hparams import Hyperparameters
from tuner.losses import build_loss, logits_to_probs, num_outputs
from tuner.metrics import classification_metrics
from tuner.mixing import MixingLoss, mix_batches
from tuner.models import BUILTIN_MODELS, Classifier, build_model
from tuner.optim import LRSchedule, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class OutOfMemory(TunerError):
    """Out of device memory even at the smallest batch size allowed: the configuration is infeasible here."""


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


def loss_class_weights(hparams: Hyperparameters, data: DeviceData, labels: np.ndarray) -> np.ndarray | None:
    """Explicit per-class weights (1 where unnamed), scikit-learn's balanced ones, or none."""
    if isinstance(hparams.class_weights, dict):
        weights = np.ones(data.num_classes)
        for name, value in hparams.class_weights.items():
            weights[data.class_index(name, "class_weights")] = value
        return weights
    if hparams.class_weights == "balanced" or hparams.imbalance == "class_weight":
        return balanced_class_weights(labels, data.num_classes)
    return None


@dataclass(frozen=True)
class TrainSettings:
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
    # features computed once (see tuner.features), kept in this folder (None: in memory, per run).
    cached_features: bool = True
    feature_cache: Path | None = None

    def uses_amp(self, device: torch.device) -> bool:
        return self.amp and (device.type == "cuda" or (device.type == "cpu" and self.amp_on_cpu))

    def uses_channels_last(self, device: torch.device) -> bool:
        # oneDNN's CPU convolutions are faster on NHWC too (about 20% per step for a small CNN
        # on this project's 2-core reference machine); MPS support for it is uneven.
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
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    augment: BatchAugment


def build_components(hparams: Hyperparameters, data: DeviceData, settings: TrainSettings, seed: int) -> Components:
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
    optimizer = build_optimizer(
        hparams.optimizer,
        model.head.parameters(),
        lr=hparams.lr,
        weight_decay=hparams.weight_decay,
        momentum=hparams.momentum,
        slower=model.backbone.parameters(),
        slower_ratio=hparams.backbone_lr_ratio,
    )
    # SMOTE / ADASYN images are already in the pool; each epoch then takes the pool as it is.
    strategy = "none" if hparams.imbalance in SYNTHESIZING else hparams.imbalance
    multipliers = {data.class_index(name, "class_multipliers"): m for name, m in hparams.class_multipliers.items()}
    epoch_size = sum(target_counts(pool_labels, strategy, hparams.ratio, multipliers).values())
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
        warmup_epochs=hparams.warmup_epochs,
    )
    return Components(
        model=model,
        normalize=model_normalization(model, hparams.model, data.channels),
        pool=pool,
        pool_labels=pool_labels,
        strategy=strategy,
        multipliers=multipliers,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        augment=BatchAugment.from_name(hparams.augment),
    )


def free_memory() -> None:
    """Give a failed run's tensors back (call outside the ``except`` block: its traceback holds them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_model(
    hparams: Hyperparameters,
    data: DeviceData,
    settings: TrainSettings,
    *,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    epochs: int | None = None,
    on_retry: Callable[[Hyperparameters], None] | None = None,
) -> tuple[Classifier, FitResult]:
    """Build model, sampler, loss, optimizer, schedule and augmentation from ``hparams``; train; return both.

    ``epochs`` stops training early (refit) while the LR schedule stays planned over
    ``settings.max_epochs``, so those epochs follow exactly the trial's schedule.

    Out of device memory, the run starts again at half the batch size with twice the gradient
    accumulation (the same images per optimizer step) and half the evaluation batch size, down to
    ``settings.min_batch_size``; ``on_retry`` is told the hyperparameters of each new attempt.
    Below the floor it raises :class:`OutOfMemory`.
    """
    while True:
        try:
            return _train_once(hparams, data, settings, seed=seed, on_epoch=on_epoch, epochs=epochs)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, once the failed run's frames are gone
        free_memory()
        smaller = hparams.batch_size // 2
        if smaller < settings.min_batch_size:
            raise OutOfMemory(
                f"out of memory at batch_size={hparams.batch_size} (model={hparams.model}); half of it is "
                f"below train.min_batch_size={settings.min_batch_size}"
            )
        log.warning("out of memory at batch_size=%d; trying %d", hparams.batch_size, smaller)
        hparams = hparams.model_copy(update={"batch_size": smaller, "accumulate_steps": 2 * hparams.accumulate_steps})
        settings = replace(settings, eval_batch_size=max(1, settings.eval_batch_size // 2))
        if on_retry is not None:
            on_retry(hparams)


def _train_once(
    hparams: Hyperparameters,
    data: DeviceData,
    settings: TrainSettings,
    *,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    epochs: int | None,
) -> tuple[Classifier, FitResult]:
    c = build_components(hparams, data, settings, seed)
    device = data.train.images.device
    channels_last = settings.uses_channels_last(device)
    generator = torch.Generator().manual_seed(seed)
    amp = settings.uses_amp(device)
    model: torch.nn.Module = c.model
    pool, val = c.pool, data.val
    normalize: Normalize | None = c.normalize
    if settings.cached_features and uses_cached_features(hparams):
        # Only the head trains, on the backbone's features of the same images in the same batches.
        embed = partial(
            cached_features,
            c.model.backbone,
            hparams=hparams,
            normalize=c.normalize,
            cache_dir=settings.feature_cache,
            batch_size=settings.eval_batch_size,
            amp=default_amp_dtype(device) if amp else None,
            channels_last=channels_last,
        )
        pool = embed(c.pool, describe=f"{len(c.pool)} training images")
        val = None if data.val is None else embed(data.val, describe=f"{len(data.val)} validation images")
        model, normalize, channels_last = c.model.head, None, False

    def train_batches(epoch: int):  # noqa: ANN202
        indices = epoch_indices(
            c.pool_labels, c.strategy, ratio=hparams.ratio, seed=seed * 1009 + epoch, multipliers=c.multipliers
        )
        order = torch.from_numpy(indices)[torch.randperm(len(indices), generator=generator)]
        batches = iterate_batches(
            pool,
            order,
            hparams.batch_size,
            normalize=normalize,
            augment=c.augment,
            generator=generator,
            channels_last=channels_last,
        )
        if not isinstance(c.loss_fn, MixingLoss):
            return batches
        return mix_batches(
            batches,
            mixup_alpha=hparams.mixup_alpha,
            cutmix_alpha=hparams.cutmix_alpha,
            prob=hparams.mixup_prob,
            rng=np.random.default_rng(seed * 7919 + epoch),
        )

    def val_batches():  # noqa: ANN202
        assert val is not None
        return iterate_batches(
            val, torch.arange(len(val)), settings.eval_batch_size, normalize=normalize, channels_last=channels_last
        )

    result = fit(
        model,
        train_batches=train_batches,
        val_batches=val_batches if val is not None else None,
        loss_fn=c.loss_fn,
        to_probs=partial(logits_to_probs, num_classes=data.num_classes, positive_index=data.positive_index),
        metrics_fn=partial(classification_metrics, positive_index=data.positive_index),
        optimizer=c.optimizer,
        schedule=c.schedule,
        max_epochs=epochs or settings.max_epochs,
        monitor=settings.monitor,
        mode=settings.mode,
        patience=settings.patience,
        accumulate_steps=hparams.accumulate_steps,
        grad_clip=hparams.grad_clip,
        amp=amp,
        ema_decay=hparams.ema_decay,
        on_epoch=on_epoch,
        train_counts=np.bincount(c.pool_labels, minlength=data.num_classes).tolist(),
        images_per_epoch=sum(target_counts(c.pool_labels, c.strategy, hparams.ratio, c.multipliers).values()),
    )
    if model is not c.model:  # the head's states, completed with the frozen backbone's
        backbone = {f"backbone.{k}": v.detach().cpu() for k, v in c.model.backbone.state_dict().items()}
        result.best_state = {**backbone, **{f"head.{k}": v for k, v in result.best_state.items()}}
    return c.model, result
