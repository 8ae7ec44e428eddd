"""Several replicas, one budget (docs/reference.md §6 "Several replicas"): three real
``spendgate serve`` processes sharing a real PostgreSQL and a real redis-server, in front
of one fake upstream that holds every response until the test lets it go."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.events_client import EventsClient
from tests.helpers import postgres as pg
from tests.helpers.gate import Gate
from tests.helpers.redis_server import RedisServer, free_port
from tests.upstream import FakeUpstream, chat_completion, json_reply, sse_reply

LEASE_S = 2.0
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
RESERVE = Decimal("0.010005")  # 2 tokens in, 1000 out, at gpt-4o's $2.50/$10 per M
COST = Decimal("0.0115")  # each reply: 1000 in, 900 out


class Replica:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def replicas(
    upstream: FakeUpstream, pg_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Replica] = []

    async def start(n: int = 1) -> list[Replica]:
        out = []
        for _ in range(n):
            port = free_port()
            log = tmp_path / f"replica-{port}.log"
            env = {**os.environ,
                   "SPENDGATE_PORT": str(port), "SPENDGATE_STORE_URL": pg_url,
                   "SPENDGATE_REDIS_URL": redis_url,
                   "SPENDGATE_DB_PATH": str(tmp_path / f"journal-{port}" / "spendgate.db"),
                   "SPENDGATE_OPENAI_BASE_URL": upstream.base_url,  # type: ignore[attr-defined]
                   "SPENDGATE_RESERVATION_LEASE_S": str(LEASE_S),
                   "SPENDGATE_ADMISSION_WAIT_S": "0", "SPENDGATE_FLUSH_INTERVAL_MS": "20",
                   "SPENDGATE_LIVE_INTERVAL_MS": "0",
                   "SPENDGATE_REPLICA_ID": f"r{port}"}  # fmt: skip
            with log.open("wb") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "spendgate", "serve"],
                    env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            r = Replica(proc, port, log)
            started.append(r)
            out.append(r)
        async with aiohttp.ClientSession() as http:
            for r in out:
                deadline = time.monotonic() + 60
                while True:
                    assert r.proc.poll() is None, r.log.read_text()[-3000:]
                    try:
                        async with http.get(r.url("/healthz")) as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert time.monotonic() < deadline, r.log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
        return out

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    for r in started:
        try:
            r.proc.wait(20)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait(5)


async def chat(
    http: aiohttp.ClientSession, r: Replica, session: str, body: dict[str, Any] = BODY
) -> Any:
    url = r.url(f"/s/{session}/openai/v1/chat/completions")
    async with http.post(url, json=body) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def cost(http: aiohttp.ClientSession, r: Replica, session: str) -> Any:
    async with http.get(r.url(f"/api/sessions/{session}/cost")) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def rows_sum(postgres: pg.PostgresServer, pg_url: str, session: str) -> str:
    db = pg_url.rsplit("/", 1)[1]
    return postgres.psql(
        db, f"SELECT COUNT(*), SUM(cost_usd) FROM token_usage WHERE session_id = '{session}'"
    )


async def test_three_replicas_share_one_budget_exactly(
    replicas: Callable[..., Any],
    upstream: FakeUpstream,
    postgres: pg.PostgresServer,
    pg_url: str,
) -> None:
    a, b, c = await replicas(3)
    upstream.default = json_reply(chat_completion("gpt-4o", 1000, 900))
    upstream.gate = gate = Gate()
    budget = RESERVE * 5 + Decimal("0.0004")  # fits five reservations, not six
    async with aiohttp.ClientSession() as http:
        async with http.put(
            a.url("/api/sessions/team/budget"), json={"budgetUsd": float(budget)}
        ) as r:
            assert r.status == 200
        events_url = b.url("/api/events?session=team&types=budget.warning,budget.paused")
        async with EventsClient(http, events_url) as events:
            reps = (a, b, c)
            tasks = [asyncio.create_task(chat(http, reps[i % 3], "team")) for i in range(60)]
            await gate.until_held(5, timeout=30)

            async def decided() -> bool:
                return sum(t.done() for t in tasks) >= 55

            await eventually(decided, timeout=30)
            await asyncio.sleep(0.2)  # and no more than that
            finished = [t.result() for t in tasks if t.done()]
            assert len(finished) == 55 and gate.held == 5  # every refusal decided while held
            assert {
                (s, h["X-Spendgate-Budget-Scope"], h["x-should-retry"]) for s, h in finished
            } == {(429, "session", "true")}
            gate.set()
            results = [await t for t in tasks]
            assert sorted(s for s, _ in results).count(200) == 5
            spent = COST * 5  # past the budget: paused, and every threshold crossed
            await events.wait_for(lambda e: e.type == "budget.paused", timeout=10)
            await asyncio.sleep(0.5)  # nothing more may come
            warnings = [e.data["threshold"] for e in events.events if e.type == "budget.warning"]
            assert sorted(warnings) == [0.5, 0.8, 0.9]  # once each, across three replicas
            assert [e.type for e in events.events].count("budget.paused") == 1
            ids = [e.id for e in events.events]
        for r in reps:  # every replica: the shared spend is the sum of the rows, exactly
            summary = await cost(http, r, "team")
            assert summary["messageCount"] == 5
            assert Decimal(str(summary["spentUsd"])) == spent
            assert Decimal(str(summary["totalCostUsd"])) == spent
            assert summary["paused"] is True and summary["inFlight"] == 0
        assert rows_sum(postgres, pg_url, "team") == f"5|{spent:.10f}"
        # A client reconnecting to another replica gets the rest, in order.
        async with EventsClient(
            http, c.url("/api/events?session=team&types=budget.warning,budget.paused"),
            headers={"Last-Event-ID": str(ids[0])},
        ) as again:  # fmt: skip
            await again.wait_for(lambda e: e.type == "budget.paused", timeout=5)
            assert [e.id for e in again.events] == ids[1:]


async def test_a_killed_replicas_reservation_is_released_within_its_lease(
    replicas: Callable[..., Any], upstream: FakeUpstream
) -> None:
    a, victim = await replicas(2)
    upstream.default = sse_reply(
        [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
          "choices": [{"index": 0, "delta": {"content": "x"}}]}] * 3
    )  # fmt: skip
    upstream.gate = gate = Gate()
    async with aiohttp.ClientSession() as http:
        async with http.put(
            a.url("/api/sessions/k/budget"), json={"budgetUsd": float(RESERVE * Decimal("1.5"))}
        ) as r:
            assert r.status == 200
        held = asyncio.create_task(chat(http, victim, "k", {**BODY, "stream": True}))
        await gate.until_held(1, timeout=30)
        status, _ = await chat(http, a, "k")
        assert status == 429  # the victim's stream holds the headroom
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(10)
        gate.set()
        while True:
            status, _ = await chat(http, a, "k")
            if status == 200:
                break
            assert status == 429
            assert time.monotonic() - killed < LEASE_S + 1, "not released within lease + 1 s"
            await asyncio.sleep(0.05)
        with pytest.raises(aiohttp.ClientError):
            await held


async def test_a_redis_restart_loses_no_row_and_no_spend(
    replicas: Callable[..., Any],
    upstream: FakeUpstream,
    redis_server: RedisServer,
    postgres: pg.PostgresServer,
    pg_url: str,
) -> None:
    (a,) = await replicas(1)
    upstream.default = json_reply(chat_completion("gpt-4o", 1000, 900))
    upstream.gate = gate = Gate()
    async with aiohttp.ClientSession() as http:
        gate.set()
        assert (await chat(http, a, "rr"))[0] == 200
        gate.clear()
        running = asyncio.create_task(chat(http, a, "rr"))
        await gate.until_held(1, timeout=30)
        redis_server.stop()
        try:
            gate.set()
            assert (await running)[0] == 200  # admitted before: it finishes, its row is kept
            status, headers = await chat(http, a, "rr")
            assert status == 503 and headers["x-should-retry"] == "true"  # closed: retry later
            async with http.get(a.url("/api/sessions/rr/cost")) as resp:  # no 500 either
                assert resp.status == 503
                assert "cannot be reached" in (await resp.json())["error"]["message"]
        finally:
            redis_server.start()

        async def caught_up() -> bool:
            summary = await cost(http, a, "rr")
            return bool(Decimal(str(summary["spentUsd"])) == COST * 2)

        await eventually(caught_up, timeout=15)  # the kept settle was sent, once
        assert rows_sum(postgres, pg_url, "rr") == f"2|{COST * 2:.10f}"
        assert (await chat(http, a, "rr"))[0] == 200


async def test_a_response_is_settled_before_the_clients_next_request_and_read(
    replicas: Callable[..., Any], upstream: FakeUpstream
) -> None:
    # The settle goes to Redis as the response leaves and is answered after it (the
    # client waits for one trip, not two). It is queued before the client can send again,
    # and API calls wait for what was queued before them: the next request and a read
    # right after a response both see its spend.
    (a,) = await replicas(1)
    upstream.default = json_reply(chat_completion("gpt-4o", 1000, 900))
    async with aiohttp.ClientSession() as http:
        for n in range(4):
            session = f"seq{n}"
            async with http.put(
                a.url(f"/api/sessions/{session}/budget"), json={"budgetUsd": float(COST * 3)}
            ) as resp:
                assert resp.status == 200, await resp.text()
            for i in range(1, 4):
                assert (await chat(http, a, session))[0] == 200
                summary = await cost(http, a, session)  # read at once
                assert Decimal(str(summary["spentUsd"])) == COST * i
            # Had the third settle come after it, this admission would fit (2 costs and a
            # reservation are under the budget of 3 costs).
            status, _ = await chat(http, a, session)
            assert status == 402
