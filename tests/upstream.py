"""A real fake upstream: an aiohttp app on a random loopback port that replays scripts.

Each incoming request takes the next scripted :class:`Reply` (or the default one) and
is recorded, so tests can assert exactly what spendgate forwarded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.paths import FIXTURES


@dataclass
class Reply:
    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Pause before each chunk (lets live events and hang-ups happen mid-stream)."""
    hang: float = 0.0
    """Sleep this long before answering at all (timeouts)."""
    reset_after: int | None = None
    """Drop the connection after this many chunks (a broken upstream)."""
    drop: bool = False
    """Reset the connection before sending any header."""
    stall_after: int | None = None
    """Go silent for ``hang`` seconds after this many chunks (a stuck upstream)."""


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def fixture_reply(name: str, chunk_size: int = 64, delay: float = 0.0, status: int = 200) -> Reply:
    data = (FIXTURES / name).read_bytes()
    ctype = "application/json"
    if name.endswith(".sse"):
        ctype = "text/event-stream"
    elif name.endswith(".ndjson"):
        ctype = "application/x-ndjson"
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    return Reply(status=status, chunks=chunks, content_type=ctype, delay=delay)


def chat_completion(model: str, prompt: int = 1000, output: int = 100) -> dict[str, Any]:
    """A minimal OpenAI chat completion with its usage, for a :func:`json_reply`."""
    return {
        "id": "c", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                  "total_tokens": prompt + output},
    }  # fmt: skip


def json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply(status=status, chunks=[orjson.dumps(payload)])


def sse_reply(events: list[Any], delay: float = 0.0, done: bool = True) -> Reply:
    chunks = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events]
    if done:
        chunks.append(b"data: [DONE]\n\n")
    return Reply(chunks=chunks, content_type="text/event-stream", delay=delay)


class FakeUpstream:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default: Reply | None = None
        self.seen: list[Seen] = []
        self.gate: asyncio.Event | None = None
        """When set, every reply waits for it (to hold requests in flight)."""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                CIMultiDict(request.headers),
                body,
            )
        )
        if self.gate is not None:
            await self.gate.wait()
        reply = self.replies.popleft() if self.replies else self.default
        if reply is None:
            return web.json_response({"error": "no scripted reply"}, status=599)
        if reply.drop:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if reply.hang and reply.stall_after is None:
            await asyncio.sleep(reply.hang)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        resp.content_type = reply.content_type
        await resp.prepare(request)
        for i, chunk in enumerate(reply.chunks):
            if reply.reset_after is not None and i >= reply.reset_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if reply.stall_after == i:
                await asyncio.sleep(reply.hang)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            await resp.write(chunk)
        await resp.write_eof()
        return resp
