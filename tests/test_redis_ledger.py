"""The budget ledger's rules, the same tests against ``MemoryLedger`` and ``RedisLedger``
(a real redis-server, tests/helpers/redis_server.py), then what only a shared ledger
must do: retries, leases of a dead replica, no reseeding, exactly-once events across
replicas, exact money."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate.budgets import BudgetLedger, Change, MemoryLedger, Refusal, ResumeRefused
from spendgate.events import Event
from spendgate.records import MessageRecord, SessionRecord
from spendgate.store import SQLiteStore
from tests.helpers.records import message
from tests.helpers.redis_server import RedisServer

D = Decimal


@dataclass
class Harness:
    """One ledger, and the events it produced however it publishes them."""

    ledger: BudgetLedger
    client: Any = None
    pos: str = "0-0"
    seen: list[Event] = field(default_factory=list)

    async def events(self, change: Change) -> list[tuple[str, dict[str, Any]]]:
        """The budget events since the last call: the memory ledger returns them in the
        change; the Redis one has already added them to the shared stream."""
        if self.client is None:
            return [(e.type, e.data) for e in change.events]
        from spendgate.redis_bus import decode

        assert not change.events  # never twice: the script published them
        entries = await self.client.xrange("spendgate:events", f"({self.pos}", "+")
        out = []
        for entry_id, fields in entries:
            self.pos = entry_id.decode()
            ev = decode(entry_id, fields)
            out.append((ev.type, ev.data))
        return out


Make = Callable[..., Awaitable[Harness]]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    store = SQLiteStore(tmp_path / "spendgate.db", flush_interval=0.01)
    await store.open()
    made: list[Harness] = []
    clients: list[Any] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    async def build(thresholds: list[float] | None = None, default: Decimal | None = None,
                    **kw: Any) -> Harness:  # fmt: skip
        ts = [0.5] if thresholds is None else thresholds
        if url is None:
            h = Harness(MemoryLedger(ts, default, **kw))
        else:
            from spendgate.ledger_factory import redis_client
            from spendgate.redis_ledger import RedisLedger

            client = redis_client(url)
            clients.append(client)
            h = Harness(RedisLedger(client, ts, default, **kw), client)
        await h.ledger.start(store)
        made.append(h)
        return h

    yield build
    for h in made:
        await asyncio.wait_for(h.ledger.close(), 10)
    for c in clients:
        await asyncio.wait_for(c.aclose(), 10)
    await asyncio.wait_for(store.close(), 10)


async def admitted(ledger: BudgetLedger, sid: str, reserve: str, agent: str | None = None) -> Any:
    got, _ = await ledger.admit(sid, agent, D(reserve))
    assert not isinstance(got, Refusal), got.message()
    return got


async def spent(ledger: BudgetLedger, sid: str) -> Decimal:
    view = await ledger.snapshot(sid)
    assert view is not None
    return view.spent


# -- the rules, on every ledger -----------------------------------------------------------


async def test_waiters_go_in_arrival_order_as_reservations_settle(make: Make) -> None:
    ledger = (await make()).ledger
    await ledger.set_budget("s", D("0.10"))
    first = await admitted(ledger, "s", "0.10")  # holds all the headroom
    waiting = []
    for _ in range(2):
        waiting.append(asyncio.create_task(ledger.admit("s", None, D("0.10"), wait=5)))
        await asyncio.sleep(0.05)  # in this order
    assert not any(t.done() for t in waiting)
    assert (await ledger.pressure("s")).waiting == 2
    await ledger.settle(first, D("0.01"))
    second, _ = await asyncio.wait_for(waiting[0], 2)
    assert not isinstance(second, Refusal)
    await asyncio.sleep(0.1)
    assert not waiting[1].done()  # the second waits on the first
    await ledger.settle(second, D("0.01"))
    third, _ = await asyncio.wait_for(waiting[1], 2)
    assert not isinstance(third, Refusal)
    await ledger.settle(third, D("0"))
    assert await spent(ledger, "s") == D("0.02")
    assert await ledger.pressure("s") == (0, 0, 0)


async def test_a_newcomer_does_not_overtake_a_waiter(make: Make) -> None:
    ledger = (await make()).ledger
    await ledger.set_budget("s", D("0.10"))
    first = await admitted(ledger, "s", "0.06")
    waiter = asyncio.create_task(ledger.admit("s", None, D("0.06"), wait=5))
    await asyncio.sleep(0.05)
    small, _ = await ledger.admit("s", None, D("0.01"))  # would fit, but someone waits
    assert isinstance(small, Refusal) and small.status == 429
    await ledger.settle(first, D("0"))
    got, _ = await asyncio.wait_for(waiter, 2)
    assert not isinstance(got, Refusal)


async def test_a_wait_that_runs_out_says_what_holds_the_headroom(make: Make) -> None:
    ledger = (await make()).ledger
    await ledger.set_budget("run-1", D("0.01"))
    await admitted(ledger, "run-1", "0.0046")
    await admitted(ledger, "run-1", "0.0046")
    got, _ = await ledger.admit("run-1", None, D("0.0046"), wait=0.05)
    assert isinstance(got, Refusal) and got.status == 429 and got.retry
    assert got.code == "budget_reserved" and got.scope == "session"
    assert got.message().startswith(
        "2 requests in flight hold $0.0092 of the $0.01 left in session 'run-1', and this "
        "request may cost up to $0.0046"
    )
    assert (await ledger.pressure("run-1")).waiting == 0


async def test_a_waiter_whose_scope_is_spent_meanwhile_gets_402(make: Make) -> None:
    ledger = (await make()).ledger
    await ledger.set_budget("s", D("0.01"))
    first = await admitted(ledger, "s", "0.01")
    waiter = asyncio.create_task(ledger.admit("s", None, D("0.01"), wait=30))
    await asyncio.sleep(0.05)
    await ledger.settle(first, D("0.02"))  # spent past the budget: paused
    got, _ = await asyncio.wait_for(waiter, 2)
    assert isinstance(got, Refusal) and got.status == 402
    assert got.code == "session_budget_exceeded"
    assert "has used up its budget (spent $0.02 of a $0.01 budget)" in got.message()


async def test_a_waiter_that_goes_away_leaves_nothing_behind(make: Make) -> None:
    ledger = (await make()).ledger
    await ledger.set_budget("s", D("0.01"))
    first = await admitted(ledger, "s", "0.01")
    waiter = asyncio.create_task(ledger.admit("s", None, D("0.01"), wait=30))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await ledger.settle(first, D("0"))
    await asyncio.sleep(0.05)
    assert await ledger.pressure("s") == (0, 0, 0)
    await admitted(ledger, "s", "0.01")  # nobody holds it


async def test_settling_twice_changes_nothing(make: Make) -> None:
    ledger = (await make()).ledger
    res = await admitted(ledger, "s", "0.5")
    change = await ledger.settle(res, D("0.25"))
    assert change.spent == D("0.25")
    assert (await ledger.settle(res, D("0.25"))).spent is None
    assert await spent(ledger, "s") == D("0.25")
    assert (await ledger.pressure("s")).in_flight == 0


@pytest.mark.parametrize("sid", ['q"uo\\te', "caf\u00e9/\u6f22\U0001f600", "[1,2]", "a b\tc", "-"])
async def test_hostile_session_and_agent_names_keep_their_own_spend(make: Make, sid: str) -> None:
    # The Redis scripts take a request's values as one JSON argument: quotes,
    # backslashes, non-ASCII and JSON-looking names must come through as the same keys.
    ledger = (await make([])).ledger
    await ledger.set_budget(sid, D("1"))
    res = await admitted(ledger, sid, "0.25", agent=sid)
    assert (await ledger.settle(res, D("0.125"))).spent == D("0.125")
    assert await spent(ledger, sid) == D("0.125")
    assert (await ledger.pressure(sid)).in_flight == 0


async def test_a_settle_saves_a_record_only_for_the_scope_it_paused(make: Make) -> None:
    # A settle changes spend, which no record holds; only a pause changes a record. (A
    # record per settle was one more journal write and PostgreSQL upsert per request.)
    ledger = (await make([])).ledger
    await ledger.set_budget("s", D("1"))
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.4"))
    assert change.records == [] and change.spent == D("0.4")
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.6"))
    assert [(r.id, r.paused, r.pause_reason) for r in change.records] == [("s", True, "budget")]
    assert isinstance(change.records[0], SessionRecord)


async def test_thresholds_fire_once_and_rearm_when_the_budget_changes(make: Make) -> None:
    h = await make([0.5, 0.8])
    ledger = h.ledger
    await h.events(await ledger.set_budget("s", D("1")))
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.6"))
    assert [(t, d["threshold"]) for t, d in await h.events(change)] == [("budget.warning", 0.5)]
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.1"))
    assert await h.events(change) == []  # 0.7: nothing new
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.1"))
    assert [d["threshold"] for _, d in await h.events(change)] == [0.8]
    await h.events(await ledger.set_budget("s", D("2")))  # 0.8 of 2: both below again
    change = await ledger.settle(await admitted(ledger, "s", "0"), D("0.3"))
    events = await h.events(change)
    assert [(t, d["threshold"], d["spentUsd"], d["budgetUsd"]) for t, d in events] == [
        ("budget.warning", 0.5, 1.1, 2.0)
    ]


async def test_a_lowered_budget_pauses_and_a_raised_one_lifts_it(make: Make) -> None:
    h = await make([])
    ledger = h.ledger
    await ledger.settle(await admitted(ledger, "s", "0"), D("0.5"))
    change = await ledger.set_budget("s", D("0.4"))
    assert [(t, d["reason"]) for t, d in await h.events(change)] == [("budget.paused", "budget")]
    got, _ = await ledger.admit("s", None, D(0))
    assert isinstance(got, Refusal) and got.status == 402
    view = await ledger.snapshot("s")
    assert view is not None and view.record.paused and view.record.pause_reason == "budget"
    change = await ledger.set_budget("s", D("1"))
    assert [(t, d["reason"]) for t, d in await h.events(change)] == [
        ("budget.resumed", "budget raised")
    ]
    await admitted(ledger, "s", "0")


async def test_resume_refuses_while_spend_is_at_the_budget_and_lifts_a_manual_pause(
    make: Make,
) -> None:
    h = await make()
    ledger = h.ledger
    await ledger.set_budget("s", D("0.01"))
    await ledger.settle(await admitted(ledger, "s", "0"), D("0.01"))
    with pytest.raises(ResumeRefused, match=r"spent \$0.01 of its \$0.01 budget"):
        await ledger.resume("s")
    await h.events(await ledger.pause("t"))
    got, _ = await ledger.admit("t", None, D(0))
    assert isinstance(got, Refusal) and "was paused by hand" in got.message()
    change = await ledger.resume("t")
    view = await ledger.snapshot("t")
    assert view is not None and not view.record.paused
    assert [d["reason"] for _, d in await h.events(change)] == ["resumed"]


async def test_an_agent_budget_stops_that_agent_only(make: Make) -> None:
    h = await make()
    ledger = h.ledger
    await ledger.set_agent_budget("s", "planner", D("0.01"))
    assert await ledger.budgeted("s", "planner") == "agent"
    assert await ledger.budgeted("s", "coder") is None
    await h.events(Change())
    change = await ledger.settle(await admitted(ledger, "s", "0", "planner"), D("0.01"))
    paused = [d for t, d in await h.events(change) if t == "budget.paused"]
    assert paused == [
        {"scope": "agent", "sessionId": "s", "agentId": "planner", "budgetUsd": 0.01,
         "spentUsd": 0.01, "reason": "budget", "sessionLabel": None}
    ]  # fmt: skip
    got, _ = await ledger.admit("s", "planner", D(0))
    assert isinstance(got, Refusal) and got.code == "agent_budget_exceeded"
    assert "spendgate budget s USD --agent planner" in got.message()
    await admitted(ledger, "s", "0", "coder")
    ((rec, agent_spent),) = await ledger.agent_budgets("s")
    assert rec.agent_id == "planner" and rec.paused and agent_spent == D("0.01")
    await ledger.set_agent_budget("s", "planner", D("1"))
    await admitted(ledger, "s", "0", "planner")


async def test_the_global_budget_spans_sessions(make: Make) -> None:
    h = await make(global_budget=D("0.02"))
    ledger = h.ledger
    assert await ledger.budgeted("any", None) == "global"
    await h.events(Change())
    change = await ledger.settle(await admitted(ledger, "a", "0"), D("0.01"))
    assert await h.events(change) == [
        ("budget.warning", {"scope": "global", "sessionId": None, "period": "total",
                            "budgetUsd": 0.02, "spentUsd": 0.01, "threshold": 0.5})
    ]  # fmt: skip
    await ledger.settle(await admitted(ledger, "b", "0"), D("0.01"))
    got, _ = await ledger.admit("c", None, D(0))
    assert isinstance(got, Refusal) and got.code == "global_budget_exceeded"
    assert "spendgate budget --global USD" in got.message()
    rec, global_spent, period, _ = await ledger.global_budget()
    assert rec.paused and global_spent == D("0.02") and period is None


async def test_a_new_period_starts_the_global_spend_again(make: Make) -> None:
    now = [datetime(2026, 12, 2, 23, 0, tzinfo=UTC).timestamp()]
    h = await make(global_budget=D("0.01"), period="day", clock=lambda: now[0])
    ledger = h.ledger
    await ledger.settle(await admitted(ledger, "a", "0"), D("0.01"))
    got, _ = await ledger.admit("a", None, D(0))
    assert isinstance(got, Refusal) and "starts again with the next day" in got.message()
    await h.events(Change())
    now[0] += 3600  # midnight UTC
    res, change = await ledger.admit("a", None, D(0))
    assert not isinstance(res, Refusal)
    assert [(t, d["reason"], d["period"]) for t, d in await h.events(change)] == [
        ("budget.resumed", "period ended", "2026-12-03")
    ]
    assert (await ledger.global_budget())[1] == 0


# -- what only a shared ledger has to do --------------------------------------------------


@pytest.fixture
async def replicas(
    redis_url: str,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Several RedisLedgers on one Redis: separate replicas as far as the ledger knows."""
    from spendgate.ledger_factory import redis_client
    from spendgate.redis_ledger import RedisLedger

    store = SQLiteStore(tmp_path / "spendgate.db", flush_interval=0.01)
    await store.open()
    made: list[tuple[Any, Any]] = []

    async def replica(**kw: Any) -> RedisLedger:
        client = redis_client(redis_url)
        kw.setdefault("thresholds", [0.5, 0.8])
        ledger = RedisLedger(client, kw.pop("thresholds"), kw.pop("default", None), **kw)
        await ledger.start(store)
        made.append((ledger, client))
        return ledger

    replica.store = store  # type: ignore[attr-defined]
    yield replica
    for ledger, client in made:
        await asyncio.wait_for(ledger.close(), 10)
        await asyncio.wait_for(client.aclose(), 10)
    await asyncio.wait_for(store.close(), 10)


async def sent_everything(ledger: Any) -> None:
    """Until the settles kept while Redis was away have been sent (bounded)."""
    for _ in range(50):
        if not ledger._pending:
            return
        await asyncio.sleep(0.1)


async def _events(client: Any, type_: str) -> list[Event]:
    from spendgate.redis_bus import decode

    entries = await client.xrange("spendgate:events", "-", "+")
    return [e for e in (decode(i, f) for i, f in entries) if e.type == type_]


async def test_concurrent_admits_on_three_replicas_admit_exactly_what_fits(
    replicas: Callable[..., Any],
) -> None:
    ledgers = [await replicas() for _ in range(3)]
    await ledgers[0].set_budget("s", D("0.05"))  # fits five reservations of $0.01
    results = await asyncio.gather(*(ledgers[i % 3].admit("s", None, D("0.01")) for i in range(60)))
    admitted_ = [r for r, _ in results if not isinstance(r, Refusal)]
    refused = [r for r, _ in results if isinstance(r, Refusal)]
    assert len(admitted_) == 5
    assert {(r.status, r.code) for r in refused} == {(429, "budget_reserved")}
    pressure = await ledgers[1].pressure("s")
    assert (pressure.in_flight, pressure.reserved) == (5, D("0.05"))
    costs = [D("0.0123456789"), D("0.0000000001"), D("0.01"), D("0.0033333333"), D("0.03")]
    await asyncio.gather(
        *(
            ledgers[i % 3].settle(r, c)
            for i, (r, c) in enumerate(zip(admitted_, costs, strict=True))
        )
    )
    assert await spent(ledgers[2], "s") == sum(costs)  # exact, to the 1e-10 unit
    warnings = await _events(ledgers[0]._r, "budget.warning")
    assert sorted(e.data["threshold"] for e in warnings) == [0.5, 0.8]  # once each
    assert len(await _events(ledgers[0]._r, "budget.paused")) == 1


async def test_a_retried_admit_or_settle_counts_once(replicas: Callable[..., Any]) -> None:
    a, b = await replicas(), await replicas()
    res = await admitted(a, "s", "0.5")
    await a.settle(res, D("0.25"))
    res.open = True  # the same settle sent again (a retry after a timeout), by another replica
    change = await b.settle(res, D("0.25"))
    assert change.spent == D("0.25")
    assert await spent(b, "s") == D("0.25")
    assert (await b.pressure("s")).in_flight == 0


async def test_a_dead_replicas_reservation_is_released_after_its_lease(
    replicas: Callable[..., Any],
) -> None:
    dead = await replicas(lease_s=0.5)
    live = await replicas(lease_s=0.5)
    await live.set_budget("s", D("0.01"))
    await admitted(dead, "s", "0.01")
    for task in dead._tasks:  # it stops renewing, as a killed process would
        task.cancel()
    got, _ = await live.admit("s", None, D("0.01"))
    assert isinstance(got, Refusal) and got.status == 429
    t0 = asyncio.get_running_loop().time()
    while isinstance(got, Refusal):
        await asyncio.sleep(0.05)
        got, _ = await live.admit("s", None, D("0.01"))
    waited = asyncio.get_running_loop().time() - t0
    assert 0.3 < waited < 1.5
    assert int(await live._r.get("spendgate:lost")) == 1


async def test_a_live_replica_renews_its_leases(replicas: Callable[..., Any]) -> None:
    a = await replicas(lease_s=0.3)
    await a.set_budget("s", D("0.01"))
    res = await admitted(a, "s", "0.01")
    await asyncio.sleep(1.0)  # three leases long: renewed every 0.1 s
    got, _ = await a.admit("s", None, D("0.01"))
    assert isinstance(got, Refusal) and got.status == 429
    await a.settle(res, D(0))
    await admitted(a, "s", "0.01")


async def test_start_seeds_from_the_rows_once_and_never_over_live_counters(
    replicas: Callable[..., Any],
) -> None:
    store: SQLiteStore = replicas.store  # type: ignore[attr-defined]
    store.save_session(SessionRecord("old", 1.0, D("1")))
    rows: list[MessageRecord] = [message(session_id="old", cost_usd=D("0.6"))]
    for row in rows:
        store.add_message(row)
    await store.flush()
    first = await replicas()
    assert await spent(first, "old") == D("0.6")
    assert await _events(first._r, "budget.warning") == []  # crossed before: not again
    await first.settle(await admitted(first, "old", "0"), D("0.1"))
    store.add_message(message(id="msg_2", session_id="old", cost_usd=D("5")))  # rows move on
    await store.flush()
    second = await replicas()  # ...but a replica starting now does not reseed
    assert await spent(second, "old") == D("0.7")


async def test_closed_failure_mode_answers_503_while_redis_is_down(
    replicas: Callable[..., Any],
    redis_server: RedisServer,
) -> None:
    ledger = await replicas()
    res = await admitted(ledger, "s", "0.01")
    redis_server.stop()
    try:
        got, _ = await ledger.admit("s", None, D("0.01"))
        assert isinstance(got, Refusal) and got.status == 503 and got.retry
        assert got.code == "ledger_unavailable"
        change = await ledger.settle(res, D("0.01"))  # kept, not lost
        assert change.spent == D("0.01")
    finally:
        redis_server.start()
    await sent_everything(ledger)
    assert await spent(ledger, "s") == D("0.01")


async def test_open_failure_mode_admits_while_redis_is_down_and_settles_later(
    replicas: Callable[..., Any],
    redis_server: RedisServer,
) -> None:
    ledger = await replicas(failure_mode="open")
    await ledger.set_budget("s", D("1"))
    redis_server.stop()
    try:
        got, _ = await ledger.admit("s", None, D("0.01"))
        assert not isinstance(got, Refusal)  # admitted unmetered: the budget may overshoot
        change = await ledger.settle(got, D("0.25"))
        assert change.spent == D("0.25")  # as far as this replica knows
    finally:
        redis_server.start()
    await sent_everything(ledger)
    assert await spent(ledger, "s") == D("0.25")  # reconciled, once
    assert await ledger.pressure("s") == (0, 0, 0)


async def test_a_burst_larger_than_the_connection_pool_waits_instead_of_failing(
    replicas: Callable[..., Any],
) -> None:
    from spendgate.ledger_factory import REDIS_CONNECTIONS

    ledger = await replicas()
    n = REDIS_CONNECTIONS * 8
    results = await asyncio.gather(*(ledger.admit(f"s{i}", None, D("0.01")) for i in range(n)))
    assert not [r for r, _ in results if isinstance(r, Refusal)]  # no 503 "Too many connections"
    await asyncio.gather(*(ledger.settle(r, D("0.001")) for r, _ in results))
    assert await spent(ledger, "s7") == D("0.001")


async def test_the_shared_gauges_are_reported_by_one_replica(
    replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spendgate import redis_ledger

    monkeypatch.setattr(redis_ledger, "GAUGE_EVERY_S", 0.05)
    ledgers = [await replicas() for _ in range(3)]
    await ledgers[0].pause("p1")
    await ledgers[1].pause("p2")
    await ledgers[2].set_budget("b", D("1"))
    await asyncio.sleep(0.3)
    assert sorted(led.paused_count for led in ledgers) == [0, 0, 2]  # summed: 2, not 6
    assert sorted(len(led.budgets()) for led in ledgers) == [0, 0, 1]
