"""Search-space files: schema, YAML loading with precise errors, and ``suggest``.

A space file has four sections::

    study:  name, metric, direction, sampler, pruner, n_trials, timeout, threshold, cv_folds,
            artifacts, save_checkpoints, stop, constraints
    data:   source, image_size, channels, val/test fractions, split_seed, group and hard-example
            columns, csv, extra_train, label_aliases, positive_class, synthetic
    train:  max_epochs, patience, checkpoint_metric, device, amp, channels_last, seed,
            eval_batch_size, min_batch_size
    params: every hyperparameter either fixed (``lr: 0.001``) or searched:
            ``lr: {low: 1.0e-4, high: 1.0e-2, log: true}``
            ``optimizer: {choices: [adam, sgd]}``
            ``scheduler: {choices: {none: {}, step: {step_size: {low: 2, high: 8}}}}``

A categorical given as a mapping carries sub-parameters per choice; they are
suggested only when that choice is drawn. Whether a range is int or float comes
from the hyperparameter itself (``batch_size`` is an int, ``lr`` a float).
Everything is validated before the first trial starts; an error names the file,
the dotted key path and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuner.data import CsvColumns
from tuner.errors import SpaceError, TunerError
from tuner.metric_names import COST_METRICS, OBJECTIVE_METRICS, VALIDATION_METRICS, Direction, natural_direction
from tuner.search.samplers import PRUNERS, SAMPLERS
from tuner.train import check_model_name, resolve_pretrained
from tuner.train import hparams as hp


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplerSettings(_Frozen):
    name: Literal[tuple(SAMPLERS)] = "tpe"  # type: ignore[valid-type]
    seed: int = 0
    n_startup_trials: Annotated[int, Field(ge=0)] = 5


class MedianPrunerSettings(_Frozen):
    name: Literal["median"] = "median"
    n_startup_trials: Annotated[int, Field(ge=0)] = 3
    n_warmup_steps: Annotated[int, Field(ge=0)] = 2
    interval_steps: Annotated[int, Field(ge=1)] = 1


class PercentilePrunerSettings(_Frozen):
    name: Literal["percentile"]
    percentile: Annotated[float, Field(gt=0.0, lt=100.0)] = 25.0
    n_startup_trials: Annotated[int, Field(ge=0)] = 3
    n_warmup_steps: Annotated[int, Field(ge=0)] = 2
    interval_steps: Annotated[int, Field(ge=1)] = 1


class SuccessiveHalvingPrunerSettings(_Frozen):
    name: Literal["successive_halving"]
    min_resource: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    reduction_factor: Annotated[int, Field(ge=2)] = 3
    min_early_stopping_rate: Annotated[int, Field(ge=0)] = 0


class HyperbandPrunerSettings(_Frozen):
    name: Literal["hyperband"]
    min_resource: Annotated[int, Field(ge=1)] = 1
    max_resource: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    reduction_factor: Annotated[int, Field(ge=2)] = 3


class WilcoxonPrunerSettings(_Frozen):
    """For cross-validated objectives: prunes when the folds so far are significantly worse than the best trial's."""

    name: Literal["wilcoxon"]
    p_threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    n_startup_steps: Annotated[int, Field(ge=0)] = 2


class NoPrunerSettings(_Frozen):
    name: Literal["none"]


PrunerSettings = Annotated[
    Union[
        MedianPrunerSettings,
        PercentilePrunerSettings,
        SuccessiveHalvingPrunerSettings,
        HyperbandPrunerSettings,
        WilcoxonPrunerSettings,
        NoPrunerSettings,
    ],
    Field(discriminator="name"),
]


class ThresholdSettings(_Frozen):
    """How the binary decision threshold is chosen on validation, frozen for the test set."""

    rule: Literal["youden", "max_f1", "target_recall", "fixed"] = "youden"
    recall: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95  # for target_recall


class StopSettings(_Frozen):
    """End the study when its best value has not improved by ``min_delta`` in the last ``patience`` finished trials."""

    patience: Annotated[int, Field(ge=1)]
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0


class Bound(_Frozen):
    """A constraint on a validation metric of a trial: at least ``min`` and/or at most ``max``."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min, max or both, e.g. {min: 0.9}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min must not exceed max, but got min={self.min}, max={self.max}")
        return self

    def violation(self, value: float) -> float:
        """How far ``value`` is outside the bound (0 or less: inside), as Optuna's constraints want it."""
        return max(
            (self.min - value) if self.min is not None else -math.inf,
            (value - self.max) if self.max is not None else -math.inf,
        )


class StudySettings(_Frozen):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)] = "tuner"
    description: str | None = None  # what the model is for: the model card's intended use
    metric: Literal[VALIDATION_METRICS] = "val_auroc"  # type: ignore[valid-type]
    direction: Literal["maximize", "minimize", None] = None
    # Multi-objective, in place of metric: [val_auroc, latency_ms]. The first is a validation metric (its
    # curve is pruned on and picks each trial's best epoch); the others are costs of the network
    # (COST_METRICS) or further validation metrics at that epoch. Directions: each one's natural one.
    metrics: tuple[Literal[OBJECTIVE_METRICS], ...] | None = None  # type: ignore[valid-type]
    directions: tuple[Literal["maximize", "minimize"], ...] | None = None
    sampler: SamplerSettings = SamplerSettings()
    pruner: PrunerSettings = MedianPrunerSettings()
    n_trials: Annotated[int, Field(ge=1)] = 20
    timeout: Annotated[float, Field(gt=0)] | None = None
    threshold: ThresholdSettings = ThresholdSettings()
    cv_folds: Annotated[int, Field(ge=2, le=20)] | None = None  # k-fold cross-validated objective over train+val
    artifacts: bool = True  # plots and per-class metrics of each completed trial, for the dashboard
    save_checkpoints: bool = False  # also each completed trial's best weights, as an artifact
    stop: StopSettings | None = None  # end early once the best value stops improving (all workers)
    # e.g. {val_recall: {min: 0.9}}: only trials meeting every bound (at their operating point) count as best
    constraints: dict[Literal[VALIDATION_METRICS], Bound] = {}  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _first_of_metrics(cls, raw: Any) -> Any:
        """With ``metrics``, ``metric`` is their first (the curve pruned on and checkpointed on)."""
        if isinstance(raw, Mapping) and isinstance(raw.get("metrics"), (list, tuple)) and raw["metrics"]:
            first = raw["metrics"][0]
            if first in COST_METRICS:
                raise ValueError(
                    f"the first of metrics is the validation metric that trials are pruned and checkpointed on "
                    f"(e.g. val_auroc), but got {first!r}"
                )
            if raw.get("metric", first) != first:
                raise ValueError(
                    f"give metric or metrics, not both (metric={raw['metric']!r}, metrics={raw['metrics']!r})"
                )
            if raw.get("direction") is not None:
                raise ValueError("with metrics, give their directions as directions: [maximize, minimize, ...]")
            return {**raw, "metric": first}
        return raw

    @model_validator(mode="after")
    def _check_objectives(self) -> StudySettings:
        if self.metrics is None:
            if self.directions is not None:
                raise ValueError("directions go with metrics (a multi-objective study); one metric has direction")
            return self
        if len(self.metrics) < 2 or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics needs two or more different metrics, but got {list(self.metrics)}")
        if self.directions is not None and len(self.directions) != len(self.metrics):
            raise ValueError(
                f"directions needs one entry per metric ({len(self.metrics)}), but got {len(self.directions)}"
            )
        if self.pruner.name not in ("median", "percentile", "none"):
            raise ValueError(
                f"a multi-objective study prunes with median, percentile or none (against the trials at least as "
                f"cheap), but got pruner {self.pruner.name!r}"
            )
        if self.sampler.name == "cmaes":
            raise ValueError("sampler cmaes optimises one objective; use tpe, nsga2, gp or random with metrics")
        if self.cv_folds is not None:
            raise ValueError("cv_folds is not available with metrics yet; use a hold-out study")
        return self

    @property
    def resolved_direction(self) -> Direction:
        """The direction of ``metric`` (the first objective)."""
        return self.resolved_directions[0]

    @property
    def objectives(self) -> tuple[str, ...]:
        """What a trial returns: ``metrics``, or ``metric`` alone."""
        return self.metrics or (self.metric,)

    @property
    def resolved_directions(self) -> tuple[Direction, ...]:
        if self.directions is not None:
            return self.directions
        if self.metrics is None and self.direction is not None:
            return (self.direction,)
        return tuple(natural_direction(m) for m in self.objectives)

    @property
    def multi_objective(self) -> bool:
        return self.metrics is not None


class SyntheticSettings(_Frozen):
    n_images: Annotated[int, Field(ge=50, le=200_000)] = 2000
    minority_fraction: Annotated[float, Field(gt=0.0, le=0.5)] = 0.09
    seed: int = 0


class CsvSettings(_Frozen):
    """Column names of a CSV manifest, and the folder its paths are relative to (default: the CSV's)."""

    path_column: str = "path"
    label_column: str = "label"
    split_column: str = "split"
    image_dir: str = ""


class ExtraTrainSettings(_Frozen):
    """Images that may join the training split only (e.g. synthetic minority images); how many of
    them a trial uses is the hyperparameter ``extra_ratio``. With ``label``, every image under the
    folder ``source`` has that class; without, ``source`` is read like ``data.source``."""

    source: str
    label: str | None = None


class DataSettings(_Frozen):
    source: str = "synthetic"
    image_size: Annotated[int, Field(ge=8, le=1024)] = 64
    channels: Literal[1, 3, None] = None
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.9)] = 0.2
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.9)] = 0.2
    split_seed: int = 0
    group_column: str | None = None
    hard_example_column: str | None = None  # CSV column whose values `drop_hard` may leave out of training
    csv: CsvSettings = CsvSettings()
    extra_train: ExtraTrainSettings | None = None
    label_aliases: dict[str, str] = {}
    positive_class: str | None = None
    synthetic: SyntheticSettings = SyntheticSettings()

    def csv_columns(self) -> CsvColumns:
        c = self.csv
        return CsvColumns(
            path=c.path_column,
            label=c.label_column,
            split=c.split_column,
            group=self.group_column,
            tag=self.hard_example_column,
            image_dir=c.image_dir,
        )


class TrainSettings(_Frozen):
    max_epochs: Annotated[int, Field(ge=1, le=10_000)] = 20
    patience: Annotated[int, Field(ge=1)] | None = 5
    # Which validation metric picks a trial's best epoch (its checkpoint) and drives early stopping;
    # default: the study's metric. The trial's value is the study's metric at that epoch.
    checkpoint_metric: Literal[VALIDATION_METRICS] | None = None  # type: ignore[valid-type]
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")] = "auto"
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    eval_batch_size: Annotated[int, Field(ge=1)] = 512
    min_batch_size: Annotated[int, Field(ge=1)] = 8  # out of memory: retry at half the batch size down to this
    # For large sets: an epoch is this many training images (slices of a stream of shuffled passes) instead of a
    # pass, so the pruner judges (and the checkpoint, early stopping and the LR schedule count) in cheaper steps.
    epoch_images: Annotated[int, Field(ge=1)] | None = None


# ---------------------------------------------------------------- parameters


def _label(value: Any) -> bool | int | float | str:
    """Optuna categoricals hold scalars; a list or mapping value is stored as its JSON text."""
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Fixed:
    name: str
    value: Any

    def suggest(self, trial: Any, out: dict[str, Any]) -> None:
        out[self.name] = self.value

    def describe(self) -> str:
        return f"fixed {self.value!r}"


@dataclass(frozen=True)
class Range:
    name: str
    kind: str  # "int" or "float"
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def suggest(self, trial: Any, out: dict[str, Any]) -> None:
        if self.kind == "int":
            out[self.name] = trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        else:
            out[self.name] = trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class Option:
    value: Any
    params: tuple[Fixed | Range | Choice | PerClass, ...] = ()


@dataclass(frozen=True)
class Choice:
    name: str
    options: tuple[Option, ...]

    def suggest(self, trial: Any, out: dict[str, Any]) -> None:
        by_label = {_label(option.value): option for option in self.options}
        picked = by_label[trial.suggest_categorical(self.name, list(by_label))]
        out[self.name] = picked.value
        for spec in picked.params:
            spec.suggest(trial, out)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o.value) for o in self.options)


@dataclass(frozen=True)
class PerClass:
    """A value per class name (``class_weights: {benign: 0.5, malignant: {low: 0.5, high: 0.85}}``);
    each searched entry is its own Optuna parameter, ``class_weights.malignant``."""

    name: str
    entries: tuple[tuple[str, Fixed | Range | Choice | PerClass], ...]

    def suggest(self, trial: Any, out: dict[str, Any]) -> None:
        values: dict[str, Any] = {}
        for _, spec in self.entries:
            spec.suggest(trial, values)
        out[self.name] = {cls: values[spec.name] for cls, spec in self.entries}

    def describe(self) -> str:
        return "per class: " + "; ".join(f"{cls} {spec.describe()}" for cls, spec in self.entries)


ParamSpec = Union[Fixed, Range, Choice, PerClass]


def iter_specs(specs: tuple[ParamSpec, ...], condition: str = "") -> Iterator[tuple[ParamSpec, str]]:
    """Every spec with the condition under which it is suggested ('' = always)."""
    for spec in specs:
        yield spec, condition
        if isinstance(spec, Choice):
            for option in spec.options:
                yield from iter_specs(option.params, f"{spec.name}={option.value}")


class SearchSpace(_Frozen):
    """A validated space file. Build with :func:`load_space` or :func:`parse_space`."""

    study: StudySettings = StudySettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    params: dict[str, Any] = {}

    @functools.cached_property
    def specs(self) -> tuple[ParamSpec, ...]:  # parsed once: every trial's suggest walks them
        return _parse_params(self.params, "params", [])

    def fingerprint(self) -> str:
        """Hash of everything that defines the experiment (not of n_trials / timeout / device)."""
        content = self.model_dump(
            mode="json", exclude={"study": {"n_trials", "timeout", "name", "stop", "description"}}
        )
        for resource in ("device", "min_batch_size"):  # where it runs, not what it computes
            content["train"].pop(resource, None)
        for section, added in (("study", "metrics"), ("study", "directions"), ("train", "epoch_images")):
            if content[section].get(added) is None:  # unset, a space means what it meant before they existed
                content[section].pop(added, None)
        text = json.dumps(content, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def suggest(trial: Any, space: SearchSpace) -> hp.Hyperparameters:
    """Draw one trial's hyperparameters (works with ``optuna.Trial`` and ``FixedTrial``)."""
    values: dict[str, Any] = {}
    for spec in space.specs:
        spec.suggest(trial, values)
    return hp.Hyperparameters(**hp.upgrade(values))


# ---------------------------------------------------------------- parsing


def _closest(name: str, valid: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(name, valid, n=1)
    return f"did you mean '{match[0]}'? " if match else ""


# Problems of a spelling an older tuner read: refused in a space file, overlooked in a stored study's space.
OUTDATED = "outdated spelling: "


def _check_value(name: str, value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if isinstance(value, str) and (name, value) in hp.RETIRED_VALUES:
        problems.append((path, f"{OUTDATED}{name}: {value} is no longer read; write {hp.RETIRED_VALUES[name, value]}"))
        return value
    try:
        checked = hp.field_adapter(name).validate_python(value)
    except ValidationError as err:
        msg = err.errors()[0]["msg"]
        problems.append((path, f"{msg}, but got {name}={value!r}"))
        return None
    if name == "model":
        try:
            check_model_name(checked)
        except TunerError as err:
            problems.append((path, str(err)))
    return checked


def _parse_params(raw: Mapping[str, Any], path: str, problems: list[tuple[str, str]]) -> tuple[ParamSpec, ...]:
    specs = []
    for name, value in raw.items():
        key = f"{path}.{name}"
        if name in hp.RENAMED:
            new, meaning = hp.RENAMED[name]
            problems.append((key, f"{OUTDATED}{name!r} is now {new!r} ({meaning}); write {new}"))
            name = new
        if name not in hp.HPARAM_NAMES:
            problems.append(
                (
                    key,
                    f"unknown hyperparameter {name!r}; {_closest(name, hp.HPARAM_NAMES)}valid: {', '.join(hp.HPARAM_NAMES)}",
                )
            )
            continue
        spec = _parse_param(name, value, key, problems)
        if spec is not None:
            specs.append(spec)
    return tuple(specs)


def _parse_class_entry(name: str, raw: Any, path: str, problems: list[tuple[str, str]]) -> ParamSpec | None:
    """One class's value in a per-class mapping: a number, a range or a list of choices."""

    def check(value: Any, where: str) -> float | None:
        try:
            return hp.CLASS_VALUE.validate_python(value)
        except ValidationError as err:
            problems.append((where, f"{err.errors()[0]['msg']}, but got {name}={value!r}"))
            return None

    if not isinstance(raw, Mapping):
        value = check(raw, path)
        return None if value is None else Fixed(name, value)
    if set(raw) == {"choices"} and isinstance(raw["choices"], list) and raw["choices"]:
        values = [check(v, f"{path}.choices") for v in raw["choices"]]
        return None if None in values else Choice(name, tuple(Option(v) for v in dict.fromkeys(values)))
    if {"low", "high"} <= set(raw) <= {"low", "high", "log", "step"}:
        return _range(name, "float", raw, path, problems, check)
    problems.append((path, f"must be a number, {{low, high[, log]}} or {{choices: [...]}}, but got {dict(raw)!r}"))
    return None


def _parse_per_class(name: str, raw: Mapping[str, Any], path: str, problems: list[tuple[str, str]]) -> PerClass | None:
    entries = []
    for cls, value in raw.items():
        spec = _parse_class_entry(f"{name}.{cls}", value, f"{path}.{cls}", problems)
        if spec is not None:
            entries.append((str(cls), spec))
    return PerClass(name, tuple(entries)) if len(entries) == len(raw) else None


def _parse_param(name: str, raw: Any, path: str, problems: list[tuple[str, str]]) -> ParamSpec | None:
    if not isinstance(raw, Mapping):
        value = _check_value(name, raw, path, problems)
        return None if value is None else Fixed(name, value)
    keys = set(raw)
    if hp.field_kind(name) == "per_class" and keys != {"choices"}:
        return _parse_per_class(name, raw, path, problems)
    if "choices" in keys:
        if keys != {"choices"}:
            problems.append((path, f"a categorical takes only 'choices', but got keys {sorted(keys)}"))
            return None
        return _parse_choice(name, raw["choices"], f"{path}.choices", problems)
    allowed = {"low", "high", "log", "step"}
    if not keys <= allowed or not {"low", "high"} <= keys:
        problems.append(
            (
                path,
                f"must be a fixed value, {{low, high[, log][, step]}} or {{choices: ...}}, but got keys {sorted(keys)}",
            )
        )
        return None
    kind = hp.field_kind(name)
    if kind not in ("int", "float"):
        problems.append((path, f"{name!r} is a {kind}, so it takes a fixed value or choices, not a range"))
        return None
    return _range(name, kind, raw, path, problems, lambda value, where: _check_value(name, value, where, problems))


def _range(
    name: str,
    kind: str,
    raw: Mapping[str, Any],
    path: str,
    problems: list[tuple[str, str]],
    check: Callable[[Any, str], Any],
) -> Range | None:
    """``{low, high[, log][, step]}`` with each bound validated by ``check(value, where)``."""
    low, high = check(raw["low"], f"{path}.low"), check(raw["high"], f"{path}.high")
    log, step = raw.get("log", False), raw.get("step")
    if low is None or high is None:
        return None
    if not isinstance(log, bool):
        problems.append((f"{path}.log", f"must be true or false, but got log={log!r}"))
    elif low >= high:
        problems.append((path, f"low must be below high, but got low={raw['low']!r}, high={raw['high']!r}"))
    elif log and low <= 0:
        problems.append((f"{path}.low", f"a log range must have low > 0, but got low={raw['low']!r}"))
    elif step is not None and (log or not isinstance(step, (int, float)) or step <= 0):
        problems.append(
            (f"{path}.step", f"step must be a positive number and cannot be combined with log, but got step={step!r}")
        )
    else:
        return Range(name, kind, low, high, log=log, step=step)
    return None


def _parse_choice(name: str, raw: Any, path: str, problems: list[tuple[str, str]]) -> Choice | None:
    if isinstance(raw, list):
        entries: list[tuple[Any, Any]] = [(value, None) for value in raw]
    elif isinstance(raw, Mapping):
        entries = list(raw.items())
    else:
        problems.append((path, f"must be a list or a mapping of choice -> sub-parameters, but got {raw!r}"))
        return None
    if not entries:
        problems.append((path, "must list at least one choice"))
        return None
    options = []
    for value, sub in entries:
        checked = _check_value(name, value, f"{path}.{value}", problems)
        if checked is None:
            continue
        if sub is not None and not isinstance(sub, Mapping):
            problems.append((f"{path}.{value}", f"sub-parameters must be a mapping, but got {sub!r}"))
            continue
        options.append(Option(checked, _parse_params(sub or {}, f"{path}.{value}", problems)))
    labels = [_label(o.value) for o in options]
    if len(set(labels)) != len(labels):
        problems.append((path, f"choices must be distinct, but got {labels}"))
    return Choice(name, tuple(options))


def _check_names(specs: tuple[ParamSpec, ...], problems: list[tuple[str, str]]) -> None:
    """A name may appear in several branches of one choice, never twice on one path."""

    def walk(specs: tuple[ParamSpec, ...], above: set[str]) -> None:
        here = {s.name for s in specs}
        for spec in specs:
            if spec.name in above:
                problems.append((f"params.{spec.name}", "is set both at an outer level and under a choice"))
            if isinstance(spec, Choice):
                for option in spec.options:
                    walk(option.params, above | here)

    walk(specs, set())
    kinds: dict[str, tuple[type, Any]] = {}
    for spec, _ in iter_specs(specs):
        signature = (type(spec), spec.log if isinstance(spec, Range) else None)
        if isinstance(spec, Fixed):
            continue
        if kinds.setdefault(spec.name, signature) != signature:
            problems.append(
                (f"params.{spec.name}", "is searched with different kinds of distribution in different branches")
            )


def _values(specs: tuple[ParamSpec, ...], name: str, default: Any) -> list[Any]:
    found = []
    for spec, _ in iter_specs(specs):
        if spec.name == name:
            found += (
                [spec.value]
                if isinstance(spec, Fixed)
                else [o.value for o in spec.options]
                if isinstance(spec, Choice)
                else []
            )
    return found or [default]


def class_names_used(specs: tuple[ParamSpec, ...]) -> dict[str, set[str]]:
    """Per hyperparameter, the class names a space refers to (checked against the data before any trial)."""
    used: dict[str, set[str]] = {}
    for spec, _ in iter_specs(specs):
        if isinstance(spec, PerClass):
            used.setdefault(spec.name, set()).update(cls for cls, _ in spec.entries)
        values = [spec.value] if isinstance(spec, Fixed) else [o.value for o in getattr(spec, "options", ())]
        for value in values:
            if isinstance(value, Mapping):
                used.setdefault(spec.name, set()).update(value)
    return used


def _check_pretrained(specs: tuple[ParamSpec, ...], problems: list[tuple[str, str]]) -> None:
    """Pretrained weights must be on this machine before the first trial, not discovered in trial 7."""
    seen = set()
    for model in _values(specs, "model", hp.Hyperparameters().model):
        for pretrained in _values(specs, "pretrained", False):
            if pretrained is False or (model, pretrained) in seen:
                continue
            seen.add((model, pretrained))
            try:
                resolve_pretrained(model, pretrained)
            except TunerError as err:
                problems.append(("params.pretrained", str(err)))


def _format_pydantic(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) >= 2 and loc[-2] == "pruner" and loc[-1] in PRUNERS:
            loc = loc[:-1]
        elif "pruner" in loc and len(loc) > loc.index("pruner") + 1 and loc[loc.index("pruner") + 1] in PRUNERS:
            del loc[loc.index("pruner") + 1]
        path = ".".join(loc)
        if e["type"] == "extra_forbidden":
            problems.append((path, "unknown key"))
        elif e["type"] == "missing":
            problems.append((path, "is required"))
        elif e["type"] == "value_error":  # a validator's own sentence says what was given
            problems.append((path, e["msg"].removeprefix("Value error, ")))
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = (e.get("ctx") or {}).get("tag")
            problems.append((f"{path}.name", f"must be one of {', '.join(PRUNERS)}, but got name={tag!r}"))
        else:
            problems.append((path, f"{e['msg']}, but got {loc[-1] if loc else 'value'}={e['input']!r}"))
    return problems


def _with_valid_keys(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Add the valid keys to 'unknown key' messages, with a close-match hint."""
    sections: dict[str, type[BaseModel]] = {
        "": SearchSpace,
        "study": StudySettings,
        "data": DataSettings,
        "train": TrainSettings,
        "study.sampler": SamplerSettings,
        "study.threshold": ThresholdSettings,
        "data.synthetic": SyntheticSettings,
        "data.csv": CsvSettings,
        "data.extra_train": ExtraTrainSettings,
    }
    out = []
    for path, msg in problems:
        parent, _, key = path.rpartition(".")
        model = sections.get(parent)
        if msg == "unknown key" and model is not None:
            valid = tuple(model.model_fields)
            msg = f"unknown key {key!r}; {_closest(key, valid)}valid: {', '.join(valid)}"
        out.append((path, msg))
    return out


def _set_key(raw: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` in ``raw``; ``None`` removes the key, so its default applies."""
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpaceError(source, [(part, "must be a mapping")])
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def parse_assignments(assignments: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """``["params.lr=0.001", "data.extra_train={source: syn, label: malignant}"]`` -> dotted key -> YAML value."""
    out = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise SpaceError(source, [("", f"expected key=value such as params.lr=0.001, but got {text!r}")])
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SpaceError(source, [(key.strip(), f"the value is not valid YAML: {value!r} ({err})")]) from None
    return out


def parse_space(
    raw: Any,
    source: str = "<space>",
    overrides: Mapping[str, Any] | None = None,
    assignments: Mapping[str, Any] | None = None,
    *,
    require_source: bool = False,
    stored: bool = False,
) -> SearchSpace:
    """Validate a space given as a dict. ``overrides`` maps dotted keys to values (CLI flags; ``None`` =
    not given); ``assignments`` too, but there ``None`` (``--set key=null``) removes the key.
    ``require_source``: ``data.source`` must be given (a user's file), not left to its default.
    ``stored``: a study's own space, which may use spellings of the tuner that created it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpaceError(
            source, [("", f"must be a mapping with keys study, data, train, params, but got {type(raw).__name__}")]
        )
    raw = json.loads(json.dumps(raw, default=str))  # a private, plain copy
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_key(raw, dotted, value, source)
    for dotted, value in (assignments or {}).items():
        _set_key(raw, dotted, value, source)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise SpaceError(source, _with_valid_keys(_format_pydantic(err))) from None
    problems: list[tuple[str, str]] = []
    specs = _parse_params(space.params, "params", problems)
    if stored:
        problems = [(key, problem) for key, problem in problems if not problem.startswith(OUTDATED)]
    if not problems:
        _check_names(specs, problems)
    if not problems:
        _check_pretrained(specs, problems)
    if problems:
        raise SpaceError(source, problems)
    data = raw.get("data")  # checked last: a typo elsewhere is the more useful message
    if require_source and (not isinstance(data, Mapping) or data.get("source") in (None, "")):
        # No silent default: a forgotten --data must not start a study on the built-in synthetic images.
        raise SpaceError(
            source,
            [
                (
                    "data.source",
                    "missing: name the data (an image folder, a CSV manifest, an .npz file, or synthetic for the "
                    "built-in images) in the file or with --data",
                )
            ],
        )
    return space


def load_space(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    assignments: Mapping[str, Any] | None = None,
    *,
    require_source: bool = True,
) -> SearchSpace:
    """Read and validate a YAML space file; ``require_source``: it (or an override) must name the data."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpaceError(str(path), [("", f"cannot read the space file: {err.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpaceError(str(path), [(where, f"invalid YAML: {problem}")]) from None
    if raw is None:
        raise SpaceError(
            str(path), [("", "is empty; a space file needs at least data.source (see search_spaces/quickstart.yaml)")]
        )
    return parse_space(raw, str(path), overrides, assignments, require_source=require_source)
