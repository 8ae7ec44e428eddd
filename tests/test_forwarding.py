"""The pure forwarding helpers (spendgate.forwarding)."""

from __future__ import annotations

import gzip

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from spendgate.forwarding import (
    client_headers,
    decoded,
    event_end,
    key_fingerprint,
    upstream_headers,
)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_upstream_headers_drop_hop_by_hop_spendgate_and_connection_listed_ones() -> None:
    got = upstream_headers(
        headers(
            ("Authorization", "Bearer sk-x"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("X-Spendgate-Session", "s1"),
            ("Transfer-Encoding", "chunked"),
            ("anthropic-version", "2023-06-01"),
        ),
        drop_encoding=False,
    )
    assert got == [("Authorization", "Bearer sk-x"), ("anthropic-version", "2023-06-01")]


def test_upstream_headers_ask_for_identity_when_the_stream_is_edited() -> None:
    got = upstream_headers(headers(("Accept-Encoding", "gzip, br")), drop_encoding=True)
    assert got == [("Accept-Encoding", "identity")]


def test_client_headers_keep_the_length_only_for_an_unchanged_body() -> None:
    up = headers(("Content-Length", "10"), ("Content-Type", "application/json"))
    assert ("Content-Length", "10") in client_headers(up, keep_length=True)
    assert client_headers(up, keep_length=False) == [("Content-Type", "application/json")]


@pytest.mark.parametrize(
    ("data", "ndjson", "end"),
    [
        (b"data: 1\n\ndata: 2", False, 9),
        (b"data: 1\r\n\r\ndata: 2\r\n\r\n", False, 22),
        (b"data: 1\n", False, -1),
        (b'{"a":1}\n{"b"', True, 8),
        (b'{"a":1}', True, -1),
    ],
)
def test_event_end_finds_the_last_boundary(data: bytes, ndjson: bool, end: int) -> None:
    assert event_end(data, ndjson) == end


def test_key_fingerprint_is_a_hash_prefix_never_the_key() -> None:
    fp = key_fingerprint({"Authorization": "Bearer sk-secret"}, {})
    assert fp is not None and len(fp) == 12 and "secret" not in fp
    assert key_fingerprint({}, {"key": "sk-secret"}) == fp  # a Gemini ?key= is the same key
    assert key_fingerprint({"x-api-key": "other"}, {}) != fp
    assert key_fingerprint({}, {}) is None


def test_decoded_feeds_the_parser_a_decompressed_copy() -> None:
    seen: list[bytes] = []
    feed = decoded(seen.append, "gzip")
    assert feed is not None
    body = gzip.compress(b'{"usage": {}}')
    feed(body[:5])
    feed(body[5:])
    assert b"".join(seen) == b'{"usage": {}}'
    assert decoded(seen.append, "") == seen.append
    assert decoded(seen.append, "x-unknown") is None
