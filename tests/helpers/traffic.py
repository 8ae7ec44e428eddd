"""Real SDK traffic through a running proxy, and the cost totals it should produce.

Used by the metrics tests and by the real-Prometheus test, which must see the same numbers.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Proxy
from tests.upstream import FakeUpstream, fixture_reply, json_reply, sse_reply


def oa(proxy: Proxy, session: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="sk-test", max_retries=0
    )


def stream_chunk(content: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [] if usage else [{"index": 0, "delta": {"content": content}}],
        "usage": usage,
    }


HI = [{"role": "user", "content": "hi"}]


async def send_traffic(proxy: Proxy, upstream: FakeUpstream) -> None:
    """OpenAI JSON + stream, Anthropic stream, an upstream 500 and a 402, all via the SDKs."""
    upstream.queue(
        fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"),
        sse_reply(
            [
                stream_chunk("Hel"),
                stream_chunk("lo"),
                stream_chunk(
                    usage={"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
                ),
            ]
        ),
        fixture_reply("anthropic/messages_stream_cache_write_claude-3-5-sonnet.sse", 64),
        json_reply({"error": {"message": "boom", "type": "server_error"}}, status=500),
    )
    async with oa(proxy, "run-1") as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
        stream = await c.chat.completions.create(model="gpt-4o", messages=HI, stream=True)  # type: ignore[arg-type]
        assert [ch async for ch in stream]
    async with (
        anthropic.AsyncAnthropic(
            base_url=proxy.url("/s/claude-run/anthropic"), api_key="k", max_retries=0
        ) as ac,
        ac.messages.stream(
            model="claude-3-5-sonnet-20240620",
            max_tokens=300,
            messages=HI,  # type: ignore[arg-type]
        ) as s,
    ):
        await s.get_final_message()
    async with oa(proxy, "run-1") as c:
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    async with proxy.http.put(proxy.url("/api/sessions/broke/budget"), json={"budgetUsd": 0}) as r:
        assert r.status == 200
    async with oa(proxy, "broke") as c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        assert err.value.status_code == 402
    async with proxy.http.post(proxy.url("/api/sessions/broke/pause")) as r:
        assert r.status == 200


async def expected_rows(proxy: Proxy) -> list[dict[str, Any]]:
    return [*await proxy.messages("run-1"), *await proxy.messages("claude-run")]


def row_cost_totals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    costs: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        if row["costUsd"] is not None:
            key = (row["providerId"], row["modelId"])
            costs[key] = costs.get(key, Decimal(0)) + Decimal(repr(row["costUsd"]))
    return costs


GPT4O_REPLY = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
}  # fmt: skip
"""A gpt-4o chat completion of 1,000 input and 100 output tokens: $0.0035."""


async def chat(
    proxy: Proxy, upstream: FakeUpstream, session: str, headers: dict[str, str] | None = None
) -> None:
    """One gpt-4o chat completion (:data:`GPT4O_REPLY`) through the OpenAI SDK."""
    upstream.queue(json_reply(GPT4O_REPLY))
    async with openai.AsyncOpenAI(
        base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="k", max_retries=0,
        default_headers=headers or {},
    ) as c:  # fmt: skip
        await c.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
