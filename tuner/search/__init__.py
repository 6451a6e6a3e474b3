"""What a study needs: the space file and its suggestions, samplers and pruners, the objective, storage,
workers and their supervision, warm start and trial artifacts.

The names imported below are this folder's public face; each is imported from its module on first
use (see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

if TYPE_CHECKING:  # also read at run time by lazy_exports
    from tuner.search.budget import TrialBudget
    from tuner.search.keys import StudyKey, TrialKey
    from tuner.search.objective import Objective, run_settings
    from tuner.search.outage import DEFAULT_PATIENCE, DatabaseAway, outage_summary
    from tuner.search.pareto import front, pick
    from tuner.search.space import (
        DataSettings,
        SearchSpace,
        ThresholdSettings,
        iter_specs,
        load_space,
        parse_assignments,
        parse_space,
        suggest,
    )
    from tuner.search.storage import (
        STUDIES_DIR,
        copy_study,
        default_storage,
        load_existing_study,
        open_storage,
        python_call,
        redact,
        redacted_command,
    )
    from tuner.search.study import (
        best_trial,
        best_value,
        feasibility,
        feasible,
        first_value,
        maximizes,
        ranked_trials,
        study_objectives,
        trial_summary,
    )
    from tuner.search.supervisor import run_optimize
    from tuner.search.trial_data import TrialData, prepare, space_at_size
    from tuner.search.worker_server import start_worker_server
