"""The training loop's state between two epochs: stop there, go on later, end as if never stopped.

Everything the rest of a run depends on: the weights and their moving average, the optimizer's, the LR
schedule's and the gradient scaler's state, the random number generators (the one the data order and
augmentation draw from, and torch's own, which dropout draws from) and the loop's own record (history,
best epoch so far). All of it copied to the CPU, in plain containers that ``torch.load(weights_only=True)``
reads back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tuner.train.averaging import WeightAverage
from tuner.train.optim import LRSchedule


@dataclass
class Progress:
    """What the loop has recorded so far."""

    epoch: int = 0  # epochs completed
    history: dict[str, list[float]] = field(default_factory=dict)
    best_value: float = math.nan
    best_epoch: int = 0  # 1-based; 0: none yet
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_probs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    train_seconds: float = 0.0
    epoch_seconds: float = 0.0
    images_seen: int = 0


@dataclass
class Snapshot:
    progress: Progress
    model: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    average: dict[str, Any] | None
    scaler: dict[str, Any] | None
    generator: torch.Tensor | None
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Snapshot:
        return cls(**{**state, "progress": Progress(**state["progress"])})


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass(frozen=True)
class RunParts:
    """The parts of a run whose state a snapshot holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    average: WeightAverage
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator | None

    def snapshot(self, progress: Progress) -> Snapshot:
        device = next(self.model.parameters()).device
        return Snapshot(
            # the best epoch's weights and probabilities are replaced, never changed in place: shared, not copied
            progress=Progress(**{**vars(progress), "history": {k: list(v) for k, v in progress.history.items()}}),
            model=to_cpu(self.model.state_dict()),
            optimizer=to_cpu(self.optimizer.state_dict()),
            schedule=to_cpu(self.schedule.state_dict()),
            average=to_cpu(self.average.state_dict()),
            scaler=None if self.scaler is None else self.scaler.state_dict(),
            generator=None if self.generator is None else self.generator.get_state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        )

    def restore(self, snapshot: Snapshot) -> Progress:
        """Put ``snapshot`` back into these freshly built parts; returns the loop's record to go on from."""
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(snapshot.optimizer)  # after the schedule was built: it sets the lrs
        self.schedule.load_state_dict(snapshot.schedule)
        self.average.load_state_dict(snapshot.average)
        if self.scaler is not None and snapshot.scaler is not None:
            self.scaler.load_state_dict(snapshot.scaler)
        if self.generator is not None and snapshot.generator is not None:
            self.generator.set_state(snapshot.generator)
        torch.set_rng_state(snapshot.torch_rng)
        device = next(self.model.parameters()).device
        if device.type == "cuda" and snapshot.cuda_rng is not None:
            torch.cuda.set_rng_state(snapshot.cuda_rng, device)
        return snapshot.progress
