"""A small real SSE client for /api/events, reading over a live HTTP connection."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from spendgate.providers._sse_decoder import SSEDecoder


@dataclass
class Received:
    id: int | None
    type: str
    data: dict[str, Any]


class EventsClient:
    def __init__(
        self, http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
    ) -> None:
        self.http, self.url, self.headers = http, url, headers or {}
        self.events: list[Received] = []
        self.comments = 0
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.ended = asyncio.Event()

    async def __aenter__(self) -> EventsClient:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with self.http.get(self.url, headers=self.headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                self._connected.set()
                self.comments += chunk.count(b"\n:") + chunk.startswith(b":")
                for ev in decoder.feed(chunk):
                    evid = int(ev.id) if ev.id else None
                    self.events.append(Received(evid, ev.event, orjson.loads(ev.data)))
        self.ended.set()

    async def wait_for(self, pred: Any, timeout: float = 5.0) -> Received:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for ev in self.events:
                if pred(ev):
                    return ev
            if loop.time() > deadline:
                raise AssertionError(
                    f"no matching event in {[(e.type, e.data) for e in self.events]}"
                )
            await asyncio.sleep(0.01)
