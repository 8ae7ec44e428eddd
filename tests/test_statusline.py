"""`spendgate statusline` (Claude Code's statusLine command) and `spendgate status`: against
a running proxy metering Claude Code-shaped traffic (Anthropic /v1/messages with its
`X-Claude-Code-Session-Id` header), with stdin as Claude Code writes it; the statusLine
line in a real tmux pane (the installer: tests/test_claude_settings.py)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from spendgate import statusline as sl
from spendgate.cli import main
from tests.conftest import Proxy, StartProxy
from tests.upstream import FakeUpstream, Reply, json_reply

SESSION = "5b0f7a52-3c1e-4d8a-9f6e-2a1c9d7e4b10"
"""Claude Code's session ids are UUIDs; spendgate records them from its header."""
SGR = re.compile(r"\x1b\[[0-9;]*m")
GREEN, AMBER, RED, PAUSED, DIM = "\x1b[32m", "\x1b[33m", "\x1b[1;31m", "\x1b[1;97;41m", "\x1b[2m"
HI = [{"role": "user", "content": "hi"}]
SONNET = "claude-3-5-sonnet-20240620"  # $3/M input, $15/M output, a 200k window


def claude_input(session_id: Any = SESSION, **changes: Any) -> bytes:
    """The JSON Claude Code writes on a statusLine command's stdin (its 2.x fields)."""
    payload: dict[str, Any] = {
        "hook_event_name": "Status",
        "session_id": session_id,
        "transcript_path": f"/home/dev/.claude/projects/-work-app/{session_id}.jsonl",
        "cwd": "/work/app",
        "model": {"id": "claude-sonnet-4-5-20250929", "display_name": "Sonnet 4.5"},
        "workspace": {"current_dir": "/work/app", "project_dir": "/work/app"},
        "version": "2.0.37",
        "output_style": {"name": "default"},
        "cost": {
            "total_cost_usd": 0.0123,
            "total_duration_ms": 45000,
            "total_api_duration_ms": 2300,
            "total_lines_added": 156,
            "total_lines_removed": 23,
        },
        "exceeds_200k_tokens": False,
        "context_window": {
            "total_input_tokens": 15234,
            "total_output_tokens": 4521,
            "context_window_size": 200000,
            "current_usage": {
                "input_tokens": 8500,
                "output_tokens": 1200,
                "cache_creation_input_tokens": 5000,
                "cache_read_input_tokens": 2000,
            },
            "used_percentage": 8,
            "remaining_percentage": 92,
        },
    }
    payload.update(changes)
    return orjson.dumps({k: v for k, v in payload.items() if v is not None})


def message(input_tokens: int, output_tokens: int = 20, model: str = SONNET) -> Reply:
    return json_reply(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    )


async def turn(
    proxy: Proxy,
    upstream: FakeUpstream,
    reply: Reply,
    agent: str | None = None,
    session: str = SESSION,
) -> None:
    """One request as Claude Code sends it: /v1/messages, its session (and agent) headers."""
    upstream.queue(reply)
    headers = {"X-Claude-Code-Session-Id": session}
    if agent:
        headers["X-Claude-Code-Agent-Id"] = agent
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url(""), api_key="sk-ant-k", max_retries=0, default_headers=headers
    ) as c:
        await c.messages.create(model=SONNET, max_tokens=10, messages=HI)  # type: ignore[arg-type]


Run = Callable[..., Awaitable[tuple[int, str]]]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """``spendgate ARGS`` in a thread (the proxy runs on this loop), with ``stdin``."""

    monkeypatch.delenv("NO_COLOR", raising=False)

    async def go(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out

    return go


@pytest.fixture
async def at(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    """The proxy, with the command line pointed at it."""
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    yield proxy


async def two_agents(proxy: Proxy, upstream: FakeUpstream, budget: float | None = 2.0) -> None:
    """$0.003300 from the main thread, then $0.1905 from the explorer (61,500 tokens)."""
    if budget is not None:
        await put(proxy, f"/api/sessions/{SESSION}/budget", budget)
    await turn(proxy, upstream, message(1000, 20))
    await turn(proxy, upstream, message(61_000, 500), agent="explorer")


async def put(proxy: Proxy, path: str, budget: float) -> None:
    async with proxy.http.put(proxy.url(path), json={"budgetUsd": budget}) as r:
        assert r.status == 200, await r.text()


def plain(out: str) -> str:
    return SGR.sub("", out)


# -- the line -----------------------------------------------------------------------------------


async def test_the_line_for_a_claude_code_session(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    await two_agents(at, upstream)
    code, out = await run("statusline", stdin=claude_input())
    assert code == 0 and out.count("\n") == 1
    # spendgate's metered figures, not Claude Code's own estimate ($0.0123) or context (8 %)
    assert plain(out) == "spendgate $0.1938 / $2.00 (9%) · ctx 61k/200k 30% · 2 agents\n"
    assert f"{GREEN}spendgate $0.1938 / $2.00 (9%)\x1b[0m" in out
    assert f"{GREEN}ctx 61k/200k 30%\x1b[0m" in out


async def test_budget_colours_follow_the_warning_thresholds(
    at: Proxy, upstream: FakeUpstream, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    await two_agents(at, upstream, budget=None)  # spent $0.1938
    for budget, colour, percent in ((0.3, GREEN, 64), (0.24, AMBER, 80), (0.2, RED, 96)):
        await put(at, f"/api/sessions/{SESSION}/budget", budget)
        _, out = await run("statusline", stdin=claude_input())
        assert f"{colour}spendgate $0.1938 / ${budget:.4f} ({percent}%)\x1b[0m" in out, out
    monkeypatch.setenv("SPENDGATE_BUDGET_THRESHOLDS", "0.5,0.7,0.95")  # amber and red at 95 %
    _, out = await run("statusline", stdin=claude_input())
    assert f"{RED}spendgate $0.1938 / $0.2000 (96%)" in out
    await put(at, f"/api/sessions/{SESSION}/budget", 0.24)
    _, out = await run("statusline", stdin=claude_input())
    assert f"{GREEN}spendgate $0.1938 / $0.2400 (80%)" in out


def test_budget_bands_reuse_the_thresholds_and_the_context_levels() -> None:
    d = sl.budget_bands
    assert tuple(map(float, d([0.5, 0.8, 0.9]))) == (0.8, 0.9)
    assert tuple(map(float, d([0.5]))) == (0.8, 0.9)  # none configured that high
    assert tuple(map(float, d([0.85, 0.95, 1.0]))) == (0.85, 0.95)
    assert tuple(map(float, d([0.95]))) == (0.95, 0.95)
    assert sl.budget_level(0.8, 1.0, [0.5, 0.8, 0.9]) == "warning"  # exact, no rounding
    assert sl.budget_level(0.7999999, 1.0, [0.5, 0.8, 0.9]) == "ok"
    assert sl.budget_level(0.0, 0.0, [0.8]) == "critical"  # a $0 budget is spent
    assert (sl.budget_percent(0.1938, 2.0), sl.budget_percent(3, 0)) == (9, 100)
    assert [sl.tokens_text(n) for n in (950, 61_500, 200_000, 1_000_000, 1_250_000)] == [
        "950", "61k", "200k", "1M", "1.2M",
    ]  # fmt: skip


async def test_context_colours_follow_the_context_levels(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    for tokens, colour, text in (
        (170_000, AMBER, "170k/200k 85%"),
        (185_000, RED, "185k/200k 92%"),
    ):
        await turn(at, upstream, message(tokens - 20))
        _, out = await run("statusline", stdin=claude_input())
        assert f"{colour}ctx {text}\x1b[0m" in out, out


async def test_unpriced_messages_show_na_and_the_window_from_claude_code(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    await turn(at, upstream, message(1000, 20))
    await turn(at, upstream, message(150_000, 100, model="claude-next-9"))  # no price, no window
    code, out = await run("statusline", stdin=claude_input())
    assert code == 0
    # the proxy's tokens against Claude Code's window, since the proxy knows none
    assert plain(out) == "spendgate $0.003300 + N/A · ctx 150k/200k 75%\n"
    code, out = await run("statusline", stdin=claude_input(context_window=None))
    assert plain(out) == "spendgate $0.003300 + N/A · ctx 150k\n"
    assert f"{DIM}ctx 150k" in out


async def test_no_traffic_yet_uses_claude_codes_context(at: Proxy, run: Run) -> None:
    await put(at, f"/api/sessions/{SESSION}/budget", 5)  # known to the proxy, no messages
    _, out = await run("statusline", stdin=claude_input())
    assert plain(out) == "spendgate $0.00 / $5.00 (0%) · ctx 15k/200k 7%\n"


async def test_paused_markers(at: Proxy, upstream: FakeUpstream, run: Run) -> None:
    await two_agents(at, upstream)
    async with at.http.post(at.url(f"/api/sessions/{SESSION}/pause")) as r:
        assert r.status == 200
    _, out = await run("statusline", stdin=claude_input())
    assert f"{PAUSED}PAUSED (manual)\x1b[0m" in out
    await put(at, f"/api/sessions/{SESSION}/agents/explorer/budget", 0.1)  # spent $0.1905
    await put(at, "/api/budget", 0.1)  # everything has spent $0.1938
    _, out = await run("statusline", stdin=claude_input())
    assert plain(out).endswith(
        " · PAUSED (manual) · GLOBAL PAUSED (budget) · PAUSED agent explorer\n"
    )


async def test_a_global_budget_stands_in_for_a_session_without_one(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    await put(at, "/api/budget", 10)
    await two_agents(at, upstream, budget=None)
    _, out = await run("statusline", stdin=claude_input())
    assert plain(out) == (
        "spendgate $0.1938 · global $0.1938 / $10.00 (1%) · ctx 61k/200k 30% · 2 agents\n"
    )


async def test_format_template(at: Proxy, upstream: FakeUpstream, run: Run) -> None:
    await two_agents(at, upstream)
    template = "{cost}|{budget}|{percent}|{context}|{agents}|{model}|{state}|{session}"
    _, out = await run("statusline", "--format", template, "--color", "never", stdin=claude_input())
    assert out == f"$0.1938|$2.00|9%|61k/200k 30%|2|Sonnet 4.5||{SESSION}\n"
    _, out = await run("statusline", "--format", "{percent} {state}", stdin=claude_input())
    assert out == f"{GREEN}9%\x1b[0m \n"
    _, out = await run("statusline", "--format", "{cost}", "--color", "tmux", stdin=claude_input())
    assert out == "$0.1938\n"
    _, out = await run("statusline", "--color", "tmux", stdin=claude_input())
    assert out.startswith("#[fg=green]spendgate $0.1938 / $2.00 (9%)#[default] · ")
    for bad, says in (("{nope}", "no field 'nope'"), ("{cost", "bad --format"), ("{0}", "bad")):
        code, out = await run("statusline", "--format", bad, stdin=claude_input())
        assert code == 0 and out.startswith(DIM) and says in out, out


@pytest.mark.parametrize(
    ("stdin", "says"),
    [
        (b"", "no session id"),
        (b"not json \xff\xfe", "no session id"),
        (b"[1, 2]", "no session id"),
        (b"[" * 5000, "no session id"),  # deeper than any parser's limit
        (b"{}", "no session id"),
        (b'{"session_id": 42}', "no session id"),
        (claude_input("../../etc"), "no traffic from this session yet"),  # not a valid id
        (claude_input("9e2d1a3f-0000-4000-8000-000000000000"), "no traffic from this session"),
    ],
)
async def test_any_stdin_gives_one_dim_line_and_exit_0(
    at: Proxy, run: Run, stdin: bytes, says: str
) -> None:
    code, out = await run("statusline", stdin=stdin)
    assert code == 0 and out.count("\n") == 1
    assert out.startswith(DIM) and says in out, out


async def test_missing_and_extra_fields_are_fine(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    await two_agents(at, upstream)
    sparse = orjson.dumps({"session_id": SESSION, "model": "not an object", "future": {"x": 1}})
    _, out = await run("statusline", stdin=sparse)
    assert plain(out) == "spendgate $0.1938 / $2.00 (9%) · ctx 61k/200k 30% · 2 agents\n"
    weird = claude_input(context_window={"context_window_size": "big", "used_percentage": None})
    _, out = await run("statusline", "--format", "{model}", "--color", "never", stdin=weird)
    assert out == "Sonnet 4.5\n"


async def test_session_flag_overrides_stdin(at: Proxy, upstream: FakeUpstream, run: Run) -> None:
    await turn(at, upstream, message(1000, 20), session="run-7")
    _, out = await run("statusline", "--session", "run-7", stdin=claude_input())
    assert plain(out) == "spendgate $0.003300 · ctx 1k/200k 0%\n"


async def test_proxy_down_or_silent_is_a_dim_line_and_exit_0(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_PORT", "1")  # nothing listens there
    code, out = await run("statusline", stdin=claude_input())
    assert (code, out) == (0, f"{DIM}spendgate · no proxy at http://127.0.0.1:1\x1b[0m\n")
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    monkeypatch.setenv("SPENDGATE_PORT", str(server.sockets[0].getsockname()[1]))
    started = time.monotonic()
    code, out = await run("statusline", stdin=claude_input())
    assert time.monotonic() - started < 2  # TIMEOUT_S (0.3 s) plus start-up, never a hang
    assert code == 0 and out.startswith(DIM) and "no answer at http://127.0.0.1:" in out
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_bad_settings_still_exit_0(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_PORT", "not-a-port")
    code, out = await run("statusline", stdin=claude_input())
    assert code == 0 and "bad settings" in out


async def test_admin_token(
    start_proxy: StartProxy, upstream: FakeUpstream, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    monkeypatch.setenv("SPENDGATE_PORT", str(proxy.server.port))
    await turn(proxy, upstream, message(1000, 20))
    code, out = await run("statusline", stdin=claude_input())
    assert code == 0 and "wants its admin token (SPENDGATE_ADMIN_TOKEN)" in out
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", "s3cret")
    code, out = await run("statusline", stdin=claude_input())
    assert plain(out) == "spendgate $0.003300 · ctx 1k/200k 0%\n"


async def test_then_chains_an_existing_command_with_the_same_stdin(
    at: Proxy, upstream: FakeUpstream, run: Run
) -> None:
    await turn(at, upstream, message(1000, 20))
    old = """sed -e 's/.*"version":"\\([^"]*\\)".*/cc \\1/'; echo; echo second line"""
    code, out = await run("statusline", "--then", old, stdin=claude_input())
    assert code == 0
    assert plain(out) == "cc 2.0.37 │ spendgate $0.003300 · ctx 1k/200k 0%\nsecond line\n"
    code, out = await run("statusline", "--then", "exit 3", stdin=claude_input())
    assert plain(out) == "spendgate $0.003300 · ctx 1k/200k 0%\n"  # it printed nothing


async def test_the_real_command_with_a_pipe_for_stdin(at: Proxy, upstream: FakeUpstream) -> None:
    """As Claude Code runs it: a process, JSON on a pipe, the line on stdout."""
    await turn(at, upstream, message(1000, 20))
    env = {**os.environ, "SPENDGATE_PORT": str(at.server.port), "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spendgate", "statusline",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate(claude_input())
    assert (proc.returncode, err) == (0, b"")
    assert out.decode() == "spendgate $0.003300 · ctx 1k/200k 0%\n"  # NO_COLOR: no escapes


# -- spendgate status -----------------------------------------------------------------------------


async def test_status_for_shells_and_scripts(at: Proxy, upstream: FakeUpstream, run: Run) -> None:
    await two_agents(at, upstream)
    code, out = await run("status", SESSION)
    assert (code, out) == (
        0,
        f"spendgate {SESSION} $0.1938 / $2.00 (9%) · ctx 61k/200k 30% · 2 agents\n",
    )
    code, out = await run("status", SESSION, "--json")
    data = orjson.loads(out)
    assert code == 0 and data["ok"] is True
    assert (data["sessionId"], data["costUsd"], data["agents"]) == (SESSION, 0.1938, 2)
    assert data["budget"] == {
        "scope": "session", "budgetUsd": 2.0, "spentUsd": 0.1938, "percent": 9, "level": "ok",
        "period": None,
    }  # fmt: skip
    assert data["context"] == {
        "contextTokens": 61_500, "contextWindow": 200_000, "percent": 30, "level": "ok",
        "source": "spendgate",
    }  # fmt: skip
    assert (data["paused"], data["state"], data["model"]) == (False, "", SONNET)
    assert data["line"] == f"spendgate {SESSION} $0.1938 / $2.00 (9%) · ctx 61k/200k 30% · 2 agents"
    code, out = await run("status", "--color", "always")  # the most recently active session
    assert code == 0 and out.startswith(f"{GREEN}spendgate {SESSION} $0.1938")
    code, out = await run("status", "nobody", "--json")
    assert (code, orjson.loads(out)) == (1, {"ok": False, "error": "unknown session 'nobody'"})


async def test_status_without_a_session(at: Proxy, upstream: FakeUpstream, run: Run) -> None:
    assert await run("status") == (0, "spendgate · no sessions yet\n")
    await turn(at, upstream, message(1000, 20), session="older")
    await turn(at, upstream, message(2000, 20), session="newer")
    _, out = await run("status")
    assert out == "spendgate newer $0.006300 · ctx 2k/200k 1%\n"
    await put(at, "/api/budget", 0.01)  # the global budget's state, once there is one
    code, out = await run("status")
    assert (code, out) == (0, "spendgate global $0.009600 / $0.0100 (96%)\n")
    _, out = await run("status", "--json")
    assert orjson.loads(out)["budget"]["level"] == "critical"


async def test_status_when_the_proxy_is_down(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_PORT", "1")
    assert await run("status") == (1, "spendgate · no proxy at http://127.0.0.1:1\n")
    code, out = await run("status", "--json")
    assert code == 1 and orjson.loads(out)["ok"] is False


# -- a real terminal ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
async def test_the_line_renders_in_a_tmux_pane(
    at: Proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The coloured line in a real terminal emulator: tmux draws it, then capture-pane -e
    gives back the cells with their colours (the README's screenshot is such a capture)."""
    await put(at, f"/api/sessions/{SESSION}/budget", 1.25)
    await turn(at, upstream, message(1000, 20))
    await turn(at, upstream, message(150_000, 500))
    await turn(at, upstream, message(160_000, 500), agent="explorer")
    await turn(at, upstream, message(170_000, 500), agent="explorer")  # past the budget: paused
    stdin = tmp_path / "in.json"
    stdin.write_bytes(claude_input())
    command = (
        f"{shlex.quote(sys.executable)} -m spendgate statusline < {shlex.quote(str(stdin))}"
        "; sleep 30"
    )
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]

    async def tmux_run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *tmux, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out.decode()

    env = ["-e", f"SPENDGATE_PORT={at.server.port}", "-e", "NO_COLOR="]
    await tmux_run("new-session", "-d", "-x", "100", "-y", "3", *env, command)
    try:
        deadline = time.monotonic() + 10
        while "spendgate" not in (pane := await tmux_run("capture-pane", "-p", "-e")):
            assert time.monotonic() < deadline, pane
            await asyncio.sleep(0.05)
    finally:
        await tmux_run("kill-server")
    line = pane.splitlines()[0]
    assert plain(line).rstrip() == (
        "spendgate $1.47 / $1.25 (117%) · ctx 170k/200k 85% · 2 agents · PAUSED (budget)"
    )
    # the cells' colours as tmux drew them: red budget, amber context, the PAUSED badge
    assert re.search(r"\x1b\[(1m\x1b\[)?31m[^\x1b]*spendgate \$1\.47", line), line
    assert "\x1b[33mctx 170k/200k 85%" in line
    assert re.search(r"\x1b\[41m[^ ]*PAUSED \(budget\)", line), line
