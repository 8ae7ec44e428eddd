"""The WebSocket relay, and the metering of the Responses API over it
(docs/reference.md §1 "WebSocket").

The proxy hands every ``GET`` with ``Upgrade: websocket`` here. The handshake goes to
the route's upstream (``ws://`` or ``wss://``) with the client's end-to-end headers and
subprotocols; then one :class:`Socket` relays messages both ways unchanged (text,
binary, ping, pong, close code and reason) until either side closes, and closes the
other.

On a Responses API socket (a path the adapter classifies as ``responses``) each
``response.create`` the client sends is one message with its own
:class:`SocketMeter`, admitted like an HTTP request (a refusal goes back as the API's
``error`` event and the message is not forwarded). The upstream's events go, in order,
to the response they belong to (:meth:`Socket._attribute`), and its
``response.completed`` / ``incomplete`` / ``failed`` ends it: one row per response,
``transport`` ``websocket``. Any other socket (the Realtime API, other routes) is
relayed unmetered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, NamedTuple

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from spendgate.accounting import Accountant
from spendgate.budgets import Refusal
from spendgate.errors import error_payload, error_response
from spendgate.forwarding import (
    client_headers,
    key_fingerprint,
    redact,
    request_secrets,
    upstream_headers,
)
from spendgate.meter import Meter
from spendgate.providers import get_adapter
from spendgate.providers._api import Adapter
from spendgate.routing import Target
from spendgate.settings import Settings

log = logging.getLogger("spendgate.proxy")

METERED_OPERATIONS = frozenset({"responses"})
"""Operations whose sockets are metered: the Responses API's ``response.create`` and
events. The Realtime API's ``/v1/realtime`` is relayed unmetered (§1 "WebSocket")."""
UPSTREAM_MAX_MESSAGE_BYTES = 64 << 20
"""The largest message taken from an upstream: a ``response.completed`` repeats the whole
output (images included, base64), so well above aiohttp's 4 MiB default."""
CLOSE_TIMEOUT_S = 5.0
"""How long a closing side may take to answer our close frame."""
ERROR_BODY_BYTES = 1 << 20
"""At most this much of a refused handshake's body is passed on."""
IDLE_CHECKS = 4
"""The idle watch looks this many times per ``upstream_idle_timeout_s`` (as the HTTP one)."""
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""The events that end a response and carry its final usage."""
_NOT_FORWARDED = ("sec-websocket-",)
"""The handshake's own headers: aiohttp's client makes its own key, version, extensions
and subprotocol list (from the client's)."""
_SSE = {"Content-Type": "text/event-stream"}
"""What a meter is told a socket's response is: a stream of events, metered live."""

Refuse = Callable[[str, Refusal], web.Response]
"""The proxy's rendering of a budget refusal (one definition, in :mod:`spendgate.proxy`)."""


class SocketMeter(Meter):
    """A meter for one ``response.create`` on a WebSocket (the row's ``transport``)."""

    __slots__ = ()
    transport = "websocket"


class End(NamedTuple):
    """How one side of a socket ended."""

    side: str
    """``client``, ``upstream``, ``idle`` (the upstream went silent mid-response) or
    ``cut`` (a response used up its budget, with ``on_budget_mid_stream = "cut"``)."""
    code: int | None = None
    """The close code it sent; None if it vanished without one."""
    reason: str = ""


class WebSocketRelay:
    """The handshakes; one :class:`Socket` per connection does the rest."""

    def __init__(
        self, settings: Settings, acct: Accountant, client: aiohttp.ClientSession, refuse: Refuse
    ) -> None:
        self.settings = settings
        self.acct = acct
        self.client = client
        self.refuse = refuse
        self.cut = settings.on_budget_mid_stream == "cut"
        self._unmetered_logged: set[str] = set()

    async def relay(self, request: web.Request, target: Target) -> web.StreamResponse:
        adapter = get_adapter(target.route.adapter)
        style = adapter.error_style
        if not web.WebSocketResponse().can_prepare(request).ok:
            msg = "not a valid WebSocket handshake (Sec-WebSocket-Key and Version 13 needed)"
            return error_response(style, 400, msg, "invalid_request_error")
        refusal = await self._paused(target)
        if refusal is not None:
            rejections = self.acct.metrics.budget_rejections
            rejections.labels(target.route.name, refusal.code).inc()
            return self.refuse(style, refusal)
        query = request.rel_url.query
        probe = adapter.inspect("POST", target.path, query, b"{}", inject_stream_usage=False)
        metered = probe.operation in METERED_OPERATIONS
        if not metered:
            self._log_unmetered(target)
        up = await self._connect(request, target, style)
        if isinstance(up, web.StreamResponse):
            return up  # refused or failed: the answer the client gets
        try:
            ws = web.WebSocketResponse(
                protocols=(up.protocol,) if up.protocol else (),
                autoclose=False,
                autoping=False,
                max_msg_size=self.settings.max_request_bytes,
                timeout=CLOSE_TIMEOUT_S,
            )
            # aiohttp keeps the upstream's 101 in the (otherwise private) _response and
            # offers no accessor: its end-to-end headers (Codex reads x-codex-turn-state,
            # x-models-etag, openai-model there) go to the client's 101, the handshake's
            # own ones do not.
            for name, value in client_headers(up._response.headers, keep_length=False):
                if not name.lower().startswith(_NOT_FORWARDED):
                    ws.headers.add(name, value)
            try:
                await ws.prepare(request)
            except (ConnectionError, web.HTTPException):
                return ws  # the client left during the handshake
            fingerprint = key_fingerprint(request.headers, query)
            await Socket(self, ws, up, adapter, target, query, fingerprint, metered).run()
            return ws
        finally:
            with contextlib.suppress(Exception):
                await up.close(code=WSCloseCode.GOING_AWAY)  # a no-op once closed

    async def _connect(
        self, request: web.Request, target: Target, style: str
    ) -> aiohttp.ClientWebSocketResponse | web.StreamResponse:
        """The upstream's socket, or the answer the client gets instead: the upstream's
        refusal, or our own 502 / 504."""
        route = target.route
        url = route.upstream + target.path
        if request.rel_url.raw_query_string:
            url += "?" + request.rel_url.raw_query_string
        headers = [
            (k, v)
            for k, v in upstream_headers(request.headers, False, route.headers)
            if not k.lower().startswith(_NOT_FORWARDED)
        ]
        protocols = _protocols(request.headers.get("Sec-WebSocket-Protocol", ""))
        deflate = "permessage-deflate" in request.headers.get("Sec-WebSocket-Extensions", "")
        settings = self.settings
        try:
            async with asyncio.timeout(
                settings.upstream_connect_timeout_s + settings.upstream_idle_timeout_s
            ):
                return await self.client.ws_connect(
                    URL(_ws_url(url), encoded=True),
                    protocols=protocols,
                    headers=headers,
                    autoclose=False,
                    autoping=False,
                    compress=15 if deflate else 0,
                    max_msg_size=UPSTREAM_MAX_MESSAGE_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S),
                )
        except aiohttp.WSServerHandshakeError as exc:
            return await self._refused(url, headers, protocols, exc, style)
        except (aiohttp.ClientError, TimeoutError) as exc:
            timeout = isinstance(exc, TimeoutError)
            kind = "timeout" if timeout else "connect"
            self.acct.upstream_failed(route.name, kind)
            what = "did not answer in time" if timeout else f"is unreachable: {exc}"
            msg = self._redacted(request, target, f"upstream {route.upstream} {what}")
            log.warning("WebSocket handshake %s for %s: %s", kind, route.name, msg)
            return error_response(style, 504 if timeout else 502, msg, "upstream_error")

    async def _paused(self, target: Target) -> Refusal | None:
        """A paused (or spent) session, agent or global budget refuses the handshake with
        its 402. Only for a session the ledger knows: a handshake makes no session (the
        first ``response.create`` does, and a refusal then comes as an event). Headroom
        held by in-flight requests (a 429) does not refuse a handshake."""
        ledger = self.acct.ledger
        sid, agent = target.session_id, target.agent_id
        if await ledger.snapshot(sid) is None:
            return None
        outcome, change = await ledger.admit(sid, agent, Decimal(0), 0.0)
        self.acct.apply(change)
        if isinstance(outcome, Refusal):
            return outcome if not outcome.retry else None
        self.acct.apply(await ledger.settle(outcome, None))
        return None

    async def _refused(
        self,
        url: str,
        headers: list[tuple[str, str]],
        protocols: tuple[str, ...],
        exc: aiohttp.WSServerHandshakeError,
        style: str,
    ) -> web.StreamResponse:
        """The upstream refused the handshake: the client gets its status, headers and
        body. aiohttp's client drops the body of a refusal, so the handshake is sent once
        more as a plain request to read it; if that one is not refused (or fails), the
        client gets the first refusal's status and headers with no body."""
        status = exc.status
        if status == 101:  # it switched protocols, but not as RFC 6455 says
            msg = f"upstream answered the WebSocket handshake wrongly: {exc.message}"
            return error_response(style, 502, msg, "upstream_error")
        again = [
            *headers,
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "c3BlbmRnYXRlLXJlZnVzYWw="),
        ]
        if protocols:
            again.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
        try:
            async with asyncio.timeout(
                self.settings.upstream_connect_timeout_s + self.settings.upstream_idle_timeout_s
            ):
                resp = await self.client.get(
                    URL(url, encoded=True), headers=again, allow_redirects=False
                )
                try:
                    if resp.status != 101:
                        body = bytearray()
                        async for piece in resp.content.iter_chunked(1 << 16):
                            body += piece[: ERROR_BODY_BYTES - len(body)]
                            if len(body) >= ERROR_BODY_BYTES:
                                break
                        return web.Response(
                            status=resp.status,
                            reason=resp.reason,
                            body=bytes(body),
                            headers=client_headers(resp.headers, keep_length=False),
                        )
                finally:
                    resp.close()  # never pooled: it may have switched protocols
        except (aiohttp.ClientError, TimeoutError):
            pass
        raw = CIMultiDictProxy(CIMultiDict(exc.headers or {}))
        return web.Response(status=status, headers=client_headers(raw, keep_length=False))

    def _log_unmetered(self, target: Target) -> None:
        route = target.route.name
        if route in self._unmetered_logged:
            return
        self._unmetered_logged.add(route)  # bounded: one entry per route
        log.info(
            "WebSocket on route %s (%s) is relayed unmetered: only the Responses API's "
            "sockets are metered (docs/reference.md §1 WebSocket)",
            route, target.path,
        )  # fmt: skip

    @staticmethod
    def _redacted(request: web.Request, target: Target, text: str) -> str:
        secrets = request_secrets(
            request.headers, request.rel_url.query, dict(target.route.headers)
        )
        return redact(text, secrets)


class Socket:
    """One relayed connection: two pumps, the idle watch, and the responses in flight."""

    def __init__(
        self,
        relay: WebSocketRelay,
        ws: web.WebSocketResponse,
        up: aiohttp.ClientWebSocketResponse,
        adapter: Adapter,
        target: Target,
        query: Mapping[str, str],
        fingerprint: str | None,
        metered: bool,
    ) -> None:
        self.relay = relay
        self.acct = relay.acct
        self.ws = ws
        self.up = up
        self.adapter = adapter
        self.target = target
        self.query = query
        self.fingerprint = fingerprint
        self.metered = metered
        self.pending: deque[SocketMeter] = deque()
        """Responses sent upstream and not ended yet, oldest first."""
        self.begun = False
        """The upstream has begun to answer the oldest of ``pending``."""
        self.frames = 0
        """Messages from the upstream so far (the idle watch looks at it)."""
        self._closing: set[asyncio.Task[Any]] = set()
        """Meters being closed: awaited before the handler returns."""
        self._cut_event: dict[str, Any] | None = None
        """The error event a budget cut sends last."""

    async def run(self) -> None:
        tasks = {
            asyncio.create_task(self._from_client()),
            asyncio.create_task(self._from_upstream()),
        }
        if self.metered:
            tasks.add(asyncio.create_task(self._watch()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done))
            exc = first.exception()
            if exc is None:
                end = first.result()
            else:  # a bug: end both sides cleanly, and say so
                log.error("WebSocket relay failed on %s", self.target.route.name, exc_info=exc)
                end = End("upstream")
            self._end_pending(end)  # billed now: closing may wait for a silent side
            await self._close(end)
        finally:
            # Cancelled before either side ended: aiohttp cancels the handler of a client
            # that left (with handler_cancellation), so it is the client's end.
            self._end_pending(End("client"))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.up.close(code=WSCloseCode.GOING_AWAY)
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the two directions ----------------------------------------------------------------

    async def _from_client(self) -> End:
        return await self._pump(self.ws, self.up, "client", self._client_text)

    async def _from_upstream(self) -> End:
        return await self._pump(self.up, self.ws, "upstream", self._upstream_text)

    async def _pump(
        self,
        src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        side: str,
        on_text: Callable[[str], Awaitable[End | None]],
    ) -> End:
        """Relay ``src``'s messages to ``dst`` until ``src`` ends (or ``dst`` fails under
        our write: then it is the other side that ended)."""
        count = src is self.up
        while True:
            msg = await src.receive()
            kind = msg.type
            if count:
                self.frames += 1
            try:
                if kind is WSMsgType.TEXT:
                    end = await on_text(msg.data)
                    if end is not None:
                        return end
                elif kind is WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif kind is WSMsgType.PING:
                    await dst.ping(msg.data)
                elif kind is WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif kind is WSMsgType.CLOSE:
                    return End(side, msg.data, msg.extra or "")
                else:  # CLOSING, CLOSED, ERROR: gone without a close frame, or too big
                    return End(side, WSCloseCode.MESSAGE_TOO_BIG if _too_big(msg) else None)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return End("upstream" if side == "client" else "client")

    async def _client_text(self, text: str) -> End | None:
        if not self.metered or await self._admitted(text):
            await self.up.send_str(text)
        return None

    async def _upstream_text(self, text: str) -> End | None:
        await self.ws.send_str(text)
        if self.pending and self._attribute(text):
            return End("cut", WSCloseCode.POLICY_VIOLATION, "spendgate: the budget ran out")
        return None

    async def _watch(self) -> End:
        """The upstream sent nothing for ``upstream_idle_timeout_s`` while a response was
        in flight (between 1× and 1.25× of it, as on HTTP). A socket waiting for the
        client's next ``response.create`` is not idle."""
        period = self.relay.settings.upstream_idle_timeout_s / IDLE_CHECKS
        seen, quiet = self.frames, 0
        while True:
            await asyncio.sleep(period)
            if not self.pending or self.frames != seen:
                seen, quiet = self.frames, 0
                continue
            quiet += 1
            if quiet >= IDLE_CHECKS:
                return End("idle", WSCloseCode.BAD_GATEWAY, "spendgate: the upstream went silent")

    async def _close(self, end: End) -> None:
        """Close the side that did not end, with the close code and reason of the one
        that did (or 1001 / 1014 when it vanished), and finish our side's handshake."""
        ws, up = self.ws, self.up
        if end.side == "client":
            code = _valid_code(end.code, WSCloseCode.GOING_AWAY)
            with contextlib.suppress(Exception):
                await up.close(code=code, message=end.reason.encode())
            with contextlib.suppress(Exception):
                await ws.close(code=_valid_code(up.close_code, code))
            return
        if end.side == "idle":
            await self._send_error(504, "upstream_timeout", end.reason)
        elif end.side == "cut" and self._cut_event is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(orjson.dumps(self._cut_event).decode())
        reason = end.reason if end.code is not None else "spendgate: upstream connection lost"
        code = _valid_code(end.code, WSCloseCode.BAD_GATEWAY)
        with contextlib.suppress(Exception):
            await ws.close(code=code, message=reason.encode())
        with contextlib.suppress(Exception):
            await up.close(code=_valid_code(ws.close_code, code))

    # -- metering ----------------------------------------------------------------------------

    async def _admitted(self, text: str) -> bool:
        """A client message: a ``response.create`` becomes a message, admitted against the
        budget (False: refused, the client got the error event instead); anything else
        passes unmetered."""
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict) or obj.get("type") != "response.create":
            return True
        body = orjson.dumps({k: v for k, v in obj.items() if k != "type"})
        info = self.adapter.inspect(
            "POST", self.target.path, self.query, body, inject_stream_usage=False
        )
        meter = SocketMeter(
            self.acct, self.adapter, self.target, info, self.fingerprint, self.relay.cut
        )
        refusal = await meter.admit()
        if refusal is not None:
            await self._send_refusal(refusal)
            return False
        self.pending.append(meter)
        return True

    def _attribute(self, text: str) -> bool:
        """An upstream event goes to the response it belongs to. The upstream answers one
        response at a time (the API refuses a second while one runs), in the order they
        were sent, so: every event belongs to the oldest response in flight, and a
        terminal one ends it; ``response.created`` while the oldest has begun means that
        one ended without a terminal event we know (it is ended, and this begins the
        next); an ``error`` ends the oldest response not yet begun (the upstream refused
        it), or the running one if none waits behind it. True: the budget cut is due
        (the response is ended; the socket must close)."""
        kind = _event_type(text)
        pending = self.pending
        if kind == "error":
            refused_next = self.begun and len(pending) > 1
            meter = pending[1] if refused_next else pending[0]
            status = _error_status(text)
            if meter.parser is None:
                meter.response_started(status or 400, {})  # refused before it began
            elif status is not None:
                meter.status = status
            else:
                meter.error = "upstream_error"  # broke off mid-response
            meter.feed_event(text.encode())
            if refused_next:
                del pending[1]
            else:
                pending.popleft()
                self.begun = False
            self._end(meter)
            return False
        if kind == "response.created" and self.begun:
            self.begun = False
            self._end(pending.popleft())
            if not pending:
                return False
        meter = pending[0]
        if not self.begun:
            self.begun = True
            meter.response_started(200, _SSE)
        meter.feed_event(text.encode())
        if kind in TERMINAL:
            pending.popleft()
            self.begun = False
            self._end(meter)
        elif meter.cut_due():
            pending.popleft()
            self.begun = False
            self._cut_event = _cut_event(meter.cut())
            self._settle(meter)
            return True
        return False

    def _end(self, meter: Meter) -> None:
        """A response ended normally: bill and store it (without holding up the relay)."""
        meter.body_ended()
        self._settle(meter)

    def _settle(self, meter: Meter) -> None:
        task = asyncio.create_task(meter.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _end_pending(self, end: End) -> None:
        """The socket ended with responses in flight: a client that left is billed for
        what streamed (aborted), an upstream that broke off or went silent is an upstream
        failure, as on HTTP."""
        route = self.target.route.upstream
        for i, meter in enumerate(self.pending):
            begun = i == 0 and self.begun
            if end.side in ("client", "cut"):
                meter.client_left()  # (after a cut, those behind it never ran)
            elif end.side == "idle":
                msg = f"upstream {route} went silent mid-response on a WebSocket"
                meter.upstream_failed("timeout", msg, None if begun else 504)
            else:
                msg = f"upstream {route} closed the WebSocket mid-response"
                meter.upstream_failed("reset", msg, None if begun else 502)
            self._settle(meter)
        self.pending.clear()
        self.begun = False

    async def _send_refusal(self, refusal: Refusal) -> None:
        """The HTTP refusal (status, OpenAI error body, headers) as the Responses API's
        ``error`` event, the shape Codex reads (``status``, ``error``, ``headers``)."""
        resp = self.relay.refuse(self.adapter.error_style, refusal)
        body = resp.body
        assert isinstance(body, bytes)
        payload = orjson.loads(body)
        headers = {str(k): v for k, v in resp.headers.items() if k.lower() != "content-type"}
        event = {
            "type": "error",
            "status": resp.status,
            "error": payload.get("error"),
            "headers": headers,
        }
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(orjson.dumps(event).decode())

    async def _send_error(self, status: int, code: str, message: str) -> None:
        error = error_payload("openai", status, message, "upstream_error", code)
        event = {"type": "error", "status": status, "error": error["error"]}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(orjson.dumps(event).decode())


# -- small pure helpers --------------------------------------------------------------------


def _ws_url(url: str) -> str:
    """``http(s)://`` → ``ws(s)://`` (a route's upstream is configured as HTTP)."""
    if url.startswith("https://"):
        return "wss://" + url[8:]
    if url.startswith("http://"):
        return "ws://" + url[7:]
    return url


def _protocols(header: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in header.split(",") if p.strip())


_VALID_CODES = frozenset(int(c) for c in WSCloseCode) - {int(WSCloseCode.ABNORMAL_CLOSURE)}


def _valid_code(code: int | None, default: int) -> int:
    """A close code that may be sent: the peer's own, else ``default`` (1005 and 1006 only
    describe a close without a code, and are never sent)."""
    if code is not None and (code in _VALID_CODES or 3000 <= code <= 4999):
        return code
    return default


def _too_big(msg: aiohttp.WSMessage) -> bool:
    exc = msg.data
    return isinstance(exc, aiohttp.WebSocketError) and exc.code == WSCloseCode.MESSAGE_TOO_BIG


_TYPE_PREFIX = '{"type":"'


def _event_type(text: str) -> str | None:
    """An event's ``type``: OpenAI writes it first, so usually a slice; else parsed."""
    if text.startswith(_TYPE_PREFIX):
        end = text.find('"', len(_TYPE_PREFIX))
        if end > 0:
            return text[len(_TYPE_PREFIX) : end]
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def _cut_event(last: bytes) -> dict[str, Any]:
    """The meter's in-band cut error (an SSE ``data:`` event in the OpenAI shape) as the
    WebSocket ``error`` event, with its 402."""
    payload = orjson.loads(last[len(b"data: ") : last.index(b"\n\n")])
    return {"type": "error", "status": 402, "error": payload.get("error")}


def _error_status(text: str) -> int | None:
    """The HTTP status an ``error`` event carries (``status``, or ``status_code``), if any."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    status = obj.get("status", obj.get("status_code"))
    return status if type(status) is int and 400 <= status <= 599 else None
