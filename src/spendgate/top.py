"""``spendgate top``: a live terminal view of a running proxy's sessions (rich), that acts.

It follows the proxy's ``/api/events`` stream (reconnecting with ``Last-Event-ID``) and
reads ``/api/sessions`` when it connects and every few seconds after, so totals stay
exact; at start it reads the messages of the sessions active in the burn window, so the
burn rate and time to budget are right at once, by the dashboard's rules
(docs/reference.md §8 "The dashboard"). Keys sort, filter, pause, resume and set a
budget (:meth:`TopState.key`, §11). Everything shown lives in :class:`TopState`, whose
``render`` depends only on what it was fed, so the view is tested without a terminal or
a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from rich.cells import cell_len
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
IDLE_AFTER_S = 300.0
"""No message finished for five minutes and none running: idle (no burn rate)."""
HISTORY_PAGES = 20
"""At most this many pages of 1,000 messages read per session at start."""
SORTS = ("recent", "cost", "burn")
MAX_TYPED = 200
"""Characters kept of a filter or budget being typed."""
BUDGET_TEXT = re.compile(r"\$?(\d+(\.\d*)?|\.\d+)")
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
    finals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """message id -> (server time, cost) of recent final messages, for the burn rate
    (from the history read at start and from events: one entry per message)."""
    ahead: int = 0
    """Messages a list counted whose finals have not arrived yet (see ``_count_once``)."""
    label: str | None = None
    names: set[str] = field(default_factory=set)
    """Its agents and models (summaries, events), for the filter."""

    def matches(self, q: str) -> bool:
        """Does the lowercase ``q`` occur in its id, label, an agent or a model?"""
        return any(q in n.lower() for n in (self.id, self.label or "", *self.names))

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

    def idle(self, now: float) -> bool:
        return not self.live and now - self.last_at > IDLE_AFTER_S

    def burn_rate(self, now: float) -> float:
        """USD per minute over the burn window (at least one minute of it); 0 when idle."""
        self.finals = {m: (t, c) for m, (t, c) in self.finals.items() if t >= now - BURN_WINDOW_S}
        if not self.finals or self.idle(now):
            return 0.0
        first = min(t for t, _ in self.finals.values())
        return sum(c for _, c in self.finals.values()) / max((now - first) / 60, 1.0)

    def add_final(self, mid: str, t: float, cost: float | None) -> None:
        self.last_at = max(self.last_at, t)
        if cost is not None:
            self.finals[mid] = (t, cost)


@dataclass(frozen=True, slots=True)
class Action:
    """What a key asks of the proxy: ``pause``, ``resume`` or ``budget`` (``usd`` None:
    unlimited) for one session."""

    kind: str
    session: str
    usd: float | None = None


class TopState:
    """What the view shows, built from session lists, summaries and events, and what the
    keys chose (sort, filter, the selected session, a budget being typed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sessions: dict[str, SessionView] = {}
        self.status = "connecting"
        self.skew = 0.0
        """Server clock minus ours, from event timestamps."""
        self.dirty = False
        """A final message arrived since the last session list."""
        self.sort = "recent"
        self.filter = ""
        self.selected: str | None = None
        self.mode: str | None = None
        """``filter`` or ``budget`` while a line is typed, else None."""
        self.typed = ""
        self.message = ""
        """The answer to the last action, shown under the table."""
        self.shown: list[str] = []
        """The session ids in the order last rendered (the keys move through these)."""

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
            view.label = r.get("label") or None
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
        next list. A list can also answer before the events of rows it counts arrive: those
        are the next finals to come, counted already (``ahead``).
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
        view.ahead += max(added, 0)
        view.recent = [f for f in view.recent if f.at >= sent_at]
        return True

    def load_history(self, sid: str, rows: list[dict[str, Any]]) -> None:
        """Message rows (``GET /api/sessions/{id}/messages``) read at start: the finals in
        the burn window, so the burn rate is right before any event arrives."""
        view = self.session(sid)
        for m in rows:
            t = float(m.get("startedAt") or 0.0) + float(m.get("durationMs") or 0.0) / 1000
            cost = m.get("costUsd")
            view.add_final(str(m.get("messageId")), t, None if cost is None else float(cost))

    def load_summary(self, summary: dict[str, Any], sent_at: float) -> None:
        """A ``SessionCostSummary``: the context meter (the totals come from the lists)."""
        view = self.session(summary["sessionId"])
        for group in ("byAgent", "byModel"):
            view.names.update(k for k in (summary.get(group) or {}) if k != "unknown")
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
        view.names.update(n for n in (d.get("agentId"), d.get("modelId")) if isinstance(n, str))
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
        counted = view.ahead > 0  # a list counted it already
        view.ahead -= counted
        unpriced = cost is None and sum(tokens) > 0
        view.recent.append(Final(at, *tokens, unpriced=unpriced, counted=counted))
        t = ts if isinstance(ts, int | float) else at + self.skew
        view.add_final(mid, t, None if cost is None else float(cost))
        self.dirty = True

    # -- the keys -------------------------------------------------------------------------------

    def key(self, k: str) -> Action | None:
        """One key (or escape sequence, :func:`split_keys`): what it changes in the view, or
        the action it asks of the proxy; ``Action("quit", "")`` to stop."""
        if self.mode is not None:
            return self._typing(k)
        if k in ("\x1b[A", "k", "\x1b[B", "j"):
            self._move(-1 if k in ("\x1b[A", "k") else 1)
        elif k == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif k == "/":
            self.mode, self.typed = "filter", self.filter
        elif k in ("p", "r", "b"):
            sid = self.current()
            if sid is None:
                self.message = "no session selected"
            elif k == "b":
                self.mode, self.typed = "budget", ""
            else:
                return Action("pause" if k == "p" else "resume", sid)
        elif k == "q":
            return Action("quit", "")
        return None

    def _typing(self, k: str) -> Action | None:
        if k in ("\x7f", "\b"):
            self.typed = self.typed[:-1]
        elif k == "\x1b":
            if self.mode == "filter":
                self.filter = ""
            self.mode, self.typed = None, ""
        elif k in ("\r", "\n"):
            mode, typed, self.mode = self.mode, self.typed.strip(), None
            if mode == "budget":
                return self._budget(typed)
        elif len(k) == 1 and k.isprintable() and len(self.typed) < MAX_TYPED:
            self.typed += k
        if self.mode == "filter":
            self.filter = self.typed  # the view follows what is typed
        return None

    def _budget(self, typed: str) -> Action | None:
        sid = self.current()
        if sid is None:
            self.message = "no session selected"
            return None
        if typed.lower() in ("none", "unlimited", "-"):
            return Action("budget", sid, None)
        if BUDGET_TEXT.fullmatch(typed.replace(",", "")):
            return Action("budget", sid, float(typed.replace(",", "").lstrip("$")))
        self.message = f"not an amount in USD: {typed[:20]!r} (a number ≥ 0, or 'unlimited')"
        return None

    def _move(self, step: int) -> None:
        if not self.shown:
            return
        at = self.shown.index(self.selected) if self.selected in self.shown else 0
        self.selected = self.shown[max(0, min(len(self.shown) - 1, at + step))]

    def current(self) -> str | None:
        """The selected session (the first shown when none is)."""
        if self.selected in self.shown:
            return self.selected
        return self.shown[0] if self.shown else None

    # -- the view -------------------------------------------------------------------------------

    def _ordered(self, now: float, rates: dict[str, float]) -> list[SessionView]:
        q = self.filter.lower()
        views = [v for v in self.sessions.values() if not q or v.matches(q)]
        key = {
            "recent": lambda v: v.last_at,
            "cost": lambda v: v.spent,
            "burn": lambda v: round(rates[v.id], 6),
        }[self.sort]
        views.sort(key=lambda v: v.id)
        views.sort(key=key, reverse=True)  # stable: ties keep the id order
        return views

    def render(
        self, now: float | None = None, max_rows: int = 30, width: int = 170
    ) -> RenderableType:
        server_now = (time.time() if now is None else now) + self.skew
        rates = {v.id: v.burn_rate(server_now) for v in self.sessions.values()}
        views = self._ordered(server_now, rates)
        totals = {v.id: v.totals() for v in views}
        total = total_usd(
            sum(v.spent for v in self.sessions.values()),
            sum(t[2] for t in totals.values()),
            sum(t[3] for t in totals.values()),
        )
        dot = ("●", "green" if self.status == "live" else "yellow")
        head = Text.assemble(  # parts, not markup: a filter may hold "[" (docs §11)
            ("spendgate top", "bold"), f"  {self.url}  ", dot, f" {self.status}  sessions ",
            (str(len(self.sessions)), "bold"), "  total ", (total, "bold"), "  burn ",
            (f"{usd(sum(rates.values()))}/min", "bold"), "  sort ", (self.sort, "bold"),
            *(("  filter ", (self.filter, "bold")) if self.filter else ()),
        )  # fmt: skip
        self.shown = [v.id for v in views]
        current = self.current()
        start = 0
        if current is not None and max_rows > 0:
            start = max(0, self.shown.index(current) - max_rows + 1)
        page = views[start : start + max_rows]
        rows = [self._row(v, totals[v.id], rates[v.id], server_now) for v in page]
        table = self._table(rows, width, [v.id == current for v in page])
        more = len(views) - start - len(page)
        parts: list[RenderableType] = [head, table]
        if more > 0:
            parts.append(Text(f"… {more} more", style="dim"))
        if not self.sessions:
            parts.append(Text("no sessions yet", style="dim"))
        elif not views:
            parts.append(Text(f"no session matches {self.filter!r}", style="dim"))
        parts.append(self._footer(current))
        return Group(*parts)

    @staticmethod
    def _table(rows: list[list[str | Text]], width: int, selected: list[bool]) -> Table:
        """Every figure at its full width; the session id gets what is left (elided in the
        middle), and when even that is too little the least needed columns go."""
        names = list(COLUMNS)
        widths = [max([len(n)] + [width_of(r[i]) for r in rows]) for i, n in enumerate(names)]
        keep = list(range(len(names)))
        for drop in DROP_ORDER:
            if width - sum(widths[i] for i in keep[1:]) - 2 * (len(keep) - 1) >= MIN_SESSION:
                break
            keep.remove(names.index(drop))
        room = width - sum(widths[i] for i in keep[1:]) - 2 * (len(keep) - 1)
        session_w = max(min(widths[0], room), MIN_SESSION)
        table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
        for i in keep:
            right = names[i] in RIGHT
            table.add_column(
                names[i],
                width=session_w if i == 0 else widths[i],
                justify="right" if right else "left",
                no_wrap=True,
                header_style="bold",
            )
        for r, sel in zip(rows, selected, strict=True):
            cells = [Text(elide(str(r[0]), session_w)), *(r[i] for i in keep[1:])]  # not markup
            table.add_row(*cells, style="reverse" if sel else None)
        return table

    def _footer(self, current: str | None) -> Text:
        if self.mode == "filter":
            return Text(f"filter: {self.typed}▌  (Enter keeps it, Esc clears)", style="bold")
        if self.mode == "budget":
            return Text(
                f"budget of {current} in USD: {self.typed}▌  (Enter sets it, 'unlimited' for"
                " none, Esc cancels)",
                style="bold",
            )
        keys = "↑↓ select  s sort  / filter  p pause  r resume  b budget  q quit"
        return Text(keys + (f"   {self.message}" if self.message else ""), style="dim")

    def _row(
        self, v: SessionView, totals: tuple[int, int, int, int], rate: float, now: float
    ) -> list[str | Text]:
        inp, out, msgs, unpriced = totals
        over = v.budget is not None and v.spent >= v.budget  # 402 until raised (§6)
        state = Text("OVER BUDGET" if over else "PAUSED", style="bold white on red") if (
            over or v.paused
        ) else Text("streaming", style="cyan") if v.live else Text("")  # fmt: skip
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
        burn = usd(rate) if rate else "idle" if v.idle(now) else "—"
        name = v.id + (f" · {v.label}" if v.label else "")
        return [
            name, state, total_usd(v.spent, msgs, unpriced), budget, f"{inp:,}", f"{out:,}",
            f"{msgs:,}", ctx, burn, eta,
        ]  # fmt: skip


COLUMNS = (
    "session",
    "state",
    "cost",
    "budget",
    "in",
    "out",
    "msgs",
    "context",
    "$/min",
    "budget in",
)
RIGHT = frozenset({"cost", "in", "out", "msgs", "$/min"})
DROP_ORDER = ("context", "budget in", "budget", "out", "$/min", "in", "state")
"""The columns left out, in this order, when the terminal is too narrow for every figure."""
MIN_SESSION = 10


def printable(text: str) -> str:
    """``text`` with control characters (a terminal's escape sequences) shown as ``?``:
    what the proxy answers is never written to the terminal raw."""
    return "".join(c if c.isprintable() else "?" for c in text)


def width_of(cell: str | Text) -> int:
    return cell_len(cell) if isinstance(cell, str) else cell.cell_len


def elide(text: str, width: int) -> str:
    """``text`` in ``width`` characters: its start and end with ``…`` between."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = width // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def split_keys(data: str) -> list[str]:
    """Keys in what the terminal sent: an escape sequence (arrows: ``ESC [ A``) is one key,
    a lone ESC another."""
    return re.findall(r"\x1b\[[0-9;]*[A-Za-z~]|\x1bO[A-Za-z]|[\s\S]", data)


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
        self.history_read: set[str] = set()

    async def _get(self, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with self.http.get(self.state.url + path, timeout=timeout) as resp:
            if resp.status == 401:
                raise PermissionError("the proxy wants its admin token: set SPENDGATE_ADMIN_TOKEN")
            resp.raise_for_status()
            return orjson.loads(await resp.read())

    async def history(self, rows: list[dict[str, Any]], now: float) -> None:
        """The messages of each listed session active in the burn window, read once (at
        most :data:`HISTORY_PAGES` pages), so its burn rate is right at once."""
        for row in rows:
            sid = row["sessionId"]
            active = float(row.get("lastActivityAt") or 0.0) >= now - BURN_WINDOW_S
            if sid in self.history_read or not active:
                continue
            self.history_read.add(sid)
            cursor = ""
            for _ in range(HISTORY_PAGES):
                query = "limit=1000" + (f"&cursor={cursor}" if cursor else "")
                data = await self._get(f"/api/sessions/{quote(sid, safe='')}/messages?{query}")
                self.state.load_history(sid, data["messages"])
                cursor = data.get("nextCursor") or ""
                if not cursor:
                    break

    async def act(self, action: Action) -> None:
        """Ask the proxy for what a key chose; the answer (or why not) goes in the footer."""
        path = f"/api/sessions/{quote(action.session, safe='')}/"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        if action.kind == "budget":
            request = self.http.put(
                self.state.url + path + "budget", json={"budgetUsd": action.usd}, timeout=timeout
            )
        else:
            request = self.http.post(self.state.url + path + action.kind, timeout=timeout)
        try:
            async with request as resp:
                body = await resp.read()
                if resp.status >= 400:
                    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                        body = orjson.loads(body)["error"]["message"].encode()
                    hint = "; raise the budget with b" if resp.status == 409 else ""
                    self.state.message = (
                        f"{action.kind} {action.session}: {resp.status} "
                        f"{printable(body.decode(errors='replace'))[:160]}{hint}"
                    )
                    return
                rec = orjson.loads(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.state.message = f"{action.kind} {action.session}: {type(exc).__name__}"
            return
        view = self.state.session(action.session)
        view.paused, view.reason = bool(rec.get("paused")), rec.get("pauseReason")
        view.budget = rec.get("budgetUsd")
        view.stamps["paused"] = time.time()
        done = {"pause": "paused", "resume": "resumed"}.get(action.kind)
        self.state.message = f"{action.session}: " + (
            done or f"budget {'unlimited' if action.usd is None else usd(action.usd)}"
        )
        self.listed_at = 0.0  # a fresh list soon

    async def refresh(self) -> None:
        """The session list (exact totals), then context for the sessions shown first."""
        sent = time.time()
        self.state.dirty = False
        self.listed_at = time.monotonic()
        data = await self._get("/api/sessions")
        self.state.load_sessions(data["sessions"], sent)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self.history(data["sessions"], sent + self.state.skew)
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
            for view in self.state.sessions.values():
                view.ahead = 0  # the replay may have missed finals: the list is the truth
            await self.refresh()  # after subscribing, so nothing falls between the two
            async for eid, kind, data in sse_events(resp.content.iter_any()):
                self.last_id = eid or self.last_id
                with contextlib.suppress(orjson.JSONDecodeError):
                    payload = orjson.loads(data)
                    if isinstance(payload, dict):
                        self.state.apply(kind, payload)


@contextlib.contextmanager
def keys_from(fd: int | None, on_key: Any) -> Any:
    """Call ``on_key`` with each key typed on the terminal ``fd`` (cbreak mode: keys come
    one by one, unechoed, and Ctrl-C still interrupts); restored on the way out."""
    if fd is None:
        yield
        return
    import termios  # POSIX only, as the terminal it drives
    import tty

    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def ready() -> None:
        try:
            data = os.read(fd, 256).decode("utf-8", errors="replace")
        except OSError:
            data = ""
        if not data:
            loop.remove_reader(fd)
            return
        for k in split_keys(data):
            on_key(k)

    tty.setcbreak(fd)
    loop.add_reader(fd, ready)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def watch(state: TopState, token: str | None, console: Console) -> None:
    """Follow the proxy and redraw until cancelled (Ctrl-C, q, or SIGTERM: the same clean
    exit); keys act on the proxy (:meth:`TopState.key`)."""
    main = asyncio.current_task()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    fd = sys.stdin.fileno() if console.is_terminal and sys.stdin.isatty() else None
    async with aiohttp.ClientSession(headers=headers) as http:
        follower = Follower(state, http)
        tasks = [asyncio.create_task(follower.follow()), asyncio.create_task(follower.refresher())]
        acting: set[asyncio.Task[None]] = set()

        def on_key(k: str) -> None:
            action = state.key(k)
            if action is None:
                return
            if action.kind == "quit":
                if main is not None:
                    main.cancel()
                return
            task = asyncio.create_task(follower.act(action))
            acting.add(task)
            task.add_done_callback(acting.discard)

        try:
            with (
                keys_from(fd, on_key),
                Live(
                    console=console,
                    screen=console.is_terminal,
                    refresh_per_second=4,
                    get_renderable=lambda: state.render(
                        max_rows=max(console.size.height - 8, 3), width=console.size.width
                    ),
                ),
            ):
                await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *acting]:
                task.cancel()
            await asyncio.gather(*tasks, *acting, return_exceptions=True)


def proxy_url(settings: Settings) -> str:
    return local_url(settings.host, settings.port)


def run_top(settings: Settings) -> int:
    """Show the live view until Ctrl-C; the terminal is restored and the exit code is 0."""
    state = TopState(proxy_url(settings))
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(watch(state, settings.admin_token, Console()))
    return 0
