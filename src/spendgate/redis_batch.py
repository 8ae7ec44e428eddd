"""Script calls of concurrent requests sent to Redis together (docs/reference.md §6
"Several replicas").

Each admission and settle is one Lua script, atomic on its own; what it costs the proxy
is mostly the trip, not the script: a write and a read on a loopback socket (a
syscall each, the kernel's TCP work included) and redis-py's per call path around them
(pool check-out, a timeout task, per-argument encoding in Python). So the calls go
through one connection of their own, one batch in flight at a time: calls made while a
batch is out wait for it and go in the next one, which makes the batches as large as
the load (self-clocking, like Nagle's algorithm: one round trip of delay at most) and
the trips per request few. Each batch is one write of ``EVALSHA`` commands packed by
hiredis (C) and one timeout for all its replies.

Each script stays its own atomic step (a batch is not a transaction), so no guarantee
changes; a batch resent after a connection error (the pool's retry policy) only repeats
scripts that are idempotent by their ids. An error reply stays with its call; NOSCRIPT
(Redis restarted) loads the script and asks again. The event log's ``PUBLISH`` script
(:mod:`spendgate.redis_bus`) uses the ledger's batch on a shared client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

MAX_BATCH = 128
"""Script calls per batch at most (bounds one write and its replies)."""
TIMEOUT_S = 5.0
"""One batch's write and replies, at most (the pool's socket timeout)."""

_Call = tuple[Any, Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatch:
    """Sends ``(script, args)`` calls over one connection, one batch in flight."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._queue: list[_Call] = []
        self._sources: list[Callable[[], _Call | None]] = []
        self._sending = False
        self._conn: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._queued = 0
        self._answered = 0
        self._barriers: list[tuple[int, asyncio.Future[None]]] = []
        """Readers waiting for the calls queued before them (``answered``)."""

    async def run(self, script: Any, args: Sequence[Any]) -> Any:
        """The script's reply, or the error Redis or the connection gave."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, args, fut))
        self._queued += 1
        self.kick()
        return await fut

    async def answered(self) -> None:
        """Wait until every call queued before this has its reply or error, so a read that
        goes to Redis another way sees what those calls wrote (read-your-writes)."""
        if self._answered >= self._queued:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers.append((self._queued, fut))
        await fut

    def add_source(self, take: Callable[[], _Call | None]) -> None:
        """``take`` is asked for one more call each time a batch is made (None: nothing
        now); its future settles as a ``run`` call's would. The event log's outbox rides
        along this way, with no task of its own to wake per event."""
        self._sources.append(take)

    def kick(self) -> None:
        """Make a batch soon: a call was queued or a source has something."""
        if not self._sending:  # else the batch in flight takes this one next
            self._sending = True
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Drop the batch's connection (the client's pool does not own it)."""
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect()
            self._conn = None

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # one more round: calls made by tasks woken with ours join
            while True:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                for take in self._sources:
                    call = take()
                    if call is not None:
                        batch.append(call)
                        self._queued += 1
                if not batch:
                    return
                await self._send(batch)
                self._answered += len(batch)
                if self._barriers:
                    self._release_barriers()
        finally:
            self._sending = False
            for _, fut in self._barriers:  # nothing is outstanding now (or it was cancelled)
                if not fut.done():
                    fut.set_result(None)
            self._barriers = []

    def _release_barriers(self) -> None:
        waiting = []
        for upto, fut in self._barriers:
            if upto > self._answered:
                waiting.append((upto, fut))
            elif not fut.done():
                fut.set_result(None)
        self._barriers = waiting

    def _connection(self) -> Any:
        if self._conn is None:
            pool = self._r.connection_pool
            # Its own timeout covers a whole batch, so the connection has none per read
            # (redis-py's per-read timeout is a context, its per-write one a task).
            kwargs = {**pool.connection_kwargs, "socket_timeout": None}
            self._conn = pool.connection_class(**kwargs)
        return self._conn

    async def _send(self, batch: list[_Call]) -> None:
        conn = self._connection()
        pack = hiredis.pack_command
        packed = b"".join(pack((b"EVALSHA", s.sha, b"0", *a)) for s, a, _ in batch)

        async def exchange() -> list[Any]:
            replies: list[Any] = []
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    await conn.send_packed_command(packed)
                    for _ in batch:
                        try:
                            replies.append(await conn.read_response())
                        except ResponseError as exc:  # read whole: the stream stays in step
                            replies.append(exc)
            except TimeoutError:
                await conn.disconnect(nowait=True)
                raise RedisTimeout(f"no reply from Redis within {TIMEOUT_S:g} s") from None
            return replies

        async def failed(_: BaseException) -> None:
            await conn.disconnect(nowait=True)

        try:
            replies = await conn.retry.call_with_retry(exchange, failed)
        except Exception as exc:  # the connection failed: every caller gets its error
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (script, args, fut), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, ask again
                await self._again(script, args, fut)
            elif fut.done():
                continue
            elif isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    @staticmethod
    async def _again(script: Any, args: Sequence[Any], fut: asyncio.Future[Any]) -> None:
        try:
            got = await script(args=list(args))  # redis-py's: loads it on NOSCRIPT
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(got)
