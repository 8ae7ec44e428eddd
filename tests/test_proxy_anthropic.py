"""The Anthropic SDK through the real proxy: streams, cache reads/writes, costs to the cent."""

from __future__ import annotations

from decimal import Decimal

import anthropic

from tests.conftest import Proxy
from tests.upstream import FakeUpstream, fixture_reply


def client(proxy: Proxy, path: str = "/s/claude-run/anthropic") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url(path), api_key="sk-ant-secret", max_retries=0
    )


MSG = [{"role": "user", "content": "hello"}]


async def test_stream_with_cache_write(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("anthropic/messages_stream_cache_write_claude-3-5-sonnet.sse", 5))
    async with (
        client(proxy) as c,
        c.messages.stream(
            model="claude-3-5-sonnet-20240620",
            max_tokens=300,
            messages=MSG,  # type: ignore[arg-type]
        ) as stream,
    ):
        text = await stream.get_final_text()
    assert text
    seen = upstream.seen[0]
    assert seen.path == "/v1/messages"
    # newer SDKs send the key as a bearer token, older ones as x-api-key: either goes through
    sent = seen.headers.get("x-api-key") or seen.headers.get("Authorization", "")
    assert sent.endswith("sk-ant-secret")
    assert "anthropic-version" in seen.headers
    (row,) = await proxy.messages("claude-run")
    # input_tokens 4 exclude the 1165 cache-creation tokens: spendgate's input is all of them
    assert row["inputTokens"] == 4 + 1165
    assert row["cacheWriteTokens"] == 1165 and row["outputTokens"] == 201
    # claude-3-5-sonnet: $3/M in, $3.75/M cache write, $15/M out
    # 4 × 3 + 1165 × 3.75 + 201 × 15 = 12 + 4368.75 + 3015 = 7395.75 µ$
    assert Decimal(repr(row["costUsd"])) == Decimal("0.00739575")


async def test_json_with_cache_read(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(fixture_reply("anthropic/messages_json_cache_read_claude-3-5-sonnet.json"))
    async with client(proxy) as c:
        msg = await c.messages.create(
            model="claude-3-5-sonnet-20240620",
            max_tokens=300,
            messages=MSG,  # type: ignore[arg-type]
        )
    assert msg.usage.cache_read_input_tokens == 1163
    cost = await proxy.cost("claude-run")
    assert cost["totalInputTokens"] == 4 + 1163 and cost["totalCachedInputTokens"] == 1163
    # 4 × 3 + 1163 × 0.30 + 202 × 15 = 12 + 348.9 + 3030 = 3390.9 µ$
    assert Decimal(repr(cost["totalCostUsd"])) == Decimal("0.0033909")


async def test_final_message_delta_revises_input(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(
        fixture_reply("anthropic/messages_stream_server_tool_claude-sonnet-4-6.sse", 100)
    )
    async with (
        client(proxy) as c,
        c.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=300,
            messages=MSG,  # type: ignore[arg-type]
        ) as stream,
    ):
        await stream.get_final_message()
    (row,) = await proxy.messages("claude-run")
    assert (row["inputTokens"], row["outputTokens"]) == (1591, 175)


async def test_unprefixed_messages_path_and_claude_code_headers(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.queue(fixture_reply("anthropic/messages_json_cache_write_claude-3-5-sonnet.json"))
    c = anthropic.AsyncAnthropic(
        base_url=proxy.url(""),
        api_key="k",
        max_retries=0,
        default_headers={
            "X-Claude-Code-Session-Id": "cc-123",
            "X-Claude-Code-Agent-Id": "explorer",
        },
    )
    async with c:
        await c.messages.create(model="claude-3-5-sonnet-20240620", max_tokens=10, messages=MSG)  # type: ignore[arg-type]
    (row,) = await proxy.messages("cc-123")
    assert row["agentId"] == "explorer"
    cost = await proxy.cost("cc-123")
    assert cost["byAgent"]["explorer"]["messageCount"] == 1
