"""What a reservation rests on, through the real proxy: bodies orjson rejects are still
read (and rewritten for include_usage), and a response is metered by its content type,
not by the request's stream flag (docs/reference.md §3)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from tests.conftest import Proxy
from tests.events_client import EventsClient
from tests.upstream import FakeUpstream, Reply, sse_reply

BOM = b"\xef\xbb\xbf"
USAGE = {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207}


def chunk(content: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if usage else [{"index": 0, "delta": {"content": content}}]
    return {"id": "c1", "model": "gpt-4o-2024-08-06", "choices": choices, "usage": usage}


async def post(proxy: Proxy, path: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}
    async with proxy.http.post(proxy.url(path), data=body, headers=headers) as resp:
        return resp.status, await resp.read()


STREAMED = (
    b'{"model": "gpt-4o", "stream": true, "max_tokens": 1, "max_completion_tokens": 64,'
    b' "messages": [{"role": "user", "content": "hello CONTENT"}]}'
)


@pytest.mark.parametrize(
    "body",
    [
        BOM + STREAMED.replace(b"CONTENT", b"there"),
        STREAMED.replace(b"CONTENT", b"\\ud800"),  # a lone surrogate escape
    ],
    ids=["bom", "lone-surrogate"],
)
async def test_a_body_orjson_rejects_still_gets_include_usage_and_real_usage(
    proxy: Proxy, upstream: FakeUpstream, body: bytes
) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    upstream.queue(sse_reply([chunk("Hel"), chunk("lo"), chunk(usage=USAGE)]))
    status, received = await post(proxy, "/s/lenient/openai/v1/chat/completions", body)
    assert status == 200
    # the upstream got include_usage, right after the brace (a BOM stays first), and
    # the body still reads as before with Python's json (what such servers run)
    sent = upstream.seen[0].body
    brace = body.index(b"{") + 1
    assert sent == body[:brace] + b'"stream_options":{"include_usage":true},' + body[brace:]
    assert json.loads(sent)["stream_options"] == {"include_usage": True}
    # the client, which did not ask for it, does not see the usage chunk
    assert b"Hel" in received and b"prompt_tokens" not in received
    assert received.endswith(b"data: [DONE]\n\n")
    (row,) = await proxy.messages("lenient")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (1200, 7, False)
    assert row["modelId"] == "gpt-4o-2024-08-06" and row["stream"] is True
    assert row["costUsd"] == pytest.approx(1200 * 2.5e-6 + 7 * 10e-6)  # gpt-4o


async def test_an_event_stream_answer_to_a_request_without_stream_is_metered_as_a_stream(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    events = [chunk(c) for c in ("one ", "two ", "three ", "four")] + [chunk(usage=USAGE)]
    upstream.queue(sse_reply(events, delay=0.05))
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "count"}]})
    url = proxy.url("/api/events?session=unasked")
    async with EventsClient(proxy.http, url) as watch:
        status, received = await post(proxy, "/s/unasked/openai/v1/chat/completions", body)
        assert status == 200 and b"four" in received
        final = await watch.wait_for(lambda e: e.type == "token.usage" and e.data["final"])
    assert upstream.seen[0].body == body  # no stream flag, so no rewrite
    # live updates went out while it streamed: the meter treated it as a stream
    live = [e for e in watch.events if e.type == "token.usage" and not e.data["final"]]
    assert live and all(e.data["estimated"] for e in live)
    assert (final.data["inputTokens"], final.data["outputTokens"]) == (1200, 7)
    (row,) = await proxy.messages("unasked")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (1200, 7, False)
    assert row["stream"] is True  # the row says what happened, not what was asked


async def test_an_ndjson_answer_to_an_ollama_request_with_stream_false_is_metered_as_a_stream(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    lines = [
        {"model": "llama3", "message": {"role": "assistant", "content": "a"}, "done": False},
        {"model": "llama3", "message": {"role": "assistant", "content": "b"}, "done": False},
        {"model": "llama3", "done": True, "prompt_eval_count": 30, "eval_count": 2},
    ]
    chunks = [orjson.dumps(line) + b"\n" for line in lines]
    upstream.queue(Reply(chunks=chunks, content_type="application/x-ndjson", delay=0.05))
    body = orjson.dumps({"model": "llama3", "stream": False, "messages": [{"role": "user"}]})
    async with EventsClient(proxy.http, proxy.url("/api/events?session=nd")) as watch:
        status, _ = await post(proxy, "/s/nd/ollama/api/chat", body)
        assert status == 200
        await watch.wait_for(lambda e: e.type == "token.usage" and e.data["final"])
    assert any(e.type == "token.usage" and not e.data["final"] for e in watch.events)
    (row,) = await proxy.messages("nd")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (30, 2, False)
