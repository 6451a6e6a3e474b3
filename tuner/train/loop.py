"""The train / evaluate loop. Knows nothing about Optuna or search spaces.

``fit`` trains for up to ``max_epochs``, evaluates on validation after every
epoch, calls ``on_epoch(epoch, metrics)`` (where a caller may report to a
pruner and raise to stop), stops early after ``patience`` epochs without
improvement and keeps the best epoch's weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tuner.train.averaging import WeightAverage
from tuner.train.optim import LRSchedule
from tuner.train.snapshot import Progress, RunParts, Snapshot, to_cpu

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Interrupted(KeyboardInterrupt):
    """``fit`` was asked to stop (its ``stop`` returned true) and did, before a batch or after an epoch.

    ``snapshot`` is the state after the last epoch completed: ``fit(start=snapshot)`` goes on from there
    and ends exactly as the run would have without the stop. A ``KeyboardInterrupt``, so that no
    ``except Exception`` takes it for a fault."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__(f"stopped after epoch {snapshot.progress.epoch}")
        self.snapshot = snapshot


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"training loss became non-finite (NaN or inf) in epoch {epoch}")
        self.epoch = epoch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def default_amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has it (CPUs, recent GPUs); fp16 on older GPUs, which then need a gradient scaler."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` on ``device``; ``None``: full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


@dataclass
class FitResult:
    history: dict[str, list[float]]
    best_epoch: int  # 1-based
    best_value: float
    best_state: dict[str, torch.Tensor] = field(repr=False)
    epochs_run: int
    seconds_per_epoch: float
    images_per_second: float
    peak_memory_mb: float
    stopped_early: bool
    # validation probabilities and targets of the best epoch (None without validation)
    best_val_probs: torch.Tensor | None = field(default=None, repr=False)
    val_targets: torch.Tensor | None = field(default=None, repr=False)
    # what the model trained on: images per class before each epoch's resampling, images per epoch
    train_counts: list[int] | None = None
    images_per_epoch: int | None = None


@torch.inference_mode()
def predict(
    model: nn.Module,
    batches: Batches,
    *,
    to_probs: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Probabilities, targets and mean loss over ``batches`` (model in eval mode; ``amp_dtype``: autocast in it, None: full precision)."""
    model.eval()
    probs, targets = [], []
    loss_sum, count = None, 0
    device = next(model.parameters()).device
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = model(x)
        if loss_fn is not None:
            batch_loss = loss_fn(logits, y) * len(y)
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        count += len(y)
        probs.append(to_probs(logits.float()))
        targets.append(y)
    mean_loss = float(loss_sum) / count if loss_sum is not None and count else float("nan")
    return torch.cat(probs), torch.cat(targets), mean_loss


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    *,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    accumulate_steps: int = 1,
    grad_clip: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """One pass; returns the summed loss (a device tensor, not synced) and the number of images.
    ``on_step`` is called after each optimizer step (weight averaging)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    images = 0
    optimizer.zero_grad(set_to_none=True)
    pending = 0
    for x, y in batches:
        with autocast(device, amp_dtype):
            loss = loss_fn(model(x), y)
        scaled = loss / accumulate_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach() * len(y)  # no .item(): that would sync the GPU every step
        images += len(y)
        pending += 1
        if pending == accumulate_steps:
            _optimizer_step(model, optimizer, scaler, grad_clip)
            schedule.after_step()
            if on_step is not None:
                on_step()
            pending = 0
    if pending:
        _optimizer_step(model, optimizer, scaler, grad_clip)
        schedule.after_step()
        if on_step is not None:
            on_step()
    return loss_sum, images


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, grad_clip: float
) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_fit_arguments(
    *,
    max_epochs: int,
    monitor: str,
    mode: str,
    patience: int | None,
    accumulate_steps: int,
    grad_clip: float,
    validating: bool,
    ema_decay: float = 0.0,
) -> None:
    """Like Optuna's constructors: each rule stated, the value echoed, before the first step."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, but got max_epochs={max_epochs}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', but got mode={mode!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be None or at least 1, but got patience={patience}")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be at least 1, but got accumulate_steps={accumulate_steps}")
    if not (grad_clip >= 0):  # also catches NaN
        raise ValueError(f"grad_clip must be 0 (off) or positive, but got grad_clip={grad_clip}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), but got ema_decay={ema_decay}")
    if not validating and monitor != "train_loss":
        raise ValueError(f"without validation batches monitor must be 'train_loss', but got monitor={monitor!r}")


def fit(
    model: nn.Module,
    *,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches] | None,
    loss_fn: nn.Module,
    to_probs: Callable[[torch.Tensor], torch.Tensor],
    metrics_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    max_epochs: int,
    monitor: str = "val_auroc",
    mode: str = "max",
    patience: int | None = None,
    accumulate_steps: int = 1,
    grad_clip: float = 0.0,
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
    ema_decay: float = 0.0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    train_counts: list[int] | None = None,
    images_per_epoch: int | None = None,
    stop: Callable[[], object] | None = None,
    start: Snapshot | None = None,
    generator: torch.Generator | None = None,
) -> FitResult:
    """Train, validate each epoch, keep the best epoch. ``train_batches(epoch)`` gives that epoch's batches.

    Without ``val_batches`` (a refit on train+val) nothing is validated, ``monitor`` may only
    be ``train_loss`` and the last epoch is the one kept.

    ``amp``: mixed precision in ``amp_dtype`` (default: the device's, see :func:`default_amp_dtype`);
    fp16 brings a gradient scaler, which skips the steps whose gradients overflowed.

    ``ema_decay`` > 0 keeps an exponential moving average of the weights (timm's ``ModelEmaV3``, its
    decay warmed up over the first steps, as short runs need): validation, the best epoch's state and
    the model returned are the averaged weights.

    ``train_counts`` / ``images_per_epoch`` (what the caller's sampler feeds each epoch) are stored in
    the result as given, so it is complete when ``fit`` returns.

    ``stop`` is asked before every batch and after every epoch; when it returns true, ``fit`` raises
    :class:`Interrupted` with the state after the last complete epoch (a snapshot taken at each epoch's
    start, on the CPU, only when ``stop`` is given). ``start``: such a snapshot to go on from, the run's
    parts freshly built as for the original; ``generator``: the one ``train_batches`` draws from, whose
    state the snapshot holds.
    """
    _check_fit_arguments(
        max_epochs=max_epochs,
        monitor=monitor,
        mode=mode,
        patience=patience,
        accumulate_steps=accumulate_steps,
        grad_clip=grad_clip,
        validating=val_batches is not None,
        ema_decay=ema_decay,
    )
    device = next(model.parameters()).device
    average = WeightAverage(model, ema_decay)
    averaged, on_step = average.module, (average.update if average.ema is not None else None)
    dtype = (amp_dtype or default_amp_dtype(device)) if amp else None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = RunParts(model, optimizer, schedule, average, scaler, generator)
    p = Progress() if start is None else parts.restore(start)
    sign = 1.0 if mode == "max" else -1.0
    stopped_early = False
    probs = None
    epoch = p.epoch
    for epoch in range(p.epoch + 1, max_epochs + 1):
        # Before train_batches: drawing the epoch's order already moves the generator on.
        snapshot = None if stop is None else parts.snapshot(p)
        batches = train_batches(epoch)
        if stop is not None and snapshot is not None:
            batches = _until_stopped(batches, stop, snapshot)
        start_time = time.perf_counter()
        loss_sum, images = train_one_epoch(
            model,
            batches,
            loss_fn=loss_fn,
            optimizer=optimizer,
            schedule=schedule,
            accumulate_steps=accumulate_steps,
            grad_clip=grad_clip,
            amp_dtype=dtype,
            scaler=scaler,
            on_step=on_step,
        )
        train_loss = float(loss_sum) / max(images, 1)  # one sync per epoch
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(epoch)
        train_done = time.perf_counter()
        metrics = {"train_loss": train_loss}
        if val_batches is not None:
            probs, p.targets, val_loss = predict(
                averaged, val_batches(), to_probs=to_probs, loss_fn=loss_fn, amp_dtype=dtype
            )
            metrics["val_loss"] = val_loss
            metrics.update({f"val_{k}": v for k, v in metrics_fn(probs, p.targets).items()})
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if monitor not in metrics:
            raise ValueError(f"monitor must be one of {', '.join(sorted(metrics))}, but got monitor={monitor!r}")
        schedule.after_epoch(metrics[monitor])
        end = time.perf_counter()
        metrics["epoch_seconds"] = end - start_time
        metrics["validate_seconds"] = end - train_done
        p.train_seconds += train_done - start_time
        p.epoch_seconds += end - start_time
        p.images_seen += images
        p.epoch = epoch
        for key, value in metrics.items():
            p.history.setdefault(key, []).append(value)

        value = metrics[monitor]
        improved = math.isfinite(value) and (not p.best_epoch or sign * value > sign * p.best_value)
        if improved and val_batches is not None:
            p.best_value, p.best_epoch, p.best_probs = value, epoch, probs
            p.best_state = to_cpu(averaged.state_dict())
        log.debug("epoch %d: %s", epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if patience is not None and p.best_epoch and epoch - p.best_epoch >= patience:
            stopped_early = True
            break
        if stop is not None and epoch < max_epochs and stop():
            raise Interrupted(parts.snapshot(p))
    if averaged is not model:
        model.load_state_dict(averaged.state_dict())
    if not p.best_epoch:  # no validation, or never a finite value: keep the last epoch
        p.best_value, p.best_epoch, p.best_state = (
            p.history.get(monitor, [math.nan])[-1],
            epoch,
            to_cpu(model.state_dict()),
        )
    return FitResult(
        history=p.history,
        best_epoch=p.best_epoch,
        best_value=p.best_value,
        best_state=p.best_state,
        epochs_run=epoch,
        seconds_per_epoch=p.epoch_seconds / max(epoch, 1),
        images_per_second=p.images_seen / p.train_seconds if p.train_seconds > 0 else float("nan"),
        peak_memory_mb=peak_memory_mb(device),
        stopped_early=stopped_early,
        best_val_probs=p.best_probs,
        val_targets=p.targets,
        train_counts=train_counts,
        images_per_epoch=images_per_epoch,
    )


def _until_stopped(batches: Batches, stop: Callable[[], object], snapshot: Snapshot) -> Batches:
    """``batches`` until ``stop()`` says otherwise; then :class:`Interrupted` with the epoch's starting state."""
    for batch in batches:
        if stop():
            raise Interrupted(snapshot)
        yield batch
