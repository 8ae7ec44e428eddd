"""Where the budget cut may end a stream (spendgate.boundaries), per wire format: on
hand-made hostile pieces, split at every offset, and through the running proxy with a
client that parses each format."""

from __future__ import annotations

import zlib
from typing import Any

import aiohttp
import orjson
import pytest

from spendgate.boundaries import (
    MAX_CUT_WAIT_BYTES,
    ArrayBoundaries,
    EventBoundaries,
    LineBoundaries,
    boundaries_for,
)
from spendgate.settings import RouteConfig
from tests.conftest import StartProxy
from tests.upstream import FakeUpstream, Reply

ARGS = ("gemini", "out of budget", "budget_exceeded", "session_budget_exceeded")
HOSTILE_TEXT = 'a "quoted" ]}[{ string \\" with \\\\ escapes, commas and \\u005d brackets'


def element(text: str, n: int = 1) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 15, "candidatesTokenCount": n},
        "modelVersion": "gemini-2.5-flash",
    }


ELEMENTS = [element(HOSTILE_TEXT, 1), element("[[[{{{", 2), element(HOSTILE_TEXT * 3, 3)]


def gemini_array(elements: list[dict[str, Any]]) -> bytes:
    """The shape Gemini sends: elements one per write, ``\\n,\\r\\n`` between them."""
    return (
        b"["
        + b"\n,\r\n".join(orjson.dumps(e, option=orjson.OPT_INDENT_2) for e in elements)
        + b"\n]"
    )


# -- JSON arrays ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", range(len(gemini_array(ELEMENTS)) + 1))
def test_an_array_cut_after_any_piece_parses_as_the_whole_elements_then_the_error(
    split: int,
) -> None:
    """Two pieces, split at every offset (inside strings, escapes, whitespace): cutting
    in the second piece, or after the first where it ended between elements, leaves
    the client a JSON array of whole elements and the error."""
    body = gemini_array(ELEMENTS)
    first, second = body[:split], body[split:]
    bounds = ArrayBoundaries()
    end_first = bounds.scan(first)
    if bounds.clean:
        got = orjson.loads(first + bounds.ending(*ARGS, truncated=False))
        assert got[:-1] == ELEMENTS[: len(got) - 1] and got[-1]["error"]["code"] == 402
    if end_first >= 0:  # the first piece holds a boundary
        got = orjson.loads(first[:end_first] + bounds.ending(*ARGS, truncated=True))
        assert got[:-1] == ELEMENTS[: len(got) - 1]
    end = bounds.scan(second)
    if end >= 0:
        got = orjson.loads(first + second[:end] + bounds.ending(*ARGS, truncated=True))
        assert got[-1] == {
            "error": {"code": 402, "message": "out of budget", "status": "BUDGET_EXCEEDED"}
        }
        assert got[:-1] == ELEMENTS[: len(got) - 1] and len(got) >= 2


def test_each_element_end_is_found_byte_by_byte() -> None:
    body = gemini_array(ELEMENTS)
    bounds = ArrayBoundaries()
    ends = [i + 1 for i in range(len(body)) if bounds.scan(body[i : i + 1]) == 1]
    assert len(ends) == len(ELEMENTS)
    assert orjson.loads(body[: ends[1]] + b"]") == ELEMENTS[:2]


def test_an_escape_split_from_its_byte_is_skipped_in_the_next_piece() -> None:
    bounds = ArrayBoundaries()
    assert bounds.scan(b'[{"t": "x\\') == -1  # the backslash ends the piece
    assert bounds.scan(b'"}') == -1  # the quote is escaped: still inside the string
    assert bounds.scan(b' ]"}') == 4 and bounds.clean


@pytest.mark.parametrize(
    "body",
    [b'{"candidates": []}', b"garbage [{}]", b'"a string"', b"  \r\n 42"],
)
def test_what_is_no_array_has_no_boundary(body: bytes) -> None:
    bounds = ArrayBoundaries()
    assert bounds.scan(body) == -1 and not bounds.clean
    assert bounds.scan(b"[{}]") == -1  # nor does anything after it


def test_a_closed_array_has_no_boundary_after_it() -> None:
    bounds = ArrayBoundaries()
    assert bounds.scan(b"[{}\n]") == 3
    assert bounds.scan(b'[{"a": 1}]') == -1 and not bounds.clean


def test_deep_nesting_and_huge_elements_keep_no_bytes() -> None:
    bounds = ArrayBoundaries()
    bounds.scan(b"[" + b"[" * 100_000)
    for _ in range(64):
        assert bounds.scan(b'{"x": "' + b"]" * 16_384 + b'"}') == -1
    assert bounds.scan(b"]" * 100_000) == 100_000  # the outer array's element ends
    assert all(not isinstance(getattr(bounds, s), (bytes, bytearray)) for s in bounds.__slots__)


def test_the_comma_the_client_already_got_is_not_sent_twice() -> None:
    bounds = ArrayBoundaries()
    bounds.scan(b"[{}\n")
    assert bounds.clean and orjson.loads(b"[{}\n" + bounds.ending(*ARGS, False))[0] == {}
    bounds.scan(b",\r\n")
    ending = bounds.ending(*ARGS, False)
    assert bounds.clean and not ending.startswith(b",")
    assert len(orjson.loads(b"[{}\n,\r\n" + ending)) == 2
    opened = ArrayBoundaries()
    assert opened.scan(b" [\n") == -1 and opened.clean
    assert orjson.loads(b" [\n" + opened.ending(*ARGS, False)) == [
        {"error": {"code": 402, "message": "out of budget", "status": "BUDGET_EXCEEDED"}}
    ]  # opened but no element yet: the error alone


# -- SSE and NDJSON ---------------------------------------------------------------------------


@pytest.mark.parametrize("blank", [b"\n\n", b"\r\n\r\n"])
def test_a_blank_line_split_between_pieces_is_found(blank: bytes) -> None:
    event = b"data: {}" + blank
    for split in range(1, len(event)):
        bounds = EventBoundaries()
        first, second = event[:split], event[split:] + b"data: {"
        assert bounds.scan(first) == (len(first) if split == len(event) else -1)
        assert bounds.scan(second) == len(event) - split
        assert not bounds.clean


def test_lines_end_at_newlines() -> None:
    bounds = LineBoundaries()
    assert bounds.scan(b'{"a": 1}\n{"b"') == 9 and not bounds.clean
    assert bounds.scan(b": 2}\n") == 5 and bounds.clean


def test_the_format_comes_from_the_content_type_and_encoding() -> None:
    assert isinstance(boundaries_for("text/event-stream; charset=utf-8", ""), EventBoundaries)
    assert isinstance(boundaries_for("application/x-ndjson", ""), LineBoundaries)
    assert isinstance(boundaries_for("application/json; charset=utf-8", ""), ArrayBoundaries)
    assert boundaries_for("text/event-stream", "gzip").opaque


# -- through the proxy --------------------------------------------------------------------------

GEMINI_STREAM = "/s/{}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


async def put_budget(http: aiohttp.ClientSession, url: str, usd: float) -> None:
    async with http.put(url, json={"budgetUsd": usd}) as r:
        assert r.status == 200, await r.text()


def many_elements(n: int) -> list[dict[str, Any]]:
    return [element(f"{HOSTILE_TEXT} {i} " * 20, 40 * i) for i in range(1, n + 1)]


@pytest.mark.parametrize("chunk", [0, 333, 1000])
async def test_a_gemini_json_array_stream_is_cut_after_a_whole_element(
    start_proxy: StartProxy, upstream: FakeUpstream, chunk: int
) -> None:
    """0: each element in a write of its own (as Gemini sends); else writes of that many
    bytes, so the cut falls inside pieces (each a moment apart, as a stream arrives)."""
    proxy = await start_proxy(on_budget_mid_stream="cut")
    await put_budget(proxy.http, proxy.url("/api/sessions/cutg/budget"), 0.00002)
    elements = many_elements(40)
    body = gemini_array(elements)
    if chunk:
        parts = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    else:
        parts = [b"[" + orjson.dumps(elements[0])]
        parts += [b"\n,\r\n" + orjson.dumps(e) for e in elements[1:]] + [b"\n]"]
    upstream.queue(Reply(chunks=parts, content_type="application/json", delay=0.005))
    url = proxy.url(GEMINI_STREAM.format("cutg"))
    async with proxy.http.post(url, json=PROMPT, headers={"x-goog-api-key": "k"}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        got = orjson.loads(await r.read())
    assert isinstance(got, list) and 1 <= len(got) - 1 < len(elements)
    assert got[:-1] == elements[: len(got) - 1]
    assert got[-1]["error"]["code"] == 402 and "ran out of budget" in got[-1]["error"]["message"]
    (row,) = await proxy.messages("cutg")
    assert row["error"] == "budget_cut" and row["estimated"] is True
    assert (await proxy.cost("cutg"))["paused"] is True


async def test_an_ollama_ndjson_stream_is_cut_after_a_whole_line(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    base = upstream.base_url  # type: ignore[attr-defined]
    remote = RouteConfig(prefix="/remote", upstream=base, adapter="ollama", local=False)
    proxy = await start_proxy(on_budget_mid_stream="cut", routes=[remote])
    await put_budget(proxy.http, proxy.url("/api/sessions/cutn/budget"), 0.0001)
    line = {"model": "gpt-4o", "message": {"role": "assistant", "content": "word " * 20}}
    body = b"".join(orjson.dumps(dict(line, done=False)) + b"\n" for _ in range(60))
    parts = [body[i : i + 50] for i in range(0, len(body), 50)]
    upstream.queue(Reply(chunks=parts, content_type="application/x-ndjson", delay=0.001))
    body_json = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url("/s/cutn/remote/api/chat"), json=body_json) as r:
        text = await r.read()
    assert text.endswith(b"\n")
    lines = [orjson.loads(x) for x in text.splitlines()]
    assert 1 <= len(lines) - 1 < 60 and all(x["message"] == line["message"] for x in lines[:-1])
    assert "ran out of budget" in lines[-1]["error"]
    (row,) = await proxy.messages("cutn")
    assert row["error"] == "budget_cut"


async def test_a_cut_with_no_boundary_in_sight_closes_the_connection(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An element that never ends: the cut waits MAX_CUT_WAIT_BYTES, then the client sees
    a body cut short (never a broken element passed off as a whole array)."""
    proxy = await start_proxy(on_budget_mid_stream="cut")
    await put_budget(proxy.http, proxy.url("/api/sessions/cuth/budget"), 0.00002)
    first = b"[" + orjson.dumps(many_elements(1)[0]) + b',{"candidates": [{"content": "'
    filler = [b"x]}" * 20_000] * 80  # 4.8 MB of one string
    upstream.queue(Reply(chunks=[first, *filler, b'"}]}]'], content_type="application/json"))
    url = proxy.url(GEMINI_STREAM.format("cuth"))
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with proxy.http.post(url, json=PROMPT) as r:
            async for data in r.content.iter_any():
                got += data
    # The wait, and the piece that went past it (pieces are what the socket read gives).
    assert MAX_CUT_WAIT_BYTES < len(got) < 2 * MAX_CUT_WAIT_BYTES
    (row,) = await proxy.messages("cuth")
    assert row["error"] == "budget_cut"
    assert "budget cut closes the connection mid-stream" in caplog.text


async def test_a_compressed_stream_is_cut_by_closing_the_connection(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets the compressed bytes unchanged: no boundary in them is one its
    decoder sees, so a due cut closes the connection after the piece in hand."""
    proxy = await start_proxy(on_budget_mid_stream="cut")
    await put_budget(proxy.http, proxy.url("/api/sessions/cutz/budget"), 0.00002)
    gz = zlib.compressobj(wbits=31)
    parts = [
        gz.compress(b"data: " + orjson.dumps(e) + b"\r\n\r\n") + gz.flush(zlib.Z_SYNC_FLUSH)
        for e in many_elements(40)
    ]
    parts.append(gz.flush())
    upstream.queue(
        Reply(
            chunks=parts,
            content_type="text/event-stream",
            headers={"Content-Encoding": "gzip"},
            delay=0.005,
        )
    )
    url = proxy.url(GEMINI_STREAM.format("cutz") + "?alt=sse")
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with proxy.http.post(url, json=PROMPT) as r:
            async for data in r.content.iter_any():
                got += data
    events = got.split(b"\r\n\r\n")
    assert 1 <= len(events) - 1 < 40 and orjson.loads(events[0][len(b"data: ") :])
    (row,) = await proxy.messages("cutz")
    assert row["error"] == "budget_cut"
    assert "a compressed body has no boundary the client decodes" in caplog.text


def test_a_stream_that_starts_with_a_blank_line_has_no_boundary_inside_it() -> None:
    bounds = EventBoundaries()
    assert bounds.clean  # nothing sent yet
    assert bounds.scan(b"\ndata: {") == -1 and not bounds.clean
