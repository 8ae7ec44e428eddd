"""``GET /api/events``: the live event stream (docs/reference.md §7).

Filters by session and type, replays from ``Last-Event-ID``, sends a keep-alive
comment every 15 s, and ends when the bus drops this subscriber for being slow.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from spendgate.events import EVENT_TYPES
from spendgate.keys import BUS

KEEPALIVE_S = 15.0
POLL_S = 1.0


async def events(request: web.Request) -> web.StreamResponse:
    bus = request.app[BUS]
    sessions = request.query.getall("session", [])
    types = [t for v in request.query.getall("types", []) for t in v.split(",") if t]
    unknown = set(types) - set(EVENT_TYPES)
    if unknown:
        raise web.HTTPBadRequest(
            text=f"unknown event types {sorted(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    last = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    try:
        last_id = int(last) if last else None
    except ValueError:
        last_id = None
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    sub, backlog = await bus.subscribe(sessions, types, last_id)
    try:
        await resp.write(b"retry: 1000\n: connected\n\n" + b"".join(e.encoded() for e in backlog))
        quiet = 0.0
        while True:
            try:
                async with asyncio.timeout(POLL_S):
                    event = await sub.get()
            except TimeoutError:
                # Notice a client that left (its transport is gone) within a second,
                # rather than at the next write; keep-alive every KEEPALIVE_S.
                if request.transport is None or request.transport.is_closing():
                    break
                quiet += POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    await resp.write(b": keep-alive\n\n")
                continue
            quiet = 0.0
            batch = []
            while event is not None:  # send everything queued in one write
                batch.append(event.encoded())
                if sub.queue.empty():
                    break
                event = sub.queue.get_nowait()
            if batch:
                await resp.write(b"".join(batch))
            if event is None:  # dropped for being slow: end, the client reconnects
                break
        await resp.write_eof()
    except ConnectionError:
        pass  # the subscriber went away
    finally:
        bus.unsubscribe(sub)
    return resp
