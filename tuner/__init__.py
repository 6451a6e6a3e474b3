"""tuner: hyperparameter search for image classification on small, imbalanced data sets.

From Python, the same functions the ``tuner`` commands call (see :mod:`tuner.api`)::

    import tuner
    study = tuner.optimize("search_spaces/quickstart.yaml", n_trials=10)
    model = tuner.refit(study)
    model.predict_proba(["lesion.png"])

Each name is imported on first use, so ``import tuner`` stays light (see ``tuner._exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner._exports import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)

if TYPE_CHECKING:  # also read at run time by lazy_exports; "as" marks each as exported to type checkers
    from tuner.api import FinalModel as FinalModel
    from tuner.api import load_model as load_model
    from tuner.api import load_space as load_space
    from tuner.api import optimize as optimize
    from tuner.api import refit as refit
    from tuner.errors import DataError as DataError
    from tuner.errors import SpaceError as SpaceError
    from tuner.errors import StorageError as StorageError
    from tuner.errors import TunerError as TunerError
    from tuner.final.explain import Explanation as Explanation
