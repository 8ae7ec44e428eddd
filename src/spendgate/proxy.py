"""The catch-all forwarding handler (docs/reference.md §1): it speaks HTTP and asks a
per-request meter.

Route and session come from :mod:`routing`, request facts from the adapter, header
rules from :mod:`forwarding`, and everything that counts, prices, budgets, stores,
publishes or measures from the request's :class:`~spendgate.meter.Meter`, which is
closed in ``finally`` so client hang-ups and upstream failures are billed and recorded
like any other response. This module writes no metric and touches no parser or ledger.
A WebSocket handshake (a ``GET`` with ``Upgrade: websocket``) goes to
:mod:`spendgate.websocket` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from spendgate import access_log, response_headers
from spendgate.accounting import Accountant
from spendgate.budgets import Refusal
from spendgate.errors import error_response, stream_error_bytes
from spendgate.forwarding import (
    client_headers,
    key_fingerprint,
    redact,
    request_secrets,
    upstream_headers,
)
from spendgate.meter import Meter
from spendgate.providers import get_adapter
from spendgate.records import MessageRecord
from spendgate.routing import Router, RoutingError
from spendgate.settings import Settings
from spendgate.websocket import WebSocketRelay

RETRY_AFTER_S = "1"
"""Retry-After of a 429 for held headroom: the request already waited
``admission_wait_s``, so a retry soon is the right advice (it waits again)."""

WHOLE_BODY_BYTES = 8 << 20
"""A non-streamed response up to this size (and of known length) is read whole."""


class IdleWatch:
    """Ends a streamed response whose upstream has sent nothing for ``idle`` seconds.

    aiohttp's ``sock_read`` timeout cancels and re-arms a timer on every read, two timer
    operations for each streamed chunk. This looks at the response's byte count a few
    times per ``idle`` instead and closes the response after a whole ``idle`` without
    progress, so it fires between ``idle`` and 1.25 × ``idle`` of silence.
    """

    CHECKS = 4
    __slots__ = ("_handle", "_loop", "_period", "_quiet", "_seen", "_up", "fired")

    def __init__(self, up: aiohttp.ClientResponse, idle: float) -> None:
        # aiohttp's own read timeout bounded the wait for the headers; from here on
        # this watch does the job, so switch that one off (if this aiohttp allows it).
        protocol = up.connection.protocol if up.connection is not None else None
        if protocol is not None and hasattr(protocol, "read_timeout"):
            protocol.read_timeout = None
        self._up = up
        self._loop = asyncio.get_running_loop()
        self._period = idle / self.CHECKS
        self._seen = up.content.total_bytes
        self._quiet = 0
        self.fired = False
        self._handle = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        total = self._up.content.total_bytes
        if total != self._seen:
            self._seen, self._quiet = total, 0
        else:
            self._quiet += 1
            if self._quiet >= self.CHECKS:
                self.fired = True
                self._up.close()  # the pending read ends; check() tells why
                return
        self._handle = self._loop.call_later(self._period, self._tick)

    def check(self) -> None:
        """After the body ended: raise if it ended because the upstream went silent."""
        if self.fired:
            raise TimeoutError("the upstream sent nothing for too long")

    def cancel(self) -> None:
        self._handle.cancel()


class ProxyHandler:
    """The catch-all route's handler.

    It exists when the routes are registered; the parts that need the event loop (the
    accountant and its store, the upstream client) are attached at startup, so
    :meth:`handle` is the route handler itself: no wrapper coroutine on the hot path.
    """

    router: Router
    acct: Accountant
    client: aiohttp.ClientSession
    sockets: WebSocketRelay

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cut = settings.on_budget_mid_stream == "cut"
        self._timeout = aiohttp.ClientTimeout(
            total=settings.upstream_total_timeout_s,
            connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_idle_timeout_s,
        )
        self._idle = settings.upstream_idle_timeout_s
        self._headers = settings.response_headers
        self._extras = settings.response_headers or settings.access_log
        """Anything to do with the row after the meter closed (off by default: then
        nothing at all, docs/reference.md §1 "Access log", "Response headers")."""

    def attach(self, router: Router, accountant: Accountant, client: aiohttp.ClientSession) -> None:
        self.router = router
        self.acct = accountant
        self.client = client
        self.sockets = WebSocketRelay(self.settings, accountant, client, _refuse)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            target = self.router.resolve(request.rel_url.raw_path, request.headers, request.method)
        except RoutingError as exc:
            return error_response(_style(exc.adapter), 400, exc.message, "invalid_request_error")
        if request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.sockets.relay(request, target)  # docs/reference.md §1 "WebSocket"
        adapter = get_adapter(target.route.adapter)
        limit = self.settings.max_request_bytes
        length = request.content_length
        try:
            if length is not None and length > limit:
                raise web.HTTPRequestEntityTooLarge(limit, length)
            body = await request.read()  # bounded: the app's client_max_size is the same limit
        except web.HTTPRequestEntityTooLarge:
            msg = f"request body exceeds max_request_bytes ({limit})"
            return error_response(adapter.error_style, 413, msg, "request_too_large")
        info = adapter.inspect(
            request.method,
            target.path,
            request.rel_url.query,
            body,
            inject_stream_usage=self.settings.inject_stream_usage,
        )
        fingerprint = key_fingerprint(request.headers, request.rel_url.query)
        meter = Meter(self.acct, adapter, target, info, fingerprint, self._cut)
        refusal = await meter.admit()
        if refusal is not None:
            return _refuse(meter.error_style, refusal)
        resp: web.StreamResponse | None = None
        try:
            resp = await self._forward(request, meter, info.body or body)
            return resp
        except asyncio.CancelledError:
            meter.client_left()  # aiohttp cancelled this handler
            raise
        finally:
            rec = await meter.close()
            if self._extras:
                self._with_row(request, resp, rec)

    def _with_row(
        self, request: web.Request, resp: web.StreamResponse | None, rec: MessageRecord
    ) -> None:
        """What the optional settings make of the closed meter's row: the headers of a
        response not sent yet, and the access log line."""
        if self._headers and resp is not None and not resp.prepared:
            response_headers.add_row(resp, rec)
        if self.settings.access_log:
            access_log.write(request.method, rec)

    def _upstream_error(
        self, request: web.Request, meter: Meter, status: int, kind: str, msg: str
    ) -> web.Response:
        """Nothing reached the client yet: answer with our own 502 or 504 (its text, like
        the log line, redacted: aiohttp's exception texts include the URL and its query)."""
        msg = _redacted(request, meter, msg)
        meter.upstream_failed(kind, msg, status)
        if request.transport is None or request.transport.is_closing():
            meter.client_left()  # the client gave up while we waited for the upstream
        return error_response(meter.error_style, status, msg, "upstream_error")

    async def _forward(self, request: web.Request, meter: Meter, body: bytes) -> web.StreamResponse:
        """``body``: the adapter's rewrite, else the client's bytes."""
        route, info = meter.target.route, meter.info
        url = route.upstream + meter.target.path
        qs = request.rel_url.raw_query_string
        if qs:
            url += "?" + qs
        headers = upstream_headers(request.headers, info.strip_usage_chunk, route.headers)
        try:
            up = await self.client.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except TimeoutError:
            return self._upstream_error(
                request, meter, 504, "timeout", f"upstream {route.upstream} did not answer in time"
            )
        except aiohttp.ClientConnectorError as exc:
            return self._upstream_error(
                request, meter, 502, "connect", f"upstream {route.upstream} is unreachable: {exc}"
            )
        except aiohttp.ClientError as exc:
            return self._upstream_error(
                request, meter, 502, "reset",
                f"upstream {route.upstream} closed the connection before answering: {exc}",
            )  # fmt: skip
        async with up:
            meter.response_started(up.status, up.headers)
            length = up.content_length
            if not info.stream and length is not None and length <= WHOLE_BODY_BYTES:
                return await self._whole(request, meter, up)
            head = b""
            held = self._headers and length is None and not meter.streamed
            if held and response_headers.holdable(up.headers.get("Content-Type", "")):
                try:  # held to price it for X-Spendgate-Cost-Usd, bounded as above
                    head, whole = await _read_upto(up.content, WHOLE_BODY_BYTES)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return self._broken_whole(request, meter, exc)
                if whole:
                    return self._whole_response(meter, up, head)
            watch = IdleWatch(up, self._idle)
            try:
                return await self._stream(request, meter, up, watch, head)
            finally:
                watch.cancel()

    async def _whole(
        self, request: web.Request, meter: Meter, up: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """A body of known, bounded size (a JSON answer): read whole, parsed once, sent with
        the headers in one write. If the upstream breaks off or goes silent, nothing has
        gone to the client yet, so it gets a clean 502 or 504 instead of a truncated body.
        aiohttp sends it after ``handle`` returns, so after ``meter.close()`` has queued
        and journaled the row (docs/reference.md §5 "Durability")."""
        try:
            body = await up.read()  # aiohttp's sock_read bounds the silence
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._broken_whole(request, meter, exc)
        return self._whole_response(meter, up, body)

    def _broken_whole(
        self, request: web.Request, meter: Meter, exc: aiohttp.ClientError | TimeoutError
    ) -> web.Response:
        upstream = meter.target.route.upstream
        if isinstance(exc, TimeoutError):
            msg = f"upstream {upstream} went silent for {self._idle:g} s mid-response"
            return self._upstream_error(request, meter, 504, "timeout", msg)
        msg = f"upstream {upstream} broke off its response: {exc}"
        return self._upstream_error(request, meter, 502, "reset", msg)

    def _whole_response(
        self, meter: Meter, up: aiohttp.ClientResponse, body: bytes
    ) -> web.Response:
        meter.whole(body, up.headers.get("Content-Encoding", ""))
        return web.Response(
            status=up.status,
            reason=up.reason,
            body=body,
            headers=client_headers(up.headers, keep_length=False),  # aiohttp sets the length
        )

    async def _stream(
        self,
        request: web.Request,
        meter: Meter,
        up: aiohttp.ClientResponse,
        watch: IdleWatch,
        head: bytes = b"",
    ) -> web.StreamResponse:
        """Each piece goes to the client as it arrives, then to the meter. ``head``: the
        start of the body, already read while it was held (``_read_upto``)."""
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        resp.headers.extend(client_headers(up.headers, keep_length=meter.keeps_length))
        if self._headers:
            response_headers.add_id(resp, meter.id)
        await resp.prepare(request)
        # Per chunk, only local names: this loop runs for every piece of every stream.
        write, outgoing, feed = resp.write, meter.outgoing, meter.feed
        chunks = up.content.iter_any() if not head else _after(head, up.content)
        try:
            async for chunk in chunks:
                out = outgoing(chunk)
                if out:
                    await write(out)
                if feed(chunk):  # over budget: this was the last event the client gets
                    await _finish(resp, meter, meter.cut())
                    if meter.cut_short and request.transport is not None:
                        request.transport.close()  # no boundary: it must look cut short
                    return resp
            watch.check()
            await _finish(resp, meter, meter.body_ended())
        except (ConnectionError, asyncio.CancelledError) as exc:
            meter.client_left()  # bill what was streamed
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = "timeout" if watch.fired or isinstance(exc, TimeoutError) else "reset"
            meter.upstream_failed(kind, _redacted(request, meter, str(exc)))
            await _end_broken(request, meter, resp, up.headers.get("Content-Type", ""))
        return resp


async def _read_upto(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to just past ``limit`` bytes of a body, and whether that was all of it."""
    parts: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), False
    return b"".join(parts), True


async def _after(head: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """``head``, then the rest of the body as it arrives."""
    yield head
    async for chunk in content.iter_any():
        yield chunk


async def _finish(resp: web.StreamResponse, meter: Meter, last: bytes) -> None:
    """Write the last bytes; a client gone by now is a hang-up. aiohttp ends the response
    after ``handle`` returns, so the end reaches the client after ``meter.close()`` has
    queued and journaled the row (docs/reference.md §5 "Durability")."""
    try:
        if last:
            await resp.write(last)
    except ConnectionError:
        meter.client_left()


async def _end_broken(
    request: web.Request, meter: Meter, resp: web.StreamResponse, ctype: str
) -> None:
    """The upstream broke after headers went out: say so in-band, or cut the connection."""
    if "event-stream" in ctype or "ndjson" in ctype:
        msg = redact(f"spendgate: upstream {meter.target.route.upstream} broke mid-response")
        await _finish(
            resp, meter, stream_error_bytes(meter.error_style, 502, msg, "upstream_error")
        )
    elif request.transport is not None:
        request.transport.close()  # a JSON body cut short must look cut short


def _redacted(request: web.Request, meter: Meter, text: str) -> str:
    """A text about an upstream failure with no key in it: the request's own keys (headers
    and query) and the route's configured ones wherever they occur, and every key-shaped
    value (docs/reference.md §1 "API keys")."""
    route_headers = dict(meter.target.route.headers)
    secrets = request_secrets(request.headers, request.rel_url.query, route_headers)
    return redact(text, secrets)


def _refuse(style: str, refusal: Refusal) -> web.Response:
    """A refusal in the provider's error shape: a 402 the SDKs do not retry, or a 429
    (headroom held by in-flight requests) they retry after ``Retry-After``."""
    budget = "" if refusal.budget_usd is None else f"{refusal.budget_usd:.6f}"
    headers = {
        "X-Spendgate-Session": refusal.session_id,
        "X-Spendgate-Budget-Scope": refusal.scope,
        "X-Spendgate-Budget-Usd": budget,
        "X-Spendgate-Spent-Usd": f"{refusal.spent_usd:.6f}",
        "x-should-retry": "true" if refusal.retry else "false",
    }
    if refusal.retry:
        headers["Retry-After"] = RETRY_AFTER_S
    kind = {429: "budget_reserved", 503: "ledger_unavailable"}.get(
        refusal.status, "budget_exceeded"
    )
    return error_response(style, refusal.status, refusal.message(), kind, refusal.code, headers)


def _style(adapter_name: str) -> str:
    try:
        return get_adapter(adapter_name).error_style
    except KeyError:
        return "openai"
