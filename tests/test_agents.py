"""The real coding agents through spendgate (issues #17 and #22): Claude Code, Codex CLI,
OpenCode, aider, Gemini CLI and Qwen Code, installed by ``scripts/install-agents``, each run
non-interactively against a fake upstream that speaks its wire format
(``tests/helpers/agents.py``).

Each run checks the session and agent spendgate recorded, the tokens and cost of every
row, that the agent printed what the upstream sent, what it does on a 402 (session budget
spent), on a 429 (headroom held by another request), on the budget cut mid-stream (Gemini
CLI and Qwen Code), and that no generation went around the proxy. These are the README's
"Connect your agent" lines. A test whose CLI is missing skips, or fails when
``SPENDGATE_REQUIRE_AGENTS`` is set (``.ci/run`` sets it where the installs succeeded).

The replay tests at the end need no CLI: they send the exchanges recorded in
``tests/fixtures/agents/`` through the proxy, and always run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Proxy, StartProxy, eventually
from tests.helpers.agents import (
    AIDER,
    AIDER_ANTHROPIC_MODEL,
    AIDER_OPENAI_MODEL,
    CLAUDE,
    CLIS,
    CODEX,
    CODEX_MODEL,
    GEMINI,
    GEMINI_MODEL,
    HOLD_HEADER,
    MARKER,
    OPENCODE,
    OPENCODE_MODEL,
    OPENCODE_SMALL_MODEL,
    QWEN,
    QWEN_MODEL,
    REQUIRE_AGENTS,
    SUB_MARKER,
    TOKENS,
    AgentUpstream,
    Ask,
    Cli,
    Recording,
    Run,
    Sandbox,
    Script,
    Turn,
    aider_anthropic,
    aider_command,
    aider_openai,
    claude_command,
    claude_sub_agent,
    codex_command,
    codex_provider_block,
    frames_of,
    gemini_command,
    headers_of,
    opencode_command,
    opencode_sub_agent,
    qwen_command,
    recordings,
    run,
    sandbox,
)

WEBSOCKET = importlib.util.find_spec("spendgate.websocket") is not None
"""Whether spendgate relays WebSockets (src/spendgate/websocket.py): Codex then stays on
its WebSocket; without it Codex's handshakes fail and it falls back to HTTPS."""

RUN_TIMEOUT = 120.0
Command = tuple[list[str], dict[str, str]]


def require(cli: Cli) -> None:
    reason = cli.missing()
    if reason is None:
        return
    if REQUIRE_AGENTS:
        pytest.fail(f"SPENDGATE_REQUIRE_AGENTS is set, but {reason}")
    pytest.skip(reason)


@pytest.fixture
async def fake() -> AsyncIterator[AgentUpstream]:
    upstream = await AgentUpstream().start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def sg(start_proxy: StartProxy, fake: AgentUpstream) -> Proxy:
    """spendgate in front of the fake; a 429 comes at once (no admission wait)."""
    return await start_proxy(
        openai_base_url=fake.base_url,
        anthropic_base_url=fake.base_url,
        gemini_base_url=fake.base_url,
        admission_wait_s=0,
    )


@pytest.fixture
async def box() -> AsyncIterator[Sandbox]:
    async with sandbox() as b:
        yield b


# --- checks ------------------------------------------------------------------------------------


async def rows_of(sg: Proxy, session: str, count: int) -> list[dict[str, Any]]:
    """The session's rows once ``count`` are stored (the writer batches)."""

    async def stored() -> bool:
        async with sg.http.get(sg.url(f"/api/sessions/{session}/messages?limit=1000")) as r:
            return r.status == 200 and len((await r.json())["messages"]) >= count

    await eventually(stored, timeout=10)
    return await sg.messages(session)


async def sessions(sg: Proxy) -> set[str]:
    data = await sg.get_json("/api/sessions")
    return {s["sessionId"] for s in data["sessions"]}


def metered(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["modelId"],
        row["inputTokens"],
        row["outputTokens"],
        row["cachedInputTokens"],
        row["reasoningTokens"],
        row["agentId"],
        row["estimated"],
        row["aborted"],
    )


def expected(ask: Ask, agent: str | None = None) -> tuple[Any, ...]:
    t = TOKENS[ask.api]
    return (ask.model, t.input, t.output, t.cached, t.reasoning, agent, False, False)


API_OF_ENDPOINT = {
    "messages": "anthropic",
    "generate_content": "gemini",
    "stream_generate_content": "gemini",
}
"""A row's ``endpoint`` -> the fake's wire format (:data:`TOKENS`' keys)."""


def check_rows(
    sg: Proxy, rows: list[dict[str, Any]], asks: list[Ask], agents: dict[int, str] | None = None
) -> None:
    """One complete, exact row per generation the upstream answered (``agents``: the agent
    label of the ask at that index), costed as the price table says."""
    want = sorted((expected(a, (agents or {}).get(i)) for i, a in enumerate(asks)), key=repr)
    assert sorted((metered(r) for r in rows), key=repr) == want, rows
    for row in rows:
        assert row["status"] == 200, row
        api = API_OF_ENDPOINT.get(row["endpoint"], row["endpoint"])
        cost = TOKENS[api].cost(sg.prices, row["modelId"])
        assert row["costUsd"] == pytest.approx(float(cost), rel=1e-9), row


def generations(fake: AgentUpstream) -> list[Ask]:
    """The asks that generated (not Codex's ``generate: false`` prewarm)."""
    return [a for e in fake.exchanges for a, t in zip(e.asks, e.turns, strict=True) if t]


def rejections(sg: Proxy, code: str) -> int:
    total = 0.0
    for metric in sg.registry.collect():
        if metric.name == "spendgate_budget_rejections":
            total += sum(
                s.value
                for s in metric.samples
                if s.name.endswith("_total") and s.labels.get("code") == code
            )
    return int(total)


async def set_budget(sg: Proxy, session: str, usd: float) -> None:
    async with sg.http.put(sg.url(f"/api/sessions/{session}/budget"), json={"budgetUsd": usd}) as r:
        assert r.status == 200, await r.text()


def flat(text: str) -> str:
    """Output with its line wrapping undone (aider wraps at the terminal width)."""
    return " ".join(text.split())


def ok(result: Run) -> None:
    assert result.returncode == 0, result.describe()
    assert MARKER in result.stdout, result.describe()


PROVIDER_HOSTS = {"api.openai.com", "api.anthropic.com", "chatgpt.com"}
"""Where a generation goes when an agent ignores its base URL."""


def no_leaks(box: Sandbox, *, also: set[str] | None = None) -> None:
    """No generation went around spendgate: every connection an agent opened beyond the
    loopback hit the trap (so nothing left the machine), and none went to a provider's API.
    ``also``: provider hosts an agent contacts for something else (Codex's analytics and
    feature flags at chatgpt.com and ab.chatgpt.com)."""
    assert not box.trap.hosts() & (PROVIDER_HOSTS - (also or set())), box.trap.targets


# --- 402 and 429 ---------------------------------------------------------------------------------


async def refused(
    sg: Proxy,
    fake: AgentUpstream,
    box: Sandbox,
    session: str,
    command: Command,
    until: Callable[[], bool] | None = None,
) -> Run:
    """The agent's session has spent its budget (zero): every attempt is a 402, nothing
    goes upstream, and the agent shows spendgate's message."""
    await set_budget(sg, session, 0)
    result = await run(*command, box.work, timeout=RUN_TIMEOUT, until=until)
    assert fake.asks() == [], "a refused request went upstream"
    assert f"spendgate paused session '{session}'" in flat(result.output), result.describe()
    return result


HOLDS = {
    "anthropic": (
        "anthropic/v1/messages",
        {
            "model": "claude-opus-5-5",
            "max_tokens": 128000,
            "messages": [{"role": "user", "content": "hold"}],
        },
    ),
    "openai": (
        "openai/v1/responses",
        {"model": CODEX_MODEL, "max_output_tokens": 128000, "input": "hold"},
    ),
    "gemini": (
        "gemini/v1beta/models/gemini-2.5-pro:generateContent",
        {
            "contents": [{"role": "user", "parts": [{"text": "hold"}]}],
            "generationConfig": {"maxOutputTokens": 128000},
        },
    ),
}
"""A request that reserves more than the $1 budget (it is admitted: alone in its session)
and waits at the fake upstream, so the agent's requests find the headroom held: 429."""


async def reserved(
    sg: Proxy,
    fake: AgentUpstream,
    box: Sandbox,
    session: str,
    route: str,
    command: Command,
    release_after: int = 2,
) -> tuple[Run, list[float]]:
    """Run the agent while another request holds its session's headroom, and let that one
    finish after the agent's ``release_after``-th 429. Returns the run and when each 429
    was answered (seconds from the agent's start)."""
    await set_budget(sg, session, 1.0)
    path, body = HOLDS[route]
    hold = asyncio.ensure_future(
        sg.http.post(sg.url(f"/s/{session}/{path}"), json=body, headers={HOLD_HEADER: "1"})
    )

    async def holding() -> bool:
        return fake.held == 1

    await eventually(holding)
    start, times = time.monotonic(), list[float]()

    async def watch() -> None:
        while True:
            while len(times) < rejections(sg, "budget_reserved"):
                times.append(round(time.monotonic() - start, 2))
            if len(times) >= release_after:
                fake.release()
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        result = await run(*command, box.work, timeout=RUN_TIMEOUT)
    finally:
        watcher.cancel()
        fake.release()
        (await hold).release()
    return result, times


async def sub_agent_run(
    fake: AgentUpstream,
    box: Sandbox,
    script: Script,
    command: Command,
    marker: str,
    label: str | None = None,
) -> tuple[list[Ask], dict[int, str]]:
    """A run whose main loop starts one sub-agent (``script``): the upstream's asks, and
    for those that carry the ``marker`` header, its ``label`` header (default: the marker)."""
    fake.script = script
    ok(await run(*command, box.work, timeout=RUN_TIMEOUT))
    asks = fake.asks()
    subs = {i: a.headers[label or marker] for i, a in enumerate(asks) if marker in a.headers}
    assert subs, f"no request carried {marker}"
    return asks, subs


# --- Claude Code -------------------------------------------------------------------------------


async def test_claude_code_print(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: ANTHROPIC_BASE_URL=…/anthropic; Claude Code's own header names the session.
    One request per turn: no HEAD check, no model listing, no count_tokens."""
    require(CLAUDE)
    result = await run(*claude_command(box, sg.url("/anthropic")), box.work, timeout=RUN_TIMEOUT)
    ok(result)
    assert result.stdout.strip() == MARKER
    asks = fake.asks()
    assert [(e.method, a.api) for e in fake.exchanges for a in e.asks] == [("POST", "anthropic")]
    assert len(fake.exchanges) == 1, [(e.method, e.path) for e in fake.exchanges]
    session = asks[0].headers["X-Claude-Code-Session-Id"]
    check_rows(sg, await rows_of(sg, session, 1), asks)
    assert await sessions(sg) == {session}
    no_leaks(box)


async def test_claude_code_sub_agent(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """The Agent tool's requests carry the parent's session id and their own agent id."""
    require(CLAUDE)
    command = claude_command(box, sg.url("/anthropic"))
    asks, subs = await sub_agent_run(fake, box, claude_sub_agent, command, "X-Claude-Code-Agent-Id")
    assert any(SUB_MARKER in a.text() for a in asks if a.has_tool_result)
    (session,) = {a.headers["X-Claude-Code-Session-Id"] for a in asks}
    check_rows(sg, await rows_of(sg, session, len(asks)), asks, subs)
    assert await sessions(sg) == {session}
    no_leaks(box)


async def test_claude_code_402(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """Claude Code shows the 402's message ("API Error: 402 …"), exits 1, never retries."""
    require(CLAUDE)
    command = claude_command(box, sg.url("/s/cc-broke/anthropic"))
    result = await refused(sg, fake, box, "cc-broke", command)
    assert result.returncode == 1, result.describe()
    assert "API Error: 402 spendgate paused session" in result.output, result.describe()
    assert rejections(sg, "session_budget_exceeded") == 1


# --- Codex CLI ---------------------------------------------------------------------------------


def codex_session(fake: AgentUpstream) -> str:
    (session,) = {v for e in fake.exchanges for k, v in e.headers if k.lower() == "session-id"}
    assert {v for e in fake.exchanges for k, v in e.headers if k.lower() == "thread-id"} == {
        session
    }
    return session


async def test_codex_exec(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: -c openai_base_url=…/openai/v1 (session from its session-id header). Codex
    opens the Responses API on a WebSocket; with spendgate's relay it stays there and each
    generation is one row; without it the handshakes fail, Codex falls back to HTTPS, and
    the failed handshakes store nothing."""
    require(CODEX)
    result = await run(*codex_command(box, sg.url("/openai/v1")), box.work, timeout=RUN_TIMEOUT)
    ok(result)
    session = codex_session(fake)
    asks = generations(fake)
    rows = await rows_of(sg, session, len(asks))
    transports = {e.transport for e in fake.exchanges if e.asks}
    if WEBSOCKET:
        assert transports == {"websocket"}
        assert "Falling back from WebSockets" not in result.output, result.describe()
        assert {r.get("transport") for r in rows} == {"websocket"}, rows
    else:
        handshakes = [e for e in fake.exchanges if e.method == "GET"]
        assert handshakes and {e.status for e in handshakes} == {405}
        assert "Falling back from WebSockets to HTTPS" in result.output, result.describe()
        assert transports == {"http"}
    # Codex's prewarm (generate: false) generates nothing: it is no message
    assert all(r["inputTokens"] and r["outputTokens"] for r in rows), rows
    check_rows(sg, rows, asks)
    assert await sessions(sg) == {session}
    no_leaks(box, also={"chatgpt.com"})


async def test_codex_config_toml_provider(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: a config.toml provider block; Codex talks plain HTTPS to it, one request."""
    require(CODEX)
    argv, env = codex_command(box, None)
    (box.home / ".codex" / "config.toml").write_text(codex_provider_block(sg.url("/openai/v1")))
    result = await run(argv, env, box.work, timeout=RUN_TIMEOUT)
    ok(result)
    assert [(e.method, e.transport) for e in fake.exchanges] == [("POST", "http")]
    session = codex_session(fake)
    check_rows(sg, await rows_of(sg, session, 1), fake.asks())
    no_leaks(box, also={"chatgpt.com"})


async def test_codex_ignores_openai_base_url(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """OPENAI_BASE_URL is not read by current Codex: it goes to api.openai.com (here: the
    trap), never to spendgate."""
    require(CODEX)
    argv, env = codex_command(box, None)
    env["OPENAI_BASE_URL"] = sg.url("/openai/v1")
    result = await run(
        argv, env, box.work, timeout=30, until=lambda: "api.openai.com" in box.trap.hosts()
    )
    assert "api.openai.com" in box.trap.hosts(), result.describe()
    assert fake.exchanges == []


async def test_codex_402(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """Codex retries a 402 (5 reconnects per transport, x-should-retry: false ignored), then
    prints "unexpected status 402 Payment Required: <spendgate's message>" and exits 1."""
    require(CODEX)
    command = codex_command(box, sg.url("/s/cx-broke/openai/v1"))
    result = await refused(sg, fake, box, "cx-broke", command)
    assert result.returncode == 1, result.describe()
    assert "unexpected status 402 Payment Required" in result.output, result.describe()
    assert rejections(sg, "session_budget_exceeded") >= 6


# --- OpenCode ----------------------------------------------------------------------------------


async def test_opencode_run(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: the openai provider's baseURL …/openai/v1 (Responses API). Its x-session-id
    names the session (it sends Codex's session-id with the same value); a title request
    on the small model comes with each new session."""
    require(OPENCODE)
    result = await run(*opencode_command(box, sg.url("/openai/v1")), box.work, timeout=RUN_TIMEOUT)
    ok(result)
    asks = fake.asks()
    assert sorted(a.model for a in asks) == sorted([OPENCODE_MODEL, OPENCODE_SMALL_MODEL])
    assert {a.api for a in asks} == {"responses"}
    (session,) = {a.headers["x-session-id"] for a in asks}
    assert {a.headers.get("session-id") for a in asks} == {session}
    check_rows(sg, await rows_of(sg, session, len(asks)), asks)
    assert await sessions(sg) == {session}
    no_leaks(box)


async def test_opencode_sub_agent(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """The task tool's sub-session sends x-parent-session-id: its rows are the parent's
    session, with the sub-session's id as the agent (the most specific header rule wins
    over Codex's session-id, which it sends too)."""
    require(OPENCODE)
    command = opencode_command(box, sg.url("/openai/v1"))
    asks, subs = await sub_agent_run(
        fake, box, opencode_sub_agent, command, "x-parent-session-id", "x-session-id"
    )
    (parent,) = {asks[i].headers["x-parent-session-id"] for i in subs}
    assert {a.headers["x-session-id"] for i, a in enumerate(asks) if i not in subs} == {parent}
    assert all(asks[i].headers["session-id"] == sub for i, sub in subs.items())
    check_rows(sg, await rows_of(sg, parent, len(asks)), asks, subs)
    assert await sessions(sg) == {parent}
    no_leaks(box)


async def test_opencode_402(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """OpenCode shows "Error: <spendgate's message>", exits 1, retries nothing (one 402 for
    the turn, one for its title request)."""
    require(OPENCODE)
    command = opencode_command(box, sg.url("/s/oc-broke/openai/v1"))
    result = await refused(sg, fake, box, "oc-broke", command)
    assert result.returncode == 1, result.describe()
    assert "Error:" in result.output
    assert rejections(sg, "session_budget_exceeded") <= 2


# --- aider -------------------------------------------------------------------------------------

AIDER_RETRIES = "Retrying in 0.5 seconds..."


async def test_aider_openai(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: aider --openai-api-base …/s/{session}/openai/v1 (aider sends no session
    header). It streams chat completions without include_usage: spendgate adds it and takes
    the usage chunk out again, so aider gets the stream as the upstream would have sent it."""
    require(AIDER)
    command = aider_openai(box, sg.url("/s/aider-oa/openai/v1"))
    result = await run(*command, box.work, timeout=RUN_TIMEOUT)
    ok(result)
    asks = fake.asks()
    assert [(a.api, a.model) for a in asks] == [("chat", AIDER_OPENAI_MODEL)]
    assert asks[0].body["stream"] is True
    assert asks[0].body["stream_options"] == {"include_usage": True}
    check_rows(sg, await rows_of(sg, "aider-oa", 1), asks)
    no_leaks(box)


async def test_aider_anthropic(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: ANTHROPIC_API_BASE=…/s/{session}/anthropic."""
    require(AIDER)
    command = aider_anthropic(box, sg.url("/s/aider-an/anthropic"))
    result = await run(*command, box.work, timeout=RUN_TIMEOUT)
    ok(result)
    asks = fake.asks()
    assert [(a.api, a.model) for a in asks] == [("anthropic", AIDER_ANTHROPIC_MODEL)]
    check_rows(sg, await rows_of(sg, "aider-an", 1), asks)
    no_leaks(box)


async def test_aider_has_no_anthropic_api_base_flag(box: Sandbox) -> None:
    require(AIDER)
    argv, env = aider_command(box, "--anthropic-api-base", "http://127.0.0.1:9/anthropic")
    result = await run(argv, env, box.work, timeout=RUN_TIMEOUT)
    assert result.returncode == 2, result.describe()
    assert "unrecognized arguments: --anthropic-api-base" in result.output, result.describe()


async def test_aider_402(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """aider retries a 402 with doubling waits (0.25 s … 32 s, about a minute in all; the
    test stops it at the third attempt), showing spendgate's message each time."""
    require(AIDER)
    command = aider_openai(box, sg.url("/s/aider-broke/openai/v1"))
    result = await refused(
        sg,
        fake,
        box,
        "aider-broke",
        command,
        until=lambda: rejections(sg, "session_budget_exceeded") >= 3,
    )
    assert AIDER_RETRIES in result.output, result.describe()


# --- Gemini CLI ------------------------------------------------------------------------------


async def test_gemini_cli_print(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: the settings file, GOOGLE_GEMINI_BASE_URL=…/s/{session}/gemini and
    GEMINI_CLI_TRUST_WORKSPACE=true. Gemini CLI sends no session header of its own: the
    path names it. One streamed request (alt=sse) per turn."""
    require(GEMINI)
    result = await run(
        *gemini_command(box, sg.url("/s/gem-run/gemini")), box.work, timeout=RUN_TIMEOUT
    )
    ok(result)
    assert result.stdout.strip() == MARKER
    asks = fake.asks()
    assert [(a.api, a.model) for a in asks] == [("gemini", GEMINI_MODEL)]
    assert [e.query for e in fake.exchanges if e.asks] == ["alt=sse"]
    check_rows(sg, await rows_of(sg, "gem-run", 1), asks)
    assert await sessions(sg) == {"gem-run"}
    no_leaks(box)


async def test_gemini_cli_custom_header(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: GEMINI_CLI_CUSTOM_HEADERS="X-Spendgate-Session: ID" names the session, with
    the unprefixed base URL (its /v1beta/ paths go to the gemini route)."""
    require(GEMINI)
    command = gemini_command(
        box, sg.url(""), GEMINI_CLI_CUSTOM_HEADERS="X-Spendgate-Session: gem-hdr"
    )
    ok(await run(*command, box.work, timeout=RUN_TIMEOUT))
    asks = fake.asks()
    assert asks and all("X-Spendgate-Session" not in a.headers for a in asks)  # spendgate's own
    check_rows(sg, await rows_of(sg, "gem-hdr", len(asks)), asks)
    assert await sessions(sg) == {"gem-hdr"}


async def test_gemini_cli_without_the_settings_file(
    sg: Proxy, fake: AgentUpstream, box: Sandbox
) -> None:
    """GOOGLE_GEMINI_BASE_URL alone: Gemini CLI picks its gateway auth type and refuses to
    start ("Invalid auth method selected.", exit 41): why the README names the file."""
    require(GEMINI)
    command = gemini_command(box, sg.url("/s/gem-none/gemini"), settings=False)
    result = await run(*command, box.work, timeout=RUN_TIMEOUT)
    assert result.returncode == 41, result.describe()
    assert "Invalid auth method selected" in result.output, result.describe()
    assert fake.exchanges == []


async def test_gemini_cli_402(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """Gemini CLI prints the error body (`_ApiError: {"error": {"code": 402, …}}`) and exits
    1; no retry."""
    require(GEMINI)
    command = gemini_command(box, sg.url("/s/gem-broke/gemini"))
    result = await refused(sg, fake, box, "gem-broke", command)
    assert result.returncode == 1, result.describe()
    assert rejections(sg, "session_budget_exceeded") == 1


# --- Qwen Code ---------------------------------------------------------------------------------


async def test_qwen_code_print(sg: Proxy, fake: AgentUpstream, box: Sandbox) -> None:
    """README: OPENAI_BASE_URL=…/s/{session}/openai/v1, OPENAI_API_KEY, OPENAI_MODEL (Qwen
    Code sends no session header). It streams chat completions with include_usage; besides
    the turn it may ask once more (its memory extraction), on the same model."""
    require(QWEN)
    result = await run(
        *qwen_command(box, sg.url("/s/qwen-run/openai/v1")), box.work, timeout=RUN_TIMEOUT
    )
    ok(result)
    asks = fake.asks()
    assert asks and {(a.api, a.model) for a in asks} == {("chat", QWEN_MODEL)}
    assert all(a.body["stream_options"] == {"include_usage": True} for a in asks)
    check_rows(sg, await rows_of(sg, "qwen-run", len(asks)), asks)
    assert await sessions(sg) == {"qwen-run"}
    no_leaks(box)


async def test_qwen_code_budget_is_enforced_then_402(
    sg: Proxy, fake: AgentUpstream, box: Sandbox
) -> None:
    """qwen3-coder-plus is priced: a budget smaller than one run's cost pauses the session
    after it, and the next run is refused (402, nothing upstream): Qwen Code shows
    "[API Error: 402 <spendgate's message>]" and exits 1, with no retry."""
    require(QWEN)
    await set_budget(sg, "qwen-budget", 0.0001)
    command = qwen_command(box, sg.url("/s/qwen-budget/openai/v1"))
    ok(await run(*command, box.work, timeout=RUN_TIMEOUT))
    sent = len(fake.asks())
    rows = await rows_of(sg, "qwen-budget", sent)
    assert all(r["costUsd"] and r["costUsd"] > 0 for r in rows), rows
    cost = await sg.cost("qwen-budget")
    assert cost["paused"] is True and cost["totalCostUsd"] >= 0.0001, cost
    before = rejections(sg, "session_budget_exceeded")  # its memory request may be one
    result = await run(*command, box.work, timeout=RUN_TIMEOUT)
    assert len(fake.asks()) == sent, "a refused request went upstream"
    assert result.returncode == 1, result.describe()
    assert "[API Error: 402 spendgate paused session 'qwen-budget'" in flat(result.output), (
        result.describe()
    )
    assert rejections(sg, "session_budget_exceeded") == before + 1


# --- the budget cut mid-stream ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cli", "make", "shown"),
    [
        pytest.param(
            GEMINI,
            lambda box, url: gemini_command(box, url("gemini")),
            "spendgate paused session 'cut'",
            id="gemini-cli",
        ),
        pytest.param(
            QWEN,
            lambda box, url: qwen_command(box, url("openai/v1")),
            "ran out of budget",
            id="qwen-code",
        ),
    ],
)
async def test_the_cut_ends_the_stream_with_spendgates_error(
    cli: Cli,
    make: Callable[[Sandbox, Callable[[str], str]], Command],
    shown: str,
    start_proxy: StartProxy,
    fake: AgentUpstream,
    box: Sandbox,
) -> None:
    """on_budget_mid_stream=cut, a budget the first event's estimate uses up: the stream
    ends after it with the provider-shaped error; the row is ``budget_cut``, the session
    paused, and the reply's text (in the second event) never reaches the agent. Qwen Code
    shows the cut's message; Gemini CLI takes the error event for a broken stream and
    retries once, and shows the 402 that retry gets (it never goes upstream)."""
    require(cli)
    sg = await start_proxy(
        openai_base_url=fake.base_url,
        gemini_base_url=fake.base_url,
        on_budget_mid_stream="cut",
        admission_wait_s=0,
    )
    await set_budget(sg, "cut", 0.00000001)
    fake.paced = 0.2
    result = await run(
        *make(box, lambda path: sg.url(f"/s/cut/{path}")), box.work, timeout=RUN_TIMEOUT
    )
    assert MARKER not in result.stdout, result.describe()
    assert shown in flat(result.output), result.describe()
    assert result.returncode == 1, result.describe()
    assert len(fake.asks()) == 1
    rows = await rows_of(sg, "cut", 1)
    assert rows[0]["error"] == "budget_cut", rows
    assert (await sg.cost("cut"))["paused"] is True


# --- every agent on a 429 ---------------------------------------------------------------------

HELD: list[Any] = [
    pytest.param(
        CLAUDE,
        "anthropic",
        lambda box, url: claude_command(box, url("anthropic")),
        id="claude-code",
    ),
    pytest.param(
        CODEX, "openai", lambda box, url: codex_command(box, url("openai/v1")), id="codex"
    ),
    pytest.param(
        OPENCODE, "openai", lambda box, url: opencode_command(box, url("openai/v1")), id="opencode"
    ),
    pytest.param(AIDER, "openai", lambda box, url: aider_openai(box, url("openai/v1")), id="aider"),
    pytest.param(
        GEMINI, "gemini", lambda box, url: gemini_command(box, url("gemini")), id="gemini-cli"
    ),
    pytest.param(
        QWEN, "openai", lambda box, url: qwen_command(box, url("openai/v1")), id="qwen-code"
    ),
]


@pytest.mark.parametrize(("cli", "route", "make"), HELD)
async def test_429_is_retried(
    cli: Cli,
    route: str,
    make: Callable[[Sandbox, Callable[[str], str]], Command],
    sg: Proxy,
    fake: AgentUpstream,
    box: Sandbox,
) -> None:
    """Another request holds the session's headroom: every agent retries spendgate's 429
    (Retry-After: 1) and goes on once the headroom is free; its generations are metered as
    usual. (How long each keeps trying when it never frees: README, measured by hand.)"""
    require(cli)
    command = make(box, lambda path: sg.url(f"/s/held/{path}"))
    result, times = await reserved(sg, fake, box, "held", route, command)
    ok(result)
    assert len(times) >= 2, times
    rows = await rows_of(sg, "held", len(generations(fake)))
    check_rows(sg, [r for r in rows if r["inputTokens"] or r["outputTokens"]], generations(fake))


# --- compressed responses ---------------------------------------------------------------------


def codex_with_provider(box: Sandbox, base_url: str) -> Command:
    argv, env = codex_command(box, None)
    (box.home / ".codex" / "config.toml").write_text(codex_provider_block(base_url))
    return argv, env


@pytest.mark.parametrize(
    ("cli", "encoding", "make"),
    [
        pytest.param(CLAUDE, "br", claude_command, id="claude-code-br"),
        pytest.param(CODEX, "zstd", codex_with_provider, id="codex-zstd"),
    ],
)
async def test_compressed_responses_are_metered(
    cli: Cli,
    encoding: str,
    make: Callable[[Sandbox, str], Command],
    sg: Proxy,
    fake: AgentUpstream,
    box: Sandbox,
) -> None:
    """Each agent offers br or zstd; an upstream that uses it is metered exactly (spendgate
    decodes its own copy) and the agent gets the encoded bytes it asked for."""
    require(cli)
    fake.compress = True
    route = "anthropic" if cli is CLAUDE else "openai/v1"
    result = await run(*make(box, sg.url(f"/s/enc/{route}")), box.work, timeout=RUN_TIMEOUT)
    ok(result)
    encoded = [e for e in fake.exchanges if ("Content-Encoding", encoding) in e.response_headers]
    assert encoded, [e.response_headers for e in fake.exchanges]
    check_rows(sg, await rows_of(sg, "enc", len(fake.asks())), fake.asks())


# --- replay: the recorded exchanges, no CLI needed ----------------------------------------------

RECORDINGS = list(recordings())
_NOT_REPLAYED = {"host", "content-length", "connection", "upgrade"}


def test_every_agent_has_recordings() -> None:
    assert {r.agent for r in RECORDINGS} == {c.name for c in CLIS}


def identity(agent: str, path: str, headers: list[tuple[str, str]]) -> tuple[str, str | None]:
    """The session and agent each CLI's traffic must land in (README, Sessions and agents):
    the path's session first, else the agent's own headers (Gemini CLI and Qwen Code send
    none: recorded with the path form)."""
    h = {k.lower(): v for k, v in headers}
    if path.startswith("/s/"):
        return path.split("/")[2], None
    if agent == "claude-code":
        return h["x-claude-code-session-id"], h.get("x-claude-code-agent-id")
    if agent == "opencode":
        parent = h.get("x-parent-session-id")
        return (parent, h["x-session-id"]) if parent else (h["x-session-id"], None)
    assert agent == "codex", agent
    return h["session-id"], h.get("x-openai-subagent")


Want = tuple[str, tuple[Any, ...]]
"""A row's session and :func:`metered` view."""


async def replay_http(sg: Proxy, rec: Recording, entry: dict[str, Any]) -> list[Want]:
    headers = [(k, v) for k, v in headers_of(entry) if k.lower() not in _NOT_REPLAYED]
    body = rec.body(entry.get("body"))
    url = sg.url(entry["path"].split("?", 1)[0])
    query = entry["path"].split("?", 1)[1] if "?" in entry["path"] else None
    async with sg.http.request(
        entry["method"],
        url + (f"?{query}" if query else ""),
        headers=headers,
        data=body,
        skip_auto_headers=["User-Agent", "Accept-Encoding", "Content-Type"],
    ) as resp:
        got = await resp.read()
        assert resp.status == entry["status"], got[:500]
    assert got == rec.body(entry.get("response")), f"{rec.name}: {entry['path']}"
    if not entry["turns"]:
        return []
    request = orjson.loads(body)
    path = entry["path"].split("?")[0]
    if path.endswith("/messages"):
        api = "anthropic"
    elif path.endswith(("GenerateContent", ":generateContent")):
        api = "gemini"
    else:
        api = "responses" if "/responses" in path else "chat"
    session, agent = identity(rec.agent, entry["path"], headers_of(entry))
    ask = Ask(api, entry["path"], {}, request)
    return [(session, expected(ask, agent))]


async def replay_socket(sg: Proxy, rec: Recording, entry: dict[str, Any]) -> list[Want]:
    """The recorded client frames on a socket through spendgate; the server frames it
    relays must be the recorded ones. Without spendgate's WebSocket relay the handshake
    goes upstream as a plain GET, fails, and stores nothing (Codex then falls back)."""
    headers = [
        (k, v)
        for k, v in headers_of(entry)
        if k.lower() not in _NOT_REPLAYED and not k.lower().startswith("sec-websocket")
    ]
    url = sg.url(entry["path"])
    if not WEBSOCKET:
        with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
            await sg.http.ws_connect(url, headers=headers)
        assert failed.value.status == 405
        return []
    frames = frames_of(rec, entry)
    want: list[Want] = []
    session, agent = identity(rec.agent, entry["path"], headers_of(entry))
    async with sg.http.ws_connect(url, headers=headers) as ws:
        sent = [t for side, t in frames if side == "client"]
        relayed: list[str] = []
        for text in sent:
            await ws.send_str(text)
            while True:
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                relayed.append(msg.data)
                if orjson.loads(msg.data)["type"] in ("response.completed", "response.failed"):
                    break
            create = orjson.loads(text)
            if create.get("generate") is not False:
                want.append((session, expected(Ask("responses", entry["path"], {}, create), agent)))
    assert relayed == [t for side, t in frames if side == "server"], rec.name
    return want


@pytest.mark.parametrize("rec", RECORDINGS, ids=[r.name for r in RECORDINGS])
async def test_replay(rec: Recording, start_proxy: StartProxy) -> None:
    """Each agent's recorded requests through spendgate: the bytes it gets back are what
    the agent got from the upstream directly, and each generation is one row in the
    session (and agent) its headers or path name, with the fake's tokens and cost."""
    turns = iter(
        [Turn() if t is None else Turn.from_json(t) for e in rec.exchanges for t in e["turns"]]
    )
    fake = await AgentUpstream(lambda _: next(turns)).start()
    try:
        sg = await start_proxy(
            openai_base_url=fake.base_url,
            anthropic_base_url=fake.base_url,
            gemini_base_url=fake.base_url,
        )
        want: list[Want] = []
        for entry in rec.exchanges:
            replay = replay_socket if entry["transport"] == "websocket" else replay_http
            want += await replay(sg, rec, entry)
        got: list[Want] = []
        for session in sorted({s for s, _ in want}):
            count = sum(1 for s, _ in want if s == session)
            rows = await rows_of(sg, session, count)
            got += [(session, metered(r)) for r in rows]  # Codex's prewarm is no message
        assert sorted(got, key=repr) == sorted(want, key=repr)
        assert await sessions(sg) == {s for s, _ in want}
    finally:
        await fake.close()
