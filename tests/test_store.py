"""The SQLite store: migrations, the batched writer, read-your-writes, and a failing disk."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate.records import COLUMNS, EXPORT_COLUMNS, MessageRecord, SessionRecord
from spendgate.store import MIGRATIONS, SQLiteStore
from tests.conftest import StartProxy, eventually
from tests.upstream import FakeUpstream, fixture_reply


def row(i: int, session: str = "s", cost: str | None = "0.001") -> MessageRecord:
    return MessageRecord(
        id=f"m{i}", session_id=session, agent_id=None, route="openai", provider="openai",
        model="gpt-4o", endpoint="chat", status=200, stream=False, input_tokens=10,
        output_tokens=5, cached_input_tokens=0, cache_write_tokens=0, reasoning_tokens=0,
        cost_usd=None if cost is None else Decimal(cost), estimated=False, aborted=False,
        started_at=time.time(), ttft_ms=1.0, duration_ms=2.0,
    )  # fmt: skip


async def test_schema_version_and_wal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "a.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = SQLiteStore(tmp_path / "a.db")  # reopening migrates nothing twice
    await again.open()
    await again.close()


async def test_nulls_and_flags_bind_as_sqlite_would_without_the_adapters(tmp_path: Path) -> None:
    """The store registers adapters for None and bool (a shortcut past sqlite3's failing
    __adapt__/__conform__ look-ups): a row must still hold NULL and the INTEGERs 0/1."""
    # Not asserted: that the adapters are in sqlite3's registry (process-wide state that
    # the full suite once found without them; the values written are what matters).
    store = SQLiteStore(tmp_path / "n.db")
    await store.open()
    store.add_message(dataclasses.replace(row(1), stream=True, ttft_ms=None, service_tier=None))
    await store.close()
    with sqlite3.connect(tmp_path / "n.db") as db:
        got = db.execute(
            "SELECT typeof(agent_id), typeof(ttft_ms), typeof(service_tier), typeof(stream), "
            "stream, typeof(estimated), estimated FROM token_usage"
        ).fetchall()
    assert got == [("null", "null", "null", "integer", 1, "integer", 0)]
    reopened = SQLiteStore(tmp_path / "n.db")
    await reopened.open()
    (back,), _ = await reopened.messages("s", 0, 10)
    await reopened.close()
    assert back.stream is True and back.estimated is False and back.agent_id is None


async def test_reads_see_queued_rows_and_totals_survive(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.db", flush_interval=60)
    await store.open()
    store.save_session(SessionRecord("s", time.time(), budget_usd=Decimal("2.5")))
    for i in range(10):
        store.add_message(row(i))
    store.add_message(row(99, cost=None))
    (tot,) = await store.totals("s")  # flushes first: read-your-writes
    assert tot["message_count"] == 11 and tot["cost_usd"] == 0.01
    await store.close()
    store = SQLiteStore(tmp_path / "b.db")
    await store.open()
    assert await store.spend_by_session() == {"s": Decimal("0.01")}
    (sess,) = await store.load_sessions()
    assert sess.budget_usd == Decimal("2.5")
    await store.close()


def _summed_from_scratch(path: Path) -> dict[str, tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT session_id, COUNT(*), SUM(input_tokens), SUM(output_tokens), "
            "ROUND(SUM(cost_usd), 10), SUM(CASE WHEN cost_usd IS NULL "
            "AND input_tokens + output_tokens > 0 THEN 1 ELSE 0 END), MAX(started_at) "
            "FROM token_usage GROUP BY session_id"
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


async def test_session_totals_follow_new_rows_and_match_the_whole_table(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db", flush_interval=60)
    await store.open()
    for sid in ("c", "a", "b"):
        store.save_session(SessionRecord(sid, time.time()))
    for batch in range(4):
        for i in range(25):
            cost = None if i % 5 == 0 else "0.0013"
            store.add_message(row(batch * 100 + i, session="ab"[i % 2], cost=cost))
        # Two reads at once still count each row once.
        first, second = await asyncio.gather(store.session_totals(), store.session_totals())
        assert first == second
        got = {
            r["id"]: (r["message_count"], r["input_tokens"], r["output_tokens"], r["cost_usd"],
                      r["unpriced_message_count"], r["last_at"])
            for r in first
        }  # fmt: skip
        assert got == {**_summed_from_scratch(tmp_path / "t.db"), "c": (0, 0, 0, None, 0, None)}
        assert got["a"][4] + got["b"][4] == 5 * (batch + 1)  # every fifth row has no price
        assert first[-1]["id"] == "c"  # no activity yet: its creation time orders it
    await store.close()


async def test_totals_count_unpriced_rows(tmp_path: Path) -> None:
    """A row with tokens and no cost is unpriced; a row without tokens costs nothing."""
    store = SQLiteStore(tmp_path / "u.db", flush_interval=60)
    await store.open()
    sessions = {
        "all-priced": [row(1), row(2, cost="0.002")],
        "mixed": [row(3), dataclasses.replace(row(4, cost=None), model="mystery")],
        "all-unpriced": [row(5, cost=None), row(6, cost=None)],
        "free": [dataclasses.replace(row(7, cost=None), input_tokens=0, output_tokens=0)],
    }
    for sid, rows in sessions.items():
        store.save_session(SessionRecord(sid, time.time()))
        for r in rows:
            store.add_message(dataclasses.replace(r, session_id=sid))
    store.save_session(SessionRecord("empty", time.time()))
    expected = {  # (messages, unpriced, cost of the priced rows)
        "all-priced": (2, 0, 0.003), "mixed": (2, 1, 0.001), "all-unpriced": (2, 2, None),
        "free": (1, 0, None), "empty": (0, 0, None),
    }  # fmt: skip
    for sid, want in expected.items():
        (tot,) = await store.totals(sid)
        assert (tot["message_count"], tot["unpriced_message_count"], tot["cost_usd"]) == want

    async def listed() -> dict[str, tuple[int, int, float | None]]:
        rows = await store.session_totals()
        return {
            r["id"]: (r["message_count"], r["unpriced_message_count"], r["cost_usd"]) for r in rows
        }

    assert await listed() == expected
    # The running totals keep the count as rows come in after the first read.
    store.add_message(dataclasses.replace(row(8, cost=None), session_id="all-priced"))
    assert await listed() == {**expected, "all-priced": (3, 1, 0.003)}
    by_model = {r["key"]: r for r in await store.totals("mixed", "model")}
    assert by_model["gpt-4o"]["unpriced_message_count"] == 0
    assert by_model["mystery"]["unpriced_message_count"] == 1
    assert by_model["mystery"]["cost_usd"] is None
    await store.close()


async def test_session_totals_never_count_a_batch_that_rolls_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    await store.open(start_writer=False)
    store.save_session(SessionRecord("s", time.time()))
    for i in range(5):
        store.add_message(row(i))
    at_commit, go_on = asyncio.Event(), asyncio.Event()
    execute = store.db.execute

    async def stalled_commit() -> None:
        at_commit.set()
        await go_on.wait()
        raise sqlite3.OperationalError("disk I/O error")

    def patched(sql: str, *args: Any) -> Any:  # the first COMMIT stalls, then fails
        return stalled_commit() if sql == "COMMIT" and not go_on.is_set() else execute(sql, *args)

    store.db.execute = patched  # type: ignore[method-assign]
    batch = asyncio.create_task(store.flush())
    await at_commit.wait()  # the rows are inserted but not committed
    reader = asyncio.create_task(store.session_totals())
    await asyncio.sleep(0.05)
    go_on.set()
    with pytest.raises(sqlite3.OperationalError):
        await batch
    (tot,) = await reader  # its own flush wrote the rows again, for good this time
    assert tot["message_count"] == 5 and tot["cost_usd"] == 0.005
    await store.close()


async def test_locked_database_keeps_rows_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(path, flush_interval=0.02)
    await store.open()
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    await store.db.execute("PRAGMA busy_timeout=10")
    for i in range(20):
        store.add_message(row(i))
    await asyncio.sleep(0.3)
    assert store.queue_depth == 20  # nothing lost, nothing written yet
    blocker.execute("ROLLBACK")
    blocker.close()
    await eventually(lambda: _empty(store))
    (tot,) = await store.totals("s")
    assert tot["message_count"] == 20
    await store.close()


async def _empty(store: SQLiteStore) -> bool:
    return store.queue_depth == 0


async def test_a_flush_waits_past_a_failing_attempt_that_started_before_it(
    tmp_path: Path,
) -> None:
    """CI saw this race: a write attempt already under way when the lock is released
    fails a moment later; a flush called in between must wait for the next attempt,
    which writes, instead of returning on that stale failure with its rows unwritten."""
    store = SQLiteStore(tmp_path / "r.db", flush_interval=0.01)
    await store.open()
    real = store._write_batch
    started, fail = asyncio.Event(), asyncio.Event()
    calls = 0

    async def stale_failure() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await fail.wait()
            raise sqlite3.OperationalError("database is locked")
        await real()

    store._write_batch = stale_failure  # type: ignore[method-assign]
    store.add_message(row(1))
    await started.wait()  # the first attempt is under way, with our row in it
    flushing = asyncio.create_task(store.flush())
    await asyncio.sleep(0.05)
    fail.set()  # ... and it fails after the flush was called
    await flushing
    assert store.queue_depth == 0 and calls >= 2
    await store.close()


async def test_queue_bound_drops_loudly(tmp_path: Path, caplog: object) -> None:
    dropped: list[int] = []
    store = SQLiteStore(tmp_path / "d.db", flush_interval=60, max_queue=5, on_drop=dropped.append)
    await store.open()
    for i in range(8):
        store.add_message(row(i))
    assert store.queue_depth == 5 and sum(dropped) == 3
    assert "dropping" in caplog.text  # type: ignore[attr-defined]
    await store.close()


async def test_forwarding_continues_while_the_database_is_locked(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    await proxy.store.db.execute("PRAGMA busy_timeout=10")  # type: ignore[attr-defined]
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    blocker = sqlite3.connect(proxy.settings.db_path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/lock/openai/v1"), api_key="k", max_retries=0)
    async with c:
        for _ in range(5):
            await c.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
            )
    assert proxy.store.queue_depth >= 5
    blocker.execute("ROLLBACK")
    blocker.close()
    assert (await proxy.cost("lock"))["messageCount"] == 5


async def test_export_streams_in_bounded_memory(start_proxy: StartProxy) -> None:
    """A big session exports page by page: memory stays far below the export's size."""
    import tracemalloc

    proxy = await start_proxy()
    store = proxy.store
    ledger = proxy.ledger
    await ledger.set_budget("big", None)  # makes the session known
    for i in range(60_000):
        store.add_message(row(i, session="big"))
    await store.flush()
    tracemalloc.start()
    try:
        size = 0
        async with proxy.http.get(proxy.url("/api/sessions/big/export?format=csv")) as r:
            async for chunk in r.content.iter_chunked(1 << 16):
                size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 6_000_000  # 60,000 rows of about 100 bytes
    assert peak < size / 2, (peak, size)  # one page of rows at a time, not the session


def test_export_columns_are_the_row_fields_in_order() -> None:
    assert tuple(row(1).to_json()) == EXPORT_COLUMNS
    assert row(1, cost=None).csv_cells()[EXPORT_COLUMNS.index("costUsd")] == ""


async def test_columns_are_the_schema_and_a_row_reads_back_whole(tmp_path: Path) -> None:
    """``records.COLUMNS`` names every stored column, and each field survives the round trip."""
    store = SQLiteStore(tmp_path / "c.db", flush_interval=60)
    await store.open()
    full = MessageRecord(
        id="m1", session_id="s", agent_id="a", model="gpt-4o", provider="openai",
        route="openai", endpoint="chat", status=200, stream=True, input_tokens=10,
        output_tokens=5, cached_input_tokens=3, cache_write_tokens=2, reasoning_tokens=1,
        cost_usd=Decimal("0.00030735"), estimated=True, aborted=True, started_at=1.5,
        ttft_ms=None, duration_ms=2.0, key_fingerprint="kf", error="boom",
    )  # fmt: skip
    store.add_message(full)
    assert await store.latest_message("s") == full
    await store.close()
    with sqlite3.connect(tmp_path / "c.db") as db:
        schema = [r[1] for r in db.execute("PRAGMA table_info(token_usage)")]
        stored = db.execute("SELECT stream, cost_usd, total_tokens FROM token_usage").fetchone()
    assert sorted(schema) == sorted(["seq", *(c.sql for c in COLUMNS)])
    assert stored == (1, 0.00030735, 15)
    assert tuple(c.key for c in COLUMNS if c.key) == EXPORT_COLUMNS
    assert "keyFingerprint" not in full.to_json() and full.to_json()["costUsd"] == 0.00030735
