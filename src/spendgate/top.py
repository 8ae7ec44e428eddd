"""``spendgate top``: a live terminal view of a running proxy's sessions (rich).

It follows the proxy's ``/api/events`` stream (reconnecting with ``Last-Event-ID``) and
reads ``/api/sessions`` when it connects and every few seconds after, so totals stay
exact. Everything shown lives in :class:`TopState`, whose ``render`` depends only on
what it was fed, so the view is tested without a terminal or a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from spendgate.address import local_url
from spendgate.context import percent_level
from spendgate.providers._sse_decoder import SSEDecoder
from spendgate.render import total_usd, usd
from spendgate.settings import Settings

BURN_WINDOW_S = 600.0
"""Burn rate is the spend of the last ten minutes per minute."""
LIST_EVERY_S = 2.0
STALE_AFTER_S = 10.0
REQUEST_TIMEOUT_S = 10.0
LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}


def duration(minutes: float) -> str:
    if minutes < 1:
        return "< 1 min"
    if minutes < 90:
        return f"~{round(minutes)} min"
    if minutes < 48 * 60:
        return f"~{minutes / 60:.1f} h"
    return f"~{round(minutes / 1440)} d"


def bar(fraction: float, width: int = 5) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


@dataclass(slots=True)
class Final:
    """A final message's tokens, until a session list surely includes them."""

    at: float
    input: int
    output: int
    unpriced: bool
    """Its cost is unknown (no price, and it has tokens)."""
    counted: bool = False
    """Believed to be in the newest list's totals already."""


@dataclass
class SessionView:
    id: str
    spent: float = 0.0
    budget: float | None = None
    paused: bool = False
    reason: str | None = None
    base: tuple[int, int, int, int] | None = None
    """input, output, messages, unpriced messages as of the newest session list."""
    recent: list[Final] = field(default_factory=list)
    """Finals in arrival order that the newest list may not include."""
    live: dict[str, tuple[int, int]] = field(default_factory=dict)
    finals: list[tuple[float, float]] = field(default_factory=list)
    """(server time, cost) of recent final messages, for the burn rate."""
    context: dict[str, Any] | None = None
    last_at: float = 0.0
    stamps: dict[str, float] = field(default_factory=dict)
    """When an event last set ``cost`` / ``paused`` / ``context`` (our clock)."""

    def totals(self) -> tuple[int, int, int, int]:
        """input, output, messages, unpriced messages: the list's, the finals not in it yet,
        and the running streams' tokens."""
        inp, out, msgs, unpriced = self.base or (0, 0, 0, 0)
        for f in self.recent:
            if not f.counted:
                inp, out, msgs = inp + f.input, out + f.output, msgs + 1
                unpriced += f.unpriced
        for i, o in self.live.values():
            inp, out = inp + i, out + o
        return inp, out, msgs, unpriced

    def burn_rate(self, now: float) -> float:
        """USD per minute over the burn window (at least one minute of it)."""
        self.finals = [(t, c) for t, c in self.finals if t >= now - BURN_WINDOW_S]
        if not self.finals:
            return 0.0
        first = min(t for t, _ in self.finals)
        return sum(c for _, c in self.finals) / max((now - first) / 60, 1.0)


class TopState:
    """What the view shows, built from session lists, summaries and events."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sessions: dict[str, SessionView] = {}
        self.status = "connecting"
        self.skew = 0.0
        """Server clock minus ours, from event timestamps."""
        self.dirty = False
        """A final message arrived since the last session list."""

    def session(self, sid: str) -> SessionView:
        view = self.sessions.get(sid)
        if view is None:
            view = self.sessions[sid] = SessionView(sid)
        return view

    def _fresh(self, view: SessionView, what: str, sent_at: float) -> bool:
        return view.stamps.get(what, 0.0) <= sent_at

    def load_sessions(self, rows: list[dict[str, Any]], sent_at: float) -> None:
        """``GET /api/sessions`` rows, asked for at ``sent_at``: exact totals to that point."""
        for r in rows:
            view = self.session(r["sessionId"])
            view.budget = r.get("budgetUsd")
            if self._fresh(view, "paused", sent_at):
                view.paused, view.reason = bool(r.get("paused")), r.get("pauseReason")
            if self._fresh(view, "cost", sent_at):
                view.spent = float(r.get("spentUsd") or 0.0)
            msgs = int(r.get("messageCount") or 0)
            if not self._count_once(view, msgs, sent_at):
                continue
            view.base = (
                int(r.get("totalInputTokens") or 0),
                int(r.get("totalOutputTokens") or 0),
                msgs,
                int(r.get("unpricedMessageCount") or 0),
            )
            view.last_at = max(view.last_at, r.get("lastActivityAt") or r.get("createdAt") or 0.0)

    @staticmethod
    def _count_once(view: SessionView, msgs: int, sent_at: float) -> bool:
        """Mark the pending finals a list of ``msgs`` messages includes; False if it is stale.

        Finals arrive in the order the proxy stored their rows (it stores, then publishes),
        and a list sees a prefix of the rows: a list counting n more messages than the last
        one includes the first n finals still pending. A final that came before the list was
        asked for is in it for sure, so it is forgotten; any guess is thus put right by the
        next list.
        """
        if view.base is not None and msgs < view.base[2]:
            return False  # an older answer overtaken by a newer one
        added = msgs - view.base[2] if view.base is not None else 0
        for final in view.recent:
            if final.counted:
                continue
            if added > 0:
                final.counted, added = True, added - 1
            elif final.at < sent_at:
                final.counted = True
        view.recent = [f for f in view.recent if f.at >= sent_at]
        return True

    def load_summary(self, summary: dict[str, Any], sent_at: float) -> None:
        """A ``SessionCostSummary``: the context meter (the totals come from the lists)."""
        view = self.session(summary["sessionId"])
        if summary.get("context") and self._fresh(view, "context", sent_at):
            view.context = summary["context"]

    def apply(self, kind: str, data: dict[str, Any], received_at: float | None = None) -> None:
        sid = data.get("sessionId")
        if not isinstance(sid, str):
            return
        at = time.time() if received_at is None else received_at
        view = self.session(sid)
        if kind == "token.usage":
            self._usage(view, data, at)
        elif kind == "context.usage":
            view.context, view.stamps["context"] = data, at
        elif data.get("scope", "session") != "session":
            return  # an agent's or the global budget: not the session's own pause or budget
        elif kind in ("budget.paused", "budget.resumed"):
            view.paused = kind == "budget.paused"
            view.reason = data.get("reason") if view.paused else None
            view.stamps["paused"] = at
            view.budget = data.get("budgetUsd", view.budget)
            if isinstance(data.get("spentUsd"), int | float):
                view.spent, view.stamps["cost"] = float(data["spentUsd"]), at
        elif kind == "budget.warning":
            view.budget = data.get("budgetUsd", view.budget)

    def _usage(self, view: SessionView, d: dict[str, Any], at: float) -> None:
        mid = str(d.get("messageId"))
        tokens = (int(d.get("inputTokens") or 0), int(d.get("outputTokens") or 0))
        ts = d.get("timestamp")
        if isinstance(ts, int | float):
            self.skew = ts - at
            view.last_at = max(view.last_at, ts)
        if isinstance(d.get("sessionCostUsd"), int | float):
            view.spent, view.stamps["cost"] = float(d["sessionCostUsd"]), at
        if not d.get("final"):
            view.live[mid] = tokens
            return
        view.live.pop(mid, None)
        cost = d.get("costUsd")
        view.recent.append(Final(at, *tokens, unpriced=cost is None and sum(tokens) > 0))
        if cost is not None:
            view.finals.append((ts if isinstance(ts, int | float) else at + self.skew, float(cost)))
        self.dirty = True

    # -- the view -------------------------------------------------------------------------------

    def render(self, now: float | None = None, max_rows: int = 30) -> RenderableType:
        server_now = (time.time() if now is None else now) + self.skew
        views = sorted(self.sessions.values(), key=lambda v: v.last_at, reverse=True)
        rates = {v.id: v.burn_rate(server_now) for v in views}
        totals = {v.id: v.totals() for v in views}
        total = total_usd(
            sum(v.spent for v in views),
            sum(t[2] for t in totals.values()),
            sum(t[3] for t in totals.values()),
        )
        dot = {"live": "[green]●[/]"}.get(self.status, "[yellow]●[/]")
        head = Text.from_markup(
            f"[bold]spendgate top[/]  {self.url}  {dot} {self.status}  "
            f"sessions [bold]{len(views)}[/]  total [bold]{total}[/]  "
            f"burn [bold]{usd(sum(rates.values()))}/min[/]   [dim]Ctrl-C quits[/]"
        )
        # Fixed widths for the figures; the session id takes what is left.
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, expand=True)
        table.add_column("session", no_wrap=True, min_width=8, ratio=1)
        for name, width, right in (
            ("state", 9, False), ("cost", 15, True), ("budget", 16, False), ("in", 8, True),
            ("out", 7, True), ("msgs", 4, True), ("context", 11, False), ("$/min", 9, True),
            ("budget in", 9, False),
        ):  # fmt: skip
            table.add_column(name, width=width, justify="right" if right else "left", no_wrap=True)
        for v in views[:max_rows]:
            table.add_row(*self._row(v, totals[v.id], rates[v.id]))
        if len(views) > max_rows:
            table.add_row(f"… {len(views) - max_rows} more", *[""] * 9)
        if not views:
            return Group(head, table, Text("no sessions yet", style="dim"))
        return Group(head, table)

    def _row(
        self, v: SessionView, totals: tuple[int, int, int, int], rate: float
    ) -> list[str | Text]:
        inp, out, msgs, unpriced = totals
        state = Text("PAUSED", style="bold white on red") if v.paused else (
            Text("streaming", style="cyan") if v.live else Text("")
        )  # fmt: skip
        if v.budget is None:
            budget: str | Text = Text("unlimited", style="dim")
            eta = "—"
        else:
            frac = v.spent / v.budget if v.budget > 0 else 1.0
            style = LEVEL_STYLE[percent_level(frac * 100)]
            budget = Text(f"{bar(frac)} {frac * 100:.0f}% {usd(v.budget)}", style=style)
            left = v.budget - v.spent
            eta = "spent" if left <= 0 else duration(left / rate) if rate > 0 else "—"
        ctx: str | Text = Text("—", style="dim")
        c = v.context
        if c and isinstance(c.get("percent"), int | float) and c.get("contextWindow"):
            pct = float(c["percent"])
            ctx = Text(f"{bar(pct / 100)} {pct:.1f}%")
            ctx.stylize(LEVEL_STYLE[percent_level(pct)])
        elif c:
            ctx = Text("window unknown", style="dim")
        return [
            v.id, state, total_usd(v.spent, msgs, unpriced), budget, f"{inp:,}", f"{out:,}",
            f"{msgs:,}", ctx, f"{usd(rate)}" if rate else "idle", eta,
        ]  # fmt: skip


# --- the network side ---------------------------------------------------------------------------


async def sse_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, str, str]]:
    """(id, event, data) of each event in a ``text/event-stream``, comments skipped."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for e in decoder.feed(chunk):
            yield e.id, e.event, e.data.decode("utf-8", errors="replace")
    for e in decoder.close():
        yield e.id, e.event, e.data.decode("utf-8", errors="replace")


class Follower:
    """Keeps a :class:`TopState` in step with a proxy; reconnects forever."""

    def __init__(self, state: TopState, http: aiohttp.ClientSession) -> None:
        self.state = state
        self.http = http
        self.last_id = ""
        self.listed_at = 0.0
        self.summarized: set[str] = set()

    async def _get(self, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with self.http.get(self.state.url + path, timeout=timeout) as resp:
            if resp.status == 401:
                raise PermissionError("the proxy wants its admin token: set SPENDGATE_ADMIN_TOKEN")
            resp.raise_for_status()
            return orjson.loads(await resp.read())

    async def refresh(self) -> None:
        """The session list (exact totals), then context for the sessions shown first."""
        sent = time.time()
        self.state.dirty = False
        self.listed_at = time.monotonic()
        data = await self._get("/api/sessions")
        self.state.load_sessions(data["sessions"], sent)
        for row in data["sessions"][:30]:
            sid = row["sessionId"]
            if sid in self.summarized:
                continue
            self.summarized.add(sid)
            sent = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                self.state.load_summary(await self._get(f"/api/sessions/{sid}/cost"), sent)

    async def refresher(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            age = time.monotonic() - self.listed_at
            if (self.state.dirty and age >= LIST_EVERY_S) or age >= STALE_AFTER_S:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, PermissionError):
                    await self.refresh()

    async def follow(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._stream()
                delay = 0.5
                self.state.status = "reconnecting"
            except PermissionError as exc:
                self.state.status = str(exc)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.state.status = f"cannot reach the proxy ({type(exc).__name__}); retrying"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _stream(self) -> None:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT_S, sock_read=45)
        async with self.http.get(
            self.state.url + "/api/events", headers=headers, timeout=timeout
        ) as resp:
            if resp.status == 401:
                raise PermissionError("the proxy wants its admin token: set SPENDGATE_ADMIN_TOKEN")
            resp.raise_for_status()
            self.state.status = "live"
            await self.refresh()  # after subscribing, so nothing falls between the two
            async for eid, kind, data in sse_events(resp.content.iter_any()):
                self.last_id = eid or self.last_id
                with contextlib.suppress(orjson.JSONDecodeError):
                    payload = orjson.loads(data)
                    if isinstance(payload, dict):
                        self.state.apply(kind, payload)


async def watch(state: TopState, token: str | None, console: Console) -> None:
    """Follow the proxy and redraw until cancelled (Ctrl-C, or SIGTERM: same clean exit)."""
    main = asyncio.current_task()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        follower = Follower(state, http)
        tasks = [asyncio.create_task(follower.follow()), asyncio.create_task(follower.refresher())]
        try:
            with Live(
                console=console,
                screen=console.is_terminal,
                refresh_per_second=4,
                get_renderable=lambda: state.render(max_rows=max(console.size.height - 7, 3)),
            ):
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def proxy_url(settings: Settings) -> str:
    return local_url(settings.host, settings.port)


def run_top(settings: Settings) -> int:
    """Show the live view until Ctrl-C; the terminal is restored and the exit code is 0."""
    state = TopState(proxy_url(settings))
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(watch(state, settings.admin_token, Console()))
    return 0
