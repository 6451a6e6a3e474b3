"""Where studies live: storage URLs (SQLite by default, PostgreSQL for many workers), opening them
with heartbeats, pre-pinged connections and calls that wait out a database restart, redacting passwords
from anything shown, loading and copying studies."""

from __future__ import annotations

import contextlib
import functools
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import StorageError
from tuner.search.optuna_internals import STORAGE_CALLS, storage_of
from tuner.search.outage import DATABASE_GONE, DEFAULT_PATIENCE, patiently, quiet_optuna_fallback

log = logging.getLogger(__name__)

STUDIES_DIR = Path("studies")
T = TypeVar("T")


def default_storage(study_name: str) -> str:
    return f"sqlite:///{STUDIES_DIR / study_name}.db"


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for every message and log line."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return "<malformed storage URL>"


_python_call: ContextVar[str | None] = ContextVar("tuner_python_call", default=None)


@contextlib.contextmanager
def python_call(line: str) -> Iterator[None]:
    """While it runs, a Python API call (``tuner.refit('breast', seeds=3)``) is what :func:`redacted_command`
    records, unless this process is the ``tuner`` command itself (which calls the API too)."""
    token = _python_call.set(line)
    try:
        yield
    finally:
        _python_call.reset(token)


def redacted_command(argv: Sequence[str] | None = None) -> str:
    """The command running now (``tuner`` and ``argv``, by default this process's arguments; or the Python
    call, from a notebook or script) as one line, with the password of any URL in it hidden: it is stored in
    the study and shown in reports."""
    call = _python_call.get()
    started_as = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    command_line = started_as.name == "tuner" or started_as.parts[-2:] == ("tuner", "__main__.py")
    if argv is None and call is not None and not command_line:
        return redact(call) if "://" in call else call
    shown = []
    for arg in sys.argv[1:] if argv is None else argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("-") and "://" in value:
            shown.append(f"{flag}={redact(value)}")
        else:
            shown.append(redact(arg) if "://" in arg else arg)
    return shlex.join(["tuner", *shown])


class OnStaleTrial:
    """Heartbeat-stale trial: Optuna's retry (re-queue its params as a WAITING trial), then ``then``
    (tuner's bookkeeping: give its start back to the budget).

    In that order: once the start is back another worker may claim it at once, and it must find the
    re-queued trial waiting; the other way round it could create a new trial instead, leaving the
    re-queued one WAITING with no start left to run it, and the workers waiting for it for ever."""

    def __init__(self, then: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        self.then = then
        with warnings.catch_warnings():  # experimental in Optuna; it is what retries a dead worker's trial
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        if self.then is not None:
            self.then(study, trial)


class PatientStorage(RDBStorage):
    """Optuna's RDB storage whose calls wait out a database that went away for up to ``patience`` seconds
    (:mod:`tuner.search.outage`). A heartbeat that cannot be recorded in that time is skipped, not
    raised: the heartbeat thread keeps beating, and the trial goes on while it needs no database."""

    patience: float = DEFAULT_PATIENCE
    shown = "the study storage"  # its URL without a password, for messages

    def wait_out(self, call: Callable[[], T]) -> T:
        """``call()`` (SQL on this storage's engine), waiting out an outage as the storage's own calls do."""
        return patiently(call, patience=self.patience, backend=self.engine.dialect.name, where=self.shown)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.wait_out(lambda: RDBStorage.record_heartbeat(self, trial_id))
        except DATABASE_GONE as err:
            log.debug("heartbeat of trial id %d skipped: %s", trial_id, err)


def _wait_out(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.wait_out(lambda: method(self, *args, **kwargs))

    return call


for _name in STORAGE_CALLS:
    if _name != "record_heartbeat":  # its own override above: skipped, not raised, past the patience
        setattr(PatientStorage, _name, _wait_out(getattr(RDBStorage, _name)))


def parse_storage_url(url: str) -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise StorageError(
            "storage must be an SQLAlchemy URL such as sqlite:///studies/NAME.db or postgresql://user@host/db, "
            f"but got {redact(url)}"
        ) from None


def open_storage(
    url: str,
    *,
    heartbeat: int = 60,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    patience: float = DEFAULT_PATIENCE,
    wait_to_open: bool = False,
) -> PatientStorage:
    """Optuna's RDB storage with heartbeats (a killed worker's trial is failed and retried), pre-ping, and
    calls that wait up to ``patience`` seconds for a database that went away.

    A trial whose worker sent no heartbeat for ``3 * heartbeat`` seconds is failed and re-queued.
    ``wait_to_open``: opening waits for the database too (a worker whose parent just opened it); otherwise
    an unreachable database is an error at once (most likely a mistyped URL).
    """
    parsed = parse_storage_url(url)
    quiet_optuna_fallback()
    engine_url = url
    if parsed.drivername == "postgresql":
        # The driver tuner's postgres extra installs (psycopg 3); SQLAlchemy before 2.1 would pick psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
        engine_url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                # Heartbeats are marked experimental in Optuna; they are what recovers a killed worker's trial.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                create = lambda: PatientStorage(  # noqa: E731
                    engine_url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=OnStaleTrial(on_stale),
                )
                shown = redact(url)
                storage = (
                    patiently(create, patience=patience, backend=parsed.get_backend_name(), where=shown)
                    if wait_to_open
                    else create()
                )
            storage.patience, storage.shown = patience, shown
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
                _write_ahead_log(storage)
            return storage
        except sqlalchemy.exc.IntegrityError:
            # Two processes creating the schema at once: the loser finds the tables on a second try.
            time.sleep(0.5 * (attempt + 1))
        except ImportError:
            raise StorageError(f"cannot open the study storage {redact(url)}: {_missing_driver(parsed)}") from None
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as err:
            reason = str(err)
            if isinstance(err, sqlalchemy.exc.DBAPIError):  # the driver's first line, without the SQL
                reason = f"{type(err).__name__} ({str(err.orig).strip().splitlines()[0]})"
            elif isinstance(err, sqlalchemy.exc.SQLAlchemyError):
                reason = type(err).__name__
            raise StorageError(
                f"cannot open the study storage {redact(url)}: {reason.replace(engine_url, redact(engine_url)).replace(url, redact(url))}"
            ) from None
    raise StorageError(f"cannot open the study storage {redact(url)}: the schema could not be created")


def _missing_driver(url: sqlalchemy.engine.URL) -> str:
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql":
        return (
            f"its driver ({driver}) is not installed: pip install -e '.[postgres]' (or pip install 'psycopg[binary]')"
        )
    return f"the database driver {driver} for {backend} is not installed; install it with pip"


def _write_ahead_log(storage: RDBStorage) -> None:
    """SQLite in write-ahead-log mode: readers (the dashboard, the parent's progress, other workers)
    never block the writer, and a writer waits its turn (the connection's 60 s busy timeout) instead
    of failing. Writes are short (a trial's report, a heartbeat), so a handful of local worker
    processes share one file. The mode is stored in the file; setting it again is a no-op."""
    with storage.engine.connect() as con:
        con.exec_driver_sql("PRAGMA journal_mode=WAL")


def load_existing_study(study_name: str, storage: str | None) -> optuna.Study:
    url = storage or default_storage(study_name)
    if storage is None and not (STUDIES_DIR / f"{study_name}.db").exists():
        raise StorageError(
            f"no study {study_name!r}: {STUDIES_DIR / study_name}.db does not exist; run `tuner optimize` first or pass --storage"
        )
    rdb = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(rdb)]
    if study_name not in names:
        raise StorageError(f"no study {study_name!r} in {redact(url)}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=rdb)


def copy_study(study_name: str, storage: str | None, to_storage: str) -> optuna.Study:
    """Copy a study (its trials with their histories, its space, data description and test-set reads)
    to another storage, e.g. from the local SQLite file to PostgreSQL when more machines join."""
    source = load_existing_study(study_name, storage)
    target = open_storage(to_storage)
    if study_name in [s.study_name for s in optuna.get_all_study_summaries(target)]:
        raise StorageError(
            f"study {study_name!r} already exists in {redact(to_storage)}; delete it there or copy to another storage"
        )
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in source.get_trials(deepcopy=False)):
        raise StorageError(f"study {study_name!r} has trials running or waiting; copy it once its workers stopped")
    optuna.copy_study(from_study_name=study_name, from_storage=storage_of(source), to_storage=target)
    return optuna.load_study(study_name=study_name, storage=target)
