"""The catch-all forwarding handler (SPEC 1): stream bytes through, tap the adapter.

It orchestrates and knows no provider's JSON: route and session come from
:mod:`routing`, request facts and parsers from the adapter, and all bookkeeping from
:class:`~spendgate.accounting.Accountant`, which runs in ``finally`` so client
hang-ups and upstream failures are billed and recorded like any other response.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from spendgate.accounting import Accountant, Exchange
from spendgate.budgets import Refusal, usd
from spendgate.errors import error_response, stream_error_bytes
from spendgate.metrics import Metrics
from spendgate.providers import get_adapter
from spendgate.providers._api import Adapter, ResponseParser
from spendgate.routing import Router, RoutingError
from spendgate.settings import Settings

log = logging.getLogger("spendgate.proxy")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
KEY_HEADERS = ("x-api-key", "x-goog-api-key", "api-key")
WHOLE_BODY_BYTES = 8 << 20
"""A non-streamed response up to this size (and of known length) is read whole."""
CLIENT_CLOSED = 499
"""Row status when the client left before the upstream answered (nginx's convention)."""


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


def _decoder(encoding: str) -> _Decoder | None:
    """A decompressor for the parser's copy of a compressed body (the client gets it as is)."""
    enc = encoding.strip().lower()
    if enc in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(wbits=47)  # gzip or zlib, detected from the header
    if enc == "br":
        try:
            import brotli  # type: ignore[import-not-found,unused-ignore]

            return brotli.Decompressor()  # type: ignore[no-any-return,unused-ignore]
        except ImportError:
            return None
    return None


def decoded(feed: Callable[[bytes], None], encoding: str) -> Callable[[bytes], None] | None:
    """``feed`` for raw body bytes: itself, or behind a decompressor for a compressed
    body (the parser reads a decompressed copy, the client gets the bytes as they came);
    None if the encoding is unreadable."""
    if not encoding:
        return feed
    decoder = _decoder(encoding)
    if decoder is None:
        return None
    return lambda data: feed(decoder.decompress(data))


def parse_whole(parser: ResponseParser, encoding: str, body: bytes) -> None:
    """Parse a whole body; one that cannot be decompressed stays unparsed."""
    feed = decoded(parser.feed_whole, encoding)
    try:
        if feed is not None:
            feed(body)
            return
    except Exception:  # a broken compressed body: unparsed, still forwarded
        pass
    parser.feed_whole(b"")


def key_fingerprint(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """First 12 hex chars of the API key's SHA-256: enough to tell keys apart, never the key."""
    key = None
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    for name in KEY_HEADERS:
        key = key or headers.get(name)
    key = key or query.get("key")
    return _fingerprint(key) if key else None


@functools.lru_cache(maxsize=256)
def _fingerprint(key: str) -> str:
    # An agent sends the same key on every request: hash it once.
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# Peers send the same few header names every time: decide once per spelling.
@functools.lru_cache(maxsize=1024)
def _not_forwarded(name: str) -> bool:
    low = name.lower()
    return low in HOP_BY_HOP or low.startswith("x-spendgate-")


@functools.lru_cache(maxsize=1024)
def _not_returned(name: str, keep_length: bool) -> bool:
    low = name.lower()
    return low in HOP_BY_HOP and not (keep_length and low == "content-length")


def upstream_headers(
    headers: CIMultiDictProxy[str], drop_encoding: bool, extra: tuple[tuple[str, str], ...] = ()
) -> list[tuple[str, str]]:
    """The client's end-to-end headers for the upstream, then ``extra`` (replacing any
    the client sent under those names). A list of pairs: aiohttp copies it anyway."""
    connection = headers.get("Connection")
    listed = {h.strip().lower() for h in connection.split(",")} if connection else ()
    replaced = {name.lower() for name, _ in extra}
    if drop_encoding:  # we must edit the stream, so ask for it uncompressed
        replaced.add("accept-encoding")
        extra = (*extra, ("Accept-Encoding", "identity"))
    out = [
        (name, value)
        for name, value in headers.items()
        if not _not_forwarded(name)
        and not (listed and name.lower() in listed)
        and not (replaced and name.lower() in replaced)
    ]
    out.extend(extra)
    return out


def client_headers(headers: CIMultiDictProxy[str], keep_length: bool) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if not _not_returned(k, keep_length)]


def event_end(data: bytes, ndjson: bool) -> int:
    """Index just past the last complete SSE event (or NDJSON line) in ``data``, else -1.

    A stream cut for budget must end between events, never inside one.
    """
    if ndjson:
        i = data.rfind(b"\n")
        return i + 1 if i >= 0 else -1
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


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
    metrics: Metrics
    client: aiohttp.ClientSession

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cut = settings.on_budget_mid_stream == "cut"
        self._timeout = aiohttp.ClientTimeout(
            total=settings.upstream_total_timeout_s,
            connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_idle_timeout_s,
        )
        self._idle = settings.upstream_idle_timeout_s

    def attach(self, router: Router, accountant: Accountant, client: aiohttp.ClientSession) -> None:
        self.router = router
        self.acct = accountant
        self.metrics = accountant.metrics
        self.client = client

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            target = self.router.resolve(request.rel_url.raw_path, request.headers)
        except RoutingError as exc:
            return error_response(_style(exc.adapter), 400, exc.message, "invalid_request_error")
        route = target.route
        adapter = get_adapter(route.adapter)
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
        ex = Exchange(
            target, info, key_fingerprint=key_fingerprint(request.headers, request.rel_url.query)
        )
        refusal = await self.acct.admit(ex)
        if refusal is not None:
            return self._refuse(adapter, refusal, route.name)
        try:
            return await self._forward(request, adapter, ex, body)
        except asyncio.CancelledError:
            ex.aborted = True  # the client left and aiohttp cancelled this handler
            if ex.status == 0:
                ex.status = CLIENT_CLOSED  # before the upstream answered
            raise
        finally:
            await self.acct.finish(ex)

    def _refuse(self, adapter: Adapter, refusal: Refusal, route: str) -> web.Response:
        self.metrics.budget_rejections.labels(route).inc()
        budget = "" if refusal.budget_usd is None else f"{refusal.budget_usd:.6f}"
        headers = {
            "X-Spendgate-Session": refusal.session_id,
            "X-Spendgate-Budget-Usd": budget,
            "X-Spendgate-Spent-Usd": f"{refusal.spent_usd:.6f}",
            "x-should-retry": "false",
        }
        return error_response(
            adapter.error_style, 402, refusal.message(), "budget_exceeded",
            "session_budget_exceeded", headers,
        )  # fmt: skip

    def _upstream_error(
        self, request: web.Request, adapter: Adapter, ex: Exchange, status: int, kind: str, msg: str
    ) -> web.Response:
        ex.status, ex.error = status, kind
        if request.transport is None or request.transport.is_closing():
            ex.aborted = True  # the client gave up while we waited for the upstream
        self.metrics.upstream_errors.labels(ex.target.route.name, kind).inc()
        log.warning("upstream %s for %s: %s", kind, ex.target.route.name, msg)
        return error_response(adapter.error_style, status, msg, "upstream_error")

    async def _forward(
        self, request: web.Request, adapter: Adapter, ex: Exchange, body: bytes
    ) -> web.StreamResponse:
        route, info = ex.target.route, ex.info
        url = route.upstream + ex.target.path
        qs = request.rel_url.raw_query_string
        if qs:
            url += "?" + qs
        headers = upstream_headers(request.headers, info.strip_usage_chunk, route.headers)
        try:
            up = await self.client.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=info.body or body or None,  # the adapter's rewrite, else the original
                allow_redirects=False,
                timeout=self._timeout,
            )
        except TimeoutError:
            return self._upstream_error(
                request, adapter, ex, 504, "timeout",
                f"upstream {route.upstream} did not answer in time",
            )  # fmt: skip
        except aiohttp.ClientConnectorError as exc:
            return self._upstream_error(
                request, adapter, ex, 502, "connect",
                f"upstream {route.upstream} is unreachable: {exc}",
            )  # fmt: skip
        except aiohttp.ClientError as exc:
            return self._upstream_error(
                request, adapter, ex, 502, "reset",
                f"upstream {route.upstream} closed the connection before answering: {exc}",
            )  # fmt: skip
        async with up:
            length = up.content_length
            if not ex.info.stream and length is not None and length <= WHOLE_BODY_BYTES:
                return await self._whole(request, adapter, ex, up)
            watch = IdleWatch(up, self._idle)
            try:
                return await self._stream(request, adapter, ex, up, watch)
            finally:
                watch.cancel()

    async def _whole(
        self,
        request: web.Request,
        adapter: Adapter,
        ex: Exchange,
        up: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        """A body of known, bounded size (a JSON answer): read whole, parsed once, sent with
        the headers in one write. If the upstream breaks off or goes silent, nothing has
        gone to the client yet, so it gets a clean 502 or 504 instead of a truncated body."""
        ex.status = up.status
        ex.parser = parser = adapter.parser(ex.info, up.status, up.headers.get("Content-Type", ""))
        try:
            body = await up.read()  # aiohttp's sock_read bounds the silence
        except (aiohttp.ClientError, TimeoutError) as exc:
            upstream = ex.target.route.upstream
            if isinstance(exc, TimeoutError):
                msg = f"upstream {upstream} went silent for {self._idle:g} s mid-response"
                return self._upstream_error(request, adapter, ex, 504, "timeout", msg)
            msg = f"upstream {upstream} broke off its response: {exc}"
            return self._upstream_error(request, adapter, ex, 502, "reset", msg)
        ex.ttft = time.perf_counter() - ex.t0
        parse_whole(parser, up.headers.get("Content-Encoding", ""), body)
        resp = web.Response(
            status=up.status,
            reason=up.reason,
            body=body,
            headers=client_headers(up.headers, keep_length=False),  # aiohttp sets the length
        )
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            ex.aborted = True
        return resp

    async def _stream(
        self,
        request: web.Request,
        adapter: Adapter,
        ex: Exchange,
        up: aiohttp.ClientResponse,
        watch: IdleWatch,
    ) -> web.StreamResponse:
        info = ex.info
        ex.status = up.status
        ctype = up.headers.get("Content-Type", "")
        encoding = up.headers.get("Content-Encoding", "")
        ok = up.status < 400
        ex.parser = parser = adapter.parser(info, up.status, ctype)
        feed = decoded(parser.feed, encoding)
        out_filter = adapter.output_filter(info) if ok and not encoding else None
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        resp.headers.extend(client_headers(up.headers, keep_length=out_filter is None))
        live = ok and info.stream
        cut = live and self._cut
        await resp.prepare(request)
        if live:
            self.metrics.active_streams += 1
        ndjson = "ndjson" in ctype
        cutting = False
        # Per chunk, only local names: this loop runs for every piece of every stream.
        write, acct = resp.write, self.acct
        filter_feed = out_filter.feed if out_filter is not None else None
        try:
            async for chunk in up.content.iter_any():
                if ex.ttft is None:
                    ex.ttft = time.perf_counter() - ex.t0
                out = filter_feed(chunk) if filter_feed is not None else chunk
                if cutting:  # over budget: stop at the first event boundary
                    end = event_end(out, ndjson)
                    if end >= 0:
                        await write(out[:end])
                        await self._cut_stream(adapter, ex, resp)
                        return resp
                if out:
                    await write(out)
                if feed is not None:
                    try:
                        feed(chunk)
                    except Exception:  # a broken compressed body: stop parsing, keep forwarding
                        feed = None
                if live:
                    acct.live(ex)
                    if cut and not cutting and acct.over_budget(ex):
                        cutting = True
                        if out and event_end(out, ndjson) == len(out):
                            await self._cut_stream(adapter, ex, resp)
                            return resp
            watch.check()
            if out_filter is not None:
                tail = out_filter.close()
                if tail:
                    await resp.write(tail)
            parser.close()
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            ex.aborted = True  # the client hung up; bill what was streamed
            parser.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = "timeout" if watch.fired or isinstance(exc, TimeoutError) else "reset"
            ex.error = f"upstream_{kind}"
            self.metrics.upstream_errors.labels(ex.target.route.name, kind).inc()
            log.warning("upstream %s mid-response on %s: %s", kind, ex.target.route.name, exc)
            parser.close()
            await self._end_broken(request, adapter, ex, resp, ctype)
        finally:
            if live:
                self.metrics.active_streams -= 1
        return resp

    async def _cut_stream(self, adapter: Adapter, ex: Exchange, resp: web.StreamResponse) -> None:
        """End the stream early for budget; what was parsed so far is billed."""
        if ex.parser is not None:
            ex.parser.close()
        ex.error = "budget_cut"
        spent = self.acct.ledger.spent(ex.target.session_id)
        msg = (
            f"spendgate stopped this stream: session '{ex.target.session_id}' ran out of budget "
            f"(spent {usd(spent)} before this response)."
        )
        try:
            await resp.write(
                stream_error_bytes(
                    adapter.error_style, 402, msg, "budget_exceeded", "session_budget_exceeded"
                )
            )
            await resp.write_eof()
        except ConnectionError:
            ex.aborted = True

    async def _end_broken(
        self,
        request: web.Request,
        adapter: Adapter,
        ex: Exchange,
        resp: web.StreamResponse,
        ctype: str,
    ) -> None:
        """The upstream broke after headers went out: say so in-band, or cut the connection."""
        try:
            if "event-stream" in ctype or "ndjson" in ctype:
                msg = f"spendgate: upstream {ex.target.route.upstream} broke mid-response"
                await resp.write(
                    stream_error_bytes(adapter.error_style, 502, msg, "upstream_error")
                )
                await resp.write_eof()
            else:
                # A JSON body cut short must look cut short: drop the connection.
                if request.transport is not None:
                    request.transport.close()
        except ConnectionError:
            ex.aborted = True


def _style(adapter_name: str) -> str:
    try:
        return get_adapter(adapter_name).error_style
    except KeyError:
        return "openai"
