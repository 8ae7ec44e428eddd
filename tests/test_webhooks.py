"""webhooks.py (SPENDGATE_WEBHOOK_URL, docs/reference.md §7 "Webhook") against a real
receiver on a loopback port: what is sent and its text, the choice of alerts, and a
receiver that is down, slow, failing or refusing, none of which may slow the proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from spendgate import webhooks
from spendgate.events import CONTEXT_USAGE, Event, budget_event
from spendgate.keys import BUS, WEBHOOKS
from spendgate.settings import SettingsError, load_settings
from tests.conftest import Proxy, StartProxy, eventually
from tests.upstream import FakeUpstream, chat_completion, json_reply

SECRET_PATH = "/services/T000/B000/s3cr3t-token"


class Receiver:
    """A webhook receiver: records each POST; answers ``statuses`` in turn (then 200),
    after ``delay`` seconds, or waits for ``gate``."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.attempts = 0
        self.statuses: list[int] = []
        self.delay = 0.0
        self.gate: asyncio.Event | None = None
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status < 300:
            self.got.append(body)
        return web.Response(status=status)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url(SECRET_PATH))

    def events(self) -> list[str]:
        return [b["event"] for b in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post(SECRET_PATH, rx.handle)
    rx.server = TestServer(app, host="127.0.0.1", port=0)
    await rx.server.start_server()
    yield rx
    if rx.gate is not None:
        rx.gate.set()
    await rx.server.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeout and backoff, so failing receivers are tested in well under a second."""
    monkeypatch.setattr(webhooks, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(webhooks, "BACKOFF_S", 0.02)


async def chat(proxy: Proxy, upstream: FakeUpstream, session: str = "hooked") -> float:
    """One priced request ($0.00021, gpt-4o-mini); how long it took."""
    upstream.queue(json_reply(chat_completion("gpt-4o-mini")))
    started = time.monotonic()
    async with proxy.http.post(
        proxy.url(f"/s/{session}/openai/v1/chat/completions"),
        json={"model": "gpt-4o-mini", "messages": [], "max_tokens": 100},
    ) as r:
        assert r.status == 200
        await r.read()
    return time.monotonic() - started


async def scrape(proxy: Proxy) -> str:
    async with proxy.http.get(proxy.url("/metrics")) as r:
        return await r.text()


def publish(proxy: Proxy, n: int, session: str = "s") -> None:
    for i in range(n):
        proxy.app[BUS].publish(
            budget_event("budget.paused", "session", f"{session}{i}", 1.0, 2.0, reason="manual")
        )


async def test_budget_alerts_reach_the_receiver_with_a_text(
    start_proxy: StartProxy, upstream: FakeUpstream, receiver: Receiver
) -> None:
    proxy = await start_proxy(webhook_url=receiver.url, default_session_budget_usd=0.0002)
    await chat(proxy, upstream)  # $0.00021 of $0.0002: every threshold, then the pause
    await eventually(lambda: _has(receiver, 4))
    assert receiver.events() == ["budget.warning"] * 3 + ["budget.paused"]
    warning, paused = receiver.got[0], receiver.got[3]
    assert warning["text"] == (
        "spendgate: session hooked has used 50% of its budget ($0.000210 of $0.000200)"
    )
    assert paused["text"] == (
        "spendgate: session hooked is paused (budget): $0.000210 spent of $0.000200"
    )
    assert paused["data"]["sessionId"] == "hooked" and paused["id"] > warning["id"]
    async with proxy.http.put(proxy.url("/api/sessions/hooked/budget"), json={"budgetUsd": 1}) as r:
        assert r.status == 200
    await eventually(lambda: _has(receiver, 5))
    assert receiver.got[4]["event"] == "budget.resumed"
    assert receiver.got[4]["text"] == "spendgate: session hooked resumed (budget raised)"


async def _has(receiver: Receiver, n: int) -> bool:
    return len(receiver.got) >= n


async def test_webhook_events_chooses_the_alerts(
    start_proxy: StartProxy, upstream: FakeUpstream, receiver: Receiver
) -> None:
    proxy = await start_proxy(
        webhook_url=receiver.url,
        webhook_events="budget.paused",
        default_session_budget_usd=0.0002,
    )
    await chat(proxy, upstream)
    await eventually(lambda: _has(receiver, 1))
    await asyncio.sleep(0.1)  # the warnings came first on the bus: none may follow
    assert receiver.events() == ["budget.paused"]


async def test_context_critical_once_per_rise(start_proxy: StartProxy, receiver: Receiver) -> None:
    proxy = await start_proxy(webhook_url=receiver.url, webhook_events="context.critical")
    bus = proxy.app[BUS]
    for level, percent in [("ok", 10), ("critical", 91), ("critical", 95), ("warning", 85),
                           ("critical", 92), ("critical", 99)]:  # fmt: skip
        data = {"sessionId": "ctx", "modelId": "gpt-4o", "contextTokens": percent * 1280,
                "contextWindow": 128_000, "percent": percent, "level": level}  # fmt: skip
        bus.publish(Event(CONTEXT_USAGE, "ctx", data))
    await eventually(lambda: _has(receiver, 2))
    await asyncio.sleep(0.1)
    assert [b["data"]["percent"] for b in receiver.got] == [91, 92]
    assert receiver.got[0]["text"] == (
        "spendgate: session ctx's context is 91% full (116,480 of 128,000 tokens, model gpt-4o)"
    )


@pytest.mark.usefixtures("quick")
async def test_a_receiver_that_is_down_never_slows_the_proxy(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = receiver.url
    assert receiver.server is not None
    await receiver.server.close()  # nothing listens there now
    proxy = await start_proxy(webhook_url=url, default_session_budget_usd=0.0002)
    hooks = proxy.app[WEBHOOKS]
    assert await chat(proxy, upstream) < 2
    await eventually(lambda: _settled(hooks, 4))
    assert hooks.failed == 4 and hooks.sent == 0
    assert 'spendgate_webhook_alerts_total{outcome="failed"} 4.0' in await scrape(proxy)
    lines = [r.getMessage() for r in caplog.records if r.name == "spendgate.webhooks"]
    assert any("not delivered" in t and "after 4 attempts" in t for t in lines)
    assert not any(SECRET_PATH in r.getMessage() for r in caplog.records)  # never the URL


async def _settled(hooks: webhooks.Webhooks, n: int) -> bool:
    return hooks.sent + hooks.failed >= n


@pytest.mark.usefixtures("quick")
async def test_a_slow_receiver_times_out_with_bounded_retries(
    start_proxy: StartProxy, upstream: FakeUpstream, receiver: Receiver
) -> None:
    receiver.delay = 5  # far past the (patched) 0.3 s timeout
    proxy = await start_proxy(webhook_url=receiver.url, webhook_events="budget.paused")
    hooks = proxy.app[WEBHOOKS]
    publish(proxy, 1)
    started = time.monotonic()
    assert await chat(proxy, upstream) < 1  # the proxy goes on while the webhook waits
    await eventually(lambda: _settled(hooks, 1), timeout=10)
    assert time.monotonic() - started < 1 + (webhooks.RETRIES + 1) * 0.3
    assert hooks.failed == 1 and receiver.attempts == webhooks.RETRIES + 1


@pytest.mark.usefixtures("quick")
async def test_a_failing_receiver_is_retried_and_a_refusing_one_is_not(
    start_proxy: StartProxy, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]  # then 200
    proxy = await start_proxy(webhook_url=receiver.url, webhook_events="budget.paused")
    hooks = proxy.app[WEBHOOKS]
    publish(proxy, 1)
    await eventually(lambda: _settled(hooks, 1))
    assert (hooks.sent, receiver.attempts, len(receiver.got)) == (1, 3, 1)
    receiver.statuses = [400]
    publish(proxy, 1, "refused")
    await eventually(lambda: _settled(hooks, 2))
    assert (hooks.failed, receiver.attempts) == (1, 4)  # a 400 is not asked again


async def test_the_queue_is_bounded_and_drops_are_counted_and_logged(
    start_proxy: StartProxy,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(webhooks, "QUEUE_SIZE", 3)
    receiver.gate = asyncio.Event()  # the receiver holds every POST
    proxy = await start_proxy(webhook_url=receiver.url, webhook_events="budget.paused")
    hooks = proxy.app[WEBHOOKS]
    publish(proxy, 1)
    await eventually(lambda: _attempted(receiver))  # one in flight, held
    publish(proxy, 10)  # 3 wait in the queue, 7 are dropped
    await eventually(lambda: _dropped(hooks, 7))
    await asyncio.sleep(0.05)
    assert hooks.dropped == 7 and hooks.queue.qsize() == 3
    assert 'spendgate_webhook_alerts_total{outcome="dropped"} 7.0' in await scrape(proxy)
    assert any(
        "webhook queue full" in r.getMessage() and "1 alerts dropped" in r.getMessage()
        for r in caplog.records
    )
    receiver.gate.set()
    await eventually(lambda: _has(receiver, 4))
    assert [b["data"]["sessionId"] for b in receiver.got] == ["s0", "s0", "s1", "s2"]


async def _attempted(receiver: Receiver) -> bool:
    return receiver.attempts >= 1


async def _dropped(hooks: webhooks.Webhooks, n: int) -> bool:
    return hooks.dropped >= n


def test_alert_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_WEBHOOK_EVENTS", "budget.paused,budget.pause")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert str(info.value).startswith(
        "bad setting in environment variable SPENDGATE_WEBHOOK_EVENTS: unknown alert "
        "'budget.pause' (did you mean budget.paused?); alerts are "
    )
    monkeypatch.setenv("SPENDGATE_WEBHOOK_EVENTS", "budget.warning, context.critical")
    monkeypatch.setenv("SPENDGATE_WEBHOOK_URL", "ftp://example" + SECRET_PATH)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert SECRET_PATH not in str(info.value)
    monkeypatch.setenv("SPENDGATE_WEBHOOK_URL", "http://127.0.0.1:9" + SECRET_PATH)
    assert load_settings().webhook_events == ["budget.warning", "context.critical"]


def test_every_alert_type_has_a_text() -> None:
    data = {"scope": "global", "period": "2026-12", "budgetUsd": None, "spentUsd": 3.0,
            "threshold": 0.8, "reason": "manual", "sessionId": "s", "modelId": "m",
            "contextTokens": 1, "contextWindow": 2, "percent": 50}  # fmt: skip
    texts = {kind: webhooks.alert_text(kind, data) for kind in webhooks.ALERT_TYPES}
    assert texts["budget.warning"] == (
        "spendgate: the global budget (2026-12) has used 80% of its budget ($3.00 of unlimited)"
    )
    assert len(set(texts.values())) == len(texts)
