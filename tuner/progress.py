"""What a running study or refit shows: bars on a terminal or in a notebook, one log line per epoch elsewhere.

The command line and the Python API show the same thing through these classes. In a terminal or a
Jupyter notebook, rich draws a bar over the trials (or networks) and the running epoch under it; off both
(a log file, a Slurm job, a notebook run by nbclient) every epoch is one log line instead, so a long run
is never silent.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)


def fmt(value: Any) -> str:
    """A number as tuner prints it (4 significant digits); anything else as is."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def say(logger: str, line: str) -> None:
    """One progress line off a terminal: through logging where it is set up (the command line, a test),
    else straight to stderr (a script or notebook that configured no logging would otherwise show nothing)."""
    log = logging.getLogger(logger)
    if log.hasHandlers():
        log.info(line)
    else:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def bars(quiet: bool) -> Progress:
    """Progress bars on stderr; off when ``quiet`` or neither a terminal nor a notebook."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not live_bars(),
    )


def live_bars() -> bool:
    """Whether bars can redraw in place: in a terminal, or in Jupyter with ipywidgets (without it rich would
    print every frame as a new output, so a notebook gets the one-line-per-epoch fallback instead)."""
    if console.is_terminal:
        return True
    if not console.is_jupyter:
        return False
    return importlib.util.find_spec("ipywidgets") is not None


class StudyProgress:
    """While a study runs: a bar over the trials with one line per finished trial, and under it the running
    trial's epoch with its latest and best value."""

    def __init__(self, space: Any, *, total: int, quiet: bool) -> None:
        self.metric, self.max_epochs = space.study.metric, space.train.max_epochs
        self.sign = 1 if space.study.resolved_direction == "maximize" else -1
        self.progress = bars(quiet)
        self.quiet = quiet
        self.total = total
        self.best_in_trial: dict[int, float] = {}
        self.last_epoch: dict[int, int] = {}

    def __enter__(self) -> StudyProgress:
        self.progress.__enter__()
        self.trials = self.progress.add_task("trials", total=self.total)
        self.epochs = self.progress.add_task("waiting for the first epoch", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def trial_finished(self, study: Any, trial: Any) -> None:
        from tuner.search import best_value, feasibility, trial_summary

        s = trial_summary(trial)
        best = best_value(study)
        if feasibility(trial) is False:
            s["reason"] = s["reason"] or "outside study.constraints"
        detail = s["reason"] or f"best epoch {s['best_epoch']}"
        self.progress.advance(self.trials)
        if self.quiet:
            return
        self.progress.console.print(
            f"trial {s['number']:>3} {s['state']:<8} {self.metric}={fmt(s['value']):<7} "
            f"({detail}; {s['duration_s']} s)  best so far {fmt(best) if best is not None else '-'}",
            highlight=False,
            soft_wrap=True,
        )

    def epoch(self, number: int, epoch: int, value: float) -> None:
        """Inside a trial: its epoch, latest value and best so far."""
        if self.last_epoch.get(number) == epoch:  # several workers are polled every second: each epoch once
            return
        self.last_epoch[number] = epoch
        best = self.best_in_trial.get(number)
        if math.isfinite(value) and (best is None or self.sign * value > self.sign * best):
            self.best_in_trial[number] = value
        line = (
            f"trial {number} epoch {epoch}/{self.max_epochs} {self.metric}={fmt(value)} "
            f"(trial best {fmt(self.best_in_trial.get(number))})"
        )
        if not self.progress.disable:
            self.progress.update(self.epochs, description=line, completed=epoch, total=self.max_epochs)
        elif not self.quiet:
            say("tuner.optimize", line)


class NetworkProgress:
    """While refit or an ensemble trains its networks: a bar over them, and the running network's epoch
    with its training loss."""

    def __init__(self, *, what: str, quiet: bool) -> None:
        self.what = what
        self.quiet = quiet
        self.progress = bars(quiet)

    def __enter__(self) -> NetworkProgress:
        self.progress.__enter__()
        self.networks = self.progress.add_task(self.what, total=None)
        self.epochs = self.progress.add_task("waiting for the first epoch", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def done(self, done: int, total: int) -> None:
        self.progress.update(self.networks, completed=done, total=total)

    def epoch(self, network: int, networks: int, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        loss = metrics.get("train_loss")
        line = f"network {network}/{networks} epoch {epoch}/{epochs}" + (
            "" if loss is None else f" train_loss={fmt(loss)}"
        )
        if not self.progress.disable:
            self.progress.update(self.epochs, description=line, completed=epoch, total=epochs)
        elif not self.quiet:
            say("tuner.refit", line)
