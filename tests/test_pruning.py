"""Removing old sessions (``pruning.py``; docs/reference.md §5): ``DELETE /api/sessions``
on a running proxy whose ledger forgets them, and ``spendgate prune`` through it, on the
file with no proxy, and asking on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate.cli import main
from spendgate.records import SessionRecord
from tests.conftest import Proxy, StartProxy
from tests.helpers.traffic import chat
from tests.upstream import FakeUpstream

DAY = 86400.0


def old_rows(proxy: Proxy, session: str, days_ago: float, n: int, cost: str = "0.01") -> None:
    """``n`` rows of a session whose last activity was ``days_ago``, as an older proxy
    wrote them (the session row too)."""
    from tests.helpers.records import message

    at = time.time() - days_ago * DAY
    proxy.store.save_session(SessionRecord(session, at - 60, label=f"{session} label"))
    for i in range(n):
        proxy.store.add_message(
            message(id=f"msg_{session}_{i}", session_id=session, started_at=at - i,
                    cost_usd=Decimal(cost))
        )  # fmt: skip


@pytest.fixture
async def aged(start_proxy: StartProxy, upstream: FakeUpstream) -> Proxy:
    """A proxy started on a database with two old sessions, an old empty one and a
    fresh one, so its ledger has loaded them all."""
    first = await start_proxy(global_budget_usd=1)
    old_rows(first, "old-1", 40, 3)
    old_rows(first, "old-2", 10, 2)
    first.store.save_session(SessionRecord("old-empty", time.time() - 20 * DAY))
    await chat(first, upstream, "fresh")
    async with first.http.put(first.url("/api/sessions/old-1/budget"), json={"budgetUsd": 9}):
        pass
    await first.server.close()
    return await start_proxy(global_budget_usd=1)


async def prune(proxy: Proxy, status: int = 200, **query: str) -> Any:
    async with proxy.http.delete(proxy.url("/api/sessions"), params=query) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def test_dry_run_then_prune_and_the_ledger_forgets(aged: Proxy) -> None:
    assert aged.ledger.session("old-1") is not None
    spent_before = (await aged.get_json("/api/budget"))["spentUsd"]
    plan = await prune(aged, before="7d", dryRun="true")
    assert plan["dryRun"] is True and plan["sessionCount"] == 3 and plan["messageCount"] == 5
    assert plan["sessions"] == ["old-1", "old-2", "old-empty"] and plan["keptInFlight"] == []
    assert len((await aged.get_json("/api/sessions"))["sessions"]) == 4  # nothing removed
    done = await prune(aged, before="7d")
    assert done["dryRun"] is False and done["sessionCount"] == 3 and done["messageCount"] == 5
    listed = [s["sessionId"] for s in (await aged.get_json("/api/sessions"))["sessions"]]
    assert listed == ["fresh"]
    for sid in ("old-1", "old-2", "old-empty"):
        assert aged.ledger.session(sid) is None
        async with aged.http.get(aged.url(f"/api/sessions/{sid}/cost")) as resp:
            assert resp.status == 404
    rows = (await aged.get_json("/api/report?by=session"))["rows"]
    assert [r["key"] for r in rows] == ["fresh"]
    # the global total budget loses the removed rows' $0.05, as a restart would load it
    spent_after = (await aged.get_json("/api/budget"))["spentUsd"]
    assert spent_before - spent_after == pytest.approx(0.05)
    assert (await prune(aged, before="7d"))["sessionCount"] == 0  # nothing left to remove


async def test_removed_sessions_stay_removed_after_a_restart(
    aged: Proxy, start_proxy: StartProxy
) -> None:
    await prune(aged, before="7d")
    await aged.server.close()
    again = await start_proxy()
    assert [s["sessionId"] for s in (await again.get_json("/api/sessions"))["sessions"]] == [
        "fresh"
    ]
    assert again.ledger.session("old-1") is None
    assert (await again.get_json("/api/report"))["total"]["messageCount"] == 1


async def test_a_session_with_a_request_in_flight_is_kept(
    aged: Proxy, upstream: FakeUpstream
) -> None:
    upstream.gate = asyncio.Event()
    seen = len(upstream.seen)
    held = asyncio.create_task(chat(aged, upstream, "old-2"))
    try:
        for _ in range(500):
            if len(upstream.seen) > seen:
                break
            await asyncio.sleep(0.01)
        done = await prune(aged, before="7d")
    finally:
        upstream.gate.set()
        await held
    assert done["keptInFlight"] == ["old-2"] and done["sessions"] == ["old-1", "old-empty"]
    assert (await aged.cost("old-2"))["messageCount"] == 3


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({}, "before is required"),
        ({"before": "ages ago"}, "before 'ages ago' is not a date"),
        ({"before": "7d", "dryRun": "perhaps"}, "dryRun must be true or false"),
    ],
)
async def test_bad_queries_are_400(proxy: Proxy, query: dict[str, str], says: str) -> None:
    body = await prune(proxy, 400, **query)
    assert says in body["error"]["message"]


async def test_needs_the_admin_token(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    async with proxy.http.delete(proxy.url("/api/sessions?before=1d")) as resp:
        assert resp.status == 401


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_command_through_the_running_proxy(
    aged: Proxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPENDGATE_PORT", str(aged.server.port))
    db = str(aged.settings.db_path)
    code, out, _ = await run(capsys, "prune", "--before", "30d", "--dry-run", "--db", db)
    assert (
        code == 0 and "would remove 1 sessions (3 messages)" in out and "through the proxy" in out
    )
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = await run(capsys, "prune", "--before", "30d", "--db", db)
    assert code == 2 and "stdin is not a terminal" in err and "--yes" in err
    assert aged.ledger.session("old-1") is not None  # nothing removed
    code, out, _ = await run(capsys, "prune", "--before", "30d", "--yes", "--db", db)
    assert code == 0 and "removed 1 sessions (3 messages)" in out
    assert aged.ledger.session("old-1") is None and aged.ledger.session("old-2") is not None
    code, out, _ = await run(capsys, "prune", "--before", "30d", "--yes", "--db", db)
    assert code == 0 and "nothing to remove" in out
    code, _, err = await run(capsys, "prune", "--before", "soon", "--db", db)
    assert code == 2 and "--before 'soon' is not a date" in err


async def test_the_command_on_the_file_and_its_guard(
    aged: Proxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SPENDGATE_PORT", str(port))
    db = str(aged.settings.db_path)
    # The proxy still runs (it holds the file's journal) but is not where we look.
    code, _, err = await run(capsys, "prune", "--before", "7d", "--yes", "--db", db)
    assert code == 1 and "a running spendgate holds" in err
    await aged.server.close()
    code, out, _ = await run(capsys, "prune", "--before", "7d", "--yes", "--db", db)
    assert code == 0 and "removed 3 sessions (5 messages)" in out
    code, out, _ = await run(capsys, "sessions", "--db", db, "--format", "json")
    assert [s["sessionId"] for s in json.loads(out)] == ["fresh"]
    code, _, err = await run(capsys, "prune", "--before", "7d", "--db", str(tmp_path / "no.db"))
    assert code == 1 and "no database at" in err


def _prune_on_a_terminal(db: Path, answer: bytes) -> tuple[int, bytes]:
    """``spendgate prune`` with a real pseudo-terminal as stdin and stdout."""
    primary, secondary = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env["SPENDGATE_PORT"] = "9"  # the discard port: nothing listens
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendgate", "prune", "--before", "7d", "--db", str(db)],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True,
    )  # fmt: skip
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(primary, 4096)
        except OSError:
            break
    os.write(primary, answer)
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    return proc.wait(timeout=60), seen


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
async def test_it_asks_on_a_terminal(aged: Proxy) -> None:
    await aged.server.close()
    db = aged.settings.db_path
    code, seen = await asyncio.to_thread(_prune_on_a_terminal, db, b"n\n")
    assert b"remove 3 sessions (5 messages) last active before" in seen and b"[y/N]" in seen
    assert code == 1 and b"nothing removed" in seen
    code, seen = await asyncio.to_thread(_prune_on_a_terminal, db, b"y\n")
    assert code == 0 and b"removed 3 sessions (5 messages)" in seen
