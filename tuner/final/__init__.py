"""After the search: refit on train+val, ensembles, evaluation on the locked test set, reports.

The names imported below are this folder's public face; each is imported from its module on first
use (see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

if TYPE_CHECKING:  # also read at run time by lazy_exports
    from tuner.final.bundle import export_bundle
    from tuner.final.ensemble import run_ensemble
    from tuner.final.evaluation import evaluate, write_image_predictions
    from tuner.final.explain import Explanation, error_gallery, explain_model
    from tuner.final.export import export_onnx
    from tuner.final.refit import run_refit
    from tuner.final.report import study_report, write_report
    from tuner.final.results import EnsembleReport, EnsembleRow, Estimate, EvaluationReport, RefitReport
