"""Weight averaging: an exponential moving average of the weights, updated after every optimizer step."""

from __future__ import annotations

from typing import Any

from torch import nn


class WeightAverage:
    """With ``decay`` > 0, timm's ``ModelEmaV3`` of ``model``; with 0, ``model`` itself and nothing to update.

    The decay is warmed up (power 3/4, timm's advice for shorter runs): it grows from 0 towards ``decay``,
    so the first epochs are not averaged with the random or pretrained start."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = model
        self.steps = 0
        self.ema = None
        if decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=0.75)

    @property
    def module(self) -> nn.Module:
        """The network to validate and keep."""
        return self.model if self.ema is None else self.ema.module

    def update(self) -> None:
        assert self.ema is not None
        self.steps += 1
        self.ema.update(self.model, step=self.steps)

    def state_dict(self) -> dict[str, Any] | None:
        if self.ema is None:
            return None
        return {"steps": self.steps, "weights": self.ema.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.ema is None or state is None:
            return
        self.steps = state["steps"]
        self.ema.module.load_state_dict(state["weights"])
