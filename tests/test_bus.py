"""The in-memory event bus: bounded history, dropped slow subscribers, growing ids."""

from __future__ import annotations

from spendgate.bus import MemoryBus
from spendgate.events import Event


async def test_slow_subscriber_is_dropped_and_publish_never_blocks() -> None:
    bus = MemoryBus(history=100, queue_size=10)
    slow, _ = await bus.subscribe([], [], None)
    fast, _ = await bus.subscribe(["s"], [], None)
    for i in range(150):
        bus.publish(Event("token.usage", "x", {"i": i}))  # never awaits, never raises
    assert bus.subscriber_count == 1  # the slow one is gone
    assert slow.queue.qsize() == 1 and await slow.get() is None  # its reader is told to end
    assert fast.queue.empty()  # still subscribed, but filtered out: nothing queued
    # history is bounded, ids strictly increase
    _, backlog = await bus.subscribe([], [], 0)
    assert len(backlog) == 100 and backlog[-1].data == {"i": 149}
    assert [e.id for e in backlog] == sorted({e.id for e in backlog})
    bus.publish(Event("token.usage", "s", {}))  # the dropped one hears nothing more
    assert fast.queue.qsize() == 1 and slow.queue.empty()


async def test_event_ids_grow_across_restarts() -> None:
    first = MemoryBus()
    ev = Event("token.usage", "s", {})
    first.publish(ev)
    second = MemoryBus()  # a restarted process: no stored state
    ev2 = Event("token.usage", "s", {})
    second.publish(ev2)
    assert ev2.id > ev.id
