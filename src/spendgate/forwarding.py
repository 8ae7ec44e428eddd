"""Pure forwarding helpers: which headers cross the proxy, decompressing the parser's
copy, where a stream may be cut, API-key fingerprints, and the one redaction of keys from
everything spendgate says (docs/reference.md §1).

No I/O and no state beyond caches: the proxy handler calls these, the meter calls
:func:`decoded` and :func:`event_end`, and tests call them directly.
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, unquote

from multidict import CIMultiDictProxy

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
KEY_HEADERS = ("x-api-key", "x-goog-api-key", "api-key")


MAX_DECODED_BYTES = 64 << 20
"""Bytes of a compressed body inflated for the parser: the most a JSON body may hold for
parsing (``providers._common.MAX_BODY_BYTES``), and far more than any stream sends. A
gzip bomb stops here: the parser gets nothing past it (its row is estimated, and its
note says why) while the client gets every compressed byte as it came."""
INFLATE_PIECE = 1 << 18
"""Most bytes inflated per step: the parser gets a long body in pieces of this size, so
no single inflated copy grows past it (zlib's ``max_length``, brotli's output limit)."""
WHOLE_PIECE = 8 << 20
"""A body read whole is inflated in one step up to this size (then the parser reads it
at once, as an uncompressed one); past it, in ``INFLATE_PIECE`` pieces."""
STEP_BYTES = 4 << 20
"""Most bytes inflated per piece of the body that arrives (or per :meth:`Inflater.step`):
what an upstream's one piece can make the proxy do before other requests get their turn
(a gzip bomb's 64 KiB piece would otherwise inflate to the whole 64 MiB cap at once).
What is left stays pending, inflated with the next piece or by ``step`` until done."""


class _Codec(Protocol):
    def inflate(self, data: bytes, limit: int) -> tuple[bytes, bool]:
        """At most about ``limit`` bytes of output for ``data`` (empty: carry on with
        what is held), and whether more output is pending."""


class _Zlib:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=47)  # gzip or zlib, detected from the header

    def inflate(self, data: bytes, limit: int) -> tuple[bytes, bool]:
        d = self._d
        tail = d.unconsumed_tail
        out = d.decompress(tail + data if tail and data else data or tail, limit)
        return out, bool(d.unconsumed_tail) or len(out) >= limit


class _Brotli:
    """Brotli takes new input only once it has given out all it holds: input that comes
    meanwhile waits in ``_held``."""

    __slots__ = ("_d", "_held")

    def __init__(self, decompressor: Any) -> None:
        self._d = decompressor
        self._held: list[bytes] = []

    def inflate(self, data: bytes, limit: int) -> tuple[bytes, bool]:
        d, held = self._d, self._held
        if data:
            held.append(data)
        data = b""
        if held and d.can_accept_more_data():
            data = b"".join(held)
            held.clear()
        out: bytes = d.process(data, output_buffer_limit=limit)
        return out, bool(held) or not d.can_accept_more_data()


class _Zstd:
    """zstd, whose decompressor cannot bound its output: it is given the input in slices
    of ``SLICE`` bytes. A zstd block inflates to at most 128 KiB and takes at least 4
    bytes, so one slice yields at most 2 MiB (a step's output stays near ``limit``), and
    reading even an incompressible body this way costs about 8 ms per MB."""

    SLICE = 64
    __slots__ = ("_at", "_d", "_pending")

    def __init__(self, decompressor: Any) -> None:
        self._d = decompressor
        self._pending = b""
        self._at = 0

    def inflate(self, data: bytes, limit: int) -> tuple[bytes, bool]:
        if data:
            rest = self._pending[self._at :]
            self._pending, self._at = rest + data if rest else data, 0
        pending, at, end, d, step = self._pending, self._at, len(self._pending), self._d, self.SLICE
        out: list[bytes] = []
        size = 0
        while at < end and size < limit:
            piece: bytes = d.decompress(pending[at : at + step])
            at += step
            if piece:
                out.append(piece)
                size += len(piece)
        self._at = at
        return b"".join(out), at < end


def _codec(encoding: str) -> _Codec | None:
    """A decompressor for the parser's copy of a compressed body (the client gets it as
    is). Brotli needs the ``brotli`` package 1.2 or later, the first whose output can be
    bounded; without it a ``br`` body is not parsed; zstd needs ``zstandard``."""
    enc = encoding.strip().lower()
    if enc in ("gzip", "x-gzip", "deflate"):
        return _Zlib()
    if enc == "zstd":
        try:
            import zstandard
        except ImportError:
            return None
        return _Zstd(zstandard.ZstdDecompressor().decompressobj())
    if enc == "br":
        try:
            import brotli  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            return None
        decompressor = brotli.Decompressor()
        if not hasattr(decompressor, "can_accept_more_data"):
            return None
        return _Brotli(decompressor)
    return None


class Inflater:
    """``feed`` behind a decompressor, bounded: each step inflates at most
    :data:`INFLATE_PIECE` bytes and hands them on, each piece of the body at most
    :data:`STEP_BYTES` (the rest stays :attr:`pending` for the next piece or
    :meth:`step`), and past :data:`MAX_DECODED_BYTES` in all it stops for good. ``note``
    says why it stopped (the cap, or a body that is not the encoding it claims)."""

    __slots__ = ("_codec", "_feed", "_left", "note", "pending")

    def __init__(self, feed: Callable[[bytes], None], codec: _Codec, limit: int) -> None:
        self._feed = feed
        self._codec = codec
        self._left = limit
        self.note: str | None = None
        self.pending = False
        """Input is held that was not inflated yet (call :meth:`step` until False)."""

    def __call__(self, data: bytes) -> None:
        if self.note is None:
            self._pump(data, STEP_BYTES)

    def step(self) -> None:
        """Inflate some more of what is pending (at most :data:`STEP_BYTES`)."""
        if self.note is None:
            self._pump(b"", STEP_BYTES)

    def whole(self, body: bytes, feed_whole: Callable[[bytes], None]) -> bool:
        """A body read whole: inflated at once up to :data:`WHOLE_PIECE` and handed to
        ``feed_whole`` (True: the parser is done), else the first piece to ``feed``
        (False: the rest is :attr:`pending`, and the caller still closes the parser)."""
        try:
            out, more = self._codec.inflate(body, WHOLE_PIECE)
        except Exception:
            self._unreadable()
            feed_whole(b"")
            return True
        if not more:
            feed_whole(out)
            return True
        self.pending = self._take(out)
        return False

    def _pump(self, data: bytes, budget: int) -> None:
        codec = self._codec
        more = False
        try:
            out, more = codec.inflate(data, INFLATE_PIECE)
            while self._take(out) and more:
                budget -= len(out)
                if budget <= 0:
                    break
                out, more = codec.inflate(b"", INFLATE_PIECE)
        except Exception:  # zlib.error, brotli.error, ZstdError: not what it claims to be
            self._unreadable()
        self.pending = more and self.note is None

    def _take(self, out: bytes) -> bool:
        """Hand ``out`` on within the cap; False once past it."""
        self._left -= len(out)
        if self._left < 0:
            self.note = (
                f"compressed body over {MAX_DECODED_BYTES >> 20} MiB inflated: "
                "parsing stopped, usage may be missing"
            )
            return False
        if out:
            self._feed(out)
        return True

    def _unreadable(self) -> None:
        self.note = "compressed body unreadable: parsing stopped, usage may be missing"


def inflater(feed: Callable[[bytes], None], encoding: str) -> Inflater | None:
    """``feed`` behind a bounded decompressor for ``encoding``; None if unreadable."""
    codec = _codec(encoding)
    return None if codec is None else Inflater(feed, codec, MAX_DECODED_BYTES)


def decoded(feed: Callable[[bytes], None], encoding: str) -> Callable[[bytes], None] | None:
    """``feed`` for raw body bytes: itself, or behind a bounded decompressor for a
    compressed body (:class:`Inflater`: the parser reads a decompressed copy, the client
    gets the bytes as they came); None if the encoding is unreadable."""
    if not encoding:
        return feed
    return inflater(feed, encoding)


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


# --- redaction (docs/reference.md §1 "API keys") ------------------------------------------
# Only failure paths call these (an error body, a log line): nothing here is on the hot path.

REDACTED = "[redacted]"
SECRET_NAMES = frozenset(
    ("authorization", "proxy-authorization", "cookie", "auth", "key", "token", "sig",
     "signature", "secret", "password", *KEY_HEADERS)
)  # fmt: skip
"""Header and query names whose values are secrets (compared in lower case, ``_`` as ``-``)."""
SECRET_SUFFIXES = ("key", "token", "secret", "password", "signature")
"""...and any name ending so: ``api_key``, ``apikey``, ``access_token``, ``client_secret``."""
MIN_LITERAL = 8
"""Shorter values are not replaced wherever they occur (a key ``k`` would garble the text);
the patterns still catch them in a query string or after a key header's name."""

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@'\"<>]+@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#?;\s'\"<>]+)=([^&#;\s'\"<>]*)")
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[^\s'\",;]+")
_KEY_HEADER = re.compile(
    r"(?i)\b(" + "|".join(map(re.escape, KEY_HEADERS)) + r")([\"']?\s*[:=]\s*[\"']?)[^\s'\",;&}<>]+"
)


def secret_name(name: str) -> bool:
    """Does a header or query parameter of this name carry a secret?"""
    low = name.lower().replace("_", "-")
    return low in SECRET_NAMES or low.endswith(SECRET_SUFFIXES)


def _query_param(m: re.Match[str]) -> str:
    sep, name = m.group(1), m.group(2)
    return f"{sep}{name}={REDACTED}" if secret_name(unquote(name)) else m.group(0)


def request_secrets(*sources: Mapping[str, str]) -> list[str]:
    """The secret values in these headers and query parameters (a request's, a route's
    configured headers): each value whose name :func:`secret_name` flags, and the
    credential after an ``Authorization`` scheme (``Bearer sk-...``) on its own."""
    out: list[str] = []
    for source in sources:
        for name, value in source.items():
            if value and secret_name(name):
                out.append(value)
                credential = value.partition(" ")[2].strip()
                if credential:
                    out.append(credential)
    return out


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with no key left in it, for anything spendgate says (an error body, a
    log line, an event, a row): the value of every secret query parameter in a URL
    (``?key=...`` → ``?key=[redacted]``), a URL's user and password, a ``Bearer``
    credential, the value after a key header's name, and each of ``secrets`` (see
    :func:`request_secrets`) wherever it occurs, as is or percent-encoded."""
    if not text:
        return text
    for value in sorted({s for s in secrets if len(s) >= MIN_LITERAL}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
        encoded = quote(value, safe="")
        if encoded != value:
            text = text.replace(encoded, REDACTED)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _QUERY_PARAM.sub(_query_param, text)
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    return _KEY_HEADER.sub(rf"\1\2{REDACTED}", text)


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
    """The upstream's end-to-end headers for the client (``Content-Length`` only when the
    body goes out unchanged)."""
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
