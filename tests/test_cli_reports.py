"""``spendgate sessions`` and ``spendgate report``: they read the database file directly.

The database is written by a real proxy with real SDK traffic, which is then stopped:
the reports must work with no proxy running.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import openai
import pytest

from spendgate.address import is_loopback, local_url
from spendgate.cli import main
from spendgate.records import EXPORT_HEADER
from spendgate.render import budget_usd, total_usd, usd
from tests.conftest import Proxy, StartProxy
from tests.upstream import FakeUpstream, Reply, json_reply


def completion(model: str, prompt: int, output: int, cached: int = 0) -> dict[str, object]:
    return {
        "id": "c", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                  "total_tokens": prompt + output,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }  # fmt: skip


async def send(
    proxy: Proxy, upstream: FakeUpstream, path: str, model: str, prompt: int, output: int
) -> None:
    upstream.queue(json_reply(completion(model, prompt, output)))
    async with openai.AsyncOpenAI(base_url=proxy.url(path), api_key="k", max_retries=0) as c:
        await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


@pytest.fixture
async def db(start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path) -> Path:
    """A database with two sessions of traffic, written by a proxy that is then stopped."""
    proxy = await start_proxy()
    # gpt-4o $2.50/$10 per M; gpt-4o-mini $0.15/$0.60 per M; my-private-model has no price.
    await send(proxy, upstream, "/s/run-1/a/planner/openai/v1", "gpt-4o", 10_000, 1_000)  # $0.035
    await send(proxy, upstream, "/s/run-1/a/coder/openai/v1", "gpt-4o-mini", 20_000, 2_000)
    await send(proxy, upstream, "/s/run-1/a/coder/openai/v1", "gpt-4o", 1_000, 100)  # $0.0035
    await send(proxy, upstream, "/s/run-1/openai/v1", "my-private-model", 700, 20)
    await send(proxy, upstream, "/s/other/openai/v1", "gpt-4o-mini", 1_000, 100)
    async with proxy.http.put(
        proxy.url("/api/sessions/run-1/budget"), json={"budgetUsd": 5}
    ) as resp:
        assert resp.status == 200
    async with proxy.http.post(proxy.url("/api/sessions/other/pause")) as resp:
        assert resp.status == 200
    await proxy.server.close()  # shutdown writes everything queued
    return proxy.settings.db_path


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))  # it runs its own event loop
    out, err = capsys.readouterr()
    return code, out, err


async def test_sessions_json_lists_totals_newest_first(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "sessions", "--db", str(db), "--format", "json")
    assert code == 0
    rows = {r["sessionId"]: r for r in json.loads(out)}
    assert list(rows) == ["other", "run-1"]
    run1 = rows["run-1"]
    assert run1["messageCount"] == 4 and run1["unpricedMessageCount"] == 1
    assert run1["totalInputTokens"] == 31_700 and run1["totalOutputTokens"] == 3_120
    # 0.035 + (20,000 × 0.15 + 2,000 × 0.6) µ$ + 0.0035 = 0.035 + 0.0042 + 0.0035
    assert run1["totalCostUsd"] == pytest.approx(0.0427)
    assert run1["budgetUsd"] == 5.0 and run1["paused"] is False
    assert rows["other"]["paused"] is True


async def test_sessions_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(capsys, "sessions", "--db", str(db))
    assert code == 0
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("run-1")]
    assert "31,700" in line and "3,120" in line and "$0.0427" in line and "$5.00" in line
    (other,) = [ln for ln in out.splitlines() if ln.strip().startswith("other")]
    assert "paused (manual)" in other and "unlimited" in other


async def test_report_json_has_totals_by_model_and_agent(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "report", "run-1", "--db", str(db), "--format", "json")
    assert code == 0
    s = json.loads(out)
    assert s["sessionId"] == "run-1" and s["messageCount"] == 4
    assert s["totalCostUsd"] == pytest.approx(0.0427)
    assert s["remainingUsd"] == pytest.approx(5 - 0.0427)
    by_model = s["byModel"]
    assert set(by_model) == {"gpt-4o", "gpt-4o-mini", "my-private-model"}
    assert by_model["gpt-4o"]["messageCount"] == 2
    assert by_model["gpt-4o"]["inputTokens"] == 11_000
    assert by_model["gpt-4o"]["costUsd"] == pytest.approx(0.0385)
    assert by_model["my-private-model"]["costUsd"] is None  # unknown, never 0
    by_agent = s["byAgent"]
    assert by_agent["planner"]["costUsd"] == pytest.approx(0.035)
    assert by_agent["coder"]["messageCount"] == 2
    assert by_agent["coder"]["costUsd"] == pytest.approx(0.0077)
    assert sum(g["messageCount"] for g in by_agent.values()) == 4


async def test_report_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(capsys, "report", "run-1", "--db", str(db))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("run-1") and "4 messages" in lines[0]
    assert "$0.0427 + N/A" in lines[0]  # one model has no price
    assert "budget $5.00" in out and "left" in out
    assert "by model" in out and "by agent" in out

    def line(name: str) -> str:
        (found,) = [ln for ln in lines if ln.strip().startswith(name + " ")]
        return found

    assert "11,000" in line("gpt-4o") and "$0.0385" in line("gpt-4o")
    assert "$0.004200" in line("gpt-4o-mini")
    assert "N/A" in line("my-private-model")
    assert "$0.0350" in line("planner") and "$0.007700" in line("coder")
    totals = [ln for ln in lines if ln.strip().startswith("total ")]
    assert len(totals) == 2 and all("31,700" in t for t in totals)


@pytest.fixture
async def costs(start_proxy: StartProxy, upstream: FakeUpstream) -> Proxy:
    """A running proxy with sessions all priced, mixed, all unpriced, free and empty."""
    proxy = await start_proxy()
    await send(proxy, upstream, "/s/all-priced/openai/v1", "gpt-4o", 10_000, 1_000)  # $0.035
    await send(proxy, upstream, "/s/all-priced/openai/v1", "gpt-4o-mini", 20_000, 2_000)
    await send(proxy, upstream, "/s/mixed/a/planner/openai/v1", "gpt-4o", 10_000, 1_000)
    await send(proxy, upstream, "/s/mixed/a/coder/openai/v1", "my-private-model", 700, 20)
    await send(proxy, upstream, "/s/all-unpriced/openai/v1", "my-private-model", 700, 20)
    await send(proxy, upstream, "/s/all-unpriced/openai/v1", "my-private-model", 300, 10)
    # An upstream error that reported no usage costs nothing, priced or not.
    upstream.queue(Reply(status=500, chunks=[b'{"error": {"message": "boom"}}']))
    async with proxy.http.post(
        proxy.url("/s/free/openai/v1/chat/completions"),
        json={"model": "my-private-model", "messages": []},
    ) as resp:
        assert resp.status == 500
    # A model listing is no message at all, and makes no session.
    upstream.queue(json_reply({"object": "list", "data": []}))
    async with proxy.http.get(proxy.url("/s/listing/openai/v1/models")) as resp:
        assert resp.status == 200
    async with proxy.http.put(proxy.url("/api/sessions/empty/budget"), json={"budgetUsd": 1}) as r:
        assert r.status == 200
    return proxy


COSTS = {  # session: (messageCount, unpricedMessageCount, totalCostUsd, as shown)
    "all-priced": (2, 0, 0.0392, "$0.0392"),  # 0.035 + (20,000 × 0.15 + 2,000 × 0.6) µ$
    "mixed": (2, 1, 0.035, "$0.0350 + N/A"),
    "all-unpriced": (2, 2, None, "N/A"),  # unknown, never 0
    "free": (1, 0, 0.0, "$0.00"),
    "empty": (0, 0, 0.0, "$0.00"),
}


async def test_api_totals_count_unpriced_messages(costs: Proxy) -> None:
    listed = {r["sessionId"]: r for r in (await costs.get_json("/api/sessions"))["sessions"]}
    for sid, (msgs, unpriced, total, _) in COSTS.items():
        summary = await costs.cost(sid)
        for s in (summary, listed[sid]):
            assert (s["messageCount"], s["unpricedMessageCount"]) == (msgs, unpriced), sid
            assert s["totalCostUsd"] == (None if total is None else pytest.approx(total)), sid
    mixed = await costs.cost("mixed")
    assert mixed["byModel"]["gpt-4o"]["unpricedMessageCount"] == 0
    assert mixed["byModel"]["my-private-model"]["unpricedMessageCount"] == 1
    assert mixed["byModel"]["my-private-model"]["costUsd"] is None
    assert mixed["byAgent"]["planner"]["unpricedMessageCount"] == 0
    assert mixed["byAgent"]["planner"]["costUsd"] == pytest.approx(0.035)
    assert (
        mixed["byAgent"]["coder"] | {"inputTokens": 700, "unpricedMessageCount": 1}
        == (mixed["byAgent"]["coder"])
    )
    assert mixed["byAgent"]["coder"]["costUsd"] is None
    priced = await costs.cost("all-priced")
    assert all(g["unpricedMessageCount"] == 0 for g in priced["byModel"].values())
    unpriced = await costs.cost("all-unpriced")
    assert unpriced["byModel"]["my-private-model"]["unpricedMessageCount"] == 2
    assert unpriced["byAgent"]["unknown"]["costUsd"] is None
    free = await costs.cost("free")
    assert (
        free["byModel"]["my-private-model"] | {"costUsd": 0.0, "unpricedMessageCount": 0}
        == (free["byModel"]["my-private-model"])
    )
    assert "listing" not in listed


async def test_cli_never_shows_a_partly_unpriced_total_as_a_plain_number(
    costs: Proxy, capsys: pytest.CaptureFixture[str]
) -> None:
    await costs.server.close()
    db = str(costs.settings.db_path)
    code, out, _ = await run(capsys, "sessions", "--db", db)
    assert code == 0
    by_session = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    for sid, (msgs, _, _, shown) in COSTS.items():
        cells = by_session[sid].split()
        assert cells[1] == str(msgs)
        assert " ".join(cells[4:-3]) == shown, by_session[sid]  # cost, before budget and time
    code, out, _ = await run(capsys, "report", "mixed", "--db", db)
    assert code == 0
    lines = out.splitlines()
    assert "2 messages (1 unpriced)" in lines[0] and "$0.0350 + N/A" in lines[0]

    def line(name: str) -> str:
        (found,) = [ln for ln in lines if ln.strip().startswith(name + " ")]
        return found

    assert line("gpt-4o").rstrip().endswith("$0.0350")
    assert line("my-private-model").rstrip().endswith("N/A")
    assert line("planner").rstrip().endswith("$0.0350")
    assert line("coder").rstrip().endswith("N/A") and "$" not in line("coder")
    totals = [ln for ln in lines if ln.strip().startswith("total ")]
    assert len(totals) == 2 and all(t.rstrip().endswith("$0.0350 + N/A") for t in totals)
    code, out, _ = await run(capsys, "report", "all-unpriced", "--db", db)
    assert code == 0
    head = out.splitlines()[0]
    assert "2 messages (2 unpriced)" in head and head.rstrip().endswith("N/A")
    assert "$0.00" not in out.split("budget")[0]  # the cost is unknown, not free
    code, out, _ = await run(capsys, "report", "all-priced", "--db", db)
    assert code == 0
    head = out.splitlines()[0]
    assert "2 messages  " in head and head.rstrip().endswith("$0.0392") and "N/A" not in out
    code, out, _ = await run(capsys, "report", "free", "--db", db)
    assert code == 0 and out.splitlines()[0].rstrip().endswith("$0.00") and "N/A" not in out


async def test_report_csv_is_one_row_per_message(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "report", "run-1", "--db", str(db), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(EXPORT_HEADER)
    assert {r["sessionLabel"] for r in rows} == {""}  # no label set
    assert [r["modelId"] for r in rows] == ["gpt-4o", "gpt-4o-mini", "gpt-4o", "my-private-model"]
    assert [r["agentId"] for r in rows] == ["planner", "coder", "coder", ""]
    assert float(rows[0]["costUsd"]) == pytest.approx(0.035)
    assert rows[3]["costUsd"] == ""  # unknown price: empty, not 0
    for r in rows:  # ISO-8601 UTC, not Unix seconds
        started = datetime.fromisoformat(r["startedAt"])
        assert r["startedAt"].endswith("Z") and abs(time.time() - started.timestamp()) < 600
    assert sum(int(r["inputTokens"]) for r in rows) == 31_700


async def test_unknown_session_and_missing_database(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "report", "nope", "--db", str(db))
    assert code == 1 and "unknown session 'nope'" in err
    missing = tmp_path / "elsewhere" / "none.db"
    for argv in (("sessions",), ("report", "run-1")):
        code, _, err = await run(capsys, *argv, "--db", str(missing))
        assert code == 1 and "no database at" in err
    assert not missing.parent.exists()  # a report never creates a database


async def test_empty_database(
    start_proxy: StartProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = await start_proxy(db_path=tmp_path / "empty.db")
    await proxy.server.close()
    code, out, _ = await run(capsys, "sessions", "--db", str(tmp_path / "empty.db"))
    assert code == 0 and "no sessions recorded" in out
    code, out, _ = await run(
        capsys, "sessions", "--db", str(tmp_path / "empty.db"), "--format", "json"
    )
    assert code == 0 and json.loads(out) == []


async def test_report_as_a_real_command(db: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "spendgate", "report", "run-1", "--db", str(db), "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 5  # header and four messages


@pytest.mark.parametrize(
    ("host", "url", "loopback"),
    [
        ("127.0.0.1", "http://127.0.0.1:8787", True),
        ("::1", "http://[::1]:8787", True),
        ("localhost", "http://localhost:8787", True),
        ("0.0.0.0", "http://127.0.0.1:8787", False),  # every address: reached on loopback
        ("::", "http://[::1]:8787", False),  # bound IPv6-only, so not 127.0.0.1
        ("", "http://127.0.0.1:8787", False),
        ("192.168.1.5", "http://192.168.1.5:8787", False),
        ("fe80::1%eth0", "http://[fe80::1%25eth0]:8787", False),
    ],
)
def test_local_url_of_each_listen_address(host: str, url: str, loopback: bool) -> None:
    assert local_url(host, 8787) == url
    assert is_loopback(host) is loopback


def test_admin_commands_reach_an_ipv6_proxy_by_a_bracketed_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SPENDGATE_HOST", "::1")
    monkeypatch.setenv("SPENDGATE_PORT", str(port))
    assert main(["pause", "run-1", "--db", str(tmp_path / "x.db")]) == 1
    err = capsys.readouterr().err
    assert f"no proxy running at http://[::1]:{port}/api/sessions/run-1/pause" in err


def test_money_for_people() -> None:
    assert [usd(v) for v in (None, 0.0, 0.00021, 0.0427, 4.96, 1234.5, -0.5)] == [
        "N/A", "$0.00", "$0.000210", "$0.0427", "$4.96", "$1,234.50", "$-0.5000",
    ]  # fmt: skip
    assert total_usd(None, 0, 0) == "$0.00" and total_usd(0.0, 0, 0) == "$0.00"  # nothing yet
    assert total_usd(0.5, 3, 0) == "$0.5000"
    assert total_usd(0.5, 3, 1) == "$0.5000 + N/A" and total_usd(0.0, 3, 2) == "$0.00 + N/A"
    assert total_usd(None, 3, 3) == "N/A" and total_usd(0.0, 3, 3) == "N/A"  # never $0.00
    assert budget_usd(None) == "unlimited" and budget_usd(5) == "$5.00"


@pytest.mark.parametrize("command", ["sessions", "report"])
def test_a_file_that_is_no_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    bad = tmp_path / "notes.db"
    bad.write_text("not a database, just notes\n" * 100)
    argv = [command, "--db", str(bad)] + (["s1"] if command == "report" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"spendgate: cannot use the database {bad}") and err.count("\n") == 1


async def test_report_over_time_as_table_json_and_csv(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Across sessions, aggregated by the store: the API's shape as JSON, a table, a CSV."""
    code, out, _ = await run(
        capsys, "report", "--db", str(db), "--by", "session", "--format", "json"
    )
    assert code == 0
    r = json.loads(out)
    assert r["by"] == "session" and r["timezone"] == "UTC" and r["since"] is None
    rows = {row["key"]: row for row in r["rows"]}
    assert rows["run-1"]["messageCount"] == 4 and rows["run-1"]["unpricedMessageCount"] == 1
    assert rows["run-1"]["costUsd"] == pytest.approx(0.0427)
    assert r["total"]["messageCount"] == 5 and r["total"]["inputTokens"] == 32_700
    # 0.0427 + (1,000 × 0.15 + 100 × 0.6) µ$
    assert r["total"]["costUsd"] == pytest.approx(0.04291)
    code, out, _ = await run(capsys, "report", "--db", str(db), "--since", "1h")
    assert code == 0
    (today,) = [ln for ln in out.splitlines() if ln.strip().startswith("20")]
    assert "32,700" in today and "$0.0429 + N/A" in today
    assert "all sessions" in out and "by day" in out
    code, out, _ = await run(capsys, "report", "--db", str(db), "--by", "model", "--format", "csv")
    assert code == 0
    lines = list(csv.reader(io.StringIO(out)))
    assert lines[0] == ["key", "messageCount", "inputTokens", "outputTokens",
                        "cachedInputTokens", "costUsd", "unpricedMessageCount"]  # fmt: skip
    by_model = {ln[0]: ln for ln in lines[1:]}
    assert by_model["gpt-4o"][5] == "0.0385"  # exact, not 0.038500000000000006
    assert by_model["my-private-model"][5] == ""  # unknown, not 0
    code, out, _ = await run(
        capsys, "report", "run-1", "--db", str(db), "--by", "agent", "--format", "json"
    )
    one = json.loads(out)
    assert one["sessionId"] == "run-1"
    assert {a["key"]: a["messageCount"] for a in one["rows"]} == {"coder": 2, "planner": 1, None: 1}
    code, out, _ = await run(capsys, "report", "--db", str(db), "--since", "2000-01-01",
                             "--until", "2000-01-02")  # fmt: skip
    assert code == 0 and "no messages from 2000-01-01T00:00:00Z" in out


async def test_report_over_time_refuses_bad_times(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "report", "--db", str(db), "--since", "last tuesday")
    assert code == 2 and "since 'last tuesday' is not a date" in err
    code, _, err = await run(capsys, "report", "--db", str(db), "--since", "1d", "--until", "2d")
    assert code == 2 and "must be before until" in err


async def test_sessions_since_and_iso_times(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(capsys, "sessions", "--db", str(db), "--format", "json")
    assert code == 0
    for row in json.loads(out):
        for key in ("createdAt", "lastActivityAt"):
            moment = datetime.fromisoformat(row[key])
            assert row[key].endswith("Z") and abs(time.time() - moment.timestamp()) < 600
    code, out, _ = await run(capsys, "report", "run-1", "--db", str(db), "--format", "json")
    assert json.loads(out)["createdAt"].endswith("Z")
    code, out, _ = await run(
        capsys, "sessions", "--db", str(db), "--since", "1h", "--format", "json"
    )
    assert code == 0 and {r["sessionId"] for r in json.loads(out)} == {"run-1", "other"}
    code, out, _ = await run(capsys, "sessions", "--db", str(db), "--since", "2099-01-01")
    assert code == 0 and "no sessions active since 2099-01-01 recorded" in out
    code, _, err = await run(capsys, "sessions", "--db", str(db), "--since", "soon")
    assert code == 2 and "since 'soon' is not a date" in err


async def test_sessions_and_report_read_through_the_store_url(
    pg_url: str,
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With SPENDGATE_STORE_URL on PostgreSQL the CLI reads the same database the
    proxies write (NUMERIC money read back as Decimal), with no local file at all."""
    proxy = await start_proxy(store_url=pg_url)
    await send(proxy, upstream, "/s/run-1/a/planner/openai/v1", "gpt-4o", 10_000, 1_000)
    await send(proxy, upstream, "/s/run-1/openai/v1", "my-private-model", 700, 20)
    async with proxy.http.put(
        proxy.url("/api/sessions/run-1/budget"), json={"budgetUsd": 5}
    ) as resp:
        assert resp.status == 200
    await proxy.server.close()
    monkeypatch.setenv("SPENDGATE_STORE_URL", pg_url)
    nowhere = str(tmp_path / "never-created" / "x.db")
    code, out, err = await run(capsys, "sessions", "--db", nowhere, "--format", "json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["sessionId"] == "run-1" and row["messageCount"] == 2
    assert row["totalCostUsd"] == pytest.approx(0.035) and row["budgetUsd"] == 5.0
    assert row["unpricedMessageCount"] == 1
    code, out, err = await run(capsys, "report", "run-1", "--db", nowhere, "--format", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["remainingUsd"] == pytest.approx(5 - 0.035)
    assert summary["byModel"]["my-private-model"]["costUsd"] is None
    code, out, _ = await run(capsys, "sessions", "--db", nowhere)
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("run-1")]
    assert code == 0 and "10,700" in line and "$5.00" in line
    assert not Path(nowhere).parent.exists()
