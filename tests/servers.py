"""Servers the tests (and the coordination benchmark) start on loopback, stopped afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Debian's PostgreSQL server binaries (the newest version), else whatever ``initdb`` is on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


_RUNNING: dict[str, tuple[list[str], str]] = {}  # URL -> how to run pg_ctl for it, and its options


@contextmanager
def postgres_down(url: str) -> Iterator[None]:
    """The server at ``url`` stopped as ``pg_ctl restart -m fast`` stops it (open connections are cut), and
    started again afterwards."""
    pg_ctl, options = _RUNNING[url]
    subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*pg_ctl, "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)


def pause_postgres(url: str, seconds: float) -> None:
    with postgres_down(url):
        time.sleep(seconds)


@contextmanager
def postgres_server(max_connections: int = 100) -> Iterator[str]:
    """A throw-away PostgreSQL server on loopback with an empty database ``tuner``; yields its URL."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    # Not under pytest's tmp folders: those are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
    data = root / "data"
    # initdb and postgres refuse to run as root: run them as the postgres user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
        root.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tuner", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections={max_connections}"
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log")]
    run(*pg_ctl[len(as_user) :], "-o", options, "-w", "-t", "60", "start")
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(f"postgresql://tuner@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as con:
            con.execute(sa.text("CREATE DATABASE tuner"))
        engine.dispose()
        url = f"postgresql://tuner@127.0.0.1:{port}/tuner"
        _RUNNING[url] = (pg_ctl, options)
        yield url
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
