"""A trial stopped by preemption: its state saved beside the study, the trial re-queued at once, and the
retry going on from the saved epoch with the original's seed, so it ends as the trial would have.

One file per trial, ``<artifact_dir>/resume/trial-<N>.pt`` (N: the trial as first run; its retries share
the file), written whole or not at all, deleted when the retry ends. A file that cannot be written (a full
disk, a read-only folder) or read (cut short) costs the trial its epochs, never the trial: it starts again
from epoch 1, and a warning names the file and the error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from tuner.interrupts import Preempted
from tuner.search.keys import TrialKey
from tuner.train import Hyperparameters, Snapshot, save_atomically

log = logging.getLogger(__name__)

FORMAT = 1


class TrialPreempted(Preempted):
    """Preempted in the middle of a trial: what the worker needs to re-queue it (once Optuna failed it)."""

    def __init__(self, signum: int, message: str, *, params: dict[str, Any], retry_attrs: dict[str, Any]) -> None:
        super().__init__(signum, message)
        self.params = params
        self.retry_attrs = retry_attrs


@dataclass(frozen=True)
class Resume:
    """What a retried trial goes on from."""

    seed: int
    snapshot: Snapshot

    @property
    def epoch(self) -> int:
        return self.snapshot.progress.epoch

    @property
    def history(self) -> dict[str, list[float]]:
        """The epochs before the stop, as the trial recorded them."""
        return self.snapshot.progress.history


def original_number(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The number of the trial as first run (a retry records it)."""
    return int(trial.user_attrs.get(TrialKey.RETRY_OF, trial.number))


class SavedTrials:
    """The saved states of a study's preempted trials, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, trial: optuna.Trial) -> Path:
        return self.folder / f"trial-{original_number(trial)}.pt"

    def save(self, trial: optuna.Trial, *, seed: int, hparams: Hyperparameters, snapshot: Snapshot) -> Path | None:
        """Write the state (atomically); None if it could not be written (said in a warning)."""
        path = self.path(trial)
        payload = {
            "format": FORMAT,
            "seed": seed,
            "hparams": hparams.model_dump(mode="json"),
            "snapshot": snapshot.to_dict(),
        }
        try:
            save_atomically(payload, path)
        except OSError as err:
            log.warning(
                "could not save trial %d's state to %s (%s); its retry starts again from epoch 1",
                trial.number,
                path,
                err.strerror or err,
            )
            return None
        return path

    def load(self, trial: optuna.Trial, hparams: Hyperparameters) -> Resume | None:
        """The saved state of this trial (a retry of a preempted one), if there is one that fits."""
        path = self.path(trial)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT}")
            if Hyperparameters(**payload["hparams"]) != hparams:
                raise ValueError("saved for other hyperparameters")
            return Resume(
                seed=int(payload["seed"]),
                snapshot=Snapshot.from_dict(payload["snapshot"]),
            )
        except Exception as err:  # noqa: BLE001 - cut short, another version, another trial: start again
            log.warning("cannot resume trial %d from %s (%s); it starts again from epoch 1", trial.number, path, err)
            return None

    def discard(self, trial: optuna.Trial) -> None:
        self.path(trial).unlink(missing_ok=True)


def requeue(study: optuna.Study, stop: TrialPreempted) -> None:
    """Queue the preempted trial's parameters again, marked as its retry (it was failed by Optuna)."""
    study.enqueue_trial(stop.params, user_attrs=stop.retry_attrs)
