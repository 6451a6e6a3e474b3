"""The samplers and pruners a space file can name: one registry each, name -> a small record.

The schema's allowed names (``study.sampler.name``, ``study.pruner.name``) and the error
messages come from these keys. Optuna is imported when a study is built, not when a space
file is only checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


def _nsga2(seed: int, n_startup_trials: int) -> Any:
    import optuna

    # Each generation is as large as the start-up: the first is drawn at random, as other samplers' start-up is.
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, n_startup_trials))


def _cmaes(seed: int, n_startup_trials: int) -> Any:
    import optuna

    from tuner.errors import TunerError

    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise TunerError(
            "sampler 'cmaes' needs the cmaes package: pip install -e '.[cmaes]' (or pip install cmaes)"
        ) from None
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup_trials)


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: what builds it (from a seed and a number of start-up trials), and whether it
    steers by ``study.constraints`` (Optuna's constraint mechanism) or samples without regard to them."""

    build: Callable[[int, int], Any]
    uses_constraints: bool


SAMPLERS: dict[str, SamplerInfo] = {
    "tpe": SamplerInfo(_tpe, uses_constraints=True),
    "random": SamplerInfo(_random, uses_constraints=False),
    "gp": SamplerInfo(_gp, uses_constraints=True),
    "cmaes": SamplerInfo(_cmaes, uses_constraints=False),
    "nsga2": SamplerInfo(_nsga2, uses_constraints=True),
}


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


@dataclass(frozen=True)
class PrunerInfo:
    """A registered pruner: what builds it, from the run's max_epochs and its own settings in the space file."""

    build: Callable[..., Any]


PRUNERS: dict[str, PrunerInfo] = {
    "median": PrunerInfo(_optuna_pruner("MedianPruner")),
    "percentile": PrunerInfo(_optuna_pruner("PercentilePruner")),
    "successive_halving": PrunerInfo(_optuna_pruner("SuccessiveHalvingPruner")),
    "hyperband": PrunerInfo(_hyperband),
    "wilcoxon": PrunerInfo(_wilcoxon),
    "none": PrunerInfo(_optuna_pruner("NopPruner")),
}


def build_sampler(settings: Any) -> Any:
    """The sampler a space's ``study.sampler`` names, with its seed and start-up trials."""
    return SAMPLERS[settings.name].build(settings.seed, settings.n_startup_trials)


def build_pruner(settings: Any, max_epochs: int) -> Any:
    """The pruner a space's ``study.pruner`` names, with its options."""
    return PRUNERS[settings.name].build(max_epochs, **settings.model_dump(exclude={"name"}))
