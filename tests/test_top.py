"""``spendgate top``: its renderer fed with events, and the real command in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from rich.console import Console

from spendgate.context import (
    CONTEXT_CRITICAL_PERCENT,
    CONTEXT_WARNING_PERCENT,
    context_level,
    percent_level,
)
from spendgate.events import context_data
from spendgate.settings import Settings
from spendgate.top import (
    Action,
    Follower,
    TopState,
    printable,
    proxy_url,
    split_keys,
    sse_events,
)
from tests.conftest import StartProxy, eventually
from tests.upstream import FakeUpstream, chat_completion, json_reply

NOW = 1_700_000_000.0
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")


def screen(state: TopState, now: float = NOW, width: int = 170, max_rows: int = 30) -> str:
    """What the view shows, as plain text."""
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(state.render(now, max_rows=max_rows, width=width))
    return console.export_text()


def usage(
    sid: str,
    mid: str,
    inp: int,
    out: int,
    cost: float | None,
    spent: float,
    *,
    final: bool = True,
    t: float = NOW,
    model: str = "gpt-4o",
) -> dict[str, object]:
    """A ``token.usage`` event's data."""
    data: dict[str, object] = {
        "messageId": mid, "sessionId": sid, "agentId": None, "inputTokens": inp,
        "outputTokens": out, "cachedInputTokens": 0, "cacheWriteTokens": 0,
        "reasoningTokens": 0, "totalTokens": inp + out, "costUsd": cost,
        "sessionCostUsd": spent, "modelId": model, "providerId": "openai", "final": final,
        "estimated": not final, "timestamp": t,
    }  # fmt: skip
    return data


def row(sid: str, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sessionId": sid, "createdAt": NOW - 600, "label": None, "budgetUsd": None,
        "spentUsd": 0.0, "remainingUsd": None, "paused": False, "pauseReason": None,
        "totalCostUsd": None, "messageCount": 0, "totalInputTokens": 0,
        "totalOutputTokens": 0, "lastActivityAt": None,
    }  # fmt: skip
    base.update(kw)
    return base


# --- the renderer ------------------------------------------------------------------------------


def test_renders_sessions_from_the_list_and_events() -> None:
    state = TopState("http://127.0.0.1:8787")
    state.status = "live"
    old = row(
        "old-run",
        spentUsd=0.25,
        totalCostUsd=0.25,
        messageCount=3,
        totalInputTokens=3000,
        totalOutputTokens=300,
        lastActivityAt=NOW - 400,  # over five minutes ago: idle
    )
    state.load_sessions([old, row("budgeted", budgetUsd=1.0, createdAt=NOW - 200)], sent_at=0.0)
    # Received a minute ago, by a clock that agrees with the proxy's.
    event = usage("budgeted", "m1", 110_000, 5_000, 0.325, 0.325, t=NOW - 60)
    state.apply("token.usage", event, received_at=NOW - 60)
    context = {
        "sessionId": "budgeted", "modelId": "gpt-4o", "contextTokens": 115_000,
        "contextWindow": 128_000, "percent": 89.84, "remainingTokens": 13_000, "level": "warning",
    }  # fmt: skip
    state.apply("context.usage", context, received_at=NOW - 60)
    text = screen(state)
    assert "spendgate top" in text and "http://127.0.0.1:8787" in text and "live" in text
    lines = [ln for ln in text.splitlines() if "budgeted" in ln or "old-run" in ln]
    assert "budgeted" in lines[0] and "old-run" in lines[1]  # newest activity first
    b = lines[0]
    assert "110,000" in b and "5,000" in b
    assert b.count("$0.3250") == 2  # spent, and burnt per minute (one message, a minute ago)
    assert "32% $1.00" in b  # budget bar
    assert "89.8%" in b  # context bar
    assert "~2 min" in b  # $0.675 left at $0.325/min
    o = lines[1]
    assert "$0.2500" in o and "3,000" in o and "unlimited" in o and "idle" in o
    assert "sessions 2" in text and "total $0.5750" in text


def test_paused_streaming_and_unknown_cost() -> None:
    state = TopState("http://x")
    state.apply("token.usage", usage("s", "m1", 100, 20, None, 0.0, model="mystery"), 1.0)
    (line,) = [ln for ln in screen(state).splitlines() if ln.split()[:1] == ["s"]]
    assert "N/A" in line and "$0.00" not in line  # unknown is never shown as free
    state.apply("token.usage", usage("s", "m2", 50, 7, 0.0001, 0.0001, final=False), 2.0)
    (line,) = [ln for ln in screen(state).splitlines() if ln.split()[:1] == ["s"]]
    assert "streaming" in line
    assert "150" in line and "27" in line  # live estimates count until the final arrives
    paused = {"sessionId": "s", "budgetUsd": 0.0001, "spentUsd": 0.0001, "reason": "budget"}
    state.apply("budget.paused", paused, 3.0)
    assert "OVER BUDGET" in screen(state)  # spent reached the budget: raise it (§6)
    manual = {"sessionId": "s", "budgetUsd": None, "spentUsd": 0.0001, "reason": "manual"}
    state.apply("budget.paused", manual, 3.5)
    assert "PAUSED" in screen(state) and "OVER BUDGET" not in screen(state)
    resumed = {"sessionId": "s", "budgetUsd": 1.0, "spentUsd": 0.0001, "reason": "resumed"}
    state.apply("budget.resumed", resumed, 4.0)
    assert "PAUSED" not in screen(state)
    agent = {"scope": "agent", "sessionId": "s", "agentId": "a", "budgetUsd": 0.0,
             "spentUsd": 0.0001, "reason": "budget"}  # fmt: skip
    state.apply("budget.paused", agent, 5.0)  # only agent 'a' is paused, not the session
    assert "PAUSED" not in screen(state)


def test_lists_and_events_never_count_a_message_twice() -> None:
    state = TopState("http://x")

    def listed(msgs: int, sent_at: float) -> None:
        row_ = row(
            "s",
            messageCount=msgs,
            totalInputTokens=100 * msgs,
            totalOutputTokens=10 * msgs,
            totalCostUsd=0.001 * msgs,
            spentUsd=0.001 * msgs,
        )
        state.load_sessions([row_], sent_at=sent_at)

    def totals() -> tuple[int, int, int, int]:
        return state.sessions["s"].totals()

    listed(0, sent_at=1.0)
    state.apply("token.usage", usage("s", "m1", 100, 10, 0.001, 0.001), received_at=5.0)
    assert totals() == (100, 10, 1, 0)
    # Asked for before m1 arrived, yet it counts m1: the race that must not double it.
    listed(1, sent_at=4.0)
    assert totals() == (100, 10, 1, 0)
    state.apply("token.usage", usage("s", "m2", 100, 10, 0.001, 0.002), received_at=9.0)
    listed(1, sent_at=8.0)  # does not include m2 yet: m2 still shows on top of it
    assert totals() == (200, 20, 2, 0)
    listed(0, sent_at=3.0)  # a late answer to an older request changes nothing
    assert totals() == (200, 20, 2, 0)
    listed(2, sent_at=10.0)
    assert totals() == (200, 20, 2, 0) and state.sessions["s"].recent == []
    # Before any list, only finals that came before it was asked for are surely in it.
    state.apply("token.usage", usage("t", "m3", 7, 1, 0.001, 0.001), received_at=20.0)
    state.load_sessions([row("t", messageCount=1, totalInputTokens=7, totalOutputTokens=1)], 21.0)
    assert state.sessions["t"].totals() == (7, 1, 1, 0)


def cost_cell(state: TopState, sid: str) -> str:
    """The cost column of a session's line (the figures after the session id and state)."""
    (line,) = [ln for ln in screen(state).splitlines() if ln.split()[:1] == [sid]]
    return line.split(sid, 1)[1].split("unlimited")[0].strip()


def test_a_total_with_unpriced_messages_is_never_a_plain_number() -> None:
    state = TopState("http://x")
    state.load_sessions(
        [
            row("all-priced", spentUsd=0.0392, totalCostUsd=0.0392, messageCount=2,
                lastActivityAt=NOW - 3),
            row("mixed", spentUsd=0.035, totalCostUsd=0.035, messageCount=2,
                unpricedMessageCount=1, lastActivityAt=NOW - 2),
            row("all-unpriced", totalCostUsd=None, messageCount=2, unpricedMessageCount=2,
                lastActivityAt=NOW - 1),
        ],
        sent_at=NOW - 10,
    )  # fmt: skip
    assert cost_cell(state, "all-priced") == "$0.0392"
    assert cost_cell(state, "mixed") == "$0.0350 + N/A"
    assert cost_cell(state, "all-unpriced") == "N/A"  # never $0.00
    assert "total $0.0742 + N/A" in screen(state)
    # An unpriced final makes a priced session's total partial; the next list counts it once.
    event = usage("all-priced", "m3", 300, 10, None, 0.0392, model="mystery", t=NOW)
    state.apply("token.usage", event, received_at=NOW)
    assert cost_cell(state, "all-priced") == "$0.0392 + N/A"
    state.load_sessions(
        [row("all-priced", spentUsd=0.0392, totalCostUsd=0.0392, messageCount=3,
             unpricedMessageCount=1, totalInputTokens=300, totalOutputTokens=10)],
        sent_at=NOW + 1,
    )  # fmt: skip
    assert state.sessions["all-priced"].totals() == (300, 10, 3, 1)
    assert cost_cell(state, "all-priced") == "$0.0392 + N/A"
    # A final without tokens costs nothing, price or not; a priced one keeps N/A partial.
    state.apply("token.usage", usage("free", "m4", 0, 0, None, 0.0, t=NOW + 2), NOW + 2)
    assert cost_cell(state, "free") == "$0.00"
    state.apply("token.usage", usage("all-unpriced", "m5", 10, 1, 0.0001, 0.0001), NOW + 3)
    assert cost_cell(state, "all-unpriced") == "$0.000100 + N/A"


async def test_unpriced_counts_from_a_real_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy()
    for session, model in (
        ("all-priced", "gpt-4o"), ("all-priced", "gpt-4o"), ("mixed", "gpt-4o"),
        ("mixed", "my-private-model"), ("all-unpriced", "my-private-model"),
    ):  # fmt: skip
        upstream.queue(json_reply(chat_completion(model, 1_000, 100)))
        async with openai.AsyncOpenAI(
            base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="k", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}]
            )
    state = TopState(proxy.url().rstrip("/"))
    await Follower(state, proxy.http).refresh()
    # gpt-4o: 1,000 × 2.5 + 100 × 10 µ$ = $0.0035 a message.
    assert cost_cell(state, "all-priced") == "$0.007000"
    assert cost_cell(state, "mixed") == "$0.003500 + N/A"
    assert cost_cell(state, "all-unpriced") == "N/A"
    assert state.sessions["mixed"].totals() == (2_000, 200, 2, 1)


def test_columns_fit_their_content_and_the_terminal() -> None:
    state = TopState("http://x")
    long_id = "a-very-long-session-id-" + "x" * 60 + "-tail"
    state.load_sessions(
        [
            row(long_id, spentUsd=1234.5678, totalCostUsd=1234.5678, messageCount=1_521_100,
                totalInputTokens=1_521_123_456, totalOutputTokens=98_765_432, budgetUsd=5000.0,
                lastActivityAt=NOW - 30),
            row("short", spentUsd=0.1234, totalCostUsd=0.1234, messageCount=3,
                lastActivityAt=NOW - 20),
        ],
        sent_at=NOW - 40,
    )  # fmt: skip
    for width in (170, 120, 100, 80, 60):
        text = screen(state, width=width)
        lines = text.splitlines()
        assert all(len(ln) <= width for ln in lines), (width, text)
        (line,) = [ln for ln in lines if ln.startswith("a-ver")]
        # Numbers are never cut; the id gives way, elided in the middle.
        assert "1,521,123,456" in line and "$1,234.57" in line, (width, line)
        assert "…" in line and line.split()[0].endswith("tail")
        assert "short" in text and "$0.1234" in text
    wide = screen(state, width=240)
    assert long_id in wide  # room enough: the whole id
    (head,) = [ln for ln in wide.splitlines() if ln.startswith("session")]
    assert head.index("state") < 100  # the session column is as wide as its longest id only


def test_keys_sort_filter_select_and_ask_for_actions() -> None:
    state = TopState("http://x")
    state.load_sessions(
        [
            row("alpha", spentUsd=0.5, lastActivityAt=NOW - 30),
            row("beta", spentUsd=2.0, lastActivityAt=NOW - 60),
            row("gamma", spentUsd=1.0, lastActivityAt=NOW - 10),
        ],
        sent_at=NOW - 100,
    )

    def order() -> list[str]:
        screen(state)
        return state.shown

    assert order() == ["gamma", "alpha", "beta"] and "sort recent" in screen(state)
    state.key("s")
    assert order() == ["beta", "gamma", "alpha"] and "sort cost" in screen(state)
    state.key("s")
    assert state.sort == "burn"
    state.key("s")
    assert state.sort == "recent"
    # Select with the arrows (an escape sequence is one key) and ask for actions.
    assert split_keys("\x1b[Bj\x1bq") == ["\x1b[B", "j", "\x1b", "q"]
    order()
    assert state.current() == "gamma"
    state.key("\x1b[B")
    assert state.key("p") == Action("pause", "alpha")
    assert state.key("r") == Action("resume", "alpha")
    assert "reverse" in repr(state.render(NOW).renderables[1].rows[1].style)  # type: ignore[attr-defined]
    assert state.key("b") is None and state.mode == "budget"
    for k in "$2.5":
        state.key(k)
    assert "budget of alpha in USD: $2.5" in screen(state)
    assert state.key("\r") == Action("budget", "alpha", 2.5)
    state.key("b")
    for k in "lots":
        state.key(k)
    assert state.key("\r") is None and "not an amount in USD: 'lots'" in screen(state)
    state.key("b")
    for k in "unlimited":
        state.key(k)
    assert state.key("\r") == Action("budget", "alpha", None)
    state.key("b")
    state.key("9")
    assert state.key("\x1b") is None and state.mode is None  # Esc: nothing asked
    # The filter follows what is typed; Esc clears it; matching is by id, agent or model.
    state.key("/")
    for k in "ET":
        state.key(k)
    assert order() == ["beta"] and state.current() == "beta"
    state.key("\x1b")
    assert order() == ["gamma", "alpha", "beta"]
    state.apply("token.usage", usage("gamma", "m1", 1, 1, 0.0, 1.0, model="o3-mini"), NOW)
    state.key("/")
    for k in "o3-":
        state.key(k)
    state.key("\r")
    assert order() == ["gamma"] and "filter o3-" in screen(state)
    state.key("/")
    for k in "\x7f\x7f\x7fzzz\r":
        state.key(k)
    assert order() == [] and "no session matches 'zzz'" in screen(state)
    assert state.key("p") is None and state.message == "no session selected"
    assert state.key("q") == Action("quit", "")


def test_labels_are_shown_and_filtered() -> None:
    state = TopState("http://x")
    state.load_sessions(
        [row("run-l", label="fix the login bug [/]", lastActivityAt=NOW), row("run-m")],
        sent_at=NOW,
    )
    assert "run-l · fix the login bug [/]" in screen(state)  # text, not rich markup
    state.key("/")
    for k in "login\r":
        state.key(k)
    screen(state)
    assert state.shown == ["run-l"]


def test_typing_is_bounded_and_answers_reach_the_terminal_as_text() -> None:
    state = TopState("http://x")
    state.load_sessions([row("s")], sent_at=NOW)
    screen(state)
    state.key("/")
    for _ in range(1000):
        state.key("x")
    assert len(state.typed) == 200 and state.filter == "x" * 200
    state.key("\x1b")
    for k in "/[/]\r":  # rich markup in a filter is text, not a crash
        state.key(k)
    assert "filter [/]" in screen(state)
    assert printable("no\x1b[2Jpe\x07") == "no?[2Jpe?"


def test_a_list_that_answers_before_the_events_counts_each_message_once() -> None:
    state = TopState("http://x")
    state.load_sessions([row("s")], sent_at=1.0)
    # The list already counts m1 and m2, whose events have not arrived yet.
    listed = row("s", messageCount=2, totalInputTokens=200, totalOutputTokens=20)
    state.load_sessions([listed], sent_at=2.0)
    state.apply("token.usage", usage("s", "m1", 100, 10, 0.001, 0.001), received_at=3.0)
    state.apply("token.usage", usage("s", "m2", 100, 10, 0.001, 0.002), received_at=3.1)
    assert state.sessions["s"].totals() == (200, 20, 2, 0)
    state.apply("token.usage", usage("s", "m3", 100, 10, 0.001, 0.003), received_at=3.2)
    assert state.sessions["s"].totals() == (300, 30, 3, 0)


def test_burn_rate_and_time_to_budget_from_history_and_idle() -> None:
    state = TopState("http://x")
    state.load_sessions(
        [row("h", budgetUsd=1.0, spentUsd=0.4, lastActivityAt=NOW - 60)], sent_at=NOW
    )
    rows = [
        {"messageId": f"m{i}", "startedAt": NOW - 240 + 60 * i, "durationMs": 0.0,
         "costUsd": 0.1}
        for i in range(4)
    ]  # fmt: skip
    state.load_history("h", rows)
    state.load_history("h", rows)  # read twice: counted once
    # $0.40 over the four minutes since the first one: $0.10/min, $0.60 left: ~6 min.
    (line,) = [ln for ln in screen(state).splitlines() if ln.startswith("h ")]
    assert "$0.1000" in line and "~6 min" in line
    # An event for a message the history had is not counted again.
    state.apply("token.usage", usage("h", "m3", 1, 1, 0.1, 0.4, t=NOW), NOW)
    assert "$0.1000" in next(ln for ln in screen(state).splitlines() if ln.startswith("h "))
    (line,) = [ln for ln in screen(state, now=NOW + 301).splitlines() if ln.startswith("h ")]
    assert "idle" in line and "$0.1000" not in line


def test_many_sessions_are_cut_to_the_screen() -> None:
    state = TopState("http://x")
    state.load_sessions([row(f"s{i:02}", createdAt=NOW + i) for i in range(40)], sent_at=0.0)
    text = screen(state, max_rows=5)
    assert "s39" in text and "s34" not in text and "… 35 more" in text


async def test_sse_parser_handles_comments_and_multiline_data() -> None:
    async def lines() -> AsyncIterator[bytes]:
        for line in (
            b": connected\n", b"\n", b"id: 7\r\n", b"event: token.usage\n", b"data: {\"a\":\n",
            b"data: 1}\n", b"\n", b": keep-alive\n", b"\n", b"id: 8\n", b"data:x\n", b"\n",
        ):  # fmt: skip
            yield line

    got = [e async for e in sse_events(lines())]
    assert got == [("7", "token.usage", '{"a":\n1}'), ("8", "message", "x")]


async def test_sse_events_from_chunks_split_anywhere() -> None:
    """The proxy's bytes arrive in arbitrary pieces: mid-line, between CR and LF, mid-UTF-8."""
    wire = (
        'id: 1\r\nevent: token.usage\r\ndata: {"m": "é"}\r\n\r\n: ping\n\nid: 2\ndata: x'.encode()
    )

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(len(wire)):
            yield wire[i : i + 1]

    got = [e async for e in sse_events(chunks())]
    assert got == [("1", "token.usage", '{"m": "é"}'), ("2", "message", "x")]


def test_context_levels_at_the_thresholds() -> None:
    """top colours by the event's floored percent; that gives the level the proxy sent."""
    assert (CONTEXT_WARNING_PERCENT, CONTEXT_CRITICAL_PERCENT) == (80, 90)
    window = 128_000
    for tokens in (0, 102_399, 102_400, 115_199, 115_200, 128_000, 140_000):
        data = context_data("s", "m", tokens, window)
        assert data["level"] == context_level(tokens, window) == percent_level(data["percent"])
    assert [context_level(t, 100_000) for t in (79_999, 80_000, 89_999, 90_000)] == [
        "ok", "warning", "warning", "critical",
    ]  # fmt: skip


def test_proxy_url_from_settings(tmp_path: Path) -> None:
    assert proxy_url(Settings(db_path=tmp_path / "x.db")) == "http://127.0.0.1:8787"
    assert (
        proxy_url(Settings(db_path=tmp_path / "x.db", host="0.0.0.0", port=9))
        == "http://127.0.0.1:9"
    )
    assert proxy_url(Settings(db_path=tmp_path / "x.db", host="::1", port=9)) == "http://[::1]:9"
    assert proxy_url(Settings(db_path=tmp_path / "x.db", host="::", port=9)) == "http://[::1]:9"


async def test_says_so_when_no_proxy_is_running() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = TopState(f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(Follower(state, http).follow())

        async def reported() -> bool:
            return state.status.startswith("cannot reach the proxy")

        try:
            await eventually(reported)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert "cannot reach the proxy" in screen(state)


# --- the real command in a pseudo-terminal ------------------------------------------------------


class Terminal:
    """A child process on a pseudo-terminal, its output collected by the event loop."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 170, 0, 0))
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True
        )
        os.close(slave)
        self.raw = bytearray()
        self.closed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            self.closed.set()
            return
        self.raw += data

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", errors="replace"))

    def send(self, keys: str) -> None:
        """Type on the terminal."""
        os.write(self.master, keys.encode())

    def mark(self) -> int:
        """Where the output is now: ``wait_for(..., since=mark)`` looks only after it."""
        return len(self.raw)

    async def wait_for(self, *needles: str, timeout: float = 15.0, since: int = 0) -> None:
        async def shown() -> bool:
            text = ANSI.sub("", self.raw[since:].decode("utf-8", errors="replace"))
            return all(n in text for n in needles)

        try:
            await eventually(shown, timeout)
        except AssertionError:
            raise AssertionError(f"{needles} not on screen:\n{self.text[-3000:]}") from None

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        try:
            code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            await asyncio.wait_for(self.closed.wait(), 5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
        return code


def top_env(proxy_port: int, tmp_path: Path, width: int = 170) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env.update(
        SPENDGATE_HOST="127.0.0.1",
        SPENDGATE_PORT=str(proxy_port),
        SPENDGATE_ADMIN_TOKEN="s3cret",
        SPENDGATE_DB_PATH=str(tmp_path / "unused.db"),
        TERM="xterm-256color",
        COLUMNS=str(width),
        LINES="40",
    )
    return env


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
async def test_top_follows_a_live_proxy_and_quits_cleanly_on_ctrl_c(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    env = top_env(proxy.server.port, tmp_path)
    term = Terminal([sys.executable, "-m", "spendgate", "top"], env, tmp_path)
    try:
        await term.wait_for("spendgate top", "live", "no sessions yet")
        upstream.queue(json_reply(chat_completion("gpt-4o", 110_000, 5_000)))
        async with openai.AsyncOpenAI(
            base_url=proxy.url("/s/run-top/openai/v1"), api_key="k", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        # The session, its cost (110,000 × 2.5 + 5,000 × 10 µ$), tokens and context appear.
        await term.wait_for("run-top", "$0.3250", "110,000", "89.8%")
        async with proxy.http.post(
            proxy.url("/api/sessions/run-top/pause"), headers={"Authorization": "Bearer s3cret"}
        ) as resp:
            assert resp.status == 200
        await term.wait_for("PAUSED")
    finally:
        code = await term.stop()
    assert code == 0, term.text[-2000:]
    assert "Traceback" not in term.text
    assert term.raw.rstrip().endswith(b"\x1b[?1049l") or b"\x1b[?1049l" in term.raw[-200:]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
async def test_top_reads_history_at_start_and_its_keys_act_on_the_proxy(
    start_proxy: StartProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(admin_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    # Spend from before top starts: gpt-4o, 1,000 × 2.5 + 100 × 10 µ$ = $0.0035 a message.
    for session in ("hist-a", "hist-a", "hist-b"):
        upstream.queue(json_reply(chat_completion("gpt-4o", 1_000, 100)))
        async with openai.AsyncOpenAI(
            base_url=proxy.url(f"/s/{session}/openai/v1"), api_key="k", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
    async with proxy.http.put(
        proxy.url("/api/sessions/hist-a/budget"), json={"budgetUsd": 1.0}, headers=auth
    ) as resp:
        assert resp.status == 200
    term = Terminal([sys.executable, "-m", "spendgate", "top"], top_env(proxy.server.port,
                    tmp_path), tmp_path)  # fmt: skip

    async def session(sid: str) -> dict[str, object]:
        data: dict[str, object] = await proxy.get_json(f"/api/sessions/{sid}/cost", headers=auth)
        return data

    try:
        # Right at once, from the rows read at start (all within the first minute): hist-a
        # burns $0.0070/min, so its $0.993 left last ~2.4 h; both burn $0.0105/min.
        await term.wait_for("hist-a", "hist-b", "~2.4 h", "burn $0.0105/min")
        at = term.mark()
        term.send("s")
        await term.wait_for("sort cost", since=at)
        at = term.mark()
        term.send("/hist-b\r")
        await term.wait_for("filter hist-b", since=at)
        term.send("p")  # the selected session: the only one shown
        await term.wait_for("hist-b: paused", "PAUSED", since=at)
        assert (await session("hist-b"))["paused"] is True
        at = term.mark()
        term.send("r")
        await term.wait_for("hist-b: resumed", since=at)
        assert (await session("hist-b"))["paused"] is False
        at = term.mark()
        term.send("b0.5\r")
        await term.wait_for("hist-b: budget $0.5000", since=at)
        assert (await session("hist-b"))["budgetUsd"] == 0.5
        # Lowered below the spend: paused, and resuming is refused (409) with what to do.
        at = term.mark()
        term.send("b0.001\r")
        await term.wait_for("hist-b: budget $0.001000", since=at)
        at = term.mark()
        term.send("r")
        await term.wait_for("resume hist-b: 409", "raise the budget with b", since=at)
        assert (await session("hist-b"))["paused"] is True
        term.send("q")
        code = await asyncio.wait_for(asyncio.to_thread(term.proc.wait), 15)
    finally:
        code = await term.stop()
    assert code == 0, term.text[-2000:]
    assert "Traceback" not in term.text
