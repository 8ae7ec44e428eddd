"""Real parts: a fake upstream on a loopback port, the real proxy app, real clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from spendgate.app import make_app
from spendgate.budgets import BudgetLedger
from spendgate.bus import EventBus
from spendgate.keys import BUS, LEDGER, METRICS, PRICES, STORE
from spendgate.metrics import Metrics
from spendgate.pricing import PriceTable
from spendgate.settings import Settings
from spendgate.store import Store
from tests.helpers import postgres as pg
from tests.helpers import redis_server as rs
from tests.upstream import FakeUpstream


@dataclass
class Proxy:
    server: TestServer
    app: web.Application
    settings: Settings
    registry: CollectorRegistry
    http: ClientSession

    def url(self, path: str = "") -> str:
        return str(self.server.make_url(path))

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def ledger(self) -> BudgetLedger:
        return self.app[LEDGER]

    @property
    def bus(self) -> EventBus:
        return self.app[BUS]

    @property
    def prices(self) -> PriceTable:
        return self.app[PRICES]

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    async def get_json(self, path: str, **kw: Any) -> Any:
        async with self.http.get(self.url(path), **kw) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def cost(self, session: str) -> Any:
        return await self.get_json(f"/api/sessions/{session}/cost")

    async def messages(self, session: str) -> list[dict[str, Any]]:
        data = await self.get_json(f"/api/sessions/{session}/messages?limit=1000")
        rows: list[dict[str, Any]] = data["messages"]
        return rows


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    server = TestServer(fake.app, host="127.0.0.1", port=0)
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake
    await server.close()


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[StartProxy]:
    """Start (and later stop) a proxy whose built-in routes all point at the fake upstream."""
    started: list[Proxy] = []

    async def start(**overrides: Any) -> Proxy:
        base = upstream.base_url  # type: ignore[attr-defined]
        values: dict[str, Any] = {
            "db_path": tmp_path / "spendgate.db",
            "openai_base_url": base,
            "anthropic_base_url": base,
            "gemini_base_url": base,
            "ollama_base_url": base,
            "live_interval_ms": 0,
            "flush_interval_ms": 20,
        }
        values.update(overrides)
        settings = Settings(**values)
        registry = CollectorRegistry()
        app = make_app(settings, registry)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        proxy = Proxy(server, app, settings, registry, ClientSession())
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        await p.http.close()
        await p.server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresServer]:
    """One real PostgreSQL server for the whole run (tests/helpers/postgres.py); skips, or
    fails under SPENDGATE_REQUIRE_SHARED, where PostgreSQL is not installed."""
    pg.need_server()
    server = pg.PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres: pg.PostgresServer) -> str:
    """A fresh database on that server, for one test."""
    if not postgres.running():  # a test that played an outage and failed before restarting
        postgres.start()
    return postgres.new_database()


redis_server = rs.redis_server
"""One real redis-server for the whole run (tests/helpers/redis_server.py)."""
redis_url = rs.redis_url
"""That server, emptied, for one test."""


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> Proxy:
    return await start_proxy()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll a condition (for effects that cross tasks); never a timing assertion."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)
