"""Optimizer and LR-scheduler factories.

Each scheduler knows when it steps: per optimizer step (OneCycle), per epoch
(step, multistep, exponential, cosine) or per epoch on the monitored metric
(plateau). The train loop calls :meth:`LRSchedule.after_step` and
:meth:`LRSchedule.after_epoch` and never needs to know which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim import lr_scheduler

from tuner.errors import TunerError


@dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer: its class and the options it takes besides the learning rate."""

    cls: Callable[..., torch.optim.Optimizer]
    has_momentum: bool = False


# The registry: a name in a space file -> its record. The schema's allowed names and the error
# messages come from its keys.
OPTIMIZERS: dict[str, OptimizerInfo] = {
    "adam": OptimizerInfo(torch.optim.Adam),
    "adamw": OptimizerInfo(torch.optim.AdamW),
    "sgd": OptimizerInfo(torch.optim.SGD, has_momentum=True),
}


def parameter_groups(
    module: nn.Module, *, lr: float, weight_decay: float, weight_decay_1d: bool = False
) -> list[dict[str, Any]]:
    """``module``'s trainable parameters as optimizer groups at ``lr``.

    The one place of the weight-decay rule: as in timm (``param_groups_weight_decay``) and nanoGPT,
    one-dimensional parameters (norm weights, biases) and those the model lists in its own
    ``no_weight_decay()`` (a ViT's position embedding and class token) are not decayed, unless
    ``weight_decay_1d``; decaying them pulls normalisation scales towards zero.
    """
    if weight_decay_1d or weight_decay == 0:
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": weight_decay}] if params else []
    else:
        own = getattr(module, "no_weight_decay", None)
        groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=own() if callable(own) else ())
    return [{**group, "lr": lr} for group in groups]


def build_optimizer(
    name: str,
    modules: Sequence[tuple[nn.Module, float]],
    *,
    weight_decay: float = 0.0,
    weight_decay_1d: bool = False,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Optimizer ``name`` over each ``(module, lr)``'s trainable parameters, learning at its own rate (the
    first module's lr is the trial's, as the history records it); weight decay per :func:`parameter_groups`."""
    if name not in OPTIMIZERS:
        raise TunerError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, but got optimizer={name!r}")
    groups = [
        group
        for module, lr in modules
        for group in parameter_groups(module, lr=lr, weight_decay=weight_decay, weight_decay_1d=weight_decay_1d)
    ]
    if not groups:
        raise TunerError("the model has no trainable parameters (is everything frozen?)")
    info = OPTIMIZERS[name]
    extra = {"momentum": momentum} if info.has_momentum else {}
    return info.cls(groups, lr=modules[0][1], **extra)


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

    def state_dict(self) -> dict[str, Any]:
        state = None if self.scheduler is None else self.scheduler.state_dict()  # type: ignore[attr-defined]
        return {"steps": self.steps, "scheduler": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ScheduleArgs:
    """Everything a schedule may take, from the trial's hyperparameters and the run's length."""

    max_epochs: int
    steps_per_epoch: int
    step_size: int
    gamma: float
    milestones: Sequence[int]
    plateau_patience: int
    plateau_factor: float
    mode: str


def _onecycle(optimizer: torch.optim.Optimizer, a: ScheduleArgs) -> LRSchedule:
    max_lr = [group["lr"] for group in optimizer.param_groups]  # each group's own peak (backbone_lr_ratio)
    total = max(1, a.max_epochs * a.steps_per_epoch)
    return LRSchedule(lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total), "step", total_steps=total)


def _plateau(optimizer: torch.optim.Optimizer, a: ScheduleArgs) -> LRSchedule:
    mode: Literal["min", "max"] = "max" if a.mode == "max" else "min"
    return LRSchedule(
        lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, patience=a.plateau_patience, factor=a.plateau_factor),
        "metric",
    )


@dataclass(frozen=True)
class ScheduleInfo:
    """A registered LR schedule: what builds it, and whether a linear warm-up can precede it (the ones
    stepped once per epoch)."""

    build: Callable[[torch.optim.Optimizer, ScheduleArgs], LRSchedule]
    after_warmup: bool


# The registry: a name in a space file -> its record (the schema's names and errors come from the keys).
SCHEDULERS: dict[str, ScheduleInfo] = {
    "none": ScheduleInfo(lambda opt, a: LRSchedule(None, "none"), after_warmup=True),
    "step": ScheduleInfo(
        lambda opt, a: LRSchedule(lr_scheduler.StepLR(opt, step_size=a.step_size, gamma=a.gamma), "epoch"),
        after_warmup=True,
    ),
    "multistep": ScheduleInfo(
        lambda opt, a: LRSchedule(
            lr_scheduler.MultiStepLR(opt, milestones=sorted(a.milestones), gamma=a.gamma), "epoch"
        ),
        after_warmup=True,
    ),
    "exponential": ScheduleInfo(
        lambda opt, a: LRSchedule(lr_scheduler.ExponentialLR(opt, gamma=a.gamma), "epoch"), after_warmup=True
    ),
    "plateau": ScheduleInfo(_plateau, after_warmup=False),
    "onecycle": ScheduleInfo(_onecycle, after_warmup=False),
    "cosine": ScheduleInfo(
        lambda opt, a: LRSchedule(lr_scheduler.CosineAnnealingLR(opt, T_max=a.max_epochs), "epoch"), after_warmup=True
    ),
}


def _schedule(name: str, optimizer: torch.optim.Optimizer, args: ScheduleArgs) -> LRSchedule:
    if name not in SCHEDULERS:
        raise TunerError(f"scheduler must be one of {', '.join(SCHEDULERS)}, but got scheduler={name!r}")
    return SCHEDULERS[name].build(optimizer, args)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    max_epochs: int,
    steps_per_epoch: int,
    step_size: int = 10,
    gamma: float = 0.1,
    milestones: Sequence[int] = (10, 15),
    plateau_patience: int = 3,
    plateau_factor: float = 0.1,
    mode: str = "max",
    warmup_epochs: int = 0,
) -> LRSchedule:
    """The LR schedule ``name``; ``warmup_epochs`` > 0 first raises the rate linearly over that many epochs
    (from 1/(warmup_epochs+1) of it), then hands over to ``name`` for the epochs left."""
    args = ScheduleArgs(
        max_epochs, steps_per_epoch, step_size, gamma, milestones, plateau_patience, plateau_factor, mode
    )
    if warmup_epochs == 0:
        return _schedule(name, optimizer, args)
    if name in SCHEDULERS and not SCHEDULERS[name].after_warmup:
        warmable = [n for n, info in SCHEDULERS.items() if info.after_warmup]
        raise TunerError(
            f"warmup_epochs applies to epoch schedules ({', '.join(warmable)}), not to "
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
