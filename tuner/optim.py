"""Optimizer and LR-scheduler factories.

Each scheduler knows when it steps: per optimizer step (OneCycle), per epoch
(step, multistep, exponential, cosine) or per epoch on the monitored metric
(plateau). The train loop calls :meth:`LRSchedule.after_step` and
:meth:`LRSchedule.after_epoch` and never needs to know which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch.optim import lr_scheduler

from tuner.errors import TunerError

# The registries: a name in a space file -> what builds it. The allowed names in the schema and
# the error messages come from their keys.
OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    slower: Iterable[torch.nn.Parameter] = (),
    slower_ratio: float = 1.0,
) -> torch.optim.Optimizer:
    """``params`` learn at ``lr``; ``slower`` ones (a pretrained backbone) at ``lr * slower_ratio``, in a second
    parameter group (the first group's lr is the trial's lr, as the history records it)."""
    params = [p for p in params if p.requires_grad]
    slow = [p for p in slower if p.requires_grad]
    if not params and not slow:
        raise TunerError("the model has no trainable parameters (is everything frozen?)")
    groups = [{"params": params, "lr": lr}] if params else []
    if slow:
        groups.append({"params": slow, "lr": lr * slower_ratio})
    if name not in OPTIMIZER_CLASSES:
        raise TunerError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, but got optimizer={name!r}")
    extra = {"momentum": momentum} if name == "sgd" else {}  # the only one of them with momentum
    return OPTIMIZER_CLASSES[name](groups, lr=lr, weight_decay=weight_decay, **extra)


class LRSchedule:
    """A scheduler plus when to step it."""

    def __init__(self, scheduler: object | None, interval: str, *, total_steps: int | None = None) -> None:
        self.scheduler = scheduler
        self.interval = interval  # "step", "epoch", "metric" or "none"
        self.total_steps = total_steps
        self.steps = 0

    def after_step(self) -> None:
        # OneCycle raises past its last step; a final partial accumulation step can overshoot by one.
        if self.interval == "step" and (self.total_steps is None or self.steps < self.total_steps - 1):
            self.steps += 1
            self.scheduler.step()  # type: ignore[union-attr]

    def after_epoch(self, metric: float) -> None:
        if self.interval == "epoch":
            self.scheduler.step()  # type: ignore[union-attr]
        elif self.interval == "metric":
            self.scheduler.step(metric)  # type: ignore[union-attr]


@dataclass(frozen=True)
class ScheduleArgs:
    """Everything a schedule may take, from the trial's hyperparameters and the run's length."""

    max_epochs: int
    steps_per_epoch: int
    step_size: int
    gamma: float
    milestones: Sequence[int]
    patience: int
    factor: float
    mode: str


def _onecycle(optimizer: torch.optim.Optimizer, a: ScheduleArgs) -> LRSchedule:
    max_lr = [group["lr"] for group in optimizer.param_groups]  # each group's own peak (backbone_lr_ratio)
    total = max(1, a.max_epochs * a.steps_per_epoch)
    return LRSchedule(lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total), "step", total_steps=total)


def _plateau(optimizer: torch.optim.Optimizer, a: ScheduleArgs) -> LRSchedule:
    mode: Literal["min", "max"] = "max" if a.mode == "max" else "min"
    return LRSchedule(
        lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, patience=a.patience, factor=a.factor), "metric"
    )


SCHEDULE_BUILDERS: dict[str, Callable[[torch.optim.Optimizer, ScheduleArgs], LRSchedule]] = {
    "none": lambda opt, a: LRSchedule(None, "none"),
    "step": lambda opt, a: LRSchedule(lr_scheduler.StepLR(opt, step_size=a.step_size, gamma=a.gamma), "epoch"),
    "multistep": lambda opt, a: LRSchedule(
        lr_scheduler.MultiStepLR(opt, milestones=sorted(a.milestones), gamma=a.gamma), "epoch"
    ),
    "exponential": lambda opt, a: LRSchedule(lr_scheduler.ExponentialLR(opt, gamma=a.gamma), "epoch"),
    "plateau": _plateau,
    "onecycle": _onecycle,
    "cosine": lambda opt, a: LRSchedule(lr_scheduler.CosineAnnealingLR(opt, T_max=a.max_epochs), "epoch"),
}
SCHEDULERS = tuple(SCHEDULE_BUILDERS)
# Stepped once per epoch: the ones a warm-up can precede.
EPOCH_SCHEDULES = ("none", "step", "multistep", "exponential", "cosine")


def _schedule(name: str, optimizer: torch.optim.Optimizer, args: ScheduleArgs) -> LRSchedule:
    if name not in SCHEDULE_BUILDERS:
        raise TunerError(f"scheduler must be one of {', '.join(SCHEDULERS)}, but got scheduler={name!r}")
    return SCHEDULE_BUILDERS[name](optimizer, args)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    max_epochs: int,
    steps_per_epoch: int,
    step_size: int = 10,
    gamma: float = 0.1,
    milestones: Sequence[int] = (10, 15),
    patience: int = 3,
    factor: float = 0.1,
    mode: str = "max",
    warmup_epochs: int = 0,
) -> LRSchedule:
    """The LR schedule ``name``; ``warmup_epochs`` > 0 first raises the rate linearly over that many epochs
    (from 1/(warmup_epochs+1) of it), then hands over to ``name`` for the epochs left."""
    args = ScheduleArgs(max_epochs, steps_per_epoch, step_size, gamma, milestones, patience, factor, mode)
    if warmup_epochs == 0:
        return _schedule(name, optimizer, args)
    if name in SCHEDULE_BUILDERS and name not in EPOCH_SCHEDULES:
        raise TunerError(
            f"warmup_epochs applies to epoch schedules ({', '.join(EPOCH_SCHEDULES)}), not to "
            f"scheduler={name!r}" + (" (it warms up by itself)" if name == "onecycle" else "")
        )
    if warmup_epochs >= max_epochs:
        raise TunerError(f"warmup_epochs={warmup_epochs} leaves no epoch of the run (max_epochs={max_epochs})")
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), total_iters=warmup_epochs)
    if name == "none":
        return LRSchedule(warmup, "epoch")
    rest = max_epochs - warmup_epochs
    main = _schedule(name, optimizer, replace(args, max_epochs=rest))
    assert isinstance(main.scheduler, lr_scheduler.LRScheduler)  # an epoch schedule (checked above)
    return LRSchedule(
        lr_scheduler.SequentialLR(optimizer, [warmup, main.scheduler], milestones=[warmup_epochs]), "epoch"
    )
