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
from typing import Protocol
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
