"""The replayed searches of ``benchmarks/search.py`` behave as tuner's own studies do.

docs/search.md draws its conclusions about samplers, pruners and defaults from these replays, so the
replay itself is checked: the table's lookup finds a recorded configuration from its own parameters,
early stopping ends a curve where tuner's loop would, and a replayed study runs Optuna's real sampler
and pruner over the committed table within its epoch budget.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

ROOT = Path(__file__).parents[1]
TABLE = ROOT / "benchmarks" / "curves" / "breast.json"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("benchmark_search", ROOT / "benchmarks" / "search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(search):
    return search.Table(TABLE)


def test_the_committed_table_has_whole_curves(table) -> None:
    assert len(table.curves) >= 100
    whole = [c for c in table.curves if len(c) == table.max_epochs]
    assert len(whole) >= 0.9 * len(table.curves)  # only diverged configurations stop early
    assert all(np.all((c >= 0) & (c <= 1)) for c in table.curves)


def test_a_configuration_is_found_from_its_own_parameters(table) -> None:
    for index in range(0, len(table.curves), 7):
        assert table.nearest(table.raw["configs"][index]["params"]) == index


def test_a_nearby_point_finds_the_configuration_with_the_same_choices(table) -> None:
    params = dict(table.raw["configs"][3]["params"])
    params["lr"] *= 1.0001
    found = table.raw["configs"][table.nearest(params)]["params"]
    assert {k: v for k, v in found.items() if isinstance(v, str)} == {
        k: v for k, v in params.items() if isinstance(v, str)
    }


def test_early_stopping_ends_the_curve_where_the_loop_would(table) -> None:
    patience = table.patience
    curve = np.array([0.5, 0.7, *([0.6] * patience), 0.9])
    value, run = table.outcome(curve)
    assert (value, run) == (0.7, 2 + patience)  # the 0.9 after the patience ran out is never seen
    value, run = table.outcome(np.array([0.5, 0.6, 0.7]))
    assert (value, run) == (0.7, 3)


@pytest.mark.parametrize("sampler,pruner", [("random", "none"), ("tpe", "median"), ("random", "hyperband")])
def test_a_replayed_search_spends_its_budget_and_reports_its_best(search, table, sampler, pruner) -> None:
    budget = 200
    trace = search.replay(table, sampler, pruner, seed=1, budget=budget)
    assert trace.epochs == sorted(trace.epochs) and trace.epochs[-1] >= budget
    assert trace.epochs[-2] < budget  # it stops once the budget is spent
    finite = [b for b in trace.best if not math.isnan(b)]
    assert finite == sorted(finite)  # the best so far never gets worse
    assert max(finite) <= max(float(np.max(c)) for c in table.curves)
    if pruner == "none":
        assert not trace.pruned_the_best
        # without pruning every trial runs until early stopping: epochs = the sum of their runs
        assert trace.trials * table.patience <= trace.epochs[-1] <= trace.trials * table.max_epochs


def test_the_summary_ranks_the_default_and_draws_the_plot(search, table, tmp_path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = 120
    traces = [
        search.replay(table, s, p, seed, budget)
        for s in ("random", "tpe")
        for p in ("none", "median")
        for seed in (0, 1)
    ]
    text = search.summarise(table, traces, budget, tmp_path)
    assert "| tpe (default) | median |" in text
    assert "| new configs |" in text
    assert "default tpe + median is" in text
    assert (tmp_path / "breast.png").stat().st_size > 10_000


def test_the_kept_replays_are_of_the_spaces_as_they_are_and_replay_the_same(search, table) -> None:
    space = search.space_for(table)
    budget = 2 * space.study.n_trials * table.max_epochs
    path = search.kept_path(TABLE, budget, space)
    # docs/search.md's tables are drawn from this file: a changed table or sampler/pruner setting
    # leaves it under an old key, and the docs describe a space that no longer exists
    assert path.exists(), f"replay again: python benchmarks/search.py {TABLE.relative_to(ROOT)}"
    replays = json.loads(path.read_text())
    for sampler, pruner in (("tpe", "median"), ("random", "hyperband")):  # Hyperband: brackets by study name
        kept = search.from_json(replays[search.replay_key(sampler, pruner, 0)])
        fresh = search.replay(table, sampler, pruner, seed=0, budget=budget)
        assert fresh.epochs == kept.epochs
        assert np.array_equal(fresh.best, kept.best, equal_nan=True)
        assert (fresh.trials, fresh.pruned_the_best, fresh.configs) == (kept.trials, kept.pruned_the_best, kept.configs)


def test_a_kept_replay_reads_back_as_it_was(search, table) -> None:
    trace = search.replay(table, "random", "median", seed=2, budget=150)
    back = search.from_json(json.loads(json.dumps(search.to_json(trace))))
    assert back.epochs == trace.epochs
    assert np.array_equal(back.best, trace.best, equal_nan=True)


def test_saving_the_kept_replays_replaces_an_older_tables_file_and_leaves_no_partial_one(search, tmp_path) -> None:
    older, other_budget = tmp_path / "breast-000000000000-800.json", tmp_path / "breast-000000000000-200.json"
    older.write_text("{}\n")
    other_budget.write_text("{}\n")
    cache = tmp_path / "breast-111111111111-800.json"
    search.save(cache, {"tpe|median|0": {"epochs": [1]}})
    search.save(cache, {"tpe|median|0": {"epochs": [1]}, "tpe|median|1": {"epochs": [2]}})  # a later save
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.name, other_budget.name])
    assert json.loads(cache.read_text()) == {"tpe|median|0": {"epochs": [1]}, "tpe|median|1": {"epochs": [2]}}
