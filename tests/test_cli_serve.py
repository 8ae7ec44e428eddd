"""The real `spendgate serve` process: SIGTERM flushes every finished row; SIGKILL loses no file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.upstream import FakeUpstream, fixture_reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, db: Path) -> None:
        self.proc, self.port, self.db = proc, port, db

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def serving(upstream: FakeUpstream, tmp_path: Path, **extra: str) -> AsyncIterator[Served]:
    """A real `spendgate serve` (``extra``: more SPENDGATE_* variables), killed at the end."""
    port = free_port()
    db = tmp_path / "proc.db"
    env = {
        **os.environ,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(db),
        "SPENDGATE_OPENAI_BASE_URL": upstream.base_url,  # type: ignore[attr-defined]
        "SPENDGATE_FLUSH_INTERVAL_MS": "60000",  # only the shutdown flush writes rows
        **extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendgate", "serve"], env=env, stdout=subprocess.DEVNULL
    )
    served = Served(proc, port, db)
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(served.url("/healthz")) as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        else:
            proc.kill()
            raise AssertionError("spendgate serve did not start")
    try:
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
async def serve(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(upstream, tmp_path) as served:
        yield served


async def _burst(served: Served, n: int) -> None:
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            async with http.post(
                served.url("/s/proc/openai/v1/chat/completions"),
                json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "x"}]},
            ) as r:
                assert r.status == 200
                await r.read()

        for start in range(0, n, 50):
            await asyncio.gather(*(one() for _ in range(min(50, n - start))))


async def test_sigterm_right_after_load_keeps_every_row(
    serve: Served, upstream: FakeUpstream
) -> None:
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    await _burst(serve, 300)
    serve.proc.send_signal(signal.SIGTERM)  # at once: the rows are still queued in memory
    assert await asyncio.to_thread(serve.proc.wait, 30) == 0
    with sqlite3.connect(serve.db) as db:
        count, tokens = db.execute(
            "SELECT COUNT(*), SUM(input_tokens) FROM token_usage WHERE session_id = 'proc'"
        ).fetchone()
    assert (count, tokens) == (300, 300 * 15)


async def test_sigkill_leaves_a_database_that_opens_cleanly(
    serve: Served, upstream: FakeUpstream
) -> None:
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    await _burst(serve, 50)
    async with aiohttp.ClientSession() as http:  # a read flushes everything finished so far
        async with http.get(serve.url("/api/sessions/proc/cost")) as r:
            assert (await r.json())["messageCount"] == 50
    serve.proc.kill()
    await asyncio.to_thread(serve.proc.wait, 10)
    with sqlite3.connect(serve.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (count,) = db.execute("SELECT COUNT(*) FROM token_usage").fetchone()
    assert count == 50


def serve_once(**env: str) -> subprocess.CompletedProcess[str]:
    """`spendgate serve` that is expected to stop by itself (a start-up error)."""
    return subprocess.run(
        [sys.executable, "-m", "spendgate", "serve"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """docs/reference.md §11: no traceback when the port is taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_once(SPENDGATE_PORT=str(port), SPENDGATE_DB_PATH=str(tmp_path / "x.db"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"spendgate: cannot listen on http://127.0.0.1:{port}: the port is in use (another "
        "spendgate, or another program?): choose another with --port or SPENDGATE_PORT"
    )


def test_a_misspelt_variable_stops_serve_before_it_listens(tmp_path: Path) -> None:
    done = serve_once(SPENDGATE_ADMIN_TOKN="x", SPENDGATE_DB_PATH=str(tmp_path / "x.db"))
    assert done.returncode == 2 and not (tmp_path / "x.db").exists()
    assert done.stderr == (
        "spendgate: unknown environment variable SPENDGATE_ADMIN_TOKN "
        "(did you mean SPENDGATE_ADMIN_TOKEN?)\n"
    )


async def test_on_postgres_a_sigkill_loses_no_finished_row(
    pg_url: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The rows of a killed process are in its journal (its writer had not run); the
    next start on the same store URL and data directory imports them into PostgreSQL."""
    from spendgate.settings import Settings
    from spendgate.store_factory import make_store

    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    async with serving(upstream, tmp_path, SPENDGATE_STORE_URL=pg_url) as served:
        await _burst(served, 40)
        served.proc.kill()
        await asyncio.to_thread(served.proc.wait, 10)
    store = make_store(Settings(store_url=pg_url, db_path=served.db))
    await store.open()
    try:
        (tot,) = await store.totals("proc")
        assert tot["message_count"] == 40 and tot["input_tokens"] == 40 * 15
    finally:
        await store.close()


def test_an_unreachable_postgres_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"postgresql://spendgate:secret@127.0.0.1:{free_port()}/spendgate"
    done = serve_once(SPENDGATE_STORE_URL=url, SPENDGATE_DB_PATH=str(tmp_path / "x.db"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "secret" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"spendgate: cannot use the database {url.replace(':secret@', ':***@')}: cannot connect"
    )
