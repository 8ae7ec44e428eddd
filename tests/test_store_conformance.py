"""The ``Store`` seam: the same tests against every implementation (SQLiteStore, and
PostgresStore on a real PostgreSQL server, tests/helpers/postgres.py), opened the way
``serve`` opens them (``store_factory.make_store``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate.records import AgentBudgetRecord, GlobalBudgetRecord, SessionRecord
from spendgate.settings import Settings
from spendgate.store import Store
from spendgate.store_factory import make_store
from tests.helpers.records import message

OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conformance.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def open_store(store_url: str, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Open a store on the test's database; several may be open at once (replicas)."""
    opened: list[Store] = []

    async def start(start_writer: bool = True, **overrides: Any) -> Store:
        values: dict[str, Any] = {
            "store_url": store_url,
            "db_path": tmp_path / "local" / "spendgate.db",
            "flush_interval_ms": 20,
        }
        values.update(overrides)
        store = make_store(Settings(**values))
        await store.open(start_writer=start_writer)
        opened.append(store)
        return store

    yield start
    for s in opened:
        await s.close()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


async def test_a_row_reads_back_whole(open_store: OpenStore) -> None:
    store = await open_store()
    row = message(
        id="m1", agent_id="sub", cost_usd=Decimal("0.0123456789"), ttft_ms=None,
        error="upstream 500", note="estimated: stream cut", transport="websocket",
        key_fingerprint="fp", stream=False, estimated=True, aborted=True, started_at=12.5,
    )  # fmt: skip
    store.add_message(row)
    page, cursor = await store.messages("run-1", 0, 10)
    assert page == [row] and cursor is None
    assert await store.latest_message("run-1") == row
    assert isinstance(page[0].stream, bool) and isinstance(page[0].cost_usd, Decimal)


async def test_money_sums_exactly(open_store: OpenStore) -> None:
    store = await open_store()
    for i in range(10):
        store.add_message(message(id=f"m{i}", cost_usd=Decimal("0.1"), started_at=float(i)))
    store.add_message(message(id="free", cost_usd=None, input_tokens=0, output_tokens=0))
    store.add_message(message(id="unpriced", cost_usd=None))
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 12 and tot["unpriced_message_count"] == 1
    assert _float(tot["cost_usd"]) == 1.0
    assert await store.spend_by_session() == {"run-1": Decimal("1")}
    assert await store.spend_since(5.0) == Decimal("0.5")
    assert await store.spend_since(None) == Decimal("1")


async def test_a_duplicate_row_is_stored_and_counted_once(open_store: OpenStore) -> None:
    store = await open_store()
    store.save_session(SessionRecord("run-1", 1.0))
    store.add_message(message(id="m1"))
    store.add_message(message(id="m1"))  # the same batch
    await store.flush()
    store.add_message(message(id="m1"))  # a later batch
    store.add_message(message(id="m2"))
    (row,) = await store.session_totals()
    assert row["message_count"] == 2 and row["input_tokens"] == 2400
    assert _float(row["cost_usd"]) == pytest.approx(0.0006147)
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 2
    page, _ = await store.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["m1", "m2"]


async def test_totals_group_by_model_and_agent(open_store: OpenStore) -> None:
    store = await open_store()
    store.add_message(message(id="a", model="m-a", agent_id="x", cost_usd=Decimal("0.25")))
    store.add_message(message(id="b", model="m-b", agent_id="x", cost_usd=Decimal("0.5")))
    store.add_message(message(id="c", model="m-b", agent_id=None, cost_usd=None))
    by_model = {r["key"]: r for r in await store.totals("run-1", "model")}
    assert _float(by_model["m-a"]["cost_usd"]) == 0.25
    assert by_model["m-b"]["message_count"] == 2 and by_model["m-b"]["unpriced_message_count"] == 1
    by_agent = {r["key"]: r for r in await store.totals("run-1", "agent_id")}
    assert _float(by_agent["x"]["cost_usd"]) == 0.75 and by_agent[None]["cost_usd"] is None
    spend = await store.agent_spend([("run-1", "x"), ("run-1", "nobody")])
    assert spend == {("run-1", "x"): Decimal("0.75"), ("run-1", "nobody"): Decimal(0)}
    with pytest.raises(ValueError):
        await store.totals("run-1", "id; DROP TABLE token_usage")


async def test_session_totals_list_every_session_newest_first(open_store: OpenStore) -> None:
    store = await open_store()
    now = time.time()
    store.save_session(SessionRecord("old", now - 100, Decimal("2.5"), label="first"))
    store.save_session(SessionRecord("new", now - 50))
    store.save_session(SessionRecord("idle", now - 10))
    store.add_message(message(id="x", session_id="old", started_at=now))
    store.add_message(message(id="y", session_id="new", started_at=now - 40))
    rows = await store.session_totals()
    assert [r["id"] for r in rows] == ["old", "idle", "new"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["idle"]["message_count"] == 0 and by_id["idle"]["cost_usd"] is None
    assert _float(by_id["old"]["budget_usd"]) == 2.5 and by_id["old"]["label"] == "first"
    assert bool(by_id["old"]["paused"]) is False


async def test_budgets_are_saved_and_the_last_write_wins(open_store: OpenStore) -> None:
    store = await open_store()
    store.save_session(SessionRecord("s", 1.0, Decimal("1")))
    store.save_session(SessionRecord("s", 1.0, Decimal("3"), True, "budget", "lbl"))
    store.save_agent_budget(AgentBudgetRecord("s", "a", Decimal("0.5")))
    store.save_agent_budget(AgentBudgetRecord("s", "a", Decimal("0.75"), True, "manual"))
    store.save_global_budget(GlobalBudgetRecord(Decimal("9"), configured=Decimal("8")))
    await store.flush()
    store.save_global_budget(GlobalBudgetRecord(Decimal("10"), configured=Decimal("8")))
    await store.flush()
    assert await store.load_sessions() == [
        SessionRecord("s", 1.0, Decimal("3"), True, "budget", "lbl")
    ]
    assert await store.load_agent_budgets() == [
        AgentBudgetRecord("s", "a", Decimal("0.75"), True, "manual")
    ]
    assert await store.load_global_budget() == GlobalBudgetRecord(
        Decimal("10"), configured=Decimal("8")
    )


async def test_the_cursor_pages_through_every_row_once(open_store: OpenStore) -> None:
    store = await open_store()
    for i in range(25):
        store.add_message(message(id=f"m{i:02}"))
        store.add_message(message(id=f"other{i}", session_id="other"))
    seen: list[str] = []
    after = 0
    while True:
        page, cursor = await store.messages("run-1", after, 10)
        seen.extend(m.id for m in page)
        if cursor is None:
            break
        after = cursor
    assert seen == [f"m{i:02}" for i in range(25)]
    assert [m.id async for m in store.iter_messages("run-1")] == seen


async def test_a_refused_row_is_kept_aside_and_the_others_written(
    open_store: OpenStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    store.add_message(message(id="ok1"))
    store.add_message(message(id="neg", input_tokens=-5))
    store.add_message(message(id="huge", output_tokens=10**13))
    store.add_message(message(id="ok2"))
    page, _ = await store.messages("run-1", 0, 10)
    assert [m.id for m in page] == ["ok1", "ok2"]
    (tot,) = await store.totals("run-1")
    assert tot["message_count"] == 2
    assert store.rejected == 2  # type: ignore[attr-defined]
    assert "refused 2 rows" in caplog.text


async def test_rows_survive_a_restart_and_a_second_replica_reads_them(
    open_store: OpenStore,
) -> None:
    a = await open_store()
    b = await open_store()
    a.save_session(SessionRecord("run-1", 1.0, Decimal("5")))
    for i in range(3):
        a.add_message(message(id=f"m{i}", cost_usd=Decimal("0.2")))
    await a.flush()  # A's request finished and its rows are committed
    assert await b.spend_by_session() == {"run-1": Decimal("0.6")}
    assert [s.id for s in await b.load_sessions()] == ["run-1"]
    await a.close()
    reader = await open_store(start_writer=False)  # the CLI's way
    (row,) = await reader.session_totals()
    assert row["message_count"] == 3 and _float(row["cost_usd"]) == pytest.approx(0.6)


async def test_reports_over_time_group_alike(open_store: OpenStore) -> None:
    store = await open_store()
    store.save_session(SessionRecord("b", 1.0, label="second"))
    at = 1767225600.0  # 2026-01-01T00:00:00Z, a Thursday: ISO week 2026-W01
    rows = [
        ("1", "a", "m-x", at + 60, "0.1"),
        ("2", "a", "m-y", at + 3600 * 5, "0.2"),
        ("3", "b", "m-x", at + 86400 * 4, None),  # Monday 2026-01-05: week 2
        ("4", "b", None, at - 1, "0.3"),  # 2025-12-31: ISO week 2026-W01 too
    ]
    for mid, sid, model, started, cost in rows:
        store.add_message(
            message(id=mid, session_id=sid, model=model, started_at=started,
                    cost_usd=None if cost is None else Decimal(cost))
        )  # fmt: skip
    by_week = await store.report("week")
    assert [(r["key"], r["message_count"]) for r in by_week] == [("2026-W01", 3), ("2026-W02", 1)]
    assert _float(by_week[0]["cost_usd"]) == pytest.approx(0.6)
    assert by_week[1]["cost_usd"] is None and by_week[1]["unpriced_message_count"] == 1
    by_hour = await store.report("hour", since=at, until=at + 86400)
    assert [r["key"] for r in by_hour] == ["2026-01-01T00:00Z", "2026-01-01T05:00Z"]
    assert [r["key"] for r in await store.report("day")] == [
        "2025-12-31", "2026-01-01", "2026-01-05"
    ]  # fmt: skip
    assert [r["key"] for r in await store.report("month")] == ["2025-12", "2026-01"]
    by_model = await store.report("model", session="a")
    assert [(r["key"], r["input_tokens"]) for r in by_model] == [("m-x", 1200), ("m-y", 1200)]
    assert [r["key"] for r in await store.report("model")] == ["m-x", "m-y", None]
    by_session = {r["key"]: r for r in await store.report("session")}
    assert by_session["b"]["label"] == "second" and by_session["a"]["label"] is None
    with pytest.raises(ValueError):
        await store.report("year")


async def test_pruning_removes_whole_sessions_alike(open_store: OpenStore) -> None:
    """Sessions last active (or, empty, created) before the bound go with their rows and
    agent budgets; the kept and the recent stay; a dry run removes nothing."""
    store = await open_store()
    now = time.time()
    store.save_session(SessionRecord("old", now - 50 * 86400))
    store.save_session(SessionRecord("old-empty", now - 40 * 86400))
    store.save_session(SessionRecord("busy", now - 40 * 86400))
    store.save_session(SessionRecord("recent", now - 40 * 86400))  # created long ago, used now
    store.save_agent_budget(AgentBudgetRecord("old", "planner", Decimal("1")))
    for i, (sid, days) in enumerate([("old", 45), ("old", 31), ("busy", 35), ("recent", 35),
                                     ("recent", 1), ("orphan", 60)]):  # fmt: skip
        store.add_message(message(id=f"m{i}", session_id=sid, started_at=now - days * 86400,
                                  cost_usd=Decimal("0.25")))  # fmt: skip
    before = now - 30 * 86400
    plan = await store.prune(before, keep={"busy"}, period_start=now - 40 * 86400, dry_run=True)
    assert plan.sessions == ["old", "old-empty", "orphan"] and plan.kept == ["busy"]
    assert plan.messages == 3 and plan.period_spend == Decimal("0.25")  # old's 31-day row
    assert len(await store.session_totals()) == 4  # nothing removed yet (orphan has no row)
    assert (await store.report("day", since=before - 86400 * 40))[0]["message_count"] >= 1
    done = await store.prune(before, keep={"busy"}, period_start=now - 40 * 86400)
    assert done == plan
    assert sorted(r["id"] for r in await store.session_totals()) == ["busy", "recent"]
    assert await store.load_agent_budgets() == []
    spend = await store.spend_by_session()
    assert set(spend) <= {"busy", "recent"} and spend["recent"] == Decimal("0.5")
    assert [r["key"] for r in await store.report("session")] == ["busy", "recent"]
    again = await store.prune(before, keep={"busy"})
    assert again.sessions == [] and again.messages == 0
