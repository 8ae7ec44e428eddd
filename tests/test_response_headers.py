"""response_headers.py through the proxy (SPENDGATE_RESPONSE_HEADERS, docs/reference.md
§1 "Response headers"): the row's id on every forwarded response, its cost on the
non-streamed ones, the held body bounded, and nothing at all by default."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
import pytest

from spendgate import proxy as proxy_module
from spendgate import response_headers
from spendgate.response_headers import COST_USD, MESSAGE_ID
from tests.conftest import Proxy, StartProxy
from tests.upstream import FakeUpstream, Reply, chat_completion, json_reply, sse_reply

CHAT = "/s/hdr/openai/v1/chat/completions"


def with_length(payload: Any) -> Reply:
    body = orjson.dumps(payload)
    return Reply(chunks=[body], headers={"Content-Length": str(len(body))})


async def post(
    proxy: Proxy, body: dict[str, Any] | None = None
) -> tuple[dict[str, str], bytes, dict[str, Any]]:
    """One chat request; its response headers and body, and its row."""
    sent = body or {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    async with proxy.http.post(proxy.url(CHAT), json=sent) as r:
        assert r.status == 200
        headers, data = dict(r.headers), await r.read()
    rows = await proxy.messages("hdr")
    return headers, data, rows[0]


async def test_off_by_default_nothing_is_added(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(with_length(chat_completion("gpt-4o-mini")))
    headers, _, _ = await post(proxy)
    assert not [h for h in headers if h.lower().startswith("x-spendgate-")]


@pytest.mark.parametrize("reply", [with_length, json_reply], ids=["content-length", "chunked"])
async def test_a_non_streamed_answer_carries_its_id_and_cost(
    start_proxy: StartProxy, upstream: FakeUpstream, reply: Any
) -> None:
    """A chunked answer (no Content-Length, which the proxy otherwise streams through) is
    held so that it can be priced first."""
    proxy = await start_proxy(response_headers=True)
    upstream.queue(reply(chat_completion("gpt-4o-mini")))
    headers, data, row = await post(proxy)
    assert orjson.loads(data)["usage"]["completion_tokens"] == 100  # the body unchanged
    assert headers[MESSAGE_ID] == row["messageId"]
    # gpt-4o-mini: $0.15 / $0.60 per million → 1000 in + 100 out = $0.00021
    assert Decimal(headers[COST_USD]) == Decimal(str(row["costUsd"])) == Decimal("0.00021")


async def test_a_stream_carries_its_id_only(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(response_headers=True)
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "hi"}}]}  # fmt: skip
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                               "total_tokens": 6}}  # fmt: skip
    upstream.queue(sse_reply([chunk, usage]))
    body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
    headers, data, row = await post(proxy, body)
    assert b"[DONE]" in data
    assert headers[MESSAGE_ID] == row["messageId"] and row["outputTokens"] == 1
    assert COST_USD not in headers  # sent before the usage existed


async def test_an_unpriced_model_has_no_cost_header(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(response_headers=True)
    upstream.queue(json_reply(chat_completion(model="my-private-model")))
    headers, _, row = await post(proxy, {"model": "my-private-model", "messages": []})
    assert headers[MESSAGE_ID] == row["messageId"] and row["costUsd"] is None
    assert COST_USD not in headers


async def test_a_held_body_past_the_bound_streams_on_whole(
    start_proxy: StartProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold is bounded by WHOLE_BODY_BYTES: a longer chunked body goes on as a stream
    from what was held (every byte, in order), with its id and no cost."""
    monkeypatch.setattr(proxy_module, "WHOLE_BODY_BYTES", 4096)
    proxy = await start_proxy(response_headers=True)
    payload = chat_completion("gpt-4o-mini")
    payload["choices"][0]["message"]["content"] = "y" * 20_000
    body = orjson.dumps(payload)
    upstream.queue(Reply(chunks=[body[i : i + 1000] for i in range(0, len(body), 1000)]))
    headers, data, row = await post(proxy)
    assert data == body
    assert headers[MESSAGE_ID] == row["messageId"] and row["outputTokens"] == 100
    assert COST_USD not in headers


async def test_an_upstream_that_breaks_off_a_held_body_is_a_clean_502(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(response_headers=True)
    upstream.queue(Reply(chunks=[b'{"id": "c", ', b'"x": 1}'], reset_after=1))
    async with proxy.http.post(proxy.url(CHAT), json={"model": "gpt-4o-mini"}) as r:
        assert r.status == 502
        message_id = r.headers[MESSAGE_ID]
    rows = await proxy.messages("hdr")
    assert rows[0]["messageId"] == message_id and rows[0]["status"] == 502


async def test_a_body_of_another_type_is_not_held(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """An unannounced stream (Bedrock's binary event stream) must keep streaming: only
    JSON is held to be priced. The first piece reaches the client before the second is
    even sent."""
    proxy = await start_proxy(response_headers=True)
    upstream.queue(
        Reply(chunks=[b"\x00first", b"\x00second"], content_type="application/octet-stream",
              delay=0.5)
    )  # fmt: skip
    async with proxy.http.post(proxy.url(CHAT), json={"model": "gpt-4o-mini"}) as r:
        first = await asyncio.wait_for(r.content.readany(), timeout=5)
        assert first == b"\x00first" and MESSAGE_ID in r.headers
        assert await r.read() == b"\x00second"
    assert not response_headers.holdable("application/x-ndjson")
    assert response_headers.holdable("application/problem+json; charset=utf-8")
