"""Live usage over /api/events (docs/reference.md §7): live then final usage, the context
meter, replay."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from tests.conftest import Proxy
from tests.events_client import EventsClient
from tests.upstream import FakeUpstream, fixture_reply, json_reply

MSG: Any = [{"role": "user", "content": "hi"}]


async def test_live_then_final_usage_with_openai_sdk(proxy: Proxy, upstream: FakeUpstream) -> None:
    # 9 slow pieces: live updates go out while the stream is still running
    upstream.queue(fixture_reply("openai/chat_stream_usage_tools_gpt-4o-mini.sse", 800, delay=0.05))
    async with EventsClient(proxy.http, proxy.url("/api/events?session=live")) as events:
        c = openai.AsyncOpenAI(base_url=proxy.url("/s/live/openai/v1"), api_key="k", max_retries=0)
        async with c:
            stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True)
            async for _ in stream:
                if any(not e.data.get("final", True) for e in events.events):
                    break_seen = True
            assert break_seen  # a live event arrived before the stream ended
        final = await events.wait_for(lambda e: e.type == "token.usage" and e.data["final"])
    d = final.data
    assert (d["inputTokens"], d["outputTokens"], d["totalTokens"]) == (75, 51, 126)
    assert d["estimated"] is False and d["modelId"] == "gpt-4o-mini-2024-07-18"
    assert d["providerId"] == "openai" and d["sessionId"] == "live"
    # 75 × 0.15 + 51 × 0.60 = 41.85 µ$
    assert d["costUsd"] == 0.00004185 and d["sessionCostUsd"] == 0.00004185
    live = [e for e in events.events if e.type == "token.usage" and not e.data["final"]]
    assert all(e.data["estimated"] for e in live)
    ids = [e.id for e in events.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def _message(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "id": "m", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }  # fmt: skip


async def test_context_meter_levels(proxy: Proxy, upstream: FakeUpstream) -> None:
    # claude-sonnet-4-6's window is 1,000,000 tokens in the bundled table
    window = proxy.prices.resolve("claude-sonnet-4-6").context_window  # type: ignore[union-attr]
    assert window == 1_000_000
    upstream.queue(
        json_reply(_message(700_000, 99_999)),  # 79.9999 % → ok
        json_reply(_message(790_000, 10_000)),  # 80 % → warning
        json_reply(_message(900_000, 0)),  # 90 % → critical
    )
    c = anthropic.AsyncAnthropic(base_url=proxy.url("/s/ctx/anthropic"), api_key="k", max_retries=0)
    async with EventsClient(proxy.http, proxy.url("/api/events?types=context.usage")) as events, c:
        for _ in range(3):
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MSG)
        await events.wait_for(lambda e: e.data["contextTokens"] == 900_000)
    levels = [(e.data["percent"], e.data["level"]) for e in events.events]
    assert levels == [(79.99, "ok"), (80.0, "warning"), (90.0, "critical")]
    assert {e.type for e in events.events} == {"context.usage"}
    summary = await proxy.cost("ctx")
    assert summary["context"]["level"] == "critical"
    assert summary["context"]["remainingTokens"] == 100_000


async def test_replay_after_reconnect_and_filters(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/r1/openai/v1"), api_key="k", max_retries=0)
    async with c:
        async with EventsClient(proxy.http, proxy.url("/api/events?session=r1")) as first:
            await c.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
            got = await first.wait_for(lambda e: e.type == "token.usage")
        # missed while disconnected: two more messages, in r1 and in another session
        await c.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
        other = openai.AsyncOpenAI(
            base_url=proxy.url("/s/r2/openai/v1"), api_key="k", max_retries=0
        )
        async with other:
            await other.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
    headers = {"Last-Event-ID": str(got.id)}
    url = proxy.url("/api/events?session=r1&types=token.usage")
    async with EventsClient(proxy.http, url, headers) as second:
        replayed = await second.wait_for(lambda e: e.type == "token.usage")
    assert replayed.id is not None and got.id is not None and replayed.id > got.id
    assert all(e.data["sessionId"] == "r1" and e.type == "token.usage" for e in second.events)
    assert len(second.events) == 1


async def test_unknown_event_type_is_a_clear_400(proxy: Proxy) -> None:
    async with proxy.http.get(proxy.url("/api/events?types=token.usage,bogus")) as r:
        assert r.status == 400 and "bogus" in await r.text()
