"""cli.py into a closed pipe (``spendgate sessions | head -1``): the command stops quietly,
no BrokenPipeError traceback (docs/reference.md §11). Real processes, a real pipe."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spendgate.records import SessionRecord
from spendgate.store import SQLiteStore
from tests.helpers.records import message

SESSIONS = 1500
"""Enough rows that every output below is several times a pipe's 64 KiB buffer, so the
command is still writing when its reader goes away."""


async def fill(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    now = time.time()
    store.save_session(SessionRecord("big", now))
    for i in range(SESSIONS):
        sid = f"session-{i:05d}-with-a-longish-name"
        store.save_session(SessionRecord(sid, now))
        store.add_message(message(id=f"msg_{i}", session_id=sid, started_at=now))
        store.add_message(message(id=f"msg_b{i}", session_id="big", started_at=now))
    await store.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipes") / "spendgate.db"
    asyncio.run(fill(path))
    return path


def first_line_then_close(*argv: str) -> tuple[bytes, int, str]:
    """Run spendgate with stdout into a pipe; read its first line, close the pipe."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendgate", *argv],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        line = reader.readline()
    _, err = proc.communicate(timeout=60)
    return line, proc.returncode, err.decode()


@pytest.mark.parametrize(
    "argv",
    [
        ["sessions"],
        ["sessions", "--format", "json"],
        ["report", "big", "--format", "csv"],
    ],
    ids=" ".join,
)
def test_output_into_a_closed_pipe_ends_quietly(db: Path, argv: list[str]) -> None:
    line, code, err = first_line_then_close(*argv, "--db", str(db))
    assert line  # it did write, and would have written much more
    assert err == ""  # no traceback, no "Exception ignored" at exit
    assert code == 0  # the reader chose to stop; nothing failed
