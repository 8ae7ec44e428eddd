"""The event bus seam: the same tests against ``MemoryBus`` and ``RedisEventBus`` (a real
redis-server); for the memory bus "another replica" is the same process's bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from spendgate.bus import EventBus, MemoryBus
from spendgate.events import Event

Make = Callable[..., Awaitable[EventBus]]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """``make(replica=name, ...)``: a bus; the same name gives the same bus, another name
    another replica (a separate RedisEventBus on the same Redis)."""
    buses: dict[str, EventBus] = {}
    clients: list[Any] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    async def build(replica: str = "a", history: int = 2048, queue_size: int = 1024) -> EventBus:
        if url is None:
            if "a" not in buses:
                buses["a"] = MemoryBus(history, queue_size)
            return buses["a"]
        if replica not in buses:
            from spendgate.ledger_factory import redis_client
            from spendgate.redis_bus import RedisEventBus

            client = redis_client(url)
            clients.append(client)
            bus = RedisEventBus(client, replica_id=replica, history=history, queue_size=queue_size)
            await bus.start()
            buses[replica] = bus
        return buses[replica]

    yield build
    for bus in buses.values():
        await asyncio.wait_for(bus.close(), 10)
    for c in clients:
        await asyncio.wait_for(c.aclose(), 10)


async def next_event(sub: Any, timeout: float = 3.0) -> Event | None:
    got: Event | None = await asyncio.wait_for(sub.get(), timeout)
    return got


async def settled(bus: EventBus) -> None:
    """Until what was published is in the log (the Redis bus sends in the background)."""
    flush = getattr(bus, "flush", None)
    if flush is not None:
        await flush()


async def replayed(
    bus: EventBus, last_id: int, n: int, sessions: list[str] | None = None
) -> list[Event]:
    """What a client reconnecting with ``last_id`` gets, backlog then live, until ``n``
    events (an event still on its way to this replica's reader arrives live)."""
    sub, got = await bus.subscribe(sessions or [], [], last_id)
    while len(got) < n:
        ev = await next_event(sub)
        assert ev is not None
        got.append(ev)
    bus.unsubscribe(sub)
    return got


async def test_a_slow_subscriber_is_dropped_and_publish_never_blocks(make: Make) -> None:
    bus = await make(history=100, queue_size=10)
    slow, _ = await bus.subscribe([], [], None)
    fast, _ = await bus.subscribe(["s"], [], None)
    for i in range(150):
        bus.publish(Event("token.usage", "x", {"i": i}))  # never awaits, never raises
    await settled(bus)
    for _ in range(300):
        if bus.subscriber_count == 1:
            break
        await asyncio.sleep(0.01)
    assert bus.subscriber_count == 1  # the slow one is gone
    assert await next_event(slow) is None  # its reader is told to end
    assert fast.queue.empty()  # still subscribed, but filtered out: nothing queued
    bus.publish(Event("token.usage", "s", {}))
    assert (await next_event(fast)) is not None


async def test_replay_after_last_event_id_on_any_replica(make: Make) -> None:
    a = await make("a")
    for i in range(5):
        a.publish(Event("token.usage", "s", {"i": i}))
    await settled(a)
    everything = await replayed(a, 0, 5)
    assert [e.data["i"] for e in everything] == [0, 1, 2, 3, 4]
    ids = [e.id for e in everything]
    assert ids == sorted(set(ids))
    b = await make("b")  # a client reconnecting to another replica
    rest = await replayed(b, ids[1], 3, ["s"])
    assert [e.data["i"] for e in rest] == [2, 3, 4]
    assert [e.id for e in rest] == ids[2:]


async def test_live_events_reach_a_subscriber_on_another_replica(make: Make) -> None:
    a, b = await make("a"), await make("b")
    sub, backlog = await b.subscribe(["s"], ["token.usage"], None)
    assert backlog == []
    for _ in range(300):  # the announcement travels through Redis
        if a.listening:
            break
        await asyncio.sleep(0.01)
    assert a.listening  # so a builds live final:false events
    a.publish(Event("token.usage", "s", {"final": False}))
    a.publish(Event("budget.warning", "s", {"threshold": 0.5}))  # filtered out
    a.publish(Event("token.usage", "s", {"final": True}))
    first, second = await next_event(sub), await next_event(sub)
    assert first is not None and second is not None
    assert (first.data, second.data) == ({"final": False}, {"final": True})
    assert first.id < second.id
    b.unsubscribe(sub)


async def test_event_ids_grow_across_restarts_and_replicas(make: Make) -> None:
    a = await make("a")
    ev = Event("token.usage", "s", {})
    a.publish(ev)
    await settled(a)
    (first,) = await replayed(a, 0, 1)
    b = await make("b")  # another process: no state of its own
    b.publish(Event("token.usage", "s", {}))
    await settled(b)
    (_, second) = await replayed(b, 0, 2)
    assert second.id > first.id > 1_700_000_000_000_000  # microseconds since the epoch


async def test_a_burst_from_two_replicas_gets_unique_increasing_ids_in_order(
    make: Make,
) -> None:
    # One PUBLISH carries a whole outbox under one clock reading: each event still gets
    # its own id, later than the one before, wherever it was published.
    a, b = await make("a"), await make("b")
    for i in range(300):  # more than one PUBLISH's 256
        (a if i % 2 else b).publish(Event("token.usage", "s", {"n": i}))
    await settled(a)
    await settled(b)
    sub, got = await a.subscribe([], [], 0)  # the log as it is now: each event once
    a.unsubscribe(sub)
    ids = [e.id for e in got]
    assert ids == sorted(set(ids)) and len(ids) == 300
    for bus in (a, b):  # each replica's own events keep their order
        mine = [e.data["n"] for e in got if e.data["n"] % 2 == (bus is a)]
        assert mine == sorted(mine)


async def test_an_event_is_claimed_by_one_replica_only(make: Make) -> None:
    """What lets the webhook post an alert once whichever replicas read it."""
    a, b = await make("a"), await make("b")
    a.publish(Event("budget.paused", "s", {}))
    await settled(a)
    (ev,) = await replayed(b, 0, 1)
    first, second = await a.claim("webhook", ev), await b.claim("webhook", ev)
    if a is b:  # one process: it is always the one
        assert first and second
    else:
        assert (first, second) == (True, False)
        assert await b.claim("other consumer", ev)


@pytest.mark.parametrize("last", [-5, 2**64, 10**30])
async def test_a_hostile_last_event_id_replays_nothing_and_breaks_nothing(
    make: Make, last: int
) -> None:
    bus = await make()
    bus.publish(Event("token.usage", "s", {}))
    await settled(bus)
    sub, backlog = await bus.subscribe([], [], last)
    assert backlog == [] or (last < 0 and len(backlog) == 1)  # the memory bus: all after -5
    bus.unsubscribe(sub)
