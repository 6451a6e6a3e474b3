"""Trains one trial's components: the single code path from hyperparameters to a trained model.

The Optuna objective and refit both call :func:`train_model`, so refit replays a trial exactly.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache, partial

import numpy as np
import torch

from tuner.data import DeviceData, Normalize, epoch_chunk, epoch_indices, iterate_batches
from tuner.errors import TunerError
from tuner.interrupts import raise_if_interrupted
from tuner.train.build import RunSettings, build_components
from tuner.train.features import cached_features, uses_cached_features
from tuner.train.hparams import Hyperparameters
from tuner.train.loop import FitResult, default_amp_dtype, fit
from tuner.train.losses import logits_to_probs
from tuner.train.metrics import classification_metrics
from tuner.train.mixing import MixingLoss, mix_batches
from tuner.train.models import Classifier
from tuner.train.snapshot import Snapshot

log = logging.getLogger(__name__)


class OutOfMemory(TunerError):
    """Out of device memory even at the smallest batch size allowed: the configuration is infeasible here."""


def free_memory() -> None:
    """Give a failed run's tensors back (call outside the ``except`` block: its traceback holds them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_model(
    hparams: Hyperparameters,
    data: DeviceData,
    settings: RunSettings,
    *,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    epochs: int | None = None,
    on_retry: Callable[[Hyperparameters], None] | None = None,
    stop: Callable[[], object] | None = None,
    start: Snapshot | None = None,
) -> tuple[Classifier, FitResult]:
    """Build model, sampler, loss, optimizer, schedule and augmentation from ``hparams``; train; return both.

    ``epochs`` stops training early (refit) while the LR schedule stays planned over
    ``settings.max_epochs``, so those epochs follow exactly the trial's schedule.

    Out of device memory, the run starts again at half the batch size with twice the gradient
    accumulation (the same images per optimizer step) and half the evaluation batch size, down to
    ``settings.min_batch_size``; ``on_retry`` is told the hyperparameters of each new attempt.
    Below the floor it raises :class:`OutOfMemory`.

    ``stop`` / ``start``: as in :func:`~tuner.train.loop.fit`, to stop between batches with the state of
    the last complete epoch (:class:`~tuner.train.loop.Interrupted`) and to go on from such a state.
    """
    while True:
        try:
            return _train_once(
                hparams, data, settings, seed=seed, on_epoch=on_epoch, epochs=epochs, stop=stop, start=start
            )
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
        start = None  # a saved state belongs to the batch size it was trained at
        if on_retry is not None:
            on_retry(hparams)


def _train_once(
    hparams: Hyperparameters,
    data: DeviceData,
    settings: RunSettings,
    *,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    epochs: int | None,
    stop: Callable[[], object] | None = None,
    start: Snapshot | None = None,
) -> tuple[Classifier, FitResult]:
    c = build_components(hparams, data, settings, seed)
    device = data.train.images.device
    channels_last = settings.uses_channels_last(device)
    generator = torch.Generator().manual_seed(seed)
    amp = settings.uses_amp(device)
    model: torch.nn.Module = c.model
    pool, val = c.pool, data.val
    normalize: Normalize | None = c.normalize
    if settings.reuse_features and uses_cached_features(hparams):
        # Only the head trains, on the backbone's features of the same images in the same batches.
        embed = partial(
            cached_features,
            c.model.backbone,
            hparams=hparams,
            normalize=c.normalize,
            cache_dir=settings.feature_cache,
            batch_size=settings.eval_batch_size,
            amp_dtype=default_amp_dtype(device) if amp else None,
            channels_last=channels_last,
        )
        pool = embed(c.pool, describe=f"{len(c.pool)} training images")
        val = None if data.val is None else embed(data.val, describe=f"{len(data.val)} validation images")
        model, normalize, channels_last = c.model.head, None, False

    # epoch_chunk asks for pass 0 (its length) and the passes an epoch spans, every epoch
    @lru_cache(maxsize=3)
    def shuffled_pass(p: int) -> np.ndarray:  # pass p of the stream that fixed-size epochs slice
        indices = epoch_indices(
            c.pool_labels, c.strategy, ratio=hparams.ratio, seed=seed * 1009 + p + 1, multipliers=c.multipliers
        )
        return indices[np.random.default_rng(seed * 1013 + p).permutation(len(indices))]

    def train_batches(epoch: int):  # noqa: ANN202
        if c.epoch_images is not None:
            order = torch.from_numpy(epoch_chunk(shuffled_pass, epoch, c.epoch_images))
        else:
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

    def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        raise_if_interrupted()  # a Ctrl-C the garbage collector swallowed mid-epoch stops here
        if on_epoch is not None:
            on_epoch(epoch, metrics)

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
        on_epoch=epoch_end,
        train_counts=np.bincount(c.pool_labels, minlength=data.num_classes).tolist(),
        images_per_epoch=c.epoch_size,
        stop=stop,
        start=start,
        generator=generator,
    )
    if model is not c.model:  # the head's states, completed with the frozen backbone's
        backbone = {f"backbone.{k}": v.detach().cpu() for k, v in c.model.backbone.state_dict().items()}
        result.best_state = {**backbone, **{f"head.{k}": v for k, v in result.best_state.items()}}
    return c.model, result
