"""The ``tuner`` command line: parses the arguments, calls the library, prints the results.

User mistakes (``TunerError``) are printed as one line per problem on stderr
with exit code 2; results go to stdout. Tracebacks never show local variables,
since a storage URL may hold a password.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from tuner import __version__, interrupts
from tuner.errors import SpaceError, TunerError
from tuner.metric_names import REPORT_ORDER, TABLE_METRICS
from tuner.progress import bars, fmt
from tuner.search import StudyKey, TrialKey

app = typer.Typer(
    name="tuner",
    help="Hyperparameter search for image classification on small, imbalanced data sets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
space_app = typer.Typer(help="Search-space files.", no_args_is_help=True)
data_app = typer.Typer(help="Data sources.", no_args_is_help=True)
app.add_typer(space_app, name="space")
app.add_typer(data_app, name="data")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

StudyOpt = Annotated[str, typer.Option("--study", "-s", help="Study name.")]


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    monai_bundle = "monai-bundle"


StorageOpt = Annotated[
    Optional[str],
    typer.Option("--storage", help="SQLAlchemy URL; default sqlite:///studies/<study>.db.", show_default=False),
]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and results.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:1, mps.")]
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Decoded-image cache.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite earlier output in the output folder.")]
AllowReuseOpt = Annotated[
    bool, typer.Option("--allow-test-reuse", help="Evaluate on a test set that already judged another trial.")
]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% CIs.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="Override any key of the space file with a YAML value: --set params.lr=0.001, "
        "--set 'data.extra_train={source: synth/, label: malignant}', --set data.extra_train=null (repeatable).",
    ),
]


def _setup_logging(verbose: int, quiet: bool) -> None:
    import optuna

    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, show_time=False, rich_tracebacks=False)
    else:  # a log file, a Slurm job, a pipe: one unwrapped line per record, whole paths to grep for
        handler = logging.StreamHandler(err.file)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    package = logging.getLogger("tuner")
    package.handlers[:] = [handler]
    package.setLevel(level)
    package.propagate = False
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def user_errors(fn: F) -> F:
    """The one exception boundary: a user mistake is one line per problem and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpaceError as e:
            for path, msg in e.problems:
                err.print(
                    f"[red]error:[/] {e.source}: {path + ': ' if path else ''}{msg}",
                    highlight=False,
                    markup=True,
                    soft_wrap=True,
                )
            raise typer.Exit(code=2) from None
        except TunerError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    interrupts.install()
    if version:
        out.print(f"tuner {__version__}")
        raise typer.Exit()


@app.command()
@user_errors
def optimize(
    space_file: Annotated[Path, typer.Option("--space", help="Search-space YAML file.", dir_okay=False)],
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="Image folder, CSV manifest, .npz or 'synthetic' (overrides data.source)."),
    ] = None,
    study: Annotated[Optional[str], typer.Option("--study", "-s", help="Study name (overrides study.name).")] = None,
    storage: StorageOpt = None,
    n_trials: Annotated[
        Optional[int], typer.Option("--n-trials", "-n", help="Trials to add (overrides study.n_trials).")
    ] = None,
    timeout: Annotated[
        Optional[float], typer.Option("--timeout", help="Stop starting trials after this many seconds.")
    ] = None,
    device: DeviceOpt = None,
    max_epochs: Annotated[Optional[int], typer.Option("--max-epochs", help="Overrides train.max_epochs.")] = None,
    cache_dir: CacheDirOpt = Path("studies/cache"),
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            "-w",
            help="Worker processes on this machine (default 1, or one per GPU slot).",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        Optional[str],
        typer.Option("--gpus", help="Comma-separated GPU ids, e.g. 0,1,2,3; each worker sees only its GPU."),
    ] = None,
    workers_per_gpu: Annotated[
        int,
        typer.Option("--workers-per-gpu", help="Workers sharing each GPU of --gpus (small images leave GPUs idle)."),
    ] = 1,
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            help="Threads per worker; default OMP_NUM_THREADS, else the cores divided among the workers.",
            show_default=False,
        ),
    ] = None,
    join: Annotated[
        bool, typer.Option("--join", help="Add no trials: help finish the study's remaining ones (another machine).")
    ] = False,
    plan: Annotated[
        bool,
        typer.Option("--plan", help="Create the study and add its trials, run none: --join workers run them (Slurm)."),
    ] = False,
    artifacts: Annotated[
        Optional[Path],
        typer.Option(
            "--artifacts", help="Artifact folder; default beside the SQLite file or studies/<study>.artifacts."
        ),
    ] = None,
    heartbeat: Annotated[
        int,
        typer.Option("--heartbeat", help="Seconds between worker heartbeats; a trial silent for 3x this is retried."),
    ] = 60,
    storage_patience: Annotated[
        float,
        typer.Option(
            "--storage-patience",
            envvar="TUNER_STORAGE_PATIENCE",
            help="Seconds to wait for a study database that went away (a restart, a failover) before stopping.",
        ),
    ] = 120,
    warm_start: Annotated[
        Optional[str], typer.Option("--warm-start", help="An earlier study whose best configurations run first.")
    ] = None,
    warm_start_storage: Annotated[
        Optional[str], typer.Option("--warm-start-storage", help="Its storage, if not the default or --storage.")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="With --warm-start: how many of its best trials.")] = 3,
    assignments: SetOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Run (or resume) a study: every trial trains a model from the space and reports validation metrics.

    Each run adds --n-trials trials to the study, shared by its --workers; `--join` on another
    machine helps finish them. The total is exact: failed trials are replaced.
    """
    from tuner.api import optimize as run
    from tuner.search import TrialBudget, outage_summary, redact

    _setup_logging(verbose, quiet)
    try:
        result = run(
            space_file,
            data=data,
            study=study,
            storage=storage,
            n_trials=n_trials,
            timeout=timeout,
            device=device,
            max_epochs=max_epochs,
            set=assignments or [],
            cache_dir=cache_dir,
            workers=workers,
            gpus=_parse_gpus(gpus),
            workers_per_gpu=workers_per_gpu,
            threads=threads,
            join=join,
            plan=plan,
            artifacts=artifacts,
            heartbeat=heartbeat,
            storage_patience=storage_patience,
            warm_start=warm_start,
            warm_start_storage=warm_start_storage,
            warm_start_top_k=top_k,
            progress=not quiet,
        )
    except interrupts.Preempted as stop:
        again = "the same command" if join else "the same command with --join"
        err.print(
            f"stopped by {stop.signal_name}: {stop.message}; to go on, run {again}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        _exit_interrupted(stop.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted: the running trial was marked FAILED; run the same command again to resume")
        _exit_interrupted()
    name = result.study_name
    storage_url = storage or _default_storage(name)
    if (line := outage_summary()) is not None:
        err.print(line, highlight=False, soft_wrap=True, markup=False)
    if plan:
        left = TrialBudget(result).left()
        out.print(f"planned study {name}: {left} trials for workers started with --join", highlight=False)
        return
    if result.user_attrs.get(StudyKey.STOPPED):
        out.print(f"stopped early: {result.user_attrs[StudyKey.STOPPED]}", highlight=False)
    _print_best(result, result.user_attrs[StudyKey.SPACE]["study"]["metric"])
    shown = redact(storage_url)
    dashboard_cmd = f"tuner dashboard --study {name}" + ("" if storage is None else f" --storage '{shown}'")
    out.print(
        f"\nOpen the dashboard:  optuna-dashboard '{shown}'\n               or:  {dashboard_cmd}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


def _exit_interrupted(code: int = 130) -> NoReturn:
    """Exit with ``code`` now (130: Ctrl-C), even if the stop landed where a library had just started a
    worker thread (Optuna's heartbeat) that nothing will stop: such a thread would keep the process alive."""
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in lingering:
        thread.join(timeout=2)
    if any(t.is_alive() for t in lingering):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code=code)


def _parse_gpus(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TunerError(f"--gpus must be comma-separated GPU ids such as 0,1,2, but got {text!r}") from None


def _default_storage(study: str) -> str:
    from tuner.search import default_storage

    return default_storage(study)


def _print_best(study: Any, metric: str) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {
        s.name: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    out.print(
        f"study {study.study_name}: {len(trials)} trials ({', '.join(f'{v} {k.lower()}' for k, v in counts.items())})"
    )
    if not counts["COMPLETE"]:
        out.print("no trial completed yet")
        return
    from tuner.search import best_trial, feasible

    try:
        best = best_trial(study)
    except TunerError as err:  # no trial within study.constraints: said, and the study itself went fine
        out.print(str(err), highlight=False)
        return
    if len(study.directions) > 1:
        _print_front(study)
        return
    out.print(
        f"best trial {best.number}: {metric}={fmt(best.value)} at epoch {best.user_attrs.get(TrialKey.BEST_EPOCH)}"
    )
    if best.user_attrs.get(TrialKey.CONSTRAINT_VALUES):
        met = ", ".join(f"{k}={fmt(v)}" for k, v in best.user_attrs[TrialKey.CONSTRAINT_VALUES].items())
        n_feasible = sum(feasible(t) for t in trials if t.state == TrialState.COMPLETE)
        out.print(f"  within study.constraints ({met}); {n_feasible} of {counts['COMPLETE']} completed trials are")
    for key, value in best.params.items():
        out.print(f"  {key} = {fmt(value)}")


def _print_front(study: Any) -> None:
    """A multi-objective study's Pareto front, best first objective first, and how to refit from it."""
    from tuner.search import front, study_objectives

    names = study_objectives(study)
    trials = front(study)
    directions = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions, strict=True))
    out.print(f"Pareto front: {len(trials)} trial(s) on {directions}", highlight=False)
    for t in trials:
        values = ", ".join(f"{n}={fmt(v)}" for n, v in zip(names, t.values, strict=True))
        out.print(f"  trial {t.number:>3}: {values}", highlight=False)
    out.print(
        f"refit one with: tuner refit --study {study.study_name} --pick '{names[1]}<=...' (or --trial N)",
        highlight=False,
    )


@app.command()
@user_errors
def trials(
    study: StudyOpt,
    storage: StorageOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many, best first.")] = 50,
) -> None:
    """A table of the study's trials: state, value, best epoch, searched params, duration."""
    from tuner.search import load_existing_study, maximizes, study_objectives, trial_summary

    s = load_existing_study(study, storage)
    rows = [trial_summary(t) for t in s.get_trials(deepcopy=False)]
    sign = -1 if maximizes(s) else 1
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0), r["number"]))
    objectives = study_objectives(s)
    on_front = set()
    if len(objectives) > 1:  # a multi-objective study: every objective, and which trials are on the front
        from tuner.search import front

        on_front = {t.number for t in front(s)}
    names = sorted({k for r in rows for k in r["params"]})
    table = Table(title=f"{study}: {len(rows)} trials")
    for r in rows:
        if r["feasible"] is False:  # study.constraints: never the best, whatever its value
            r["reason"] = r["reason"] or "outside study.constraints"
        if r["number"] in on_front:
            r["reason"] = "Pareto front"
    for col in ("#", "state", *objectives, "best epoch", *names, "s", "note"):
        table.add_column(col, justify="right" if col not in ("state", "note") else "left")
    for r in rows[:limit]:
        table.add_row(
            str(r["number"]),
            r["state"],
            *(fmt(v) for v in (r["values"] or [None] * len(objectives))),
            fmt(r["best_epoch"]),
            *(fmt(r["params"].get(n)) for n in names),
            fmt(r["duration_s"]),
            r["reason"] or "",
        )
    # Piped output has no terminal width; a wide table beats one truncated to 80 columns.
    wide = out if out.is_terminal else Console(width=max(160, table_width(names)))
    wide.print(table)


def table_width(names: list[str]) -> int:
    return 60 + 12 * len(names)


@app.command()
@user_errors
def best(
    study: StudyOpt,
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The best trial (within study.constraints): value, params, best epoch."""
    from tuner.search import best_trial, load_existing_study, trial_summary

    s = load_existing_study(study, storage)
    trial = best_trial(s)
    summary = trial_summary(trial)
    summary["metric"] = s.user_attrs.get(StudyKey.SPACE, {}).get("study", {}).get("metric")
    summary["hparams"] = trial.user_attrs.get(TrialKey.HPARAMS)
    summary["study"] = study
    if len(s.directions) > 1:
        from tuner.search import front, study_objectives

        summary["objectives"] = study_objectives(s)
        summary["front"] = [trial_summary(t) for t in front(s)]
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    _print_best(s, summary["metric"] or "value")


@app.command()
@user_errors
def copy(
    study: StudyOpt,
    to: Annotated[str, typer.Option("--to", help="The storage to copy to, e.g. postgresql://user@host/db.")],
    storage: StorageOpt = None,
) -> None:
    """Copy a study to another storage (e.g. the local SQLite file to PostgreSQL), trials and history included."""
    import optuna

    from tuner.search import copy_study, redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" line says less than ours
    copied = copy_study(study, storage, to)
    out.print(
        f"copied study {study} ({len(copied.trials)} trials) to {redact(to)}; continue it with "
        f"--storage '{redact(to)}' (artifacts stay in {copied.user_attrs.get(StudyKey.ARTIFACT_DIR)})",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def dashboard(
    study: StudyOpt,
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study's storage, with its artifact store (plots, CSVs, checkpoints)."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    from tuner.search import load_existing_study, redact

    s = load_existing_study(study, storage)
    folder = s.user_attrs.get(StudyKey.ARTIFACT_DIR)
    store = FileSystemArtifactStore(folder) if folder and Path(folder).is_dir() else None
    err.print(f"optuna-dashboard for {redact(storage or _default_storage(study))} at http://{host}:{port}/dashboard/")
    err.print(f"artifacts from {folder}" if store else "no artifact store for this study", highlight=False)
    err.print("Ctrl-C to stop")
    optuna_dashboard.run_server(s._storage, host=host, port=port, artifact_store=store)


@app.command()
@user_errors
def refit(
    study: StudyOpt,
    storage: StorageOpt = None,
    best_trial: Annotated[bool, typer.Option("--best", help="Refit the best trial (the default).")] = False,
    trial: Annotated[Optional[int], typer.Option("--trial", help="Refit this trial number instead.")] = None,
    pick: Annotated[
        Optional[str],
        typer.Option(
            "--pick",
            help="Multi-objective study: refit the Pareto front's trial with the best first objective among "
            "those meeting these conditions, e.g. 'latency_ms<=20' or 'latency_ms<=20,val_recall>=0.9'.",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", help="Repeat with this many seeds: mean, sd and a bootstrap 95% CI.")
    ] = 1,
    folds: Annotated[
        Optional[int],
        typer.Option(
            "--folds",
            help="Per seed, train K networks on K folds of train+val (each leaves one out) and average them; "
            "the threshold comes from their out-of-fold predictions.",
        ),
    ] = None,
    tta: Annotated[
        str, typer.Option("--tta", help="Test-time augmentation: none, flip (left-right) or flips (both axes).")
    ] = "none",
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder; default studies/<study>/refit.")
    ] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data source, if it moved since optimize.")] = None,
    device: DeviceOpt = None,
    cache_dir: CacheDirOpt = Path("studies/cache"),
    force: ForceOpt = False,
    allow_test_reuse: AllowReuseOpt = False,
    bootstrap: BootstrapOpt = 1000,
    top_k: Annotated[
        Optional[int],
        typer.Option(
            "--top-k", help="Re-score the K best trials with --seeds seeds on validation; refit the best mean."
        ),
    ] = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Retrain a trial on train+validation and evaluate it once on the locked test split."""
    from tuner.api import refit as run

    _setup_logging(verbose, quiet)
    if sum((best_trial, trial is not None, pick is not None)) > 1:
        raise TunerError("give one of --best, --trial N and --pick, not two")
    model = run(
        study,
        storage=storage,
        trial=trial,
        pick=pick,
        seeds=seeds,
        folds=folds,
        tta=tta,
        top_k=top_k,
        out_dir=out_dir,
        data=data,
        device=device,
        cache_dir=cache_dir,
        allow_test_reuse=allow_test_reuse,
        force=force,
        bootstrap=bootstrap,
        progress=not quiet,
    )
    report = model.report
    assert report is not None
    if report.rescoring:
        out.print("re-scored on validation (mean ± sd over seeds):", highlight=False)
        for row in report.rescoring:
            mark = "  <- chosen" if row["trial"] == report.trial else ""
            out.print(
                f"  trial {row['trial']:>3}: {fmt(row['value'])} in the study, {row['mean']:.4f} ± {row['sd']:.4f}{mark}",
                highlight=False,
            )
    _print_test_summary(
        f"trial {report.trial} refit on train+val for {report.epochs} epochs, seeds {report.seeds}",
        positive_class=report.positive_class,
        threshold=report.threshold,
        threshold_rule=report.threshold_rule,
        n_test=report.n_test,
        summary=report.summary,
        seeds=len(report.seeds),
        networks=report.networks,
        final=report.final_summary,
        single=report.single_network,
        how=f"{report.folds} folds × {len(report.seeds)} seeds" if report.folds else f"{len(report.seeds)} seed(s)",
        tta=report.tta,
    )
    out.print(f"model, predictions, plots and report in {model.path.parent}/", highlight=False)


@app.command()
@user_errors
def ensemble(
    studies: Annotated[
        list[str], typer.Option("--study", "-s", help="A study whose top trials join the ensemble (repeatable).")
    ],
    storage: StorageOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Members per study: its K best completed trials.")] = 3,
    per_model: Annotated[
        bool, typer.Option("--per-model", help="Only each architecture's best trial counts towards --top-k.")
    ] = False,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder; default studies/<first study>/ensemble.")
    ] = None,
    device: DeviceOpt = None,
    cache_dir: CacheDirOpt = Path("studies/cache"),
    force: ForceOpt = False,
    allow_test_reuse: AllowReuseOpt = False,
    bootstrap: BootstrapOpt = 1000,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Average the probabilities of the top trials of one or more studies; report the ensemble next to its members.

    Each member is replayed on the training split (its validation probabilities set the ensemble's
    threshold), refit on train+validation like `tuner refit`, and evaluated once on the test split.
    """
    from tuner.final import run_ensemble
    from tuner.search import load_existing_study

    _setup_logging(verbose, quiet)
    loaded = [load_existing_study(name, storage) for name in dict.fromkeys(studies)]
    progress = bars(quiet)
    with progress:
        task = progress.add_task("members", total=None)
        report = run_ensemble(
            loaded,
            top_k=top_k,
            per_model=per_model,
            out_dir=out_dir,
            cache_dir=cache_dir,
            device=device,
            allow_test_reuse=allow_test_reuse,
            force=force,
            bootstrap=bootstrap,
            on_member=lambda done, total: progress.update(task, completed=done, total=total),
        )
    table = Table(title="test split (members at their own thresholds, the ensemble at one chosen on validation)")
    names = [m for m in TABLE_METRICS if m in report.summary]
    for column in ("model", "val", *names):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in [*report.members, report.ensemble]:
        label = row.name if row.model is None else f"{row.name} ({row.model})"
        val = "" if row.validation_value is None else f"{row.validation_value:.4f}"
        table.add_row(label, val, *[f"{row.summary[n].mean:.4f}" for n in names])
    out.print(table)
    folder = out_dir or Path("studies") / loaded[0].study_name / "ensemble"
    out.print(f"member models, predictions, plots and report in {folder}/", highlight=False)


def _print_test_summary(
    headline: str,
    *,
    positive_class: str | None,
    threshold: float | None,
    threshold_rule: str,
    n_test: int,
    summary: dict[str, Any],
    seeds: int = 1,
    networks: int = 1,
    final: dict[str, Any] | None = None,
    single: dict[str, Any] | None = None,
    how: str = "",
    tta: str = "none",
) -> None:
    """The test table: per seed (mean ± sd over seeds) and the final model, or one model's values, with
    bootstrap CIs; one network alone beside them when the final model averages several."""
    out.print(headline, highlight=False)
    if positive_class:
        out.print(f"positive class {positive_class}, threshold {fmt(threshold)} ({threshold_rule})")
    if seeds == 1:  # one seed's networks are the final model: a per-seed column would repeat it
        final = None
    if networks == 1:  # and one network is the whole model
        single = None
    table = Table(title=f"test set, n={n_test}")
    if seeds == 1:  # one model has a value, not a spread
        columns = ["metric", f"final ({networks} networks)" if networks > 1 else "value", "95% CI"]
    elif final is None:
        columns = ["metric", "mean", "sd", "95% CI"]
    else:
        columns = ["metric", f"per seed ({seeds})", "95% CI", f"final ({networks} networks)", "95% CI "]
    if single is not None:
        columns.append("one network")
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")
    if summary.get("focus_recall"):
        out.print(f"focus class {positive_class}: its recall and precision come first")
    for name in REPORT_ORDER:
        m = summary.get(name)
        if not m:
            continue
        if seeds == 1:
            row = [name, f"{m.mean:.4f}", _ci(m)]
        elif final is None:
            row = [name, f"{m.mean:.4f}", f"{m.sd:.4f}", _ci(m)]
        else:
            row = [name, f"{m.mean:.4f} ± {m.sd:.4f}", _ci(m), f"{final[name].mean:.4f}", _ci(final[name])]
        if single is not None:
            spread = f" ± {single[name].sd:.4f}" if seeds > 1 else ""
            row.append(f"{single[name].mean:.4f}{spread}")
        table.add_row(*row)
    out.print(table)
    if networks > 1:
        shown_tta = f", TTA {tta}" if tta != "none" else ""
        out.print(f"final model = the {networks} networks averaged ({how}{shown_tta})", highlight=False)


def _ci(m: Any) -> str:
    return "" if m.ci_low is None else f"[{m.ci_low:.3f}, {m.ci_high:.3f}]"


@app.command()
@user_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="A model.pt written by refit.", dir_okay=False)],
    data: Annotated[
        str, typer.Option("--data", help="Image folder, CSV manifest or .npz: its test split, else all of it.")
    ],
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder; default <model folder>/evaluate.")
    ] = None,
    cache_dir: CacheDirOpt = Path("studies/cache"),
    force: ForceOpt = False,
    bootstrap: BootstrapOpt = 1000,
) -> None:
    """Evaluate a saved model on a data set, with its frozen threshold."""
    from tuner.api import load_model

    report = load_model(model).evaluate(data, out_dir=out_dir, cache_dir=cache_dir, force=force, bootstrap=bootstrap)
    _print_test_summary(
        f"{model} on {report.data} ({report.split})",
        positive_class=report.positive_class,
        threshold=report.threshold,
        threshold_rule="chosen on validation",
        n_test=report.n_test,
        summary=report.summary,
    )


@app.command()
@user_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.", exists=False)],
    model: Annotated[Path, typer.Option("--model", help="A model.pt written by refit.", dir_okay=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="CSV file; default stdout.")] = None,
) -> None:
    """Class probabilities and the thresholded label for each image, as CSV."""
    from tuner.api import load_model
    from tuner.final import write_image_predictions

    final = load_model(model)
    probs = final.predict_proba(images)
    labels = final.decide(probs)
    fh = output.open("w", newline="") if output else sys.stdout
    write_image_predictions(fh, images, probs.tolist(), labels, final.classes)
    if output:
        fh.close()


@app.command()
@user_errors
def export(
    model: Annotated[Path, typer.Option("--model", help="A model.pt written by refit.", dir_okay=False)],
    to: Annotated[Path, typer.Option("--to", help="The ONNX file (.onnx) or the new bundle folder to write.")],
    format: Annotated[  # noqa: A002 - the option's name
        ExportFormat, typer.Option("--format", help="onnx: one graph; monai-bundle: a MONAI bundle folder.")
    ] = ExportFormat.onnx,
) -> None:
    """One ONNX graph: uint8 images in, class probabilities out (normalisation, every network, TTA inside);
    or a MONAI bundle of it (configs, state dict, ONNX, the model card as docs/README.md)."""
    from tuner.api import load_model

    final = load_model(model)
    written = final.export(to, format=format.value)
    size = f"{final.saved.channels}×{final.image_size}×{final.image_size}"
    if format is ExportFormat.monai_bundle:
        what = f"a MONAI bundle: float pixels [0, 255] N×{size} in"
        where = "configs/metadata.json"
    else:
        what, where = f"uint8 images N×{size} in", "its metadata"
    out.print(
        f"{written}: {what}, probabilities of {', '.join(final.classes)} out; threshold {fmt(final.threshold)} "
        f"in {where}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files.", exists=False)],
    model: Annotated[Path, typer.Option("--model", help="A model.pt written by refit.", dir_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the overlays, explanations.csv and maps.npz.")],
    target: Annotated[
        Optional[str], typer.Option("--class", help="Explain this class; default each image's predicted class.")
    ] = None,
    layer: Annotated[
        Optional[str],
        typer.Option(help="The layer to explain at; default a CNN's last feature map, a ViT's last block."),
    ] = None,
) -> None:
    """Grad-CAM maps of where the model finds evidence, over each image (averaged over its networks and TTA)."""
    from tuner.api import load_model

    final = load_model(model)
    explanation = final.explain(images, target=target, layer=layer)
    names = [p.stem for p in images]
    if len(set(names)) < len(names):  # the same file name in two folders
        names = [f"{i:04d}_{name}" for i, name in enumerate(names)]
    written = explanation.save(out_dir, names)
    out.print(
        f"{len(written)} Grad-CAM overlays in {out_dir} (layer {explanation.layer}; "
        f"{len(final.saved.models)} network(s) × TTA {final.saved.tta} averaged)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@user_errors
def report(
    study: StudyOpt,
    storage: StorageOpt = None,
    top: Annotated[int, typer.Option(help="How many top trials to list.")] = 10,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder; default studies/<study>/report.")
    ] = None,
) -> None:
    """The study view: top trials, parameter importances, optimization history (written as files too)."""
    from tuner.final import study_report
    from tuner.search import load_existing_study

    s = load_existing_study(study, storage)
    folder = out_dir or Path("studies") / study / "report"
    summary = study_report(s, folder, top=top)
    table = Table(title=f"{study}: top {len(summary['top_trials'])} of {summary['n_trials']} trials")
    for col in ("#", summary["metric"], "best epoch", "threshold", "params"):
        table.add_column(col)
    for t in summary["top_trials"]:
        params = ", ".join(f"{k}={fmt(v)}" for k, v in t["params"].items())
        table.add_row(str(t["number"]), fmt(t["value"]), fmt(t["best_epoch"]), fmt(t["threshold"]), params)
    out.print(table)
    if summary["importances"]:
        out.print(
            "parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items())
        )
    if "front" in summary:
        _print_front(s)
    out.print(f"report, plots and JSON in {folder}/", highlight=False)


@space_app.command("check")
@user_errors
def space_check(
    file: Annotated[Path, typer.Argument(help="Search-space YAML file.", dir_okay=False)],
    assignments: SetOpt = None,
) -> None:
    """Validate a space file and print the resolved space."""
    from tuner.search import iter_specs, load_space, parse_assignments

    # A space file may leave the data to --data at optimize time.
    search_space = load_space(file, None, parse_assignments(assignments or []), require_source=False)
    s = search_space.study
    out.print(f"[bold]{file}[/] is valid (fingerprint {search_space.fingerprint()})")
    out.print(
        f"study {s.name}: "
        + ", ".join(f"{d} {m}" for m, d in zip(s.objectives, s.resolved_directions, strict=True))
        + f", sampler {s.sampler.name} (seed {s.sampler.seed}), "
        f"pruner {s.pruner.name}, {s.n_trials} trials" + (f", timeout {s.timeout} s" if s.timeout else ""),
        highlight=False,
    )
    d, t = search_space.data, search_space.train
    out.print(
        f"data {d.source} at {d.image_size}px, val {d.val_fraction}, test {d.test_fraction}, split seed {d.split_seed}",
        highlight=False,
    )
    out.print(
        f"train up to {t.max_epochs} epochs, patience {t.patience}, device {t.device}, amp {t.amp}, seed {t.seed}",
        highlight=False,
    )
    table = Table(title="params")
    for col in ("name", "distribution", "when"):
        table.add_column(col)
    for param, condition in iter_specs(search_space.specs):
        table.add_row(param.name, param.describe(), condition or "always")
    out.print(table)


@data_app.command("inspect")
@user_errors
def data_inspect(
    space: Annotated[
        Optional[Path], typer.Option("--space", help="Space file whose data section to use.", dir_okay=False)
    ] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data source (overrides data.source).")] = None,
    cache_dir: CacheDirOpt = Path("studies/cache"),
    assignments: SetOpt = None,
) -> None:
    """Decode (once, into the cache) and show classes and split sizes; the test split is not read."""
    import numpy as np

    from tuner.search import load_space, parse_assignments, parse_space, prepare

    sets = parse_assignments(assignments or [])
    overrides = {"data.source": data}
    search_space = (
        load_space(space, overrides, sets) if space else parse_space({}, "--data", overrides, sets, require_source=True)
    )
    ds = prepare(search_space, cache_dir=cache_dir)
    out.print(
        f"{ds.description}: {ds.channels} channel(s), {ds.image_size}px, classes {', '.join(ds.class_names)}",
        highlight=False,
    )
    table = Table()
    table.add_column("split")
    for name in ds.class_names:
        table.add_column(name, justify="right")
    for split_name, split in (("train", ds.train), ("val", ds.val)):
        table.add_row(split_name, *map(str, split.class_counts(ds.num_classes)))
    if ds.extra is not None:
        table.add_row("extra (train only)", *map(str, ds.extra.class_counts(ds.num_classes)))
    out.print(table)
    if ds.train.tags is not None:
        values, counts = np.unique(ds.train.tags.astype(str), return_counts=True)
        column = search_space.data.hard_example_column
        out.print(
            f"{column} in train: " + ", ".join(f"{v}: {n}" for v, n in zip(values, counts, strict=True)),
            highlight=False,
        )
    if ds.positive_index is not None:
        out.print(f"positive class: {ds.class_names[ds.positive_index]}")
