"""The samplers and pruners a space file can name: one registry each, name -> builder.

The schema's allowed names (``study.sampler.name``, ``study.pruner.name``) and the error
messages come from these keys. Optuna is imported when a study is built, not when a space
file is only checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def _tpe(seed: int, n_startup_trials: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)


def _random(seed: int, n_startup_trials: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _gp(seed: int, n_startup_trials: int) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)


def _cmaes(seed: int, n_startup_trials: int) -> Any:
    import optuna

    from tuner.errors import TunerError

    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise TunerError("sampler 'cmaes' needs the cmaes package: pip install cmaes") from None
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)


SAMPLERS: dict[str, Callable[[int, int], Any]] = {"tpe": _tpe, "random": _random, "gp": _gp, "cmaes": _cmaes}


def _hyperband(max_epochs: int, **kwargs: Any) -> Any:
    import optuna

    if kwargs["max_resource"] == "auto":
        kwargs["max_resource"] = max_epochs
    return optuna.pruners.HyperbandPruner(**kwargs)


def _wilcoxon(max_epochs: int, **kwargs: Any) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner(**kwargs)


def _optuna_pruner(class_name: str) -> Callable[..., Any]:
    def build(max_epochs: int, **kwargs: Any) -> Any:
        import optuna

        return getattr(optuna.pruners, class_name)(**kwargs)

    return build


# Each takes the run's max_epochs and the pruner's own settings from the space file.
PRUNERS: dict[str, Callable[..., Any]] = {
    "median": _optuna_pruner("MedianPruner"),
    "percentile": _optuna_pruner("PercentilePruner"),
    "successive_halving": _optuna_pruner("SuccessiveHalvingPruner"),
    "hyperband": _hyperband,
    "wilcoxon": _wilcoxon,
    "none": _optuna_pruner("NopPruner"),
}


def build_sampler(settings: Any) -> Any:
    """The sampler a space's ``study.sampler`` names, with its seed and start-up trials."""
    return SAMPLERS[settings.name](settings.seed, settings.n_startup_trials)


def build_pruner(settings: Any, max_epochs: int) -> Any:
    """The pruner a space's ``study.pruner`` names, with its options."""
    return PRUNERS[settings.name](max_epochs, **settings.model_dump(exclude={"name"}))
