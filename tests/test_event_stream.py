"""Live usage over /api/events, the context meter, summaries and export (SPEC 6, 7)."""

from __future__ import annotations

import csv
import io
from typing import Any

import anthropic
import openai
import orjson

from spendgate.bus import MemoryBus
from spendgate.events import Event
from tests.conftest import Proxy, StartProxy
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


async def test_slow_subscriber_is_dropped_and_publish_never_blocks() -> None:
    bus = MemoryBus(history=100, queue_size=10)
    slow, _ = bus.subscribe([], [], None)
    fast, _ = bus.subscribe(["s"], [], None)
    for i in range(150):
        bus.publish(Event("token.usage", "x", {"i": i}))  # never awaits, never raises
    assert slow.dropped and bus.subscriber_count == 1
    assert await slow.get() is None  # its reader is told to end
    assert not fast.dropped and fast.queue.empty()  # filtered out, nothing queued
    # history is bounded, ids strictly increase
    _, backlog = bus.subscribe([], [], 0)
    assert len(backlog) == 100 and backlog[-1].data == {"i": 149}
    assert [e.id for e in backlog] == sorted({e.id for e in backlog})


async def test_event_ids_grow_across_restarts() -> None:
    first = MemoryBus()
    ev = Event("token.usage", "s", {})
    first.publish(ev)
    second = MemoryBus()  # a restarted process: no stored state
    ev2 = Event("token.usage", "s", {})
    second.publish(ev2)
    assert ev2.id > ev.id


async def test_summary_by_model_and_agent(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.queue(
        fixture_reply("openai/chat_json_gpt-3.5-turbo.json"),
        fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"),
        fixture_reply("openai/chat_json_cached_gpt-4o-mini.json"),
    )
    for agent, model in (
        ("planner", "gpt-3.5-turbo"),
        ("coder", "gpt-4o-mini"),
        ("coder", "gpt-4o-mini"),
    ):
        c = openai.AsyncOpenAI(
            base_url=proxy.url(f"/s/multi/a/{agent}/openai/v1"), api_key="k", max_retries=0
        )
        async with c:
            await c.chat.completions.create(model=model, messages=MSG)
    s = await proxy.cost("multi")
    assert s["sessionId"] == "multi" and s["messageCount"] == 3
    assert s["totalInputTokens"] == 15 + 1149 * 2
    assert s["totalOutputTokens"] == 31 + 353 * 2
    assert s["totalCachedInputTokens"] == 2048 and s["totalCacheWriteTokens"] == 0
    assert s["totalReasoningTokens"] == 0
    assert set(s["byModel"]) == {"gpt-3.5-turbo-0125", "gpt-4o-mini-2024-07-18"}
    assert s["byAgent"]["coder"]["messageCount"] == 2
    assert s["byAgent"]["planner"]["inputTokens"] == 15
    assert s["budgetUsd"] is None and s["remainingUsd"] is None and s["paused"] is False
    for key in ("totalCostUsd", "context"):
        assert key in s
    listed = await proxy.get_json("/api/sessions")
    assert listed["sessions"][0]["sessionId"] == "multi"


async def test_messages_pagination_and_export(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.default = fixture_reply("openai/chat_json_gpt-3.5-turbo.json")
    upstream.queue(
        json_reply(
            {"id": "x", "object": "chat.completion", "created": 1, "model": "mystery-model",
             "choices": [],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )
    )  # fmt: skip
    c = openai.AsyncOpenAI(base_url=proxy.url("/s/exp/openai/v1"), api_key="k", max_retries=0)
    async with c:
        for _ in range(5):
            await c.chat.completions.create(model="gpt-3.5-turbo", messages=MSG)
    page1 = await proxy.get_json("/api/sessions/exp/messages?limit=2")
    page2 = await proxy.get_json(f"/api/sessions/exp/messages?limit=2&cursor={page1['nextCursor']}")
    page3 = await proxy.get_json(f"/api/sessions/exp/messages?limit=2&cursor={page2['nextCursor']}")
    assert page3["nextCursor"] is None
    rows = page1["messages"] + page2["messages"] + page3["messages"]
    assert len(rows) == 5 and len({r["messageId"] for r in rows}) == 5
    assert rows[0]["costUsd"] is None and rows[1]["costUsd"] is not None  # oldest first

    async with proxy.http.get(proxy.url("/api/sessions/exp/export?format=csv")) as r:
        assert r.status == 200
        assert 'filename="spendgate-exp.csv"' in r.headers["Content-Disposition"]
        table = list(csv.DictReader(io.StringIO(await r.text())))
    assert [t["messageId"] for t in table] == [r["messageId"] for r in rows]
    assert table[0]["costUsd"] == ""  # unknown cost: empty in CSV
    assert float(table[1]["costUsd"]) == rows[1]["costUsd"]
    assert table[1]["inputTokens"] == "15" and table[1]["endpoint"] == "chat"

    async with proxy.http.get(proxy.url("/api/sessions/exp/export?format=json")) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        data = orjson.loads(await r.read())
    assert len(data) == 5 and data[0]["costUsd"] is None
    assert set(data[0]) >= {"messageId", "startedAt", "ttftMs", "durationMs", "aborted"}


async def test_unknown_session_is_404(proxy: Proxy) -> None:
    for path in ("cost", "messages", "export"):
        async with proxy.http.get(proxy.url(f"/api/sessions/nope/{path}")) as r:
            assert r.status == 404
            assert "unknown session" in (await r.json())["error"]["message"]


async def test_admin_token_guards_api_and_events(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    for path in ("/api/sessions", "/api/events", "/"):
        async with proxy.http.get(proxy.url(path)) as r:
            assert r.status == 401
            assert "admin token" in await r.text()
    async with proxy.http.get(
        proxy.url("/api/sessions"), headers={"Authorization": "Bearer s3cret"}
    ) as r:
        assert r.status == 200
    async with proxy.http.get(proxy.url("/?token=s3cret")) as r:
        assert r.status == 200
    async with EventsClient(proxy.http, proxy.url("/api/events?token=s3cret")):
        pass
    async with proxy.http.get(proxy.url("/healthz")) as r:
        assert r.status == 200 and (await r.json()) == {"status": "ok"}
    async with proxy.http.get(proxy.url("/metrics")) as r:
        assert r.status == 200


async def test_cors_is_off_unless_configured(start_proxy: StartProxy) -> None:
    plain = await start_proxy()
    hdrs = {"Origin": "http://127.0.0.1:3000"}
    async with plain.http.get(plain.url("/api/sessions"), headers=hdrs) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    open_ = await start_proxy(cors_origins=["http://127.0.0.1:3000"])
    async with open_.http.get(open_.url("/api/sessions"), headers=hdrs) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    async with open_.http.options(open_.url("/api/sessions"), headers=hdrs) as r:
        assert r.status == 204
