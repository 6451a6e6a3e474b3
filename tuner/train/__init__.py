"""What one network needs: its hyperparameters, model, loss, optimizer and schedule, the loop, metrics,
inference and the saved model. Knows nothing about Optuna or search spaces.

The names imported below are this folder's public face; each is imported from its module on first
use (see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

if TYPE_CHECKING:  # also read at run time by lazy_exports
    from tuner.train.build import (
        RunSettings,
        build_classifier,
        build_components,
        model_normalization,
        seed_everything,
    )
    from tuner.train.checkpoint import SavedModel, decide, load_model, save_atomically, save_model, versions
    from tuner.train.costs import Costs, network_costs
    from tuner.train.hparams import BEFORE_ADDED, Hyperparameters, renamed, upgrade, upgrade_stored
    from tuner.train.inference import TTA_VIEWS, average_probabilities
    from tuner.train.loop import FitResult, Interrupted, NonFiniteLossError, fit, predict, resolve_device
    from tuner.train.losses import logits_to_probs
    from tuner.train.metrics import binary_metrics, choose_threshold, classification_metrics, evaluation_report
    from tuner.train.models import Classifier, build_model, check_model_name
    from tuner.train.plots import per_class_csv, plot_confusion, plot_history, plot_roc_pr, save_figure
    from tuner.train.run import OutOfMemory, free_memory, train_model
    from tuner.train.snapshot import Snapshot
    from tuner.train.weights import package_file, resolve_pretrained
