"""A real Prometheus server scrapes a running proxy after SDK traffic.

Prometheus (Debian's ``prometheus`` package, installed by .ci/run) runs on a free
loopback port with a temporary storage dir and a config derived from
config/prometheus.yml, its alerting rules included; the test waits (bounded) for a
scrape and asks the HTTP API for the cost the traffic produced.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Proxy
from tests.helpers.stack import ALERTS, DASHBOARD, PROMETHEUS, dashboard_exprs, load
from tests.helpers.traffic import expected_rows, row_cost_totals, send_traffic
from tests.upstream import FakeUpstream

BINARY = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    BINARY is None,
    reason="the prometheus binary is not installed (Debian package 'prometheus'; .ci/run "
    "installs it with apt-get where it can)",
)
WAIT = 60.0  # seconds, the bound on every wait for the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def derived_config(proxy_addr: str) -> dict[str, Any]:
    """config/prometheus.yml, scraping ``proxy_addr`` every second, rules by absolute path."""
    config: dict[str, Any] = load(PROMETHEUS)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str((PROMETHEUS.parent / f).resolve()) for f in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "spendgate"]
    job["static_configs"] = [{"targets": [proxy_addr]}]
    return config


@dataclass
class PromServer:
    url: str
    log: Path
    http: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(self.url + path, params=params) as resp:
            body = await resp.json()
            assert body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, what: str, check: Any) -> Any:
        """Poll ``check()`` until it returns something truthy, at most WAIT seconds."""
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            got = await check()
            if got:
                return got
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"Prometheus never {what}; its log:\n{self.log.read_text()}")
            await asyncio.sleep(0.2)


@pytest.fixture
async def prometheus(proxy: Proxy, tmp_path: Path) -> AsyncIterator[PromServer]:
    """Prometheus on a free loopback port scraping ``proxy``; killed at the end."""
    assert BINARY is not None
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    config = prom_dir / "prometheus.yml"
    addr = f"{proxy.server.host}:{proxy.server.port}"
    config.write_text(yaml.safe_dump(derived_config(addr)))
    port = free_port()
    log = prom_dir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                BINARY,
                f"--config.file={config}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        async with aiohttp.ClientSession() as http:
            server = PromServer(f"http://127.0.0.1:{port}", log, http)

            async def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited: {log.read_text()}")
                try:
                    async with http.get(server.url + "/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await server.until("became ready", ready)
            yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_prometheus_scrapes_the_cost_of_the_traffic(
    proxy: Proxy, upstream: FakeUpstream, prometheus: PromServer
) -> None:
    await send_traffic(proxy, upstream)
    rows = await expected_rows(proxy)
    costs = row_cost_totals(rows)
    want = sum(costs.values(), Decimal(0))
    assert want > 0

    async def cost_scraped() -> list[dict[str, Any]]:
        result = await prometheus.query("sum(spendgate_cost_usd_total)")
        # the first scrape may predate the last request: wait for the full amount
        return [r for r in result if float(r["value"][1]) == pytest.approx(float(want), rel=1e-12)]

    (total,) = await prometheus.until("scraped the traffic's cost", cost_scraped)
    assert float(total["value"][1]) == pytest.approx(float(want), rel=1e-12)

    # per model, the value is exactly what spendgate exported
    for (provider, model), cost in costs.items():
        expr = f'spendgate_cost_usd_total{{provider="{provider}",model="{model}"}}'
        (series,) = await prometheus.query(expr)
        assert float(series["value"][1]) == float(cost)
        assert series["metric"]["job"] == "spendgate"

    (up,) = await prometheus.query('up{job="spendgate"}')
    assert up["value"][1] == "1"
    (requests,) = await prometheus.query("sum(spendgate_requests_total)")
    assert float(requests["value"][1]) == len(rows)


async def test_alert_rules_load_and_every_dashboard_query_runs(
    proxy: Proxy, upstream: FakeUpstream, prometheus: PromServer
) -> None:
    await send_traffic(proxy, upstream)
    # run-1 has spent 95 % of its budget: the alert goes off on real data
    spent = sum(row_cost_totals(await proxy.messages("run-1")).values(), Decimal(0))
    budget = {"budgetUsd": float(spent / Decimal("0.95"))}
    async with proxy.http.put(proxy.url("/api/sessions/run-1/budget"), json=budget) as r:
        assert r.status == 200

    async def rules_evaluated() -> bool:
        groups = (await prometheus.api("/api/v1/rules"))["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        return bool(rules) and all(
            rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001")
            for rule in rules
        )

    await prometheus.until("evaluated the alerting rules", rules_evaluated)
    names = {r["alert"] for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r}
    groups = (await prometheus.api("/api/v1/rules"))["groups"]
    assert {rule["name"] for g in groups for rule in g["rules"]} == names

    async def budget_alert() -> list[dict[str, Any]]:
        alerts = (await prometheus.api("/api/v1/alerts"))["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "SpendgateSessionBudgetNearlySpent"
            and a["labels"]["session"] == "run-1"
        ]

    (alert,) = await prometheus.until("raised the budget alert", budget_alert)
    assert alert["state"] == "firing"
    assert float(alert["value"]) == pytest.approx(0.95)

    # the dashboard's PromQL is valid for a real server (Grafana's variables filled in)
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_exprs(dashboard):
        for var, val in (("$__rate_interval", "1m"), ("$__range", "5m"), ("$provider", ".*"),
                         ("$model", ".*")):  # fmt: skip
            expr = expr.replace(var, val)
        await prometheus.query(expr)  # raises on a bad query
    # only the sessions with a budget have a budget series ("claude-run" has none)
    ratios = await prometheus.query("max by (session) (spendgate_session_budget_used_ratio)")
    assert {r["metric"]["session"] for r in ratios} == {"run-1", "broke"}
