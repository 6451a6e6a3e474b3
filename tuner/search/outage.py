"""The study database away for a while (a restart for maintenance, a failover): calls wait for it.

A storage call that fails because the connection to the database server is gone is tried again, with
pauses growing to a few seconds, for up to ``patience`` seconds. Past that it raises :class:`DatabaseAway`
(one line naming the database) and later calls in the process fail at their first error, until one
succeeds, so a worker that gave up stops in one step instead of one window per call. How long the database
was away is kept per process for the command's closing line.

What is retried is a lost connection only: a refused connection or a server shutting down on PostgreSQL
(or any server database), and a connection SQLAlchemy found invalidated. SQLite's own errors (a locked
file waits in its busy timeout; a full disk must fail at once) are never retried.

A database that refuses writes (its disk is full, its file or folder is read-only) is
:class:`DatabaseUnwritable` at once, one line naming it. The database itself is never left corrupt by that:
SQLite and PostgreSQL roll the refused transaction back whole.

The default patience stays below the heartbeat grace period (three heartbeats) less one heartbeat, so an
outage that is ridden out never makes a live trial look stale to another worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa

from tuner import interrupts
from tuner.errors import StorageError

log = logging.getLogger(__name__)

DEFAULT_PATIENCE = 120.0
_FIRST_PAUSE, _LONGEST_PAUSE = 0.25, 5.0

T = TypeVar("T")


class DatabaseAway(StorageError):
    """The study database stayed unreachable for longer than the patience."""


class DatabaseUnwritable(StorageError):
    """The study database refused a write: its disk is full, or its file or folder is read-only."""


DATABASE_GONE = (DatabaseAway, DatabaseUnwritable)  # the storage cannot be used by this process any more


class StorageLost(BaseException):
    """A storage call inside a trial failed for good (one of :data:`DATABASE_GONE`). Raised past Optuna's
    handling of a failed objective, which would record the failure in that same storage, log a traceback
    and trip over the trial it could not update. The trial stays RUNNING; its heartbeat stops, so the next
    run finds it stale and retries it."""

    def __init__(self, error: StorageError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Outages:
    """This process's outages: how many calls waited, and for how long in all and at most."""

    count: int = 0
    total: float = 0.0
    longest: float = 0.0
    gave_up: bool = False

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.longest = max(self.longest, seconds)


outages = Outages()
_lock = threading.Lock()
_inside = threading.local()  # a patient call inside another (Optuna's retry inside ours) waits once


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from or while handling (Optuna wraps errors in its own, and a
    query that failed with the connection leaves its session asking for a rollback)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def storage_gone(err: BaseException) -> StorageError | None:
    """The :data:`DATABASE_GONE` error behind ``err``, if any (Optuna, failing to record a trial's end,
    raises an ``AssertionError`` from it)."""
    return next((seen for seen in _chain(err) if isinstance(seen, DATABASE_GONE)), None)


def refused_write(err: BaseException) -> str | None:
    """Why the database refused to write (its disk is full, it is read-only), if that is what ``err``
    (raised by a storage call) means, in the database's own words."""
    for seen in _chain(err):
        if not isinstance(seen, sa.exc.DBAPIError):
            continue
        orig = seen.orig
        code = getattr(orig, "sqlite_errorname", None) or ""  # SQLite: SQLITE_FULL, SQLITE_READONLY_…
        state = getattr(orig, "sqlstate", None) or ""  # PostgreSQL: 53100 disk full, 25006 read-only
        if code.startswith(("SQLITE_FULL", "SQLITE_READONLY")) or state in ("53100", "25006"):
            return str(orig).strip().splitlines()[0]
    return None


def connection_lost(err: BaseException, backend: str) -> bool:
    """Whether ``err`` (raised by a storage call on a ``backend`` database) means the server went away."""
    if refused_write(err) is not None:  # an OperationalError on PostgreSQL too, but no outage to wait out
        return False
    return any(
        isinstance(seen, sa.exc.DBAPIError)
        and (
            seen.connection_invalidated
            or (backend != "sqlite" and isinstance(seen, (sa.exc.OperationalError, sa.exc.InterfaceError)))
        )
        for seen in _chain(err)
    )


class _QuietFallback(logging.Filter):
    """Optuna's RDB storage answers a failed trial query by warning and trying a slower query (meant for
    SQLite's limit on query variables). On a lost connection that second query fails too and is waited out
    here; its warning, with the whole SQL statement, would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Caught an error from sqlalchemy") and "connection" in text)


def quiet_optuna_fallback() -> None:
    logger = logging.getLogger("optuna.storages._rdb.storage")
    if not any(isinstance(f, _QuietFallback) for f in logger.filters):
        logger.addFilter(_QuietFallback())


def patiently(call: Callable[[], T], *, patience: float, backend: str, where: str) -> T:
    """``call()``, tried again while the database at ``where`` (a redacted URL) is unreachable, for up to
    ``patience`` seconds. Preempted (SIGTERM), the process has no time to wait: the error is raised at once."""
    if getattr(_inside, "active", False):
        return call()
    _inside.active = True
    try:
        began: float | None = None
        pause = _FIRST_PAUSE
        while True:
            try:
                result = call()
            except Exception as err:
                refused = refused_write(err)
                if refused is not None:
                    raise DatabaseUnwritable(
                        f"the study database {where} refused a write ({refused}): what was stored before is "
                        "intact; free space or make it writable, then add --join to the same command to finish "
                        "the study's trials"
                    ) from None
                if not connection_lost(err, backend):
                    raise
                now = time.monotonic()
                if began is None:
                    began = now
                    log.debug("the study database %s is unreachable; retrying for up to %.0f s", where, patience)
                waited = now - began
                if outages.gave_up or waited >= patience or interrupts.preempted() is not None:
                    with _lock:
                        outages.gave_up = True
                    raise DatabaseAway(
                        f"the study database {where} was unreachable for {waited:.0f} s "
                        f"(--storage-patience {patience:.0f}); stopped. Finished trials are stored; a trial that "
                        "was running is retried by the next run with --join"
                    ) from None
                time.sleep(min(pause, max(0.0, began + patience - now)))
                pause = min(2 * pause, _LONGEST_PAUSE)
                continue
            if began is not None:
                with _lock:
                    outages.add(time.monotonic() - began)
                log.debug("the study database %s is back after %.1f s", where, time.monotonic() - began)
            if outages.gave_up:
                with _lock:
                    outages.gave_up = False
            return result
    finally:
        _inside.active = False


def outage_summary() -> str | None:
    """One line on this process's outages, or None if there was none."""
    if not outages.count:
        return None
    line = f"the study database was unreachable for {outages.longest:.0f} s"
    if outages.count > 1:
        line += f" ({outages.count} waits, {outages.total:.0f} s in all)"
    return line + "; every storage call waited for it and the study went on"
