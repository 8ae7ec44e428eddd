"""Prices that stay current (issue #18): `spendgate pricing update` against a table served
on a loopback port (never the internet), the stored update's place among the price
files, and a running proxy reloading its prices (POST /api/pricing/reload, SIGHUP)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from spendgate.cli import main
from spendgate.price_files import (
    DEFAULT_UPDATE_URL,
    load_price_table,
    plan_update,
    read_update,
    store_update,
)
from spendgate.pricing import PricingError
from spendgate.settings import RouteConfig
from tests.conftest import Proxy, StartProxy, eventually
from tests.paths import PRICE_DATA
from tests.upstream import FakeUpstream, json_reply

D = Decimal
TOKEN = {"Authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def litellm() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(PRICE_DATA.read_bytes())
    return data


class Tables:
    """Price tables served at ``url(name)`` on a loopback port."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.base = ""

    def put(self, name: str, body: bytes | Any) -> str:
        self.files[name] = body if isinstance(body, bytes) else orjson.dumps(body)
        return f"{self.base}/{name}"

    async def handle(self, request: web.Request) -> web.Response:
        body = self.files.get(request.path.lstrip("/"))
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=body, content_type="application/json")


@pytest.fixture
async def tables() -> AsyncIterator[Tables]:
    served = Tables()
    app = web.Application()
    app.router.add_get("/{name:.*}", served.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    served.base = str(server.make_url("")).rstrip("/")
    yield served
    await server.close()


@pytest.fixture
def stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the update goes: beside the database (a temporary one)."""
    monkeypatch.setenv("SPENDGATE_DB_PATH", str(tmp_path / "spendgate.db"))
    return tmp_path / "prices-update.json"


async def run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def shown(out: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(out)
    return data


def today() -> str:
    return datetime.now(UTC).date().isoformat()


# --- pricing update -------------------------------------------------------------------------


async def test_update_fetches_checks_reports_and_stores(
    tables: Tables, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = tables.put("model_prices_and_context_window.json", PRICE_DATA.read_bytes())
    assert await run("pricing", "llama-3.3-70b", "--route", "openai") == 1
    capsys.readouterr()
    assert await run("pricing", "update", "--from", url) == 0
    out = capsys.readouterr().out
    assert f"{url}: litellm table, 3736 token-priced models" in out
    assert "added 3141: " in out and "removed 0" in out and "changed prices 0" in out
    assert f"stored in {stored}" in out and "bundled table (2026-11-22)" in out
    assert read_update(stored).origin == url
    # a model the bundled table lacks, listed only as cerebras/…, now priced by the
    # proxy's resolution
    assert await run("pricing", "llama-3.3-70b", "--route", "openai") == 0
    price = shown(capsys.readouterr().out)
    assert price["pricedAs"] == "cerebras/llama-3.3-70b"
    assert price["priceSource"] == f"update {today()}" and price["source"] == "update"
    assert (price["input"], price["output"]) == (0.85, 1.2)
    assert await run("pricing") == 0
    sources = shown(capsys.readouterr().out)["sources"]
    assert [s["source"] for s in sources] == ["overrides", "bundled", "update"]
    assert sources[2]["from"] == url and sources[2]["models"] == 3736


async def test_update_from_a_models_dev_file_reports_changed_prices(
    tmp_path: Path, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = tmp_path / "api.json"
    api.write_bytes(
        orjson.dumps(
            {
                "openai": {
                    "models": {
                        "gpt-4o": {"cost": {"input": 3, "output": 12}, "limit": {"context": 128000}}
                    }
                }
            }
        )
    )
    assert await run("pricing", "update", "--from", str(api)) == 0
    out = capsys.readouterr().out
    assert "models.dev table, 1 token-priced models" in out
    assert "changed prices 1:\n  gpt-4o: $2.5 / $10 → $3 / $12 per million" in out
    assert await run("pricing", "gpt-4o") == 0
    price = shown(capsys.readouterr().out)
    assert (price["input"], price["output"], price["source"]) == (3, 12, "update")
    assert price["cachedInput"] is None  # the update's entry replaces the bundled one whole


async def test_a_priced_entry_dropping_to_zero_or_vanishing_is_refused_without_force(
    tables: Tables, stored: Path, litellm: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("pricing", "update", "--from", tables.put("v1.json", litellm)) == 0
    before = stored.read_bytes()
    newer = copy.deepcopy(litellm)
    newer["gpt-4o"]["input_cost_per_token"] = 0
    newer["gpt-4o"]["output_cost_per_token"] = 0
    del newer["azure/gpt-35-turbo"]
    del newer["cerebras/llama-3.3-70b"]
    url = tables.put("v2.json", newer)
    capsys.readouterr()
    assert await run("pricing", "update", "--from", url) == 1
    captured = capsys.readouterr()
    assert "REFUSED: gpt-4o was priced and would be $0" in captured.out
    assert "REFUSED: cerebras/llama-3.3-70b was priced and would be gone" in captured.out
    assert "removed 1: cerebras/llama-3.3-70b" in captured.out
    # the bundled table keeps listing azure/gpt-35-turbo: not gone, not refused
    assert "azure/gpt-35-turbo" not in captured.out
    assert "not stored" in captured.err and "--force" in captured.err
    assert stored.read_bytes() == before
    assert await run("pricing", "update", "--from", url, "--force") == 0
    capsys.readouterr()
    await run("pricing", "llama-3.3-70b", "--provider", "cerebras")
    assert "cerebras/llama-3.3-70b" not in capsys.readouterr().out  # gone now


async def test_absurd_prices_are_refused_and_negative_ones_never_stored(
    tables: Tables, stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # USD per token written as USD per million: $2,500,000 per million tokens
    slip = {"acme/m": {"input_cost_per_token": 2.5, "output_cost_per_token": 10}}
    assert await run("pricing", "update", "--from", tables.put("slip.json", slip)) == 1
    out = capsys.readouterr().out
    assert "REFUSED: prices above $20000 per million tokens: acme/m" in out
    assert not stored.exists()
    negative = {"acme/m": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06}}
    url = tables.put("negative.json", negative)
    assert await run("pricing", "update", "--from", url, "--force") == 1
    err = capsys.readouterr().err
    assert "'acme/m'" in err and "must be a non-negative number" in err
    assert "nothing stored" in err and not stored.exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>rate limited</html>", "not JSON"),
        (b"[1, 2]", "a price table is a JSON object"),
        (b'{"hello": "world"}', "unrecognised price table"),
        (b'{"x": {"litellm_provider": "acme", "mode": "image_generation"}}', "no model priced"),
    ],
)
async def test_not_a_price_table(
    tables: Tables, stored: Path, capsys: pytest.CaptureFixture[str], body: bytes, message: str
) -> None:
    assert await run("pricing", "update", "--from", tables.put("t.json", body)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not stored.exists()


async def test_unreachable_or_missing_tables(
    tables: Tables, stored: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("pricing", "update", "--from", f"{tables.base}/nope.json") == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert await run("pricing", "update", "--from", "http://127.0.0.1:1/prices.json") == 1
    assert "cannot fetch" in capsys.readouterr().err
    assert await run("pricing", "update", "--from", str(tmp_path / "nope.json")) == 1
    assert "cannot read" in capsys.readouterr().err
    assert not stored.exists()


async def test_dry_run_and_verbose(
    tables: Tables, stored: Path, litellm: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = tables.put("t.json", litellm)
    assert await run("pricing", "update", "--from", url, "--dry-run", "--verbose") == 0
    out = capsys.readouterr().out
    assert "dry run: nothing stored" in out and "more (--verbose)" not in out
    assert "cerebras/llama-3.3-70b" in out and not stored.exists()


def test_the_default_source_is_litellms_public_table() -> None:
    assert DEFAULT_UPDATE_URL == (
        "https://raw.githubusercontent.com/BerriAI/litellm/main/"
        "model_prices_and_context_window.json"
    )


def test_the_update_over_the_bundled_table_and_the_users_file_over_both(tmp_path: Path) -> None:
    api = orjson.dumps({"openai": {"models": {"gpt-4o": {"cost": {"input": 3, "output": 12}}}}})
    update = tmp_path / "prices-update.json"
    store_update(plan_update(api, "api.json"), update)
    mine = tmp_path / "pricing.toml"
    mine.write_text('[models."gpt-4o"]\ninput = 4\n')
    t = load_price_table(mine, update_file=update)
    gpt = t.get("gpt-4o")
    assert gpt is not None and (gpt.input, gpt.output) == (D(4), D(12))  # file, then update
    assert gpt.price_source == f"file {mine}"
    mini = t.get("gpt-4o-mini")
    assert mini is not None and mini.price_source == "bundled 2026-11-22"
    assert [s["source"] for s in t.sources] == ["overrides", "bundled", "update", "file"]
    # no update stored yet: the bundled table alone
    assert len(load_price_table(update_file=tmp_path / "none.json")) == len(load_price_table())


def test_a_damaged_stored_update_is_one_clear_error(tmp_path: Path) -> None:
    update = tmp_path / "prices-update.json"
    update.write_text("{half")
    with pytest.raises(PricingError, match="run `spendgate pricing update` again"):
        load_price_table(update_file=update)


# --- a running proxy takes new prices -------------------------------------------------------


def azure_completion() -> Any:
    return json_reply(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "llama-3.3-70b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500},
        }
    )


async def chat(
    proxy: Proxy, session: str, prefix: str = "openai", model: str = "llama-3.3-70b"
) -> Any:
    """One chat completion through the proxy, and its row (read with the admin token)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    url = proxy.url(f"/s/{session}/{prefix}/v1/chat/completions")
    async with proxy.http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
    data = await proxy.get_json(f"/api/sessions/{session}/messages", headers=TOKEN)
    (row,) = data["messages"]
    return row


def store_public_table(litellm: dict[str, Any], tmp_path: Path) -> None:
    """What `pricing update` stores beside the proxy's database."""
    body = orjson.dumps(litellm)
    store_update(plan_update(body, "litellm.json"), tmp_path / "prices-update.json")


async def test_reload_through_the_api(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path, litellm: dict[str, Any]
) -> None:
    proxy = await start_proxy(admin_token="tok")
    upstream.default = azure_completion()
    assert (await chat(proxy, "before"))["costUsd"] is None  # the bundled table lacks it
    async with proxy.http.get(proxy.url("/api/pricing/llama-3.3-70b"), headers=TOKEN) as r:
        assert r.status == 404
    store_public_table(litellm, tmp_path)
    async with proxy.http.post(proxy.url("/api/pricing/reload")) as r:
        assert r.status == 401  # the admin token guards it, as every /api route
    async with proxy.http.post(proxy.url("/api/pricing/reload"), headers=TOKEN) as r:
        assert r.status == 200
        done = await r.json()
    assert done["reloaded"] is True and done["models"] > 3000
    assert [s["source"] for s in done["sources"]] == ["overrides", "bundled", "update"]
    # cerebras/llama-3.3-70b: input 0.85, output 1.2 → (1000 x 0.85 + 500 x 1.2) / 1e6
    assert (await chat(proxy, "after"))["costUsd"] == pytest.approx(0.00145)
    url = proxy.url("/api/pricing/llama-3.3-70b?route=openai")
    async with proxy.http.get(url, headers=TOKEN) as r:
        assert r.status == 200
        price = await r.json()
    assert (price["pricedAs"], price["priceSource"]) == (
        "cerebras/llama-3.3-70b",
        f"update {today()}",
    )
    assert price["query"] == {
        "model": "llama-3.3-70b", "route": "openai", "provider": "openai", "local": False,
    }  # fmt: skip


async def test_a_reload_that_cannot_read_the_files_changes_nothing(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    mine = tmp_path / "pricing.toml"
    mine.write_text('[models."house-model"]\ninput = 1\noutput = 2\n')
    proxy = await start_proxy(pricing_file=mine)
    mine.write_text('[models."house-model"]\ninput = -1\n')
    async with proxy.http.post(proxy.url("/api/pricing/reload")) as r:
        assert r.status == 409
        message = (await r.json())["error"]["message"]
    assert str(mine) in message and "the prices in use are unchanged" in message
    assert proxy.prices.priced("house-model") is not None


async def test_sighup_reloads_the_prices(
    start_proxy: StartProxy, tmp_path: Path, litellm: dict[str, Any]
) -> None:
    proxy = await start_proxy()
    assert proxy.prices.priced("llama-3.3-70b", "openai") is None
    store_public_table(litellm, tmp_path)
    # the proxy handles SIGHUP (else it would end the test run)
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    os.kill(os.getpid(), signal.SIGHUP)

    async def reloaded() -> bool:
        return proxy.prices.priced("llama-3.3-70b", "openai") is not None

    await eventually(reloaded)
    price = proxy.prices.priced("llama-3.3-70b", "openai")
    assert price is not None and price.priced_as == "cerebras/llama-3.3-70b"


async def test_pricing_reload_and_update_reload_commands(
    start_proxy: StartProxy,
    tables: Tables,
    tmp_path: Path,
    litellm: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await start_proxy(admin_token="tok")
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", "tok")
    monkeypatch.setenv("SPENDGATE_DB_PATH", str(proxy.settings.db_path))
    assert await run("pricing", "reload") == 0
    assert shown(capsys.readouterr().out)["models"] == len(proxy.prices)
    url = tables.put("t.json", litellm)
    assert await run("pricing", "update", "--from", url, "--reload") == 0
    assert '"reloaded": true' in capsys.readouterr().out
    assert proxy.prices.priced("claude-3-haiku-20240307", "anthropic") is not None
    assert (tmp_path / "prices-update.json").exists()


# --- local routes through the proxy -----------------------------------------------------------


async def test_local_routes_cost_nothing_and_pass_a_budget(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    box = RouteConfig(prefix="/box", upstream=upstream.base_url, local=True)  # type: ignore[attr-defined]
    proxy = await start_proxy(routes=[box], default_session_budget_usd=1.0)
    upstream.default = json_reply(
        {"model": "llama3.2", "message": {"role": "assistant", "content": "hi"}, "done": True,
         "prompt_eval_count": 10, "eval_count": 5}
    )  # fmt: skip
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url("/s/local-1/ollama/api/chat"), json=body) as r:
        assert r.status == 200, await r.text()  # not refused as unpriced
    (row,) = await proxy.messages("local-1")
    assert row["costUsd"] == 0 and row["inputTokens"] == 10
    upstream.default = azure_completion()
    row = await chat(proxy, "local-2", prefix="box", model="my-own-model")
    assert row["costUsd"] == 0
