"""Each completed trial's plots and files for optuna-dashboard, drawn off the trial's critical path.

Drawing a trial's curves, confusion matrix and ROC/PR plot takes about a second
of CPU, as long as a small trial's epochs. So the files are registered with the
trial while it still runs (each an empty placeholder under its own artifact id,
which takes milliseconds: a finished trial can no longer be changed), and a
background thread draws them and writes their contents into the artifact store
under those ids while the next trial trains. On a GPU machine that thread uses
an otherwise idle CPU core. :meth:`TrialArtifacts.close` waits for the last ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from tuner.train import evaluation_report, per_class_csv, plot_confusion, plot_history, plot_roc_pr

log = logging.getLogger(__name__)

Draw = Callable[[Path], Path]  # writes one file at the given path


class TrialArtifacts:
    """The dashboard files of a study's trials: registered at once, drawn in the background."""

    def __init__(
        self,
        folder: Path,
        *,
        metric: str,
        class_names: tuple[str, ...],
        positive_index: int | None,
        save_checkpoints: bool = False,
    ) -> None:
        self.folder = folder
        self.store = FileSystemArtifactStore(str(folder))
        self.metric = metric
        self.class_names = class_names
        self.positive_index = positive_index
        self.save_checkpoints = save_checkpoints
        self._drawer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trial-artifacts")
        self._pending: Future[None] | None = None  # the last trial's drawing (one thread: earlier ones are done)

    def add(
        self,
        trial: optuna.Trial,
        *,
        history: dict[str, list[float]],
        probs: torch.Tensor | None,
        targets: torch.Tensor | None,
        threshold: float,
        state: dict[str, torch.Tensor],
        hparams: dict[str, Any],
    ) -> None:
        """Register the trial's files now (it is still running) and queue their drawing."""
        history = {k: list(v) for k, v in history.items()}  # copies: the caller's objects move on
        files: dict[str, Draw] = {"curves.png": lambda path: plot_history(history, self.metric, path)}
        if probs is not None and targets is not None:
            probs, targets = probs.detach().cpu().clone(), targets.detach().cpu().clone()
            val = evaluation_report(
                probs, targets, class_names=self.class_names, positive_index=self.positive_index, threshold=threshold
            )
            files["val_confusion_matrix.png"] = lambda path: plot_confusion(
                val["confusion_matrix"], self.class_names, path
            )
            files["val_per_class.csv"] = lambda path: per_class_csv(val["per_class"], path)
            if len(self.class_names) == 2 and self.positive_index is not None:
                positive = self.positive_index
                files["val_roc_pr.png"] = lambda path: plot_roc_pr(
                    probs, targets, positive_index=positive, threshold=threshold, path=path
                )
        if self.save_checkpoints:
            files["best_checkpoint.pt"] = lambda path: _save(path, {"state_dict": state, "hparams": hparams})
        try:
            with tempfile.TemporaryDirectory() as tmp:
                ids = {}
                for name in files:
                    placeholder = Path(tmp) / name
                    placeholder.touch()
                    ids[name] = upload_artifact(
                        artifact_store=self.store, file_path=str(placeholder), study_or_trial=trial
                    )
        except OSError as err:  # a full disk, a read-only folder: the trial's result still counts
            log.warning("could not write the dashboard files of trial %d in %s: %s", trial.number, self.folder, err)
            return
        self._pending = self._drawer.submit(self._draw, trial.number, files, ids)

    def wait(self) -> None:
        """Until the trials' files drawn so far are written (a latency timing must not share the cores)."""
        if self._pending is not None:
            self._pending.result()

    def close(self) -> None:
        """Wait until every queued trial's files are written."""
        self._drawer.shutdown(wait=True)

    def _draw(self, number: int, files: dict[str, Draw], ids: dict[str, str]) -> None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for name, draw in files.items():
                    path = draw(Path(tmp) / name)
                    with path.open("rb") as fh:
                        self.store.write(ids[name], fh)
        except Exception as err:  # noqa: BLE001 - a plot that fails must not stop the study
            log.warning("could not write the dashboard files of trial %d in %s: %s", number, self.folder, err)


def _save(path: Path, content: dict) -> Path:
    torch.save(content, path)
    return path
