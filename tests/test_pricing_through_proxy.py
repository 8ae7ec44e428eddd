"""Each pricing rule of docs/reference.md §4 through the real proxy, with the official
SDKs as clients where the provider has one here: service tiers, per-call tool fees,
audio tokens, a provider-reported cost, and how each row says it was priced (API,
export, ``token.usage`` events). The figures are the issue's (#18)."""

from __future__ import annotations

import csv
import io
from typing import Any

import anthropic
import openai
import pytest

from spendgate.settings import RouteConfig
from tests.conftest import Proxy, StartProxy
from tests.events_client import EventsClient
from tests.upstream import FakeUpstream, chat_completion, json_reply, sse_reply

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def oai(proxy: Proxy, session: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="sk-test", max_retries=0
    )


def completion(model: str, usage: dict[str, Any], tier: str | None) -> dict[str, Any]:
    """A chat completion (the shared one) with this usage and service tier."""
    body = {**chat_completion(model), "usage": usage}
    if tier is not None:
        body["service_tier"] = tier
    return body


async def only_row(proxy: Proxy, session: str) -> dict[str, Any]:
    (row,) = await proxy.messages(session)
    return row


@pytest.mark.parametrize(
    ("model", "tier", "prompt", "completion_tokens", "usd"),
    [
        ("gpt-5-2025-08-07", "priority", 1220, 450, 0.01205),
        ("gpt-5-2025-08-07", "default", 1220, 450, 0.006025),
        ("gpt-4o-mini-2024-07-18", "priority", 1000, 1000, 0.00125),
        ("gpt-5-2025-08-07", "flex", 53, 469, 0.002378125),
    ],
)
async def test_chat_service_tier(
    proxy: Proxy,
    upstream: FakeUpstream,
    model: str,
    tier: str,
    prompt: int,
    completion_tokens: int,
    usd: float,
) -> None:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens}
    upstream.queue(json_reply(completion(model, usage, tier)))
    async with oai(proxy, "tier") as c:
        resp = await c.chat.completions.create(model=model, messages=MESSAGES)
    assert resp.service_tier == tier
    row = await only_row(proxy, "tier")
    assert row["serviceTier"] == tier
    assert row["costUsd"] == pytest.approx(usd, rel=1e-12)
    assert row["tableCostUsd"] == row["costUsd"] and row["toolCostUsd"] == 0
    assert row["priceSource"] == "bundled 2026-11-22"
    assert row["pricedAs"] == model  # the dated entry the response names


async def test_streamed_chat_priority_tier(proxy: Proxy, upstream: FakeUpstream) -> None:
    def chunk(**kw: Any) -> dict[str, Any]:
        return {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "priority",
            **kw,
        }

    upstream.queue(
        sse_reply(
            [
                chunk(choices=[{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]),
                chunk(choices=[], usage={"prompt_tokens": 1000, "completion_tokens": 1000}),
            ]
        )
    )
    async with oai(proxy, "stream") as c:
        stream = await c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        [ch async for ch in stream]
    row = await only_row(proxy, "stream")
    assert (row["serviceTier"], row["stream"]) == ("priority", True)
    assert row["costUsd"] == pytest.approx(0.00125, rel=1e-12)  # not $0.00075


def response(
    tier: str, usage: dict[str, Any], output: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "gpt-5-2025-08-07",
        "service_tier": tier,
        "output": output
        or [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


async def test_responses_priority_and_a_web_search_call(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    usage = {
        "input_tokens": 1600,
        "output_tokens": 250,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1850,
    }
    upstream.queue(json_reply(response("priority", usage)))
    search = [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]
    upstream.queue(json_reply(response("default", usage, search + response("x", {})["output"])))
    async with oai(proxy, "resp") as c:
        first = await c.responses.create(model="gpt-5", input="hi", service_tier="priority")
        second = await c.responses.create(model="gpt-5", input="hi", tools=[{"type": "web_search"}])
    assert first.service_tier == "priority" and second.output[0].type == "web_search_call"
    rows = sorted(await proxy.messages("resp"), key=lambda r: r["startedAt"])
    assert [r["serviceTier"] for r in rows] == ["priority", "default"]
    assert rows[0]["costUsd"] == pytest.approx(0.009, rel=1e-12)  # not $0.0045
    # $0.0045 of tokens at the standard price, plus one web search at $0.01
    assert rows[1]["costUsd"] == pytest.approx(0.0145, rel=1e-12)
    assert rows[1]["toolCostUsd"] == pytest.approx(0.01)


async def test_audio_tokens_at_their_own_price(proxy: Proxy, upstream: FakeUpstream) -> None:
    usage = {
        "prompt_tokens": 800,
        "completion_tokens": 550,
        "prompt_tokens_details": {"audio_tokens": 800, "cached_tokens": 0},
        "completion_tokens_details": {"audio_tokens": 400, "reasoning_tokens": 0},
    }
    upstream.queue(json_reply(completion("gpt-audio", usage, "default")))
    async with oai(proxy, "audio") as c:
        await c.chat.completions.create(model="gpt-audio", messages=MESSAGES)
    row = await only_row(proxy, "audio")
    assert (row["inputAudioTokens"], row["outputAudioTokens"]) == (800, 400)
    assert row["costUsd"] == pytest.approx(0.0527, rel=1e-12)  # not $0.0075 as text


async def test_gemini_audio_input(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = {
        "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
        "modelVersion": "gemini-2.5-flash",
        "usageMetadata": {
            "promptTokenCount": 1000,
            "candidatesTokenCount": 100,
            "totalTokenCount": 1100,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": 200},
                {"modality": "AUDIO", "tokenCount": 800},
            ],
            "serviceTier": "standard",
        },
    }
    upstream.queue(json_reply(body))
    url = proxy.url("/s/gem/gemini/v1beta/models/gemini-2.5-flash:generateContent")
    async with proxy.http.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]}) as r:
        assert r.status == 200
    row = await only_row(proxy, "gem")
    assert (row["inputAudioTokens"], row["serviceTier"]) == (800, "standard")
    assert row["costUsd"] == pytest.approx(0.00111, rel=1e-12)  # not $0.00055


async def test_anthropic_web_searches_with_the_sdk(proxy: Proxy, upstream: FakeUpstream) -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 1000,
            "output_tokens": 100,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "server_tool_use": {"web_search_requests": 3},
            "service_tier": "priority",
        },
    }
    upstream.queue(json_reply(message))
    c = anthropic.AsyncAnthropic(
        base_url=proxy.url("/s/claude/anthropic"), api_key="sk-ant-test", max_retries=0
    )
    async with c:
        resp = await c.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES)
    assert resp.usage.server_tool_use is not None
    row = await only_row(proxy, "claude")
    # $0.0045 of tokens (no priority price in the table: the standard one) + 3 x $0.01
    assert row["costUsd"] == pytest.approx(0.0345, rel=1e-12)
    assert row["toolCostUsd"] == pytest.approx(0.03)
    assert row["serviceTier"] == "priority"


OPENROUTER_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 100,
    "cost": 0.0123,
}


@pytest.mark.parametrize(
    ("prefix", "options", "reported"),
    [
        ("/openrouter", {"provider": "openrouter"}, True),
        ("/openrouter", {"provider": "openrouter", "reported_cost": False}, False),
        ("/gw", {"reported_cost": True}, True),
        ("/gw", {}, False),
    ],
)
async def test_a_provider_reported_cost_wins_where_the_route_takes_it(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    prefix: str,
    options: dict[str, Any],
    reported: bool,
) -> None:
    base = upstream.base_url  # type: ignore[attr-defined]
    proxy = await start_proxy(routes=[RouteConfig(prefix=prefix, upstream=base, **options)])
    upstream.queue(json_reply(completion("gpt-4o-mini-2024-07-18", OPENROUTER_USAGE, None)))
    url = proxy.url(f"/s/or{prefix}/v1/chat/completions")
    async with proxy.http.post(url, json={"model": "gpt-4o-mini", "messages": MESSAGES}) as r:
        assert r.status == 200
    row = await only_row(proxy, "or")
    table = (1000 * 0.15 + 100 * 0.6) / 1e6
    assert row["tableCostUsd"] == pytest.approx(table, rel=1e-12)
    if reported:
        assert (row["costUsd"], row["priceSource"]) == (0.0123, "provider")
    else:
        assert row["costUsd"] == pytest.approx(table, rel=1e-12)
        assert row["priceSource"] == "bundled 2026-11-22"
    assert row["pricedAs"] == "gpt-4o-mini-2024-07-18"


async def test_how_it_was_priced_in_the_export_and_the_event(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    usage = {"prompt_tokens": 1220, "completion_tokens": 450}
    upstream.queue(json_reply(completion("gpt-5-2025-08-07", usage, "priority")))
    async with EventsClient(proxy.http, proxy.url("/api/events?session=ex")) as events:
        async with oai(proxy, "ex") as c:
            await c.chat.completions.create(model="gpt-5", messages=MESSAGES)
        final = await events.wait_for(lambda e: e.type == "token.usage" and e.data["final"])
    assert final.data["serviceTier"] == "priority"
    assert final.data["pricedAs"] == "gpt-5-2025-08-07"
    assert final.data["priceSource"] == "bundled 2026-11-22"
    assert final.data["costUsd"] == pytest.approx(0.01205) and final.data["toolCostUsd"] == 0
    async with proxy.http.get(proxy.url("/api/sessions/ex/export?format=csv")) as r:
        (row,) = list(csv.DictReader(io.StringIO(await r.text())))
    assert (row["serviceTier"], row["pricedAs"], row["priceSource"]) == (
        "priority",
        "gpt-5-2025-08-07",
        "bundled 2026-11-22",
    )
    assert float(row["costUsd"]) == pytest.approx(0.01205)
    async with proxy.http.get(proxy.url("/api/sessions/ex/export?format=json")) as r:
        (doc,) = await r.json()
    assert doc["toolCostUsd"] == 0 and doc["tableCostUsd"] == pytest.approx(0.01205)


async def test_a_budget_on_a_qwen_code_model_is_enforced(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    base = upstream.base_url  # type: ignore[attr-defined]
    proxy = await start_proxy(
        routes=[RouteConfig(prefix="/qwen", upstream=base, provider="dashscope")]
    )
    async with proxy.http.put(proxy.url("/api/sessions/q/budget"), json={"budgetUsd": 0.02}) as r:
        assert r.status == 200, await r.text()
    usage = {"prompt_tokens": 10_000, "completion_tokens": 1_000}  # $0.015 at $1 / $5
    upstream.queue(json_reply(completion("qwen3-coder-plus", usage, None)))
    url = proxy.url("/s/q/qwen/v1/chat/completions")
    body = {"model": "qwen3-coder-plus", "messages": MESSAGES, "max_tokens": 100}
    async with proxy.http.post(url, json=body) as r:
        assert r.status == 200, await r.text()  # priced, so not refused as unpriced
    row = await only_row(proxy, "q")
    assert row["costUsd"] == pytest.approx(0.015, rel=1e-12)
    upstream.queue(json_reply(completion("qwen3-coder-plus", usage, None)))
    async with proxy.http.post(url, json=body) as r:
        assert r.status == 200
    async with proxy.http.post(url, json=body) as r:  # $0.03 spent of $0.02
        assert r.status == 402, await r.text()
