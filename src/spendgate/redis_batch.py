"""Script calls of concurrent requests sent to Redis together (docs/reference.md §6
"Several replicas").

Each admission and settle is one Lua script, atomic on its own; the cost per request
is mostly redis-py's per call work (pool checkout under a condition, a write, a read,
release). Calls made while the event loop runs one round are queued and sent as one
non-transactional pipeline on the next round: one checkout, one write and one read for
the lot. Each script stays its own atomic step (a pipeline is not a transaction), so
no guarantee changes; a retried pipeline resends scripts that are idempotent by their
ids. A lone call goes the usual way (a pipeline of one costs more). The event log's
``PUBLISH`` script (:mod:`spendgate.redis_bus`) uses the ledger's batch on a shared client.
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_BATCH = 128
"""Script calls per pipeline at most (bounds one write and one reply)."""


class ScriptBatch:
    """Queues ``(script, args)`` calls made in one loop round and sends them together."""

    def __init__(self, client: Any) -> None:
        self._r = client
        self._queue: list[tuple[Any, list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, script: Any, args: list[Any]) -> Any:
        """The script's reply, or the error Redis or the connection gave."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, args, fut))
        if len(self._queue) == 1:  # the first of this round schedules the send
            task = asyncio.ensure_future(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # one more round: calls made by tasks woken with ours join
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            if len(batch) == 1:
                script, args, fut = batch[0]
                await self._one(script, args, fut)
                continue
            await self._many(batch)

    @staticmethod
    async def _one(script: Any, args: list[Any], fut: asyncio.Future[Any]) -> None:
        try:
            got = await script(args=args)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(got)

    async def _many(self, batch: list[tuple[Any, list[Any], asyncio.Future[Any]]]) -> None:
        from redis.exceptions import NoScriptError

        pipe = self._r.pipeline(transaction=False)
        for script, args, _ in batch:
            pipe.evalsha(script.sha, 0, *args)  # EVALSHA directly: no SCRIPT EXISTS first
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every caller gets its error
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (script, args, fut), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, ask again
                await self._one(script, args, fut)
            elif fut.done():
                continue
            elif isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
