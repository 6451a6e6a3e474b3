"""What each worker process may use: its share of the CPU cores, and on a GPU machine its one GPU.

Every torch process starts as many threads as the machine has cores. Two
workers on two cores, or one beside another job, then spin against each other
and a study slows down several times over. Each worker therefore takes
``cores // workers`` threads (at least one) unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from tuner.errors import TunerError

log = logging.getLogger(__name__)

GPU_ENV = "CUDA_VISIBLE_DEVICES"


def available_cores() -> int:
    """The cores this process may run on (a Slurm or taskset allocation, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """``threads`` if given, else an explicit ``OMP_NUM_THREADS``, else this worker's share of the cores."""
    if threads is not None:
        if threads < 1:
            raise TunerError(f"threads must be at least 1, but got threads={threads}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise TunerError(f"OMP_NUM_THREADS must be a whole number, but got OMP_NUM_THREADS={env!r}") from None
    return max(1, available_cores() // max(1, workers))


def use_threads(n: int) -> None:
    """Limit this process to ``n`` threads: torch's intra- and inter-op pools and any BLAS/OpenMP pool
    (NumPy, scikit-learn's nearest neighbours for SMOTE)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before the first parallel operation; the intra-op limit is what matters
        pass
    threadpool_limits(n)
    log.debug("using %d thread(s)", n)


def gpu_slots(gpus: list[int], workers_per_gpu: int) -> list[int]:
    """The GPU of each worker: ``workers_per_gpu`` workers on each listed GPU."""
    if workers_per_gpu < 1:
        raise TunerError(f"--workers-per-gpu must be at least 1, but got {workers_per_gpu}")
    if not gpus:
        if workers_per_gpu > 1:
            raise TunerError("--workers-per-gpu needs --gpus, the GPUs to share (e.g. --gpus 0,1)")
        return []
    return [gpu for gpu in gpus for _ in range(workers_per_gpu)]


def see_only_gpu(gpu: int) -> None:
    """Make ``gpu`` this process's only visible GPU (``cuda:0`` from here on). Call before CUDA starts."""
    os.environ[GPU_ENV] = str(gpu)


def worker_name(pid: int | None = None) -> str:
    """How a trial records the process that runs it: ``host:pid``."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def process_space() -> str:
    """Where a pid names one process: this boot of this machine and its pid namespace. Two containers
    may share a host name (``--network host``) while each has its own pids."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc (macOS, Windows): the host name alone
        return socket.gethostname()


def process_gone(worker: str, space: str | None) -> bool:
    """Whether the process ``worker`` (``host:pid``, recorded in ``space``) has certainly ended. False when
    it cannot be known from here (another machine or container): its heartbeats will tell."""
    pid = worker.rpartition(":")[2]
    if space != process_space() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False
