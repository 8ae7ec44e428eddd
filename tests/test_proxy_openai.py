"""The OpenAI SDK through the real proxy to a fake upstream: forwarding and metering."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from tests.conftest import Proxy
from tests.upstream import FakeUpstream, fixture_reply, json_reply, sse_reply


def client(proxy: Proxy, session: str = "run-1", **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="sk-test-secret", max_retries=0, **kw
    )


def chunk(
    content: str | None = None, usage: dict[str, object] | None = None, choices: bool = True
) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
        if choices
        else [],
        "usage": usage,
    }


async def test_json_completion_is_forwarded_and_priced(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"))
    async with client(proxy) as c:
        resp = await c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert resp.usage is not None and resp.usage.prompt_tokens == 1149
    seen = upstream.seen[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer sk-test-secret"
    cost = await proxy.cost("run-1")
    assert cost["totalInputTokens"] == 1149
    assert cost["totalCachedInputTokens"] == 1024
    assert cost["totalOutputTokens"] == 353
    # gpt-4o-mini: $0.15/M input, $0.075/M cached, $0.60/M output
    # 125 × 0.15 + 1024 × 0.075 + 353 × 0.6 = 18.75 + 76.8 + 211.8 = 307.35 µ$
    assert Decimal(repr(cost["totalCostUsd"])) == Decimal("0.00030735")
    (row,) = await proxy.messages("run-1")
    assert row["modelId"] == "gpt-4o-mini-2024-07-18"
    assert row["estimated"] is False and row["stream"] is False


async def test_stream_injects_include_usage_and_hides_the_usage_chunk(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    upstream.queue(
        sse_reply([chunk("Hel"), chunk("lo"), chunk("!"), chunk(usage=usage, choices=False)])
    )
    async with client(proxy) as c:
        stream = await c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hello!"
    assert all(ch.usage is None for ch in chunks)  # the client never asked for usage
    assert upstream.seen[0].json()["stream_options"] == {"include_usage": True}
    (row,) = await proxy.messages("run-1")
    assert (row["inputTokens"], row["outputTokens"], row["estimated"]) == (10, 3, False)
    # gpt-4o: $2.50/M in, $10/M out → 10 × 2.5 + 3 × 10 = 55 µ$
    assert Decimal(repr(row["costUsd"])) == Decimal("0.000055")


async def test_client_that_asked_for_usage_gets_it(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("openai/chat_stream_usage_gpt-4.sse", chunk_size=7))
    async with client(proxy) as c:
        stream = await c.chat.completions.create(
            model="gpt-4",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 17
    (row,) = await proxy.messages("run-1")
    assert (row["inputTokens"], row["outputTokens"]) == (12, 5)


async def test_stream_without_usage_is_estimated(
    start_proxy: object, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(inject_stream_usage=False)  # type: ignore[operator]
    upstream.queue(fixture_reply("openai/chat_stream_nousage_gpt-5-nano.sse"))
    async with client(proxy) as c:
        stream = await c.chat.completions.create(
            model="gpt-5-nano", messages=[{"role": "user", "content": "hello there"}], stream=True
        )
        _ = [ch async for ch in stream]
    assert "stream_options" not in upstream.seen[0].json()
    (row,) = await proxy.messages("run-1")
    assert row["estimated"] is True
    assert row["outputTokens"] > 0 and row["inputTokens"] > 0


async def test_unknown_model_costs_null_but_counts_tokens(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(
        json_reply(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "my-private-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            }
        )
    )
    async with client(proxy) as c:
        await c.chat.completions.create(
            model="my-private-model", messages=[{"role": "user", "content": "x"}]
        )
    cost = await proxy.cost("run-1")
    assert cost["totalInputTokens"] == 7 and cost["totalOutputTokens"] == 2
    assert cost["totalCostUsd"] is None
    assert cost["byModel"]["my-private-model"]["costUsd"] is None


async def test_upstream_error_is_passed_through_and_costs_nothing(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    err = {
        "error": {"message": "Rate limit", "type": "rate_limit_error", "param": None, "code": None}
    }
    upstream.queue(json_reply(err, status=429))
    async with client(proxy) as c:
        with pytest.raises(openai.RateLimitError, match="Rate limit"):
            await c.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
    (row,) = await proxy.messages("run-1")
    assert row["status"] == 429 and row["costUsd"] == 0 and row["estimated"] is False
    assert row["inputTokens"] == 0


async def test_unprefixed_v1_path_and_default_session(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("openai/chat_json_gpt-3.5-turbo.json"))
    async with openai.AsyncOpenAI(base_url=proxy.url("/v1"), api_key="k", max_retries=0) as c:
        await c.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
        )
    assert upstream.seen[0].path == "/v1/chat/completions"
    cost = await proxy.cost("default")
    assert cost["messageCount"] == 1 and cost["totalInputTokens"] == 15
