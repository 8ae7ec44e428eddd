"""`spendgate pricing MODEL` and `spendgate pricing import FILE`."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from spendgate.cli import main
from tests.conftest import StartProxy
from tests.paths import PRICE_DATA


def test_pricing_shows_resolved_entry_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pricing", "openai/gpt-4o-2024-08-06"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["model"] in ("gpt-4o-2024-08-06", "gpt-4o")
    assert shown["input"] == 2.5 and shown["output"] == 10 and shown["source"] == "bundled"


def test_unknown_model_says_na(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pricing", "no-such-model-xyz"]) == 1
    assert "N/A" in capsys.readouterr().err


def test_import_public_table_then_use_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "mine.json"
    assert main(["pricing", "import", str(PRICE_DATA), "--to", str(target)]) == 0
    assert "imported" in capsys.readouterr().out
    monkeypatch.setenv("SPENDGATE_PRICING_FILE", str(target))
    # a model only the full public table has (a Bedrock id), now priced from the user's file
    assert main(["pricing", "anthropic.claude-3-5-sonnet-20240620-v1:0"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["input"] == 3 and shown["source"] == str(target)


def test_import_bad_file_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["pricing", "import", str(bad), "--to", str(tmp_path / "out.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("spendgate: cannot import") and err.count("\n") == 1


def test_bad_setting_is_one_readable_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPENDGATE_ON_BUDGET_MID_STREAM", "explode")
    assert main(["pricing", "gpt-4o"]) == 2
    err = capsys.readouterr().err
    assert "SPENDGATE_ON_BUDGET_MID_STREAM" in err and err.count("\n") == 1


def test_serve_refuses_remote_bind_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "SPENDGATE_ADMIN_TOKEN" in capsys.readouterr().err


async def test_budget_and_resume_go_through_the_running_proxy(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    proxy = await start_proxy(admin_token="tok")
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", "tok")
    assert await asyncio.to_thread(main, ["budget", "cli-run", "$1.50"]) == 0
    assert orjson.loads(capsys.readouterr().out)["budgetUsd"] == 1.5
    assert proxy.ledger.session("cli-run") is not None
    assert await asyncio.to_thread(main, ["pause", "cli-run"]) == 0
    assert orjson.loads(capsys.readouterr().out)["paused"] is True
    assert await asyncio.to_thread(main, ["resume", "cli-run"]) == 0
    assert orjson.loads(capsys.readouterr().out)["paused"] is False
    assert await asyncio.to_thread(main, ["budget", "cli-run", "lots"]) == 2
    monkeypatch.setenv("SPENDGATE_PORT", "1")  # nothing listens there
    assert await asyncio.to_thread(main, ["resume", "cli-run"]) == 1
    assert "start `spendgate serve`" in capsys.readouterr().err


async def test_agent_and_global_budgets_and_a_refused_resume_from_the_command_line(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    from decimal import Decimal

    proxy = await start_proxy()
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))

    async def run(*argv: str) -> int:
        return await asyncio.to_thread(main, list(argv))

    assert await run("budget", "cli-a", "0.5", "--agent", "planner") == 0
    out = orjson.loads(capsys.readouterr().out)
    assert (out["sessionId"], out["agentId"], out["budgetUsd"]) == ("cli-a", "planner", 0.5)
    assert await run("budget", "--global", "$20") == 0
    out = orjson.loads(capsys.readouterr().out)
    assert (out["scope"], out["budgetUsd"], out["period"]) == ("global", 20.0, "total")
    for bad in (["budget", "cli-a", "nan"], ["budget", "cli-a", "-1"], ["budget", "cli-a"],
                ["budget", "--global", "5", "cli-a"], ["budget", "--global", "inf"],
                ["budget", "--global", "5", "--agent", "x"]):  # fmt: skip
        assert await run(*bad) == 2, bad
        assert capsys.readouterr().err.startswith("spendgate: ")
    await proxy.ledger.set_budget("cli-a", Decimal("0"))  # spent $0 of $0: over
    assert await run("resume", "cli-a") == 1
    err = capsys.readouterr().err
    assert err.startswith("spendgate: 409: session 'cli-a' has spent $0.00 of its $0.00 budget")
    assert "spendgate budget cli-a USD" in err


# --- the proxy's own resolution, its entry and source (issue #18) -------------------------


@pytest.mark.parametrize(
    ("argv", "entry", "source"),
    [
        (["grok-4.7", "--route", "openai"], "xai/grok-4.7", "bundled 2026-11-22"),
        (["grok-4.7", "--provider", "grok"], "xai/grok-4.7", "bundled 2026-11-22"),
        (["x-ai/grok-4.7"], "xai/grok-4.7", "bundled 2026-11-22"),
        (["llama3.2", "--route", "ollama"], "llama3.2", "local"),
        (["my-model", "--local"], "my-model", "local"),
        (["llama3", "--route", "ollama"], "ollama/llama3", "bundled 2026-11-22"),
    ],
)
def test_pricing_says_which_entry_and_source_priced_it(
    capsys: pytest.CaptureFixture[str], argv: list[str], entry: str, source: str
) -> None:
    assert main(["pricing", *argv]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert (shown["pricedAs"], shown["priceSource"]) == (entry, source)
    assert shown["query"]["model"] == argv[0]


def test_pricing_asks_what_the_proxy_asks(capsys: pytest.CaptureFixture[str]) -> None:
    from spendgate.price_files import load_price_table

    assert main(["pricing", "claude-sonnet-4-6", "--route", "anthropic"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["query"] == {
        "model": "claude-sonnet-4-6", "route": "anthropic", "provider": "anthropic",
        "local": False,
    }  # fmt: skip
    price = load_price_table().priced("claude-sonnet-4-6", "anthropic", local=False)
    assert price is not None and shown == {**price.to_json(), "query": shown["query"]}


def test_pricing_unknown_route_and_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pricing", "gpt-4o", "--route", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no route named 'nope'" in err and "openai" in err
    assert main(["pricing", "llama3.2", "--route", "openai"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "N/A" in err  # one line, not the proxy's log warning
    assert main(["pricing"]) == 0
    sources = orjson.loads(capsys.readouterr().out)["sources"]
    assert [s["source"] for s in sources] == ["overrides", "bundled"]


def test_pricing_list_is_the_effective_table_as_the_proxy_charges_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(
        '[models."my-private-model"]\ninput = 1.25\noutput = 5\n'
        '[models."gpt-4o"]\ninput = 2.0\n'
        '[aliases]\n"team-default" = "gpt-4o-mini"\n'
    )
    monkeypatch.setenv("SPENDGATE_PRICING_FILE", str(mine))
    assert main(["pricing", "--list", "--json", "--db", str(tmp_path / "x.db")]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) > 300
    by_id = {r["id"]: r for r in rows}
    assert by_id["my-private-model"]["input"] == 1.25
    assert by_id["gpt-4o"]["input"] == 2.0 and by_id["gpt-4o"]["output"] == 10  # one field
    assert by_id["team-default"]["alias"] == "gpt-4o-mini"
    assert by_id["team-default"]["pricedAs"].startswith("gpt-4o-mini")
    for model in ("gpt-4o", "team-default", "claude-sonnet-4-5", "my-private-model"):
        assert main(["pricing", model, "--db", str(tmp_path / "x.db")]) == 0  # the same lookup
        alone = orjson.loads(capsys.readouterr().out)
        alone.pop("query")
        listed = dict(by_id[model])
        listed.pop("id"), listed.pop("alias")
        assert listed == alone, model


def test_pricing_search_and_routes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = ["--db", str(tmp_path / "x.db")]
    assert main(["pricing", "--list", "--search", "Sonnet-4.5", "--json", *db]) == 0
    found = [r["id"] for r in orjson.loads(capsys.readouterr().out)]
    assert "claude-sonnet-4-5" in found and all("sonnet-4" in f.replace(".", "-") for f in found)
    assert main(["pricing", "--search", "sonnet-4-5", *db]) == 0  # --search implies --list
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("claude-sonnet-4-5 ")]
    assert line.split()[1:4] == ["3", "0.3", "15"] and "200,000" in line
    assert main(["pricing", "--list", "--search", "gpt-4o-mini", "--route", "ollama", "--json",
                 *db]) == 0  # fmt: skip
    assert all(r["input"] == 0 and r["source"] == "local" for r in orjson.loads(
        capsys.readouterr().out))  # fmt: skip
    assert main(["pricing", "--list", "--search", "zzz-no-such", *db]) == 0
    assert "no models matching 'zzz-no-such'" in capsys.readouterr().out
    assert main(["pricing", "--list", "--route", "nope", *db]) == 2
    assert "no route named 'nope'" in capsys.readouterr().err
    assert main(["pricing", "gpt-4o", "--list", *db]) == 2
    assert "--list takes no MODEL" in capsys.readouterr().err
