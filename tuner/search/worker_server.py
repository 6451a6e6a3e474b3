"""Where worker processes come from: forked from a server process that imported torch and tuner once and
nothing else, so each starts in a fraction of a second instead of importing them again. The server never
touches CUDA, which cannot be forked once started. Where there is no fork server (Windows), spawn.

A light module (only :mod:`multiprocessing`): a run with several workers starts the server first thing,
so its imports run beside the caller's own instead of after them.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

PRELOAD = ["tuner.search.workers"]


def worker_context() -> Any:
    """The multiprocessing context workers are started with."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_worker_server() -> None:
    """Start the fork server now (it imports in the background); starting a worker later reuses it."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
