"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT arrives. When
that is a weakref callback or a ``__del__`` run by the garbage collector (SQLAlchemy and torch
register many), the exception is printed as "ignored" and training simply goes on. The handler here
also records the request, and :func:`raise_if_interrupted`, called at every epoch's end and between
trials, raises it again at a point where it cannot be swallowed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Handle Ctrl-C this way in this process (only the main thread may set a signal handler)."""
    global _requested
    _requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    if _requested:
        raise KeyboardInterrupt
