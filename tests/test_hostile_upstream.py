"""A hostile upstream through the real proxy (issue #16, items 2, 3 and 10): usage numbers
that are no token counts, cache counts beyond the input, gzip bombs and lines that never
end. The client gets every byte as the upstream sent it; the row is estimated (or
adjusted) and its note says why; memory stays bounded (timing is bench/hostile.py's).

The proxy, the fake upstream and the client share this process, so ``tracemalloc``'s
peak covers all three: a bound on it bounds what the proxy held.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import tracemalloc
import zlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from spendgate.forwarding import MAX_DECODED_BYTES
from tests.conftest import Proxy
from tests.upstream import FakeUpstream, Reply, json_reply

MSG: Any = [{"role": "user", "content": "hello there, how are you today?"}]
MIB = 1 << 20


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python's allocations inside the block (appended to the list)."""
    tracemalloc.start()
    peak: list[int] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """POST and read the answer as raw bytes (nothing decompressed), hashed as it comes
    so that a 64 MiB answer is not held by the client either."""
    digest, size = hashlib.sha256(), 0
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(proxy.url(path), json=body, headers={"Accept-Encoding": "gzip"}) as r,
    ):
        async for piece in r.content.iter_any():
            digest.update(piece)
            size += len(piece)
        return r.status, digest.digest() + size.to_bytes(8, "big")


def fingerprint(chunks: list[bytes]) -> bytes:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest() + sum(map(len, chunks)).to_bytes(8, "big")


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _claude(input_tokens: object, output_tokens: int) -> tuple[bytes, bytes]:
    """An Anthropic stream's two usage reports: ``message_start``, a ``message_delta``."""
    usage = {"input_tokens": input_tokens, "output_tokens": 1}
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-6", "usage": usage}}
    delta = {"type": "message_delta", "usage": {"output_tokens": output_tokens}}
    return _sse(start), _sse(delta)


async def only_row(proxy: Proxy, session: str) -> dict[str, Any]:
    (row,) = await proxy.messages(session)
    return row


# --- usage numbers that are no token counts ---------------------------------------------------

BAD = [
    (2**63, "usage out of range: prompt_tokens=9223372036854775808"),
    (1e300, "usage out of range: prompt_tokens=1e300"),
    (-5, "usage out of range: prompt_tokens=-5"),
    ("12", 'usage not an integer: prompt_tokens="12"'),
    (True, "usage not an integer: prompt_tokens=true"),
]


@pytest.mark.parametrize(("value", "note"), BAD, ids=[n.rpartition("=")[2] for _, n in BAD])
async def test_a_usage_count_that_is_no_count_makes_an_estimated_row_that_says_why(
    proxy: Proxy, upstream: FakeUpstream, value: object, note: str
) -> None:
    usage = {"prompt_tokens": value, "completion_tokens": 5}
    upstream.queue(json_reply({"model": "gpt-4o-mini", "choices": [], "usage": usage}))
    status, _ = await post(
        proxy, "/s/bad/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG}
    )
    assert status == 200
    row = await only_row(proxy, "bad")
    assert row["estimated"] is True
    assert row["outputTokens"] == 5  # what was valid still counts
    assert 0 < row["inputTokens"] < 100  # the prompt's estimate, not the upstream's number
    assert row["note"] == note
    assert Decimal(str(row["costUsd"])) < Decimal("0.001")
    # And the store goes on: the next row is written like any other.
    upstream.queue(
        json_reply(
            {
                "model": "gpt-4o-mini",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }
        )
    )
    await post(
        proxy, "/s/next/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG}
    )
    row = await only_row(proxy, "next")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"], row["note"]) == (
        3,
        2,
        False,
        None,
    )


async def test_a_streamed_anthropic_count_out_of_range_is_noted(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    chunks = [
        b"event: " + name + b"\n" + event
        for name, event in zip((b"message_start", b"message_delta"), _claude(1e300, 7), strict=True)
    ]
    upstream.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True, "messages": MSG}
    status, got = await post(proxy, "/s/anth/anthropic/v1/messages", body)
    assert status == 200 and got == fingerprint(chunks)
    row = await only_row(proxy, "anth")
    assert row["estimated"] is True and row["outputTokens"] == 7
    assert row["note"] == "usage out of range: input_tokens=1e300"


async def test_999999_cached_tokens_against_no_input_are_clamped_and_logged_once(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # The figure: this was billed $1.25 (999,999 tokens at gpt-4o's cached price).
    caplog.set_level(logging.WARNING)
    usage = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 999_999},
    }
    for session in ("c1", "c2"):
        upstream.queue(json_reply({"model": "gpt-4o", "choices": [], "usage": usage}))
        await post(
            proxy, f"/s/{session}/openai/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}
        )
        row = await only_row(proxy, session)
        assert (row["inputTokens"], row["cachedInputTokens"], row["estimated"]) == (0, 0, False)
        assert Decimal(str(row["costUsd"])) == 0
        assert row["note"] == "cached tokens beyond the input: 999999 > 0, clamped to 0"
    logged = [r for r in caplog.records if "cached tokens beyond the input" in r.getMessage()]
    assert len(logged) == 1  # once per route and kind, not per row


# --- gzip bombs ----------------------------------------------------------------------------------


@functools.cache
def _bomb(prefix: bytes, fill: bytes, size: int, encoding: str = "gzip") -> bytes:
    """``prefix`` then ``fill`` repeated to ``size`` bytes, compressed (gzip about 1,000:1,
    br and zstd far more)."""
    unit = (fill * (MIB // len(fill) + 1))[:MIB]
    if encoding == "br":
        br = pytest.importorskip("brotli").Compressor(quality=4)
        step, end = br.process, br.finish
    elif encoding == "zstd":
        zstd = pytest.importorskip("zstandard").ZstdCompressor(level=3).compressobj()
        step, end = zstd.compress, zstd.flush
    else:
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)
        step, end = gz.compress, gz.flush
    out = [step(prefix), *(step(unit) for _ in range(size // MIB)), end()]
    return b"".join(out)


BOMB_SIZE = 4 * MAX_DECODED_BYTES  # 256 MiB inflated, about 250 KB on the wire as gzip
JSON_HEAD = b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":1,"completion_tokens":1},"x":"'
BOMBS = {
    "gzip-zeros": ("gzip", b"", b"\0"),
    "gzip-json": ("gzip", JSON_HEAD, b"0"),
    "br-json": ("br", JSON_HEAD, b"0"),
    "zstd-json": ("zstd", JSON_HEAD, b"0"),
}


@pytest.mark.parametrize("kind", list(BOMBS))
@pytest.mark.parametrize("whole", [True, False], ids=["content-length", "chunked"])
async def test_a_bomb_reaches_the_client_whole_and_the_parser_stops_at_the_cap(
    proxy: Proxy, upstream: FakeUpstream, kind: str, whole: bool
) -> None:
    encoding, prefix, fill = BOMBS[kind]
    bomb = _bomb(prefix, fill, BOMB_SIZE, encoding)
    chunks = [bomb[i : i + 65536] for i in range(0, len(bomb), 65536)]
    headers = {"Content-Encoding": encoding}
    if whole:  # read whole by the proxy (under 8 MiB on the wire)
        headers["Content-Length"] = str(len(bomb))
    upstream.queue(Reply(chunks=chunks, headers=headers))
    body = {"model": "gpt-4o-mini", "messages": MSG}
    with peak_memory() as peak:
        status, got = await post(proxy, "/s/bomb/openai/v1/chat/completions", body)
    assert status == 200 and got == fingerprint([bomb])  # every byte, unchanged
    row = await only_row(proxy, "bomb")
    assert row["estimated"] is True
    assert "compressed body over 64 MiB inflated: parsing stopped" in row["note"]
    # Bounded: the parser's copy never exceeds the cap (a JSON-shaped bomb is held up to
    # it, as any JSON body may be; zeros are not JSON and hold one 8 MiB line at most).
    bound = MAX_DECODED_BYTES + 40 * MIB if prefix else 32 * MIB
    assert peak[0] < bound, peak


async def test_a_large_compressed_answer_is_read_in_pieces_and_billed_as_reported(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # 12 MiB inflated: past the 8 MiB read at once, so the parser reads it in pieces.
    body = orjson.dumps(
        {
            "model": "text-embedding-3-small",
            "data": [{"embedding": "QUJD" * (3 * MIB)}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6},
        }
    )
    packed = gzip.compress(body)
    upstream.queue(
        Reply(
            chunks=[packed],
            headers={"Content-Encoding": "gzip", "Content-Length": str(len(packed))},
        )
    )
    status, got = await post(
        proxy, "/s/emb/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"}
    )
    assert status == 200 and got == fingerprint([packed])
    row = await only_row(proxy, "emb")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"], row["note"]) == (
        6,
        0,
        False,
        None,
    )


# --- lines that never end -------------------------------------------------------------------

LINE = 64 * MIB
PIECE = b"x" * 65536  # one object sent again and again: the test itself holds 64 KiB


def _giant_stream(head: list[bytes], tail: list[bytes]) -> list[bytes]:
    return [*head, b"data: ", *[PIECE] * (LINE // len(PIECE)), b"\n\n", *tail]


async def test_a_64_mib_line_on_the_openai_route_is_skipped_in_bounded_memory(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # No stream_options: spendgate injects include_usage and hides the usage-only chunk,
    # so the output filter sees the giant line too.
    content = {"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    usage = {
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4},
    }
    chunks = _giant_stream([_sse(content)], [_sse(usage), b"data: [DONE]\n\n"])
    upstream.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    body = {"model": "gpt-4o-mini", "stream": True, "messages": MSG}
    with peak_memory() as peak:
        status, got = await post(proxy, "/s/line/openai/v1/chat/completions", body)
    assert status == 200
    assert got == fingerprint([c for c in chunks if c != _sse(usage)])  # all but the usage chunk
    assert upstream.seen[0].json()["stream_options"] == {"include_usage": True}
    row = await only_row(proxy, "line")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (9, 4, False)
    assert row["note"] == "oversized SSE events skipped: 1 over 8 MiB, usage may be missing"
    assert peak[0] < 24 * MIB, peak  # the 8 MiB cap, and pieces in flight


async def test_a_64_mib_line_on_the_anthropic_route_is_skipped_in_bounded_memory(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    start, delta = _claude(11, 6)
    chunks = _giant_stream([start], [delta])
    upstream.queue(Reply(chunks=chunks, content_type="text/event-stream"))
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True, "messages": MSG}
    with peak_memory() as peak:
        status, got = await post(proxy, "/s/aline/anthropic/v1/messages", body)
    assert status == 200 and got == fingerprint(chunks)
    row = await only_row(proxy, "aline")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (11, 6, False)
    assert "oversized SSE events skipped" in row["note"]
    assert peak[0] < 24 * MIB, peak


async def test_a_giant_ndjson_line_on_the_ollama_route_is_skipped(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    done = orjson.dumps({"model": "llama3", "done": True, "prompt_eval_count": 8, "eval_count": 3})
    chunks = [b'{"model":"llama3","message":{"content":"', *[PIECE] * 256, b'"}}\n', done + b"\n"]
    upstream.queue(Reply(chunks=chunks, content_type="application/x-ndjson"))
    status, got = await post(proxy, "/s/ol/ollama/api/chat", {"model": "llama3", "messages": MSG})
    assert status == 200 and got == fingerprint(chunks)
    row = await only_row(proxy, "ol")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (8, 3, False)
    assert row["note"] == "oversized NDJSON lines skipped: 1 over 8 MiB, usage may be missing"


async def test_a_json_stream_past_the_buffer_is_not_parsed_and_says_so(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    # Chunked, so not read whole: the body framer holds at most 64 MiB, then lets go.
    chunks = [
        b'{"model":"gpt-4o-mini","x":"',
        *[PIECE] * (65 * 16),
        b'","usage":{"prompt_tokens":1}}',
    ]
    upstream.queue(Reply(chunks=chunks))
    with peak_memory() as peak:
        status, got = await post(
            proxy, "/s/big/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MSG}
        )
    assert status == 200 and got == fingerprint(chunks)
    row = await only_row(proxy, "big")
    assert row["estimated"] is True and row["note"] == "JSON body over 64 MiB: not parsed"
    assert peak[0] < 64 * MIB + 24 * MIB, peak
