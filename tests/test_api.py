"""The HTTP API (docs/reference.md §8): session summaries, messages and export, errors,
the admin token, CORS."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import Proxy, StartProxy
from tests.events_client import EventsClient
from tests.upstream import FakeUpstream, fixture_reply, json_reply

MSG: Any = [{"role": "user", "content": "hi"}]


GEMINI_FREE_CALLS = [
    ("POST", "/gemini/v1beta/models/gemini-2.5-flash:countTokens"),
    ("GET", "/gemini/v1beta/models?pageSize=1000"),
    ("GET", "/gemini/v1beta/models/gemini-2.5-flash"),
    ("POST", "/v1beta/models/gemini-2.5-flash:countTokens"),  # Gemini CLI's unprefixed form
    ("GET", "/v1beta/models"),
]


async def test_gemini_count_tokens_and_model_listings_are_no_messages(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    """As the other free endpoints (issue #22): forwarded, no row, not in messageCount,
    no ``unknown`` model entry; the generation beside them is the session's one message."""
    upstream.default = json_reply({"totalTokens": 5, "models": [{"name": "models/x"}]})
    for method, path in GEMINI_FREE_CALLS:
        body = {"contents": [{"parts": [{"text": "hi"}]}]} if method == "POST" else None
        async with proxy.http.request(method, proxy.url("/s/gfree" + path), json=body) as r:
            assert r.status == 200 and "totalTokens" in await r.json()
    assert len(upstream.seen) == len(GEMINI_FREE_CALLS)
    upstream.queue(fixture_reply("gemini/generate_content_thinking_gemini-2.5-flash.json"))
    generate = "/s/gfree/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    async with proxy.http.post(proxy.url(generate), json={"contents": []}) as r:
        assert r.status == 200
    s = await proxy.cost("gfree")
    assert s["messageCount"] == 1 and set(s["byModel"]) == {"gemini-2.5-flash"}
    assert len(await proxy.messages("gfree")) == 1


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
    # Exports show times as ISO-8601 UTC; the messages API keeps Unix seconds (the
    # dashboard's arithmetic), and both name the same moment to the millisecond.
    for api_row, csv_row, json_row in zip(rows, table, data, strict=True):
        assert isinstance(api_row["startedAt"], float)
        assert csv_row["startedAt"] == json_row["startedAt"]
        moment = datetime.fromisoformat(json_row["startedAt"])
        assert json_row["startedAt"].endswith("Z") and moment.utcoffset() == timedelta(0)
        assert abs(moment.timestamp() - api_row["startedAt"]) < 0.001


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


@pytest.mark.parametrize(
    "body",
    [b'{"budgetUsd": "5"}', b'{"budgetUsd": true}', b'{"budgetUsd": -1}', b"{}", b"5",
     b'{"budgetUsd": 1e999}', b"not json"],
)  # fmt: skip
async def test_budget_bodies_must_be_a_number_or_null(proxy: Proxy, body: bytes) -> None:
    for path in ("/api/sessions/s/budget", "/api/sessions/s/agents/a/budget", "/api/budget"):
        async with proxy.http.put(proxy.url(path), data=body) as r:
            assert r.status == 400, (path, body)
            assert "budgetUsd" in (await r.json())["error"]["message"]


async def test_global_and_agent_budgets_read_back(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        global_budget_usd=3, global_budget_period="month", budget_timezone="Europe/Paris"
    )
    g = await proxy.get_json("/api/budget")
    assert g["scope"] == "global" and g["budgetUsd"] == 3.0 and g["spentUsd"] == 0.0
    assert (g["period"], g["timezone"]) == ("month", "Europe/Paris")
    assert g["periodStart"] < g["periodEnd"] and len(g["periodLabel"]) == 7  # 2026-12
    async with proxy.http.put(proxy.url("/api/budget"), json={"budgetUsd": None}) as r:
        assert r.status == 200 and (await r.json())["budgetUsd"] is None
    async with proxy.http.put(
        proxy.url("/api/sessions/s/agents/bad id/budget"), json={"budgetUsd": 1}
    ) as r:
        assert r.status == 400
    async with proxy.http.put(
        proxy.url("/api/sessions/s/agents/coder/budget"), json={"budgetUsd": 0.25}
    ) as r:
        agent = await r.json()
    assert agent == {
        "sessionId": "s", "agentId": "coder", "budgetUsd": 0.25, "spentUsd": 0.0,
        "remainingUsd": 0.25, "paused": False, "pauseReason": None, "inFlight": 0,
        "reservedUsd": 0.0, "waiting": 0,
    }  # fmt: skip
    summary = await proxy.cost("s")
    assert summary["byAgent"]["coder"]["budgetUsd"] == 0.25
    assert summary["byAgent"]["coder"]["messageCount"] == 0
