"""Honest admission (issue #15, docs/reference.md §6) end to end: requests that wait for
headroom held by in-flight reservations (429 ``budget_reserved``), refusals that stay
402, the reservation escapes that are closed, resume, unpriced models, agent and global
budgets.

Concurrency is real: a gated fake upstream (tests/helpers/gate.py) holds admitted
requests, so their reservations are in flight while the others arrive. Prices are the
bundled ones, read from the proxy's own table.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from multidict import CIMultiDictProxy

from spendgate.bus import Subscription
from spendgate.events import Event
from spendgate.usage import TokenCounts, estimate_tokens
from tests.conftest import Proxy, StartProxy, eventually
from tests.helpers.gate import Gate
from tests.helpers.prices import found
from tests.upstream import FakeUpstream, Reply, json_reply, sse_reply

MINI = "gpt-4o-mini"
HAIKU = "claude-3-5-haiku-20241022"
UNPRICED = "no-such-model-xyz"
MSG: Any = [{"role": "user", "content": "hi"}]
MSG_CHARS = len("user") + len("hi")  # the prompt text the adapters count
WAIT = 0.3
"""``admission_wait_s`` where a test waits for the 429."""
LONG_WAIT = 1.5
"""``admission_wait_s`` where nothing should run out of time."""
BOM = b"\xef\xbb\xbf"
TIMEOUT = aiohttp.ClientTimeout(total=10)
"""A request the proxy wrongly lets through to the gate fails instead of hanging."""


@pytest.fixture
async def gate(upstream: FakeUpstream, start_proxy: StartProxy) -> AsyncIterator[Gate]:
    """Every upstream request waits here until the test releases it (set up after the
    proxies, so torn down first: whatever is still held is let go before they close)."""
    upstream.gate = held = Gate()
    yield held
    held.set()


# -- prices ---------------------------------------------------------------------------------


def cost(proxy: Proxy, prompt: int, completion: int, model: str = MINI) -> Decimal:
    """The bundled price of one response."""
    value = proxy.prices.cost(model, TokenCounts(input_tokens=prompt, output_tokens=completion))
    assert value is not None, model
    return value


def reservation(proxy: Proxy, out: int, model: str = MINI, chars: int = MSG_CHARS) -> Decimal:
    """What one request of ``chars`` prompt characters and output bound ``out`` holds."""
    held = found(proxy.prices, model).reserve_cost(estimate_tokens(chars), out)
    assert held is not None, model
    return held


# -- the fake upstream's answers ----------------------------------------------------------


def chat_reply(prompt: int, completion: int, model: str = MINI) -> Reply:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    message = {"role": "assistant", "content": "ok"}
    head = {"id": "c", "object": "chat.completion", "created": 1, "model": model}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return json_reply({**head, "choices": [choice], "usage": usage})


def chat_stream_reply(prompt: int, completion: int, model: str = MINI) -> Reply:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
    text = {**head, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return sse_reply([text, {**head, "choices": [], "usage": usage}])


def message_reply(input_tokens: int, output_tokens: int, model: str = HAIKU) -> Reply:
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    content = [{"type": "text", "text": "ok"}]
    head = {"id": "m", "type": "message", "role": "assistant", "model": model}
    return json_reply({**head, "content": content, "stop_reason": "end_turn", "usage": usage})


# -- talking to the proxy -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    """Parsed JSON, or the raw bytes (a stream)."""

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        assert isinstance(self.body, dict), self.body
        err: dict[str, Any] = self.body["error"]
        return err


async def send(proxy: Proxy, path: str, body: Any, headers: dict[str, str] | None = None) -> Answer:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with proxy.http.post(proxy.url(path), data=data, headers=hdrs, timeout=TIMEOUT) as r:
        raw = await r.read()
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = raw
        return Answer(r.status, r.headers, parsed)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MINI, "messages": MSG, **extra}


async def chat(proxy: Proxy, session: str, agent: str | None = None, **extra: Any) -> Answer:
    prefix = f"/s/{session}" + (f"/a/{agent}" if agent else "")
    return await send(proxy, prefix + "/openai/v1/chat/completions", chat_body(**extra))


def spawn(n: int, make: Callable[[], Any]) -> list[asyncio.Task[Answer]]:
    return [asyncio.create_task(make()) for _ in range(n)]


async def put_budget(proxy: Proxy, path: str, usd: float | None) -> dict[str, Any]:
    """PUT ``{"budgetUsd": usd}`` to a session's, an agent's or the global budget."""
    async with proxy.http.put(proxy.url(path), json={"budgetUsd": usd}) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def post_api(proxy: Proxy, path: str) -> tuple[int, str]:
    async with proxy.http.post(proxy.url(path)) as r:
        return r.status, await r.text()


async def until_paused(proxy: Proxy, session: str) -> None:
    async def paused() -> bool:
        return bool((await proxy.cost(session))["paused"])

    await eventually(paused)


async def until_settled(proxy: Proxy, session: str, count: int) -> None:
    async def stored() -> bool:
        return len(await proxy.messages(session)) == count

    await eventually(stored)


async def in_flight(gate: Gate, at_least: int) -> int:
    """How many requests crossed admission at once: at least ``at_least`` held at the
    upstream, and no more arriving. The others wait at admission."""
    await gate.until_held(at_least)
    await asyncio.sleep(0.05)
    return gate.held


def fits(budget: Decimal, each: Decimal) -> range:
    """How many requests reserving ``each`` may be in flight at once on ``budget``: at
    least as many as fit whole, at most one more (admitted only if the spend and the
    others' reservations stay below the budget, its own not counted)."""
    whole = int(budget // each)
    return range(whole, whole + 2)


def drain(sub: Subscription) -> list[Event]:
    out = []
    while not sub.queue.empty():
        ev = sub.queue.get_nowait()
        assert ev is not None
        out.append(ev)
    return out


def money(value: str | float) -> Decimal:
    """A header's or a JSON float's dollars, exactly as written."""
    return Decimal(value if isinstance(value, str) else repr(value))


class Attempts:
    """Every HTTP response an SDK client got, one per attempt (retries included), seen
    through an httpx response hook; ``on_429`` runs when a 429 arrives."""

    def __init__(self, on_429: Callable[[], None] | None = None) -> None:
        self.statuses: list[int] = []
        self.headers: list[Any] = []
        self.errors: list[Any] = []
        self._on_429 = on_429

    async def _hook(self, response: Any) -> None:
        self.statuses.append(response.status_code)
        self.headers.append(response.headers)
        if response.status_code >= 400:
            self.errors.append(orjson.loads(await response.aread()))
        if response.status_code == 429 and self._on_429 is not None:
            self._on_429()

    def openai(self, base_url: str, max_retries: int = 2) -> openai.AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._hook]})
        return openai.AsyncOpenAI(
            base_url=base_url, api_key="sk-test", max_retries=max_retries, http_client=http
        )

    def anthropic(self, base_url: str, **kw: Any) -> anthropic.AsyncAnthropic:
        http = anthropic.DefaultAsyncHttpxClient(event_hooks={"response": [self._hook]})
        return anthropic.AsyncAnthropic(
            base_url=base_url, api_key="k", max_retries=2, http_client=http, **kw
        )


def assert_reserved(answer: Answer, scope: str) -> str:
    """A 429 ``budget_reserved`` in the OpenAI shape; returns its message."""
    assert answer.status == 429, answer.body
    assert set(answer.body) == {"error"}
    assert set(answer.error) == {"message", "type", "param", "code"}
    assert answer.error["code"] == "budget_reserved"
    assert answer.headers["x-should-retry"] == "true"
    assert answer.headers["X-Spendgate-Budget-Scope"] == scope
    retry_after = answer.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after  # RFC 9110 seconds
    message: str = answer.error["message"]
    return message


def assert_refused(
    answer: Answer, scope: str, session: str, budget: Decimal, spent: Decimal
) -> None:
    """A 402 ``{scope}_budget_exceeded`` in the OpenAI shape, with its headers."""
    assert answer.status == 402, answer.body
    assert answer.error["code"] == f"{scope}_budget_exceeded"
    assert answer.error["type"] == "budget_exceeded"
    h = answer.headers
    assert h["x-should-retry"] == "false"
    assert h["X-Spendgate-Budget-Scope"] == scope
    assert h["X-Spendgate-Session"] == session
    assert money(h["X-Spendgate-Budget-Usd"]) == budget
    assert money(h["X-Spendgate-Spent-Usd"]) == spent


# -- 1. honest admission --------------------------------------------------------------------


async def test_three_concurrent_cheap_requests_on_a_fresh_budget_all_pass(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(default_session_budget_usd=0.01, admission_wait_s=WAIT)
    upstream.default = chat_reply(10, 10)
    # no max_tokens: each holds 4,096 output tokens (gpt-4o-mini's max output is 16,384)
    assert 3 * reservation(proxy, 4096) < Decimal("0.01")
    attempts = Attempts()
    async with attempts.openai(proxy.url("/s/fresh/v1"), max_retries=0) as c:
        calls = [
            asyncio.create_task(c.chat.completions.create(model=MINI, messages=MSG))
            for _ in range(3)
        ]
        await gate.until_held(3)  # all three in flight at once
        gate.set()
        done = await asyncio.gather(*calls)
    assert [d.choices[0].message.content for d in done] == ["ok"] * 3
    assert attempts.statuses == [200] * 3
    await until_settled(proxy, "fresh", 3)
    assert money((await proxy.cost("fresh"))["spentUsd"]) == 3 * cost(proxy, 10, 10)


async def test_a_burst_of_20_waits_for_headroom_instead_of_402(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(admission_wait_s=LONG_WAIT)
    upstream.default = chat_reply(10, 10)
    each = reservation(proxy, 1000)  # ≈ $0.0006
    budget = (each * Decimal("3.25")).quantize(Decimal("0.000001"))  # fits 3
    await put_budget(proxy, "/api/sessions/b20/budget", float(budget))
    tasks = spawn(20, lambda: chat(proxy, "b20", max_tokens=1000))
    admitted = await in_flight(gate, 3)
    assert admitted in fits(budget, each) and len(upstream.seen) == admitted, admitted
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert [a.status for a in answers] == [200] * 20  # admitted as the reservations settled
    assert gate.peak == admitted
    await until_settled(proxy, "b20", 20)
    summary = await proxy.cost("b20")
    assert money(summary["spentUsd"]) == 20 * cost(proxy, 10, 10)
    assert summary["paused"] is False


async def one_at_a_time(
    start_proxy: StartProxy, upstream: FakeUpstream, session: str, wait: float
) -> Proxy:
    """A proxy where ``session``'s $0.002 budget fits one gpt-4o-mini request without
    max_tokens in flight (its 4,096 output tokens hold $0.00246), cheap answers."""
    proxy = await start_proxy(admission_wait_s=wait)
    upstream.default = chat_reply(10, 10)
    await put_budget(proxy, f"/api/sessions/{session}/budget", 0.002)
    assert reservation(proxy, 4096, chars=len("userA")) >= Decimal("0.002")
    return proxy


async def test_waiters_are_admitted_in_arrival_order(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await one_at_a_time(start_proxy, upstream, "fifo", LONG_WAIT)

    def named(name: str) -> asyncio.Task[Answer]:
        return asyncio.create_task(
            chat(proxy, "fifo", messages=[{"role": "user", "content": name}])
        )

    first = named("A")
    await gate.until_held(1)
    later = []
    for name in "BCDE":
        later.append(named(name))
        await asyncio.sleep(0.03)  # arrives after the one before it
    assert len(upstream.seen) == 1
    gate.set()
    answers = await asyncio.gather(first, *later)
    assert [a.status for a in answers] == [200] * 5
    assert [s.json()["messages"][0]["content"] for s in upstream.seen] == list("ABCDE")


async def test_reserved_headroom_answers_429_then_the_retry_is_admitted(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await one_at_a_time(start_proxy, upstream, "run-1", WAIT)
    held = asyncio.create_task(chat(proxy, "run-1"))
    await gate.until_held(1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b = await chat(proxy, "run-1")
    waited = loop.time() - t0
    message = assert_reserved(b, "session")
    assert waited >= WAIT * 0.9, waited  # it waited for headroom first
    assert re.search(r"\b1 requests? in flight\b", message), message
    assert "'run-1'" in message, message
    assert len(upstream.seen) == 1  # B never went upstream
    gate.set()
    assert (await held).status == 200
    assert (await chat(proxy, "run-1")).status == 200  # B again: A's reservation settled
    assert len(upstream.seen) == 2


async def test_the_429_message_counts_the_requests_in_flight_and_their_hold(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(admission_wait_s=WAIT)
    upstream.default = chat_reply(10, 10)
    each = reservation(proxy, 1000)
    budget = Decimal("0.0015")  # 2.5 reservations
    await put_budget(proxy, "/api/sessions/msg-1/budget", float(budget))
    first = spawn(3, lambda: chat(proxy, "msg-1", max_tokens=1000))
    n = await in_flight(gate, 2)
    assert n in fits(budget, each), n
    message = assert_reserved(await chat(proxy, "msg-1", max_tokens=1000), "session")
    assert re.search(rf"\b{n} requests in flight\b", message), message
    assert "'msg-1'" in message, message
    amounts = [Decimal(a.replace(",", "")) for a in re.findall(r"\$(\d[\d,]*(?:\.\d+)?)", message)]
    assert budget in amounts, message  # what is left: nothing is spent yet
    assert any(abs(a - n * each) < Decimal("0.00005") for a in amounts), message  # their hold
    gate.set()
    statuses = [a.status for a in await asyncio.gather(*first)]
    assert statuses.count(200) >= n and set(statuses) <= {200, 429}, statuses


async def test_waiters_get_402_as_soon_as_the_spend_reaches_the_budget(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(admission_wait_s=LONG_WAIT)
    upstream.default = chat_reply(1000, 4000)
    spent = cost(proxy, 1000, 4000)  # $0.00255
    await put_budget(proxy, "/api/sessions/w402/budget", 0.002)
    first = asyncio.create_task(chat(proxy, "w402"))
    await gate.until_held(1)
    waiters = spawn(3, lambda: chat(proxy, "w402"))
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)  # nothing is spent yet: they wait, no 402
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    gate.set()
    assert (await first).status == 200
    answers = await asyncio.gather(*waiters)
    assert loop.time() - t0 < LONG_WAIT / 2  # refused when the spend arrived, not at timeout
    for a in answers:
        assert_refused(a, "session", "w402", Decimal("0.002"), spent)
    assert len(upstream.seen) == 1


# -- 1. the SDKs retry the 429, never the 402 -----------------------------------------------


async def test_openai_sdk_does_not_retry_a_402(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.default = chat_reply(1000, 2000)
    spent = cost(proxy, 1000, 2000)  # $0.00135
    await put_budget(proxy, "/api/sessions/sdk-2/budget", 0.001)
    assert (await chat(proxy, "sdk-2")).status == 200
    await until_paused(proxy, "sdk-2")
    attempts = Attempts()
    async with attempts.openai(proxy.url("/s/sdk-2/v1")) as c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model=MINI, messages=MSG)
    assert err.value.status_code == 402
    assert attempts.statuses == [402]  # one attempt
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "session_budget_exceeded"
    h = err.value.response.headers
    assert h["x-should-retry"] == "false" and h["X-Spendgate-Budget-Scope"] == "session"
    assert h["X-Spendgate-Session"] == "sdk-2"
    assert money(h["X-Spendgate-Budget-Usd"]) == Decimal("0.001")
    assert money(h["X-Spendgate-Spent-Usd"]) == spent
    assert len(upstream.seen) == 1


async def sdk_call(sdk: str, attempts: Attempts, proxy: Proxy) -> None:
    """One call through the official SDK on session "sdk", which retries on its own."""
    if sdk == "openai":
        async with attempts.openai(proxy.url("/s/sdk/v1")) as oc:
            done = await oc.chat.completions.create(model=MINI, messages=MSG)
        assert done.choices[0].message.content == "ok"
    else:
        async with attempts.anthropic(proxy.url("/s/sdk/anthropic")) as ac:
            message = await ac.messages.create(model=HAIKU, max_tokens=1000, messages=MSG)
        assert message.content[0].type == "text"


@pytest.mark.parametrize(
    ("sdk", "reply", "path", "body", "out_bound"),
    [
        ("openai", chat_reply(10, 10), "/s/sdk/openai/v1/chat/completions", chat_body(), 4096),
        (
            "anthropic",
            message_reply(10, 10),
            "/s/sdk/anthropic/v1/messages",
            {"model": HAIKU, "max_tokens": 1000, "messages": MSG},
            1000,
        ),
    ],
    ids=["openai", "anthropic"],
)
async def test_the_sdk_retries_the_429_and_succeeds_once_the_gate_opens(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    gate: Gate,
    sdk: str,
    reply: Reply,
    path: str,
    body: dict[str, Any],
    out_bound: int,
) -> None:
    proxy = await start_proxy(admission_wait_s=WAIT)
    upstream.default = reply
    model = MINI if sdk == "openai" else HAIKU
    assert reservation(proxy, out_bound, model=model) >= Decimal("0.002")  # one holds it all
    await put_budget(proxy, "/api/sessions/sdk/budget", 0.002)
    held = asyncio.create_task(send(proxy, path, body))
    await gate.until_held(1)
    attempts = Attempts(on_429=gate.set)  # the first 429 lets the held request finish
    await asyncio.wait_for(sdk_call(sdk, attempts, proxy), 10)
    assert attempts.statuses == [429, 200]
    (error,) = attempts.errors
    assert (
        error["type"] == "error"
        if sdk == "anthropic"
        else error["error"]["code"] == "budget_reserved"
    )
    assert re.search(r"\b1 requests? in flight\b", error["error"]["message"]), error
    assert attempts.headers[0]["x-should-retry"] == "true"
    assert attempts.headers[0]["X-Spendgate-Budget-Scope"] == "session"
    assert (await held).status == 200
    assert len(upstream.seen) == 2


async def test_anthropic_sdk_does_not_retry_a_402(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.default = message_reply(1000, 1000)
    await put_budget(proxy, "/api/sessions/an-2/budget", 0.001)
    attempts = Attempts()
    # the provider's own path, the session in a header
    client = attempts.anthropic(proxy.url(""), default_headers={"X-Spendgate-Session": "an-2"})
    async with client as c:
        await c.messages.create(model=HAIKU, max_tokens=10, messages=MSG)  # $0.0048: over
        await until_paused(proxy, "an-2")
        with pytest.raises(anthropic.APIStatusError) as err:
            await c.messages.create(model=HAIKU, max_tokens=10, messages=MSG)
    assert err.value.status_code == 402
    assert attempts.statuses == [200, 402]  # the 402 once
    (error,) = attempts.errors
    assert error["type"] == "error" and error["error"]["type"] == "budget_exceeded"
    assert "an-2" in error["error"]["message"]
    h = err.value.response.headers
    assert h["x-should-retry"] == "false" and h["X-Spendgate-Budget-Scope"] == "session"
    assert money(h["X-Spendgate-Spent-Usd"]) == cost(proxy, 1000, 1000, HAIKU)
    assert len(upstream.seen) == 1


# -- 2. escapes closed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "bound", "reply", "stream"),
    [
        pytest.param(
            orjson.dumps(chat_body(max_tokens=1000, n=4)),
            4 * 1000,
            chat_reply(2, 4000),
            False,
            id="n=4",
        ),
        pytest.param(
            orjson.dumps(chat_body(max_tokens=1, max_completion_tokens=4096)),
            4096,
            chat_reply(2, 4096),
            False,
            id="max_tokens=1+max_completion_tokens=4096",
        ),
        pytest.param(
            BOM + orjson.dumps(chat_body(stream=True, max_tokens=8000)),
            8000,  # not the 4,096 default: max_tokens was read
            chat_stream_reply(2, 8000),
            True,
            id="utf8-bom",
        ),
    ],
)
async def test_a_burst_cannot_escape_its_reservation(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    gate: Gate,
    body: bytes,
    bound: int,
    reply: Reply,
    stream: bool,
) -> None:
    proxy = await start_proxy(admission_wait_s=LONG_WAIT)
    upstream.default = reply
    each = reservation(proxy, bound)
    budget = (each * Decimal("3.25")).quantize(Decimal("0.000001"))  # fits 3
    await put_budget(proxy, "/api/sessions/esc/budget", float(budget))
    tasks = spawn(50, lambda: send(proxy, "/s/esc/openai/v1/chat/completions", body))
    admitted = await in_flight(gate, 3)
    assert admitted in fits(budget, each), f"{len(upstream.seen)} of 50 went upstream at once"
    gate.set()
    statuses = [a.status for a in await asyncio.gather(*tasks)]
    # 3 or 4 at once, then while the spend is below the budget one more: 4 in all
    assert statuses.count(200) == 4 and set(statuses) <= {200, 402, 429}, statuses
    assert len(upstream.seen) == 4
    await until_settled(proxy, "esc", 4)
    spent = money((await proxy.cost("esc"))["spentUsd"])
    assert spent == 4 * cost(proxy, 2, bound)
    assert spent <= budget + each
    rows = await proxy.messages("esc")
    assert [(r["stream"], r["costUsd"] is not None) for r in rows] == [(stream, True)] * 4


# -- 3. resume ---------------------------------------------------------------------------------


async def test_resume_over_budget_is_409_and_a_burst_after_it_is_refused(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.default = chat_reply(1000, 2000)
    spent = cost(proxy, 1000, 2000)
    sub, _ = await proxy.bus.subscribe(["over"], ["budget.paused", "budget.resumed"], None)
    await put_budget(proxy, "/api/sessions/over/budget", 0.001)
    assert (await chat(proxy, "over")).status == 200
    await until_paused(proxy, "over")
    status, text = await post_api(proxy, "/api/sessions/over/resume")
    assert status == 409, text
    assert "spendgate budget" in text or "/budget" in text, text  # says to raise the budget
    answers = await asyncio.gather(*(chat(proxy, "over") for _ in range(50)))
    for a in answers:
        assert_refused(a, "session", "over", Decimal("0.001"), spent)
    assert len(upstream.seen) == 1
    assert (await proxy.cost("over"))["paused"] is True
    events = [(e.type, e.data["scope"], e.data["sessionId"]) for e in drain(sub)]
    assert events == [("budget.paused", "session", "over")]


async def test_resume_lifts_a_manual_pause(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.default = chat_reply(10, 10)
    await put_budget(proxy, "/api/sessions/hand/budget", 1.0)
    status, text = await post_api(proxy, "/api/sessions/hand/pause")
    assert status == 200 and orjson.loads(text)["paused"] is True
    refused = await chat(proxy, "hand")
    assert refused.status == 402 and refused.error["code"] == "session_budget_exceeded"
    assert refused.headers["x-should-retry"] == "false"
    status, text = await post_api(proxy, "/api/sessions/hand/resume")
    assert status == 200 and orjson.loads(text)["paused"] is False
    assert (await chat(proxy, "hand")).status == 200
    assert len(upstream.seen) == 1


async def test_raising_the_budget_lifts_the_budget_pause(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.default = chat_reply(1000, 2000)
    sub, _ = await proxy.bus.subscribe(["raise"], ["budget.paused", "budget.resumed"], None)
    await put_budget(proxy, "/api/sessions/raise/budget", 0.001)
    assert (await chat(proxy, "raise")).status == 200
    await until_paused(proxy, "raise")
    assert (await chat(proxy, "raise")).status == 402
    session = await put_budget(proxy, "/api/sessions/raise/budget", 0.01)
    assert session["paused"] is False
    assert (await chat(proxy, "raise")).status == 200
    assert len(upstream.seen) == 2
    events = [(e.type, e.data["scope"], e.data["sessionId"]) for e in drain(sub)]
    assert events == [("budget.paused", "session", "raise"), ("budget.resumed", "session", "raise")]


# -- 4. unpriced models -------------------------------------------------------------------------


async def test_unpriced_model_on_a_budgeted_session_is_refused_before_upstream(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    await put_budget(proxy, "/api/sessions/up-1/budget", 1.0)
    attempts = Attempts()
    async with attempts.openai(proxy.url("/s/up-1/v1")) as c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(model=UNPRICED, messages=MSG)
    assert err.value.status_code == 402
    assert attempts.statuses == [402]
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_unpriced"
    message = body["message"]
    assert UNPRICED in message, message
    assert "pricing_file" in message.lower() and "SPENDGATE_UNPRICED_MODELS" in message, message
    assert err.value.response.headers["x-should-retry"] == "false"
    assert upstream.seen == []


async def test_unpriced_model_without_a_budget_is_forwarded_as_before(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.default = chat_reply(7, 2, model=UNPRICED)
    assert (await chat(proxy, "up-2", model=UNPRICED)).status == 200
    await until_settled(proxy, "up-2", 1)
    (row,) = await proxy.messages("up-2")
    assert row["costUsd"] is None and (row["inputTokens"], row["outputTokens"]) == (7, 2)


async def test_unpriced_allow_forwards_and_tells_once_per_session_and_model(
    start_proxy: StartProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    proxy = await start_proxy(unpriced_models="allow")
    upstream.default = chat_reply(7, 2, model=UNPRICED)
    for sid in ("al-1", "al-2"):
        await put_budget(proxy, f"/api/sessions/{sid}/budget", 1.0)
    sub, _ = await proxy.bus.subscribe([], ["budget.unenforceable"], None)
    for _ in range(3):
        assert (await chat(proxy, "al-1", model=UNPRICED)).status == 200
    assert (await chat(proxy, "al-2", model=UNPRICED)).status == 200
    assert len(upstream.seen) == 4
    await until_settled(proxy, "al-1", 3)
    assert [r["costUsd"] for r in await proxy.messages("al-1")] == [None] * 3
    events = drain(sub)
    assert [(e.type, e.data["sessionId"]) for e in events] == [
        ("budget.unenforceable", "al-1"),
        ("budget.unenforceable", "al-2"),
    ]
    assert all(UNPRICED in orjson.dumps(e.data).decode() for e in events)
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and UNPRICED in r.getMessage() and "al-1" in r.getMessage()
    ]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


async def test_price_as_prices_an_unpriced_model_like_the_stand_in(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(unpriced_models=f"price_as:{MINI}")
    upstream.default = chat_reply(1000, 1000, model=UNPRICED)
    each = cost(proxy, 1000, 1000)  # $0.00075 at gpt-4o-mini's price
    await put_budget(proxy, "/api/sessions/pa/budget", 0.001)
    assert (await chat(proxy, "pa", model=UNPRICED)).status == 200
    await until_settled(proxy, "pa", 1)
    (row,) = await proxy.messages("pa")
    assert money(row["costUsd"]) == each
    assert (await chat(proxy, "pa", model=UNPRICED)).status == 200
    await until_paused(proxy, "pa")
    assert_refused(
        await chat(proxy, "pa", model=UNPRICED), "session", "pa", Decimal("0.001"), 2 * each
    )
    assert len(upstream.seen) == 2


# -- 5. agent budgets ---------------------------------------------------------------------------


async def test_an_agent_budget_refuses_that_agent_only(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.default = chat_reply(1000, 1000)
    each = cost(proxy, 1000, 1000)
    sub, _ = await proxy.bus.subscribe(["team"], ["budget.warning", "budget.paused"], None)
    data = await put_budget(proxy, "/api/sessions/team/agents/a1/budget", 0.001)
    keys = ("sessionId", "agentId", "budgetUsd", "spentUsd", "remainingUsd", "paused")
    assert {k: data[k] for k in keys} == {
        "sessionId": "team",
        "agentId": "a1",
        "budgetUsd": 0.001,
        "spentUsd": 0.0,
        "remainingUsd": 0.001,
        "paused": False,
    }
    for _ in range(2):
        assert (await chat(proxy, "team", agent="a1")).status == 200

    async def agent_paused() -> bool:
        return (await proxy.cost("team"))["byAgent"].get("a1", {}).get("paused") is True

    await eventually(agent_paused)
    refused = await chat(proxy, "team", agent="a1")
    assert_refused(refused, "agent", "team", Decimal("0.001"), 2 * each)
    by_headers = await send(
        proxy,
        "/v1/chat/completions",
        chat_body(),
        headers={"X-Spendgate-Session": "team", "X-Spendgate-Agent": "a1"},
    )
    assert_refused(by_headers, "agent", "team", Decimal("0.001"), 2 * each)
    assert (await chat(proxy, "team", agent="a2")).status == 200  # another agent passes
    assert (await chat(proxy, "team")).status == 200  # the session has no budget
    assert len(upstream.seen) == 4
    await until_settled(proxy, "team", 4)
    by_agent = (await proxy.cost("team"))["byAgent"]
    a1 = by_agent["a1"]
    assert (a1["budgetUsd"], a1["paused"]) == (0.001, True)
    assert money(a1["remainingUsd"]) == Decimal("0.001") - 2 * each
    assert by_agent["a2"].get("budgetUsd") is None
    paused = [e for e in drain(sub) if e.type == "budget.paused"]
    assert [(e.data["scope"], e.data["sessionId"], e.data["agentId"]) for e in paused] == [
        ("agent", "team", "a1")
    ]


async def test_an_agents_reservations_make_only_that_agent_wait(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(admission_wait_s=WAIT)
    upstream.default = chat_reply(10, 10)
    await put_budget(proxy, "/api/sessions/crew/agents/a1/budget", 0.002)
    held = asyncio.create_task(chat(proxy, "crew", agent="a1"))
    await gate.until_held(1)
    other = asyncio.create_task(chat(proxy, "crew", agent="a2"))
    await gate.until_held(2)  # a2 went straight upstream: no wait on a1's reservation
    message = assert_reserved(await chat(proxy, "crew", agent="a1"), "agent")
    assert "a1" in message, message
    gate.set()
    assert [(await held).status, (await other).status] == [200, 200]
    assert (await chat(proxy, "crew", agent="a1")).status == 200


# -- 6. the global budget -------------------------------------------------------------------------


async def test_the_global_budget_refuses_every_session(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(global_budget_usd=0.001)
    upstream.default = chat_reply(1000, 1000)
    each = cost(proxy, 1000, 1000)
    types = ["budget.warning", "budget.paused", "budget.resumed"]
    sub, _ = await proxy.bus.subscribe([], types, None)
    state = await proxy.get_json("/api/budget")
    keys = ("scope", "budgetUsd", "spentUsd", "remainingUsd", "paused", "period", "periodStart")
    assert {k: state[k] for k in keys} == {
        "scope": "global",
        "budgetUsd": 0.001,
        "spentUsd": 0.0,
        "remainingUsd": 0.001,
        "paused": False,
        "period": "total",
        "periodStart": None,
    }
    assert (await chat(proxy, "g1")).status == 200
    assert (await chat(proxy, "g2")).status == 200  # spent $0.00075 < $0.001: admitted

    async def paused() -> bool:
        return bool((await proxy.get_json("/api/budget"))["paused"])

    await eventually(paused)
    for sid in ("g1", "g2", "g3"):
        assert_refused(await chat(proxy, sid), "global", sid, Decimal("0.001"), 2 * each)
    state = await proxy.get_json("/api/budget")
    assert money(state["spentUsd"]) == 2 * each
    assert money(state["remainingUsd"]) == Decimal("0.001") - 2 * each
    assert len(upstream.seen) == 2
    raised = await put_budget(proxy, "/api/budget", 1.0)
    assert (raised["scope"], raised["budgetUsd"], raised["paused"]) == ("global", 1.0, False)
    assert (await chat(proxy, "g3")).status == 200
    events = [
        (e.type, e.data["scope"], e.data["sessionId"], e.data["period"], e.data.get("threshold"))
        for e in drain(sub)
    ]
    assert events == [
        ("budget.warning", "global", None, "total", 0.5),
        ("budget.warning", "global", None, "total", 0.8),
        ("budget.warning", "global", None, "total", 0.9),
        ("budget.paused", "global", None, "total", None),
        ("budget.resumed", "global", None, "total", None),
    ]


async def test_global_reservations_make_other_sessions_wait(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(global_budget_usd=0.002, admission_wait_s=WAIT)
    upstream.default = chat_reply(10, 10)
    held = asyncio.create_task(chat(proxy, "ga"))
    await gate.until_held(1)
    assert_reserved(await chat(proxy, "gb"), "global")
    gate.set()
    assert (await held).status == 200
    assert (await chat(proxy, "gb")).status == 200


async def test_a_daily_global_budget_reports_its_period(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(global_budget_usd=1.0, global_budget_period="day")
    state = await proxy.get_json("/api/budget")
    assert (state["scope"], state["period"], state["budgetUsd"]) == ("global", "day", 1.0)
    assert state["periodStart"] is not None


async def test_agent_and_global_budgets_and_spend_survive_a_restart(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.default = chat_reply(1000, 1000)
    first = await start_proxy()
    each = cost(first, 1000, 1000)
    state = await put_budget(first, "/api/budget", 0.004)
    assert (state["scope"], state["budgetUsd"]) == ("global", 0.004)
    await put_budget(first, "/api/sessions/keep/agents/a1/budget", 0.001)
    for _ in range(2):
        assert (await chat(first, "keep", agent="a1")).status == 200
    assert (await chat(first, "elsewhere")).status == 200
    await until_settled(first, "keep", 2)
    await until_settled(first, "elsewhere", 1)
    await first.server.close()  # runs cleanup: the writer flushes

    second = await start_proxy()
    state = await second.get_json("/api/budget")
    assert (state["budgetUsd"], state["paused"]) == (0.004, False)
    assert money(state["spentUsd"]) == 3 * each
    a1 = (await second.cost("keep"))["byAgent"]["a1"]
    assert (a1["budgetUsd"], a1["paused"]) == (0.001, True)
    assert_refused(
        await chat(second, "keep", agent="a1"), "agent", "keep", Decimal("0.001"), 2 * each
    )
    assert (await chat(second, "keep", agent="a2")).status == 200  # global: $0.003 of $0.004
    assert (await chat(second, "new")).status == 200  # $0.00375: still under

    async def paused() -> bool:
        return bool((await second.get_json("/api/budget"))["paused"])

    assert (await chat(second, "new")).status == 200  # $0.0045: over
    await eventually(paused)
    assert_refused(await chat(second, "newer"), "global", "newer", Decimal("0.004"), 6 * each)


# -- 7. no budget at all --------------------------------------------------------------------------


async def test_without_any_budget_admission_never_waits_nor_refuses(
    start_proxy: StartProxy, upstream: FakeUpstream, gate: Gate
) -> None:
    proxy = await start_proxy(admission_wait_s=WAIT)
    upstream.default = chat_reply(10, 10)
    tasks = spawn(50, lambda: chat(proxy, "free"))
    await gate.until_held(50)  # all 50 admitted while the others were in flight
    gate.set()
    assert [a.status for a in await asyncio.gather(*tasks)] == [200] * 50
