"""One request's meter: what the proxy tells it, and what it answers (docs/reference.md §13).

The proxy handler speaks HTTP and nothing else. For each request it makes a
:class:`Meter` and tells it what happens, in order::

    refusal = await meter.admit()           # None, or why the budget refuses it
    meter.response_started(status, headers) # the upstream answered
    meter.whole(body)                       # a body read at once, or per piece:
    out = meter.outgoing(chunk)             #   the bytes the client gets for it
    stop = meter.feed(chunk)                #   parse it; True when the budget cut is due
    meter.feed_event(payload)               # or one decoded JSON event (not an HTTP body)
    tail = meter.body_ended()               # the upstream's body ended normally
    meter.cut() / upstream_failed(...) / client_left()   # the ways it can end early
    await meter.close()                     # always, in ``finally``: bill, store, publish

The meter owns the parser, the output filter, the outcome (status, aborted, error,
time to first byte) and the budget cut; the bookkeeping at the end is the accountant's
(:mod:`spendgate.accounting`), which the meter calls with itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from spendgate import billing
from spendgate.boundaries import MAX_CUT_WAIT_BYTES, Boundaries, boundaries_for
from spendgate.budgets import Headroom, Refusal, Reservation, usd
from spendgate.errors import stream_error_bytes
from spendgate.forwarding import Inflater, inflater, redact
from spendgate.pricing import ModelPrice
from spendgate.providers._api import Adapter, OutputFilter, RequestInfo, ResponseParser
from spendgate.providers._common import shown
from spendgate.records import MessageRecord
from spendgate.routing import Target
from spendgate.usage import TokenCounts

if TYPE_CHECKING:
    from spendgate.accounting import Accountant

log = logging.getLogger("spendgate.proxy")

CLIENT_CLOSED = 499
"""Row status when the client left before the upstream answered (nginx's convention)."""

MAX_LOGGED_NOTES = 1000
"""(route, kind) pairs of row notes already logged: each kind of note is logged once per
route (routes are configured, kinds are a fixed few), and this bounds it anyway."""
_logged_notes: set[tuple[str, str]] = set()

UNREAD_NOTE = "not valid JSON"
"""The kind of note a parser gives for payloads it could not read: left out of the row
of a response cut short, whose last event is expected to be cut too."""

# Message ids: a random per-process prefix and a counter (unique across restarts and
# replicas, and no system call per request as uuid4 makes).
_ID_PREFIX = os.urandom(8).hex()
_ID_SEQ = itertools.count()


class Meter:
    """One request, from admission to its row.

    A plain slotted class rather than a dataclass: one is built per request, and a
    generated ``__init__`` with default factories costs several times this one.
    """

    __slots__ = (
        "_acct", "_adapter", "_body_done", "_bounds", "_cut", "_cut_by", "_cutting",
        "_decode_note", "_filter", "_inflater", "_live", "_out_filter", "_parse",
        "_parser_open", "_stop", "_truncated", "_waited", "aborted", "cut_enabled",
        "cut_short", "error", "id", "info", "key_fingerprint", "last_live", "parser", "price",
        "priced_model", "reservation", "started_at", "status", "streamed", "t0", "target",
        "ttft",
    )  # fmt: skip

    transport = "http"
    """How the request came (the row's ``transport``): a subclass per other transport
    (:class:`spendgate.websocket.SocketMeter`), so no slot is set per request."""

    def __init__(
        self,
        acct: Accountant,
        adapter: Adapter,
        target: Target,
        info: RequestInfo,
        key_fingerprint: str | None = None,
        cut_enabled: bool = False,
    ) -> None:
        self._acct = acct
        self._adapter = adapter
        self.target = target
        self.info = info
        self.key_fingerprint = key_fingerprint
        self.cut_enabled = cut_enabled
        """``on_budget_mid_stream = "cut"``: end a stream that uses up the budget."""
        self.id = f"msg_{_ID_PREFIX}{next(_ID_SEQ):010x}"
        self.started_at = time.time()
        self.t0 = self.last_live = time.perf_counter()
        """``last_live``: when the last live update went out (the first waits one interval)."""
        self.ttft: float | None = None
        self.status = 0
        self.streamed = info.stream
        """Did the response stream? (The request's flag until the response says.)"""
        self.aborted = False
        self.error: str | None = None
        self.reservation: Reservation | None = None
        self.price: ModelPrice | None = None
        self.priced_model: str | None = None
        """The model ``price`` was looked up for (the response may name another)."""
        self.parser: ResponseParser | None = None
        self._parse: Callable[[bytes], None] | None = None
        self._parser_open = False
        self._inflater: Inflater | None = None
        """The parser's bounded decompressor, for a compressed body."""
        self._decode_note: str | None = None
        """Why a compressed body was not parsed at all (an encoding spendgate cannot read)."""
        self._out_filter: OutputFilter | None = None
        self._filter: Callable[[bytes], bytes] | None = None
        """``_out_filter.feed``, looked up once: it runs for every piece of a stream."""
        self._live = self._cut = self._cutting = self._stop = self._truncated = False
        self._body_done = False
        """The upstream's whole body arrived (so a client leaving now loses nothing)."""
        self._cut_by: Headroom | None = None
        """The budget the cut is for, once it is due."""
        self._bounds: Boundaries | None = None
        """Where the stream may be cut (only for a stream the cut applies to)."""
        self._waited = 0
        """Bytes let through since the cut was due, waiting for a boundary."""
        self.cut_short = False
        """The cut found no boundary: the proxy closes the connection, nothing in-band."""

    # -- what the meter knows --------------------------------------------------------------

    @property
    def model(self) -> str | None:
        return (self.parser.model if self.parser else None) or self.info.model

    @property
    def error_style(self) -> str:
        return self._adapter.error_style

    @property
    def keeps_length(self) -> bool:
        """The body goes to the client unchanged, so its Content-Length still holds."""
        return self._filter is None

    @property
    def complete(self) -> bool:
        """The response body arrived whole (nothing cut it short)."""
        return not self.aborted and self.error is None

    def estimated_counts(self) -> TokenCounts:
        """Estimates from the request size and the deltas streamed so far."""
        parser = self.parser
        if parser is None:
            return billing.estimated_counts(self.info, None, 0)
        parser.settle()
        return billing.estimated_counts(self.info, parser.usage, parser.output_chars)

    def final_counts(self) -> tuple[TokenCounts, bool]:
        """The numbers to bill, and whether they are estimates (:mod:`spendgate.billing`)."""
        usage = self.parser.usage if self.parser else None
        counts = billing.billed_counts(self.info, self.status, self.complete, usage)
        if counts is None:
            return self.estimated_counts(), True
        return counts, False

    # -- what the proxy tells it -----------------------------------------------------------

    async def admit(self) -> Refusal | None:
        """Reserve this request's worst case against the budget, or say why not."""
        return await self._acct.admit(self)

    def response_started(self, status: int, headers: Mapping[str, str]) -> None:
        """The upstream answered: set up the parser, and the output filter and the live
        updates for a successful stream."""
        self.status = status
        ctype = headers.get("Content-Type", "")
        encoding = headers.get("Content-Encoding", "")
        self.parser = parser = self._adapter.parser(self.info, status, ctype)
        self._parser_open = True
        if encoding:  # the parser reads a bounded, decompressed copy
            self._parse = self._inflater = inflate = inflater(parser.feed, encoding)
            if inflate is None:
                self._decode_note = f"Content-Encoding {shown(encoding)} not read: not parsed"
        else:
            self._parse = parser.feed
        ok = status < 400
        out_filter = self._adapter.output_filter(self.info) if ok and not encoding else None
        self._out_filter = out_filter
        self._filter = out_filter.feed if out_filter is not None else None
        # The response's content type, not the request's flag, says it streams (SSE, or
        # Ollama's NDJSON): a server may stream what the request did not ask to stream,
        # or what spendgate could not read.
        lowered = ctype.lower()
        self.streamed = streamed = self.info.stream or lowered.startswith(
            ("text/event-stream", "application/x-ndjson")
        )
        self._live = live = ok and streamed
        self._cut = cut = live and self.cut_enabled
        if cut:
            self._bounds = boundaries_for(lowered, encoding)
        if live:
            self._acct.stream_started()

    def whole(self, body: bytes, encoding: str) -> None:
        """A whole body, read at once: parsed in one go."""
        self._first_byte()
        parser = self.parser
        assert parser is not None, "response_started comes first"
        self._parser_open = False  # feed_whole stands for feed and close
        self._body_done = True
        if not encoding:
            parser.feed_whole(body)
            return
        inflate = self._inflater
        if inflate is None:  # an encoding spendgate cannot read: unparsed, still forwarded
            parser.feed_whole(b"")
        elif not inflate.whole(body, parser.feed_whole):  # it goes in pieces: end them
            self._parser_open = True  # (the rest is inflated in close(), a step at a time)
            if not inflate.pending:
                self._close_parser()

    def note(self) -> str | None:
        """The row's note: what the parser refused, adjusted or could not read, and why a
        compressed body was not parsed (whole or in part); None when all was plain. The
        first note of each kind on a route is logged."""
        parser = self.parser
        notes = parser.notes if parser is not None else []
        inflate = self._inflater
        decode_note = inflate.note if inflate is not None else self._decode_note
        if not notes and decode_note is None:
            return None  # nearly every row
        if decode_note is not None:
            notes.append(decode_note)
        if not self.complete:
            notes = [n for n in notes if not n.startswith(UNREAD_NOTE)]
        if not notes:
            return None
        route = self.target.route.name
        for text in notes:
            key = (route, text.partition(":")[0])
            if key not in _logged_notes and len(_logged_notes) < MAX_LOGGED_NOTES:
                _logged_notes.add(key)
                log.warning(
                    "route %s, message %s: %s (each kind logged once per route)",
                    route, self.id, text,
                )  # fmt: skip
        return "; ".join(notes)

    def _first_byte(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0

    def outgoing(self, chunk: bytes) -> bytes:
        """What the client gets for this piece of the body: the piece itself, the output
        filter's version of it, or, once a cut is due, the piece up to the last boundary
        in it (:mod:`spendgate.boundaries`: an SSE event, an NDJSON line, a JSON-array
        element), which the stream's cut points see from the first piece."""
        if self.ttft is None:  # _first_byte() inline: this runs for every piece
            self.ttft = time.perf_counter() - self.t0
        out = self._filter(chunk) if self._filter is not None else chunk
        bounds = self._bounds
        if bounds is None:
            return out
        end = bounds.scan(out)
        if self._cutting:
            if end >= 0:
                self._stop = self._truncated = True  # the cut happens here: feed() says so
                return out[:end]
            self._waited += len(out)
            if self._waited > MAX_CUT_WAIT_BYTES:
                self._end_short(f"no event boundary in the {self._waited} bytes since it was due")
        return out

    def feed(self, chunk: bytes) -> bool:
        """Parse this piece (after the client got :meth:`outgoing`'s bytes); True when the
        stream must end here for budget (then send :meth:`cut`)."""
        if self._stop:
            return True
        if self._parse is not None:
            try:
                self._parse(chunk)
            except Exception:  # a broken compressed body: stop parsing, keep forwarding
                self._parse = None
        if self._live:
            acct = self._acct
            acct.live(self)
            if self._cut and not self._cutting and (by := acct.over_budget(self)):
                self._cutting, self._cut_by = True, by
                bounds = self._bounds
                if bounds is not None and bounds.opaque:
                    self._end_short("a compressed body has no boundary the client decodes")
                    return True
                if bounds is not None and bounds.clean:
                    return True
        return False

    def feed_event(self, payload: bytes) -> None:
        """One decoded JSON event that did not come as an HTTP body (a WebSocket
        message): parsed as the SSE event it would have been on HTTP, with the live
        updates :meth:`feed` sends for a stream."""
        self._first_byte()
        if self._parse is not None:
            self._parse(b"data: " + payload + b"\n\n")
        if self._live:
            self._acct.live(self)

    def body_ended(self) -> bytes:
        """The upstream's body ended normally; returns what the output filter still held."""
        self._body_done = True
        inflate = self._inflater
        if inflate is None or not inflate.pending:  # else close() inflates the rest first
            self._close_parser()
        out_filter = self._out_filter
        return out_filter.close() if out_filter is not None else b""

    def cut_due(self) -> bool:
        """For events that come one at a time (:meth:`feed_event`): is the budget cut due
        now (``on_budget_mid_stream = "cut"`` and the live estimate used up the tightest
        budget)? Then end the response with :meth:`cut`."""
        if not self._cut or self._cutting:
            return False
        by = self._acct.over_budget(self)
        if by is None:
            return False
        self._cutting, self._cut_by = True, by
        return True

    def cut(self) -> bytes:
        """End the stream early for budget: what was parsed so far is billed; returns the
        in-band error the client gets last."""
        self._close_parser()
        self.error = "budget_cut"
        by = self._cut_by
        name, scope = (by.name, by.scope) if by is not None else ("the budget", "session")
        spent = self._acct.ledger.cached_spent(self.target.session_id)
        msg = (
            f"spendgate stopped this stream: {name} ran out of budget (spent "
            f"{usd(spent)} in the session before this response)."
        )
        code, bounds = f"{scope}_budget_exceeded", self._bounds
        if self.cut_short:
            return b""
        if bounds is None:  # events one at a time (a WebSocket): each is whole
            return stream_error_bytes(self.error_style, 402, msg, "budget_exceeded", code)
        return bounds.ending(self.error_style, msg, "budget_exceeded", code, self._truncated)

    def _end_short(self, why: str) -> None:
        """A due cut that cannot end at a boundary: the proxy closes the connection (the
        client sees a stream cut short, never a broken unit passed off as whole)."""
        self._stop = self.cut_short = True
        log.warning(
            "route %s, message %s: budget cut closes the connection mid-stream: %s",
            self.target.route.name, self.id, why,
        )  # fmt: skip

    def upstream_failed(self, kind: str, detail: str, status: int | None = None) -> None:
        """The upstream failed: before any byte reached the client (``status`` is the
        answer the client gets instead, 502 or 504), or mid-response (``status`` None).
        ``detail`` is logged redacted (the proxy has already taken the request's own keys
        out of it; this takes out any key-shaped value left)."""
        route = self.target.route.name
        detail = redact(detail)
        if status is None:
            self.error = f"upstream_{kind}"
            log.warning("upstream %s mid-response on %s: %s", kind, route, detail)
        else:
            self.status, self.error = status, kind
            log.warning("upstream %s for %s: %s", kind, route, detail)
        self._acct.upstream_failed(route, kind)

    def client_left(self) -> None:
        """The client hung up; what was streamed is billed. After the upstream's body
        ended (its final usage parsed) nothing was lost: the response is complete, not
        aborted, whatever the client does then (SDKs close on ``[DONE]``, Codex on
        ``response.completed``, before spendgate's last write)."""
        if self._body_done:
            return
        self.aborted = True
        if self.status == 0:
            self.status = CLIENT_CLOSED  # before the upstream answered

    async def close(self) -> MessageRecord:
        """Always last: price, settle the budget, queue the row, publish, record metrics."""
        inflate = self._inflater
        if inflate is not None and inflate.pending and self._parser_open:
            await _inflate_rest(inflate)
        self._close_parser()
        if self._live:
            self._live = False
            self._acct.stream_ended()
        return await self._acct.finish(self)

    def _close_parser(self) -> None:
        if self._parser_open:
            self._parser_open = False
            parser = self.parser
            assert parser is not None
            inflate = self._inflater
            if inflate is not None and inflate.note is not None:
                # Decompression stopped partway: closing would parse the truncated rest
                # (a cut JSON document, held whole); what was read is settled instead.
                parser.settle()
            else:
                parser.close()


async def _inflate_rest(inflate: Inflater) -> None:
    """What a compressed body still holds, a step at a time with the event loop's other
    work between steps (a body read whole, or a bomb's last piece, may hold up to the
    64 MiB cap: other requests must not wait for all of it)."""
    while inflate.pending:
        inflate.step()
        await asyncio.sleep(0)
