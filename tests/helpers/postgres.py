"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, started with
``initdb`` and ``pg_ctl`` under a temporary directory on a free loopback port.

As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as root), so
the directory is handed to that user. Without the binaries the tests that need the server
skip with a reason, unless ``SPENDGATE_REQUIRE_SHARED`` is set (CI installs the package):
then they fail. The server is started once per pytest session (``conftest.postgres``);
each test gets a database of its own (``conftest.pg_url``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REQUIRED = bool(os.environ.get("SPENDGATE_REQUIRE_SHARED"))
"""Set by .ci/run where PostgreSQL and Redis installed: a missing server fails the tests."""


def bindir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian puts them outside PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _version(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def missing() -> str | None:
    """Why the tests cannot have a server, or None."""
    where = bindir()
    if where is None or not (where / "pg_ctl").exists():
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser, so PostgreSQL cannot run as its own user"
    return None


def need_server() -> None:
    """Skip (or fail, in CI) a test that needs a server when there is none."""
    why = missing()
    if why is None:
        return
    if REQUIRED:
        pytest.fail(f"SPENDGATE_REQUIRE_SHARED is set, but {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One throw-away cluster: ``start``/``stop`` (a test may stop it to play an outage
    and start it again), ``url(db)`` to reach a database, ``close`` to remove it all."""

    def __init__(self) -> None:
        where = bindir()
        assert where is not None
        self.bin = where
        self.root = Path(tempfile.mkdtemp(prefix="spendgate-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale", "C")  # fmt: skip
        self.start()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=self.root)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL (one per test: no state crosses tests)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                  "-c", f"CREATE DATABASE {name} TEMPLATE template0")  # fmt: skip
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """One query's result as text (rows one a line, columns by |)."""
        done = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                         "-d", database, "-At", "-c", sql)  # fmt: skip
        return done.stdout.strip()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
