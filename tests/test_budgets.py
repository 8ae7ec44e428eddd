"""Session budgets and the 402 pause (docs/reference.md §6), through the official SDKs."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from spendgate.budgets import MemoryLedger, Refusal
from spendgate.records import AgentBudgetRecord, GlobalBudgetRecord
from tests.conftest import Proxy, StartProxy
from tests.upstream import FakeUpstream, Reply, fixture_reply, json_reply, sse_reply

MSG: Any = [{"role": "user", "content": "hi"}]


def oai(proxy: Proxy, session: str = "b1") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="k", max_retries=2
    )


def completion(prompt: int, completion: int, model: str = "gpt-4o") -> Reply:
    return json_reply(
        {
            "id": "c", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }
    )  # fmt: skip


async def put_budget(proxy: Proxy, session: str, usd: float | None) -> dict[str, Any]:
    async with proxy.http.put(
        proxy.url(f"/api/sessions/{session}/budget"), json={"budgetUsd": usd}
    ) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def test_over_budget_pauses_and_sdk_raises_402_without_retry(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    await put_budget(proxy, "b1", 0.001)
    # 100 in × $2.5/M + 100 out × $10/M = $0.00125 ≥ $0.001 → paused after this one
    upstream.queue(completion(100, 100))
    async with oai(proxy) as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    assert err.value.status_code == 402
    assert len(upstream.seen) == 1  # refused before anything went upstream, and not retried
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "session_budget_exceeded"
    assert body["type"] == "budget_exceeded"
    assert "b1" in err.value.message and "raise the budget" in err.value.message
    headers = err.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert headers["X-Spendgate-Session"] == "b1"
    assert Decimal(headers["X-Spendgate-Budget-Usd"]) == Decimal("0.001")
    assert Decimal(headers["X-Spendgate-Spent-Usd"]) == Decimal("0.00125")
    cost = await proxy.cost("b1")
    assert cost["paused"] is True and cost["budgetUsd"] == 0.001
    assert cost["remainingUsd"] == pytest.approx(-0.00025)


async def test_anthropic_sdk_gets_its_own_error_shape(proxy: Proxy, upstream: FakeUpstream) -> None:
    async with proxy.http.post(proxy.url("/api/sessions/b2/pause")) as r:
        assert r.status == 404  # unknown sessions can't be paused
    await put_budget(proxy, "b2", 1.0)
    async with proxy.http.post(proxy.url("/api/sessions/b2/pause")) as r:
        assert r.status == 200 and (await r.json())["paused"] is True
    c = anthropic.AsyncAnthropic(base_url=proxy.url("/s/b2/anthropic"), api_key="k", max_retries=2)
    async with c:
        with pytest.raises(anthropic.APIStatusError) as err:
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MSG)
    assert err.value.status_code == 402
    assert err.value.body == {
        "type": "error",
        "error": {"type": "budget_exceeded", "message": err.value.body["error"]["message"]},
    }  # type: ignore[index]
    assert "paused by hand" in err.value.message
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/s/b3/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini"),
        ("/s/b3/ollama/api/chat", "ollama"),
    ],
)
async def test_gemini_and_ollama_shapes(proxy: Proxy, path: str, shape: str) -> None:
    await put_budget(proxy, "b3", 0)
    async with proxy.http.post(proxy.url(path), json={"model": "llama3", "messages": MSG}) as r:
        assert r.status == 402
        body = await r.json()
    if shape == "gemini":
        assert body["error"]["code"] == 402 and body["error"]["status"] == "BUDGET_EXCEEDED"
    else:
        assert isinstance(body["error"], str) and "b3" in body["error"]


async def test_raising_budget_and_resume_lift_the_pause(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.default = completion(100, 100)
    await put_budget(proxy, "b4", 0.001)
    async with oai(proxy, "b4") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
        assert (await proxy.cost("b4"))["paused"] is True
        session = await put_budget(proxy, "b4", 1.0)
        assert session["paused"] is False
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
        # Lowered below what is spent: paused at once, and resume cannot open the gate.
        assert (await put_budget(proxy, "b4", 0.002))["paused"] is True
        async with proxy.http.post(proxy.url("/api/sessions/b4/resume")) as r:
            assert r.status == 409
            message = (await r.json())["error"]["message"]
        assert "spendgate budget b4 USD" in message and "$0.0025" in message
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
        assert err.value.status_code == 402
        assert (await put_budget(proxy, "b4", 0.01))["paused"] is False
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    assert len(upstream.seen) == 3


async def _burst(proxy: Proxy, upstream: FakeUpstream, n: int) -> list[asyncio.Task[int]]:
    """``n`` concurrent requests on session "burst" with a budget that fits 3 reservations
    (input "hi" ≈ 1 token × $2.5/M + 1000 out × $10/M = $0.0100025 each), the upstream
    gated."""
    upstream.default = completion(10, 10)
    upstream.gate = asyncio.Event()  # hold admitted requests in flight
    await put_budget(proxy, "burst", 0.031)

    async def one() -> int:
        async with proxy.http.post(
            proxy.url("/s/burst/openai/v1/chat/completions"),
            json={"model": "gpt-4o", "messages": MSG, "max_tokens": 1000},
        ) as r:
            await r.read()
            return r.status

    return [asyncio.create_task(one()) for _ in range(n)]


async def test_burst_is_admitted_by_reservations_not_by_luck(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    """20 concurrent requests, a budget that fits 3 reservations: 3 go upstream, the
    other 17 wait for headroom (nothing is spent yet, so none is refused) and go in as
    the first ones settle.

    Admission reserves max_tokens' worth before forwarding, with no await between check
    and reservation, so the count does not depend on scheduling.
    """
    tasks = await _burst(proxy, upstream, 20)
    while len(upstream.seen) < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(upstream.seen) == 3 and not any(t.done() for t in tasks)
    assert upstream.gate is not None
    upstream.gate.set()
    statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 20  # each costs $0.000125: all 20 fit in $0.031
    assert (await proxy.cost("burst"))["totalCostUsd"] == pytest.approx(20 * 0.000125)


async def test_burst_without_waiting_answers_429_at_once(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(admission_wait_s=0)
    tasks = await _burst(proxy, upstream, 20)
    done = 0
    while done < 17:
        done = sum(t.done() for t in tasks)
        await asyncio.sleep(0.01)
    assert len(upstream.seen) == 3
    assert upstream.gate is not None
    upstream.gate.set()
    statuses = await asyncio.gather(*tasks)
    assert sorted(statuses) == [200] * 3 + [429] * 17  # held headroom, never a false 402


async def test_default_budget_and_thresholds_emit_events(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(default_session_budget_usd=0.01, budget_thresholds=[0.5, 0.9])
    upstream.default = completion(1000, 300)  # 2500 + 3000 = $0.0055 each
    ledger = proxy.ledger
    assert isinstance(ledger, MemoryLedger)
    sub, _ = await proxy.bus.subscribe(["d1"], ["budget.warning", "budget.paused"], None)
    async with oai(proxy, "d1") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    events = []
    while not sub.queue.empty():
        ev = sub.queue.get_nowait()
        assert ev is not None
        events.append((ev.type, ev.data.get("threshold")))
    assert events == [("budget.warning", 0.5), ("budget.warning", 0.9), ("budget.paused", None)]
    cost = await proxy.cost("d1")
    assert cost["budgetUsd"] == 0.01 and cost["paused"] is True


async def test_budget_and_pause_survive_restart(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = completion(100, 100)
    first = await start_proxy()
    await put_budget(first, "keep", 0.001)
    async with oai(first, "keep") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    await first.server.close()  # runs cleanup: the writer flushes
    second = await start_proxy()
    cost = await second.cost("keep")
    assert cost["paused"] is True and cost["budgetUsd"] == 0.001
    assert cost["totalCostUsd"] == pytest.approx(0.00125)
    assert second.ledger.spent("keep") == Decimal("0.00125")


async def test_cut_policy_ends_stream_with_provider_error(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(on_budget_mid_stream="cut")
    await put_budget(proxy, "cut", 0.0001)  # $0.0001 = 10 output tokens of gpt-4o
    words = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
         "choices": [{"index": 0, "delta": {"content": "word " * 10}, "finish_reason": None}]}
        for _ in range(50)
    ]  # fmt: skip
    upstream.queue(sse_reply(words))
    async with oai(proxy, "cut") as c:
        stream = await c.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        with pytest.raises(openai.APIError, match="ran out of budget"):
            async for _ in stream:
                pass
    (row,) = await proxy.messages("cut")
    assert row["error"] == "budget_cut" and row["estimated"] is True
    assert (await proxy.cost("cut"))["paused"] is True


async def test_cut_policy_anthropic_event(start_proxy: StartProxy, upstream: FakeUpstream) -> None:
    proxy = await start_proxy(on_budget_mid_stream="cut")
    await put_budget(proxy, "cut2", 0.0005)
    upstream.queue(fixture_reply("anthropic/messages_stream_tools_claude-3-5-sonnet.sse", 40))
    c = anthropic.AsyncAnthropic(
        base_url=proxy.url("/s/cut2/anthropic"), api_key="k", max_retries=0
    )
    async with c:
        with pytest.raises(anthropic.APIStatusError, match="ran out of budget"):
            async with c.messages.stream(
                model="claude-3-5-sonnet-20240620", max_tokens=10, messages=MSG
            ) as stream:
                async for _ in stream:
                    pass


# -- the ledger on its own: scopes, waiting, periods -----------------------------------------

D = Decimal


def ledger_with(**kw: Any) -> MemoryLedger:
    return MemoryLedger([0.5], None, **kw)


async def admitted(ledger: MemoryLedger, sid: str, reserve: str, agent: str | None = None) -> Any:
    got, _ = await ledger.admit(sid, agent, D(reserve))
    assert not isinstance(got, Refusal), got.message()
    return got


# The ledger's rules on their own (waiting, 429, 402, resume, agent and global scopes,
# periods) are in tests/test_redis_ledger.py, against every ledger.


async def test_restart_keeps_agent_and_global_budgets() -> None:
    ledger = ledger_with(global_budget=D("5"))
    ledger.load(
        [],
        {},
        agents=[AgentBudgetRecord("s", "a", D("0.01"))],
        agent_spend={("s", "a"): D("0.01"), ("s", "b"): D("0.5")},
        global_record=GlobalBudgetRecord(D("2"), configured=D("5")),
        global_spend=D("1"),
    )
    assert (await ledger.agent_budgets("s"))[0][0].paused  # spent reached its budget before
    rec, spent, _, _ = await ledger.global_budget()
    assert rec.budget_usd == D("2") and spent == D("1")  # the PUT outlives a restart
    changed = ledger_with(global_budget=D("7"))
    changed.load([], {}, global_record=GlobalBudgetRecord(D("2"), configured=D("5")))
    assert (await changed.global_budget())[0].budget_usd == D("7")  # ... until the setting changes


async def test_what_holds_the_headroom_is_in_the_api_and_the_status_line(
    proxy: Proxy,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from spendgate.cli import main

    upstream.default = completion(10, 10)
    upstream.gate = asyncio.Event()
    await put_budget(proxy, "held", 0.015)  # fits one $0.010005 reservation, not two

    async def one() -> int:
        async with proxy.http.post(
            proxy.url("/s/held/openai/v1/chat/completions"),
            json={"model": "gpt-4o", "messages": MSG, "max_tokens": 1000},
        ) as r:
            return r.status

    tasks = [asyncio.create_task(one()) for _ in range(2)]
    while len(upstream.seen) < 1 or not (await proxy.ledger.pressure("held")).waiting:
        await asyncio.sleep(0.01)
    cost = await proxy.cost("held")
    assert (cost["inFlight"], cost["waiting"]) == (1, 1)
    assert cost["reservedUsd"] == pytest.approx(0.010005)  # 2 tokens in, 1000 out
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    assert await asyncio.to_thread(main, ["status", "held", "--color", "never"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("· WAITING (1)")
    upstream.gate.set()
    assert await asyncio.gather(*tasks) == [200, 200]
    assert (await proxy.cost("held"))["waiting"] == 0


async def test_an_agent_budgeted_after_a_restart_counts_what_it_spent_before(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """Only agents with a budget are loaded at start-up; one budgeted later is seeded
    from its rows from before the restart, and its spend since is not counted twice."""
    upstream.default = completion(100, 100)  # $0.00125 on gpt-4o
    first = await start_proxy()
    async with oai(first, "ag/a/coder") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    await first.server.close()
    second = await start_proxy()
    async with oai(second, "ag/a/coder") as c:
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=10)
    async with second.http.put(
        second.url("/api/sessions/ag/agents/coder/budget"), json={"budgetUsd": 0.01}
    ) as r:
        agent = await r.json()
    assert Decimal(str(agent["spentUsd"])) == Decimal("0.0025")
    async with second.http.put(
        second.url("/api/sessions/ag/agents/coder/budget"), json={"budgetUsd": 0.002}
    ) as r:
        agent = await r.json()
    assert agent["paused"] is True and Decimal(str(agent["spentUsd"])) == Decimal("0.0025")
