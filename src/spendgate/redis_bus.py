"""The shared event log of several replicas: one Redis Stream (docs/reference.md §7
"Several replicas").

Every event, whichever replica publishes it, goes into one stream under an id that Redis
assigns in one atomic step: ``max(now in µs, last + 1)``, today's microsecond form, so
ids increase across replicas and restarts and a ``Last-Event-ID`` from a single-process
deployment still compares right. Each replica runs one reader task (``XREAD BLOCK``)
that feeds its local subscribers' bounded queues, so a subscriber on any replica sees
every replica's events, live ``final: false`` ones included, and replay after
``Last-Event-ID`` reads the stream (bounded like the memory history by
``SPENDGATE_EVENT_HISTORY``). The budget events of :mod:`spendgate.redis_ledger` are
added to the same stream by its scripts, in the step that changes the budget state, so
they exist exactly once.

``publish`` stays sync and never blocks: it appends to a bounded local outbox that the
script batch (:mod:`spendgate.redis_batch`) takes from as one ``PUBLISH`` per batch, in
order, one at a time. An event lost to a Redis outage is logged with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Collection
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from spendgate.bus import Fanout, Subscription
from spendgate.events import Event, budget_event
from spendgate.redis_batch import ScriptBatch
from spendgate.store import COST_DIGITS

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("spendgate.redis_bus")

UNIT = Decimal(1).scaleb(-COST_DIGITS)
"""Money in Redis is integer units of 1e-10 USD (the rows' precision)."""

LUA_EMIT = """
local function event_clock(P)  -- now in µs, and the last id given
  local t = redis.call('TIME')
  local last = tonumber(redis.call('GET', P .. 'evseq') or '0')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]), last
end
local function add_event(P, maxlen, now, last, typ, sid, payload, units)
  local id = now
  if id <= last then id = last + 1 end
  local sid_ = string.format('%.0f', id)
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', maxlen, sid_ .. '-0',
             't', typ, 's', sid, 'd', payload, 'u', units)
  return id, sid_
end
local function emit(P, maxlen, typ, sid, payload, units)
  local now, last = event_clock(P)
  local _, sid_ = add_event(P, maxlen, now, last, typ, sid, payload, units)
  redis.call('SET', P .. 'evseq', sid_)
  return sid_
end
"""
"""The one definition of an event id, ``max(now in µs, last + 1)``, shared by every
script that adds an event."""

_PUBLISH = (
    LUA_EMIT
    + """
-- a batch of events: the clock and the last id read once and the last id written once
-- (per event only its XADD)
local P, maxlen = ARGV[1], ARGV[2]
local now, last = event_clock(P)
local out = ''
for i = 3, #ARGV, 3 do
  last, out = add_event(P, maxlen, now, last, ARGV[i], ARGV[i + 1], ARGV[i + 2], '0')
end
if out ~= '' then redis.call('SET', P .. 'evseq', out) end
return out
"""
)

BATCH = 256
"""Events per PUBLISH call."""
OUTBOX = 10_000
"""Events waiting to be sent at most; past this (Redis down) the oldest are dropped."""
LISTENER_TTL_MS = 5_000
MAX_ID = 2**63
"""Past this a Last-Event-ID is no stream id (nothing is replayed after it)."""


def _usd(units: str | None) -> float | None:
    return None if units in (None, "") else float(Decimal(int(units)) * UNIT)


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    """A stream entry as the Event it was; a budget event written by a ledger script
    carries its money in units and becomes the same payload :func:`budget_event` makes."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    type_ = fields[b"t"].decode()
    data: dict[str, Any] = orjson.loads(fields[b"d"])
    if fields.get(b"u") == b"1":
        extra: dict[str, Any] = {}
        if "threshold" in data:
            extra["threshold"] = float(data["threshold"])
        if "reason" in data:
            extra["reason"] = data["reason"]
        if "sessionLabel" in data:
            extra["sessionLabel"] = data["sessionLabel"]
        event = budget_event(
            type_,
            data["scope"],
            data.get("sessionId") or None,
            _usd(data.get("budgetU")),
            _usd(data.get("spentU")) or 0.0,
            agent_id=data.get("agentId") or None,
            period=data.get("period"),
            **extra,
        )
    else:
        event = Event(type_, fields[b"s"].decode(), data)
    event.id = int(raw.partition("-")[0])
    return event


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background tasks and wait until each has ended (whatever it raised)."""
    for task in tasks:
        task.cancel()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()


class RedisEventBus(Fanout):
    """The :class:`~spendgate.bus.EventBus` of several replicas (see the module)."""

    def __init__(
        self,
        client: Redis,
        *,
        replica_id: str,
        history: int = 2048,
        queue_size: int = 1024,
        prefix: str = "spendgate:",
        batch: ScriptBatch | None = None,
    ) -> None:
        super().__init__(queue_size)
        self._r: Any = client  # redis-py's own types are loose; its replies are checked here
        self._p = prefix
        self._stream = prefix + "events"
        self._replica = replica_id
        self._history = history
        self._out: deque[tuple[str, str, bytes]] = deque()
        self._sending = 0
        """Events at the head of ``_out`` in the PUBLISH in flight (one at a time: in order)."""
        self._retry: asyncio.TimerHandle | None = None
        self._dropped = 0
        self._pos = "0-0"
        """The last stream id delivered to the local subscribers."""
        self._idle = False
        self._wanted = asyncio.Event()
        self._closing = False
        self._read_task: asyncio.Task[None] | None = None
        self._publish = client.register_script(_PUBLISH)
        # The ledger's batch when it shares the client: the outbox rides in the next batch
        # of admits and settles instead of a trip of its own.
        self._batch = batch if batch is not None else ScriptBatch(client)
        self._batch.add_source(self._take)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        last = await self._r.xrevrange(self._stream, count=1)
        self._pos = last[0][0].decode() if last else "0-0"
        await self._refresh_listening()
        self._read_task = asyncio.create_task(self._reader())
        self._tasks.append(asyncio.create_task(self._listeners()))

    # -- publishing --------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        if len(self._out) >= OUTBOX:
            self._out.popleft()
            if self._sending:  # it is in the PUBLISH in flight: one fewer to take off after
                self._sending -= 1
            self._dropped += 1
            if self._dropped in (1, 100) or self._dropped % 10_000 == 0:
                log.warning(
                    "event log unreachable: %d events dropped so far (outbox of %d full)",
                    self._dropped, OUTBOX,
                )  # fmt: skip
        self._out.append((event.type, event.session_id, orjson.dumps(event.data)))
        if not self._sending and self._retry is None:
            self._batch.kick()

    def _take(self) -> tuple[Any, list[Any], asyncio.Future[Any]] | None:
        """The batch's source: one PUBLISH of what the outbox holds (BATCH at most)."""
        if self._sending or self._retry is not None or not self._out:
            return None
        n = min(BATCH, len(self._out))
        args: list[Any] = [self._p, self._history]
        for i in range(n):
            args += self._out[i]
        self._sending = n
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(self._sent)
        return self._publish, args, fut

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        n, self._sending = self._sending, 0
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:  # Redis away: keep them queued, try again
            log.warning("event log: %d events not sent yet: %s", len(self._out), exc)
            self._retry = asyncio.get_running_loop().call_later(0.5, self._again)
            return
        for _ in range(n):
            self._out.popleft()
        if self._out:
            self._batch.kick()

    def _again(self) -> None:
        self._retry = None
        self._batch.kick()

    async def flush(self) -> None:
        """Wait until everything published so far is in the stream (tests, shutdown)."""
        for _ in range(200):
            if not self._out:
                return
            if self._retry is None:
                self._batch.kick()
            await asyncio.sleep(0.01)

    # -- delivering --------------------------------------------------------------------------

    async def _reader(self) -> None:
        """Read the log while this replica has subscribers; idle otherwise (reading
        every event for nobody costs CPU on every request)."""
        while not self._closing:
            if not self._subs:
                self._idle = True
                await self._wanted.wait()
                self._wanted.clear()
                continue
            try:
                got = await self._r.xread({self._stream: self._pos}, count=512, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event log: cannot read (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for _, entries in got or ():
                for entry_id, fields in entries:
                    self._pos = entry_id.decode()
                    if self._subs:
                        self._deliver(decode(entry_id, fields))

    async def subscribe(
        self, sessions: Collection[str], types: Collection[str], last_event_id: int | None
    ) -> tuple[Subscription, list[Event]]:
        """Live events from now on, and those after ``last_event_id`` still in the
        stream. Registered before the backlog is read, and the backlog ends where live
        delivery began, so nothing is missed or sent twice."""
        if self._idle:  # the reader was idle: it goes on from the log's end as it is now
            last = await self._r.xrevrange(self._stream, count=1)
            if self._idle:
                self._pos = last[0][0].decode() if last else "0-0"
                self._idle = False
                self._wanted.set()
        sub = self._add(sessions, types)
        until = self._pos
        backlog: list[Event] = []
        if last_event_id is not None and last_event_id < MAX_ID:  # a client's number
            after = max(last_event_id, 0)
            entries = await self._r.xrange(self._stream, f"({after}-0", until, count=self._history)
            backlog = [e for e in (decode(i, f) for i, f in entries) if sub.wants(e)]
        with contextlib.suppress(Exception):
            await self._announce()
        return sub, backlog

    async def claim(self, consumer: str, event: Event) -> bool:
        """The first replica to ask for this event id wins (kept an hour). Redis away:
        yes, so an alert may come twice rather than not at all."""
        try:
            got = await self._r.set(
                f"{self._p}claim:{consumer}:{event.id}", self._replica, nx=True, px=3_600_000
            )
        except Exception as exc:
            log.warning("event log: cannot claim event %d for %s (%s)", event.id, consumer, exc)
            return True
        return bool(got)

    # -- who listens -----------------------------------------------------------------------

    async def _announce(self) -> None:
        if self._subs:
            expiry = int(time.time() * 1000) + LISTENER_TTL_MS
            await self._r.zadd(self._p + "listeners", {self._replica: expiry})

    async def _refresh_listening(self) -> None:
        now = int(time.time() * 1000)
        key = self._p + "listeners"
        pipe = self._r.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zcard(key)
        _, n = await pipe.execute()
        self._elsewhere = bool(n)
        self.listening = bool(n) or bool(self._subs)

    async def _listeners(self) -> None:
        """Announce this replica's subscribers every second and learn whether any
        replica has one (``listening``). Expiry uses this host's clock; replicas' clocks
        only need to agree within a few seconds for this hint."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._announce()
                await self._refresh_listening()
            except Exception as exc:
                log.debug("listeners: %s", exc)

    async def close(self) -> None:
        """Send what is queued (briefly), stop the tasks and end every local stream."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2)
        if self._retry is not None:
            self._retry.cancel()
        # The reader ends by itself within its 1 s block: cancelling redis-py in the
        # middle of a blocking read can leave the close waiting on its connection.
        self._closing = True
        self._wanted.set()
        if self._read_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._read_task), 3)
            self._tasks.append(self._read_task)
            self._read_task = None
        await stop_tasks(self._tasks)
        self._drop_all()
        with contextlib.suppress(Exception):
            await self._r.zrem(self._p + "listeners", self._replica)
