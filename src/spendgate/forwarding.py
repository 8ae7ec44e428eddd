"""Pure forwarding helpers: which headers cross the proxy, decompressing the parser's
copy, where a stream may be cut, and API-key fingerprints (docs/reference.md §1).

No I/O and no state beyond caches: the proxy handler calls these, the meter calls
:func:`decoded` and :func:`event_end`, and tests call them directly.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Callable, Mapping
from typing import Protocol

from multidict import CIMultiDictProxy

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
KEY_HEADERS = ("x-api-key", "x-goog-api-key", "api-key")


class Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


def _decoder(encoding: str) -> Decoder | None:
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
