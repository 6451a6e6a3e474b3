"""Ctrl-C that is never lost, and preemption (SIGTERM, SIGUSR1) that loses nothing.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT arrives. When
that is a weakref callback or a ``__del__`` run by the garbage collector (SQLAlchemy and torch
register many), the exception is printed as "ignored" and training simply goes on. The handler here
also records the request, and :func:`raise_if_interrupted`, called at every epoch's end and between
trials, raises it again at a point where it cannot be swallowed.

SIGTERM (``scancel``, a cluster's preemption, ``docker stop``, a pod eviction) and SIGUSR1 (which
Slurm's ``--signal`` sends ahead of a time limit) are different: the sender waits a grace period and
then kills. Inside :func:`preemptible` they only record the request; the training loop looks at
:func:`preempted` before every batch, saves the running trial's state and stops, and the process
ends with the conventional status (128 + the signal's number).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = False
_deferred = False
_preempted_by: int | None = None


class Preempted(KeyboardInterrupt):
    """This process was asked to stop (SIGTERM, SIGUSR1) and stopped at a safe point.

    A ``KeyboardInterrupt`` so that nothing that catches ``Exception`` (Optuna's ``catch``) mistakes it
    for a trial's fault. ``message`` says what was saved and how to go on."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    if not _deferred:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: Ctrl-C is recorded, and raised by :func:`raise_if_interrupted` or inside :func:`immediate`.

    Optuna creates a trial and only then enters the ``try`` that fails it on an exception; a Ctrl-C in
    between would leave the trial RUNNING for ever. Deferred around ``study.optimize``, immediate inside
    the objective, it lands where Optuna fails the trial, or between trials."""
    global _deferred
    before, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = before


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Within: Ctrl-C raises at once (a Ctrl-C recorded just before is raised on entry)."""
    global _deferred
    before, _deferred = _deferred, False
    try:
        raise_if_interrupted()
        yield
    finally:
        _deferred = before


def _on_preempt(signum: int, frame: FrameType | None) -> None:
    global _preempted_by
    _preempted_by = _preempted_by or signum


def install() -> None:
    """Handle Ctrl-C this way in this process (only the main thread may set a signal handler)."""
    global _requested
    _requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within: Ctrl-C handled as :func:`install` does; after, the process's own handler again (a notebook's
    kernel, a user's script calling the Python API)."""
    before = signal.getsignal(signal.SIGINT)
    install()
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def preemptible() -> Iterator[None]:
    """Within: SIGTERM and SIGUSR1 are recorded, to be acted on at the next batch (see :func:`preempted`).
    Outside, they keep their default (end the process at once): a command that never looks at the
    request must not ignore it."""
    global _preempted_by
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _preempted_by = None
    before = {signum: signal.signal(signum, _on_preempt) for signum in PREEMPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def preempted() -> int | None:
    """The signal that asked this process to stop, if one did (inside :func:`preemptible`)."""
    return _preempted_by


def raise_if_interrupted() -> None:
    if _requested:
        raise KeyboardInterrupt


def raise_if_preempted(message: str = "") -> None:
    if _preempted_by is not None:
        raise Preempted(_preempted_by, message)
