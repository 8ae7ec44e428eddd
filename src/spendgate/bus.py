"""The event bus seam: in-process fan-out with a bounded history for replay
(docs/reference.md §7).

``publish`` never blocks and never raises: each subscriber has a bounded queue, and a
subscriber whose queue is full is dropped (it may reconnect with Last-Event-ID).
:class:`spendgate.redis_bus.RedisEventBus` implements the same protocol for several
replicas (one event log, replay and live events from any replica), which is why
``subscribe`` and ``close`` are async and ``listening`` (anyone, on any replica) is apart
from ``subscriber_count`` (this process's own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Collection
from typing import Protocol

from spendgate.events import Event

log = logging.getLogger("spendgate.bus")


class Subscription:
    """One subscriber's filtered, bounded view of the bus."""

    def __init__(self, sessions: Collection[str], types: Collection[str], maxsize: int) -> None:
        self.sessions = frozenset(sessions)
        self.types = frozenset(types)
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)

    def wants(self, event: Event) -> bool:
        return (
            not self.sessions or event.session_id in self.sessions or not event.session_id
        ) and (not self.types or event.type in self.types)

    async def get(self) -> Event | None:
        """The next event, or None once the subscriber has been dropped."""
        return await self.queue.get()


class EventBus(Protocol):
    @property
    def subscriber_count(self) -> int:
        """This process's subscribers (the ``spendgate_event_subscribers`` gauge)."""

    @property
    def listening(self) -> bool:
        """Does anyone listen, on any replica? Live ``final: false`` events are only
        built when so; read on every streamed chunk, so it is a plain attribute read."""

    def publish(self, event: Event) -> None: ...

    async def subscribe(
        self, sessions: Collection[str], types: Collection[str], last_event_id: int | None
    ) -> tuple[Subscription, list[Event]]: ...

    def unsubscribe(self, sub: Subscription) -> None: ...

    async def claim(self, consumer: str, event: Event) -> bool:
        """Is this process the one to act on ``event`` for ``consumer``? Every replica
        reads every event; a consumer that must act once (the webhook posts each alert
        once) acts only where this says yes. Always yes in a single process."""

    async def close(self) -> None: ...


class Fanout:
    """A bus's local subscribers and the fan-out to them, the same for every bus: each
    has a bounded queue, and one whose queue is full is dropped (it may reconnect with
    Last-Event-ID)."""

    def __init__(self, queue_size: int) -> None:
        self._subs: set[Subscription] = set()
        self._queue_size = queue_size
        self.subscriber_count = 0
        """Kept as a plain number: every streamed chunk asks whether anyone listens."""
        self.listening = False
        self._elsewhere = False
        """Someone listens on another replica (a shared bus keeps this current)."""

    def _add(self, sessions: Collection[str], types: Collection[str]) -> Subscription:
        sub = Subscription(sessions, types, self._queue_size)
        self._subs.add(sub)
        self.subscriber_count = len(self._subs)
        self.listening = True
        return sub

    def _deliver(self, event: Event) -> None:
        for sub in list(self._subs):
            if not sub.wants(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping a slow event subscriber (queue of %d full)", self._queue_size)
                self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        """Forget a subscriber and wake its reader with the end marker."""
        self.unsubscribe(sub)
        while not sub.queue.empty():
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        self.subscriber_count = len(self._subs)
        self.listening = bool(self._subs) or self._elsewhere

    def _drop_all(self) -> None:
        """End every subscriber's stream (at shutdown, so open SSE handlers return)."""
        for sub in list(self._subs):
            self._drop(sub)


class MemoryBus(Fanout):
    def __init__(self, history: int = 2048, queue_size: int = 1024) -> None:
        super().__init__(queue_size)
        self._history: deque[Event] = deque(maxlen=history)
        self._last_id = 0

    def publish(self, event: Event) -> None:
        # Ids are microseconds since the epoch, kept strictly increasing: they grow across
        # restarts without being stored, so an old Last-Event-ID never hides new events.
        now = time.time_ns() // 1000
        event.id = self._last_id = now if now > self._last_id else self._last_id + 1
        self._history.append(event)
        if self._subs:
            self._deliver(event)

    async def subscribe(
        self, sessions: Collection[str], types: Collection[str], last_event_id: int | None
    ) -> tuple[Subscription, list[Event]]:
        sub = self._add(sessions, types)
        backlog: list[Event] = []
        if last_event_id is not None:
            backlog = [e for e in self._history if e.id > last_event_id and sub.wants(e)]
        return sub, backlog

    async def claim(self, consumer: str, event: Event) -> bool:
        return True

    async def close(self) -> None:
        self._drop_all()
