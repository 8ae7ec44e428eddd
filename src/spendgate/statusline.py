"""The one-line status: ``spendgate statusline`` (the command Claude Code's ``statusLine``
setting runs after each assistant message, with the session's JSON on stdin) and
``spendgate status`` (shells, tmux, scripts). Installing it in Claude Code's settings is
:mod:`spendgate.claude_settings`.

A line is built from the running proxy's API (``/api/sessions/{id}/cost``, ``/api/budget``,
``/api/sessions``) within :data:`TIMEOUT_S`. What cannot be read becomes a short dim line:
``statusline`` always exits 0, since a non-zero exit blanks Claude Code's line.

Imports stay light (no aiohttp, no asyncio loop): Claude Code runs this every few hundred
milliseconds.
"""

from __future__ import annotations

import http.client
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import orjson

from spendgate.address import local_url
from spendgate.context import (
    CONTEXT_CRITICAL_PERCENT,
    CONTEXT_WARNING_PERCENT,
    context_level,
    percent_level,
)
from spendgate.render import budget_usd, total_usd, usd

if TYPE_CHECKING:
    from spendgate.settings import Settings

TIMEOUT_S = 0.3
"""Everything the proxy is asked, in all: Claude Code refreshes at most every 300 ms."""
STDIN_TIMEOUT_S = 0.3
"""The longest wait for Claude Code's JSON on stdin (it writes it at once and closes)."""
THEN_TIMEOUT_S = 5.0
"""The longest a chained status line command (``--then``) may take."""
FIELDS = ("cost", "budget", "percent", "context", "agents", "model", "state", "session")
"""The ``--format`` template's fields."""

# -- Claude Code's input ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentInput:
    """What a ``statusLine`` command is told on stdin; every field may be missing."""

    session_id: str | None = None
    model: str | None = None
    context_tokens: int | None = None
    context_window: int | None = None


def _count(value: Any) -> int | None:
    """A non-negative whole number from JSON, else None (booleans are not numbers)."""
    number = _number(value)
    return None if number is None or number < 0 else int(number)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_input(raw: bytes) -> AgentInput:
    """Claude Code's JSON (``session_id``, ``model``, ``context_window``...), read
    defensively: a missing or odd field is None, other fields are ignored, and anything
    that is not a JSON object gives an empty input."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return AgentInput()
    if not isinstance(data, dict):
        return AgentInput()
    model = _dict(data.get("model"))
    ctx = _dict(data.get("context_window"))
    window = _count(ctx.get("context_window_size")) or None
    usage = _dict(ctx.get("current_usage"))
    parts = [
        _count(usage.get(k))
        for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    ]
    tokens: int | None = sum(p or 0 for p in parts) if any(p is not None for p in parts) else None
    percent = _number(ctx.get("used_percentage"))
    if tokens is None and window and percent is not None and 0 <= percent <= 100:
        tokens = round(window * percent / 100)
    return AgentInput(
        session_id=_text(data.get("session_id")),
        model=_text(model.get("display_name")) or _text(model.get("id")),
        context_tokens=tokens,
        context_window=window,
    )


def read_stdin(timeout: float = STDIN_TIMEOUT_S) -> bytes:
    """All of stdin, or what came within ``timeout``; nothing from a terminal."""
    stream = sys.stdin
    if stream is None:
        return b""
    try:
        if stream.isatty():
            return b""
        binary = getattr(stream, "buffer", None)
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            fd = None  # not a real file (a test's stream): read it as it is
        if fd is None or sys.platform == "win32":
            data = binary.read() if binary is not None else stream.read()
            return data if isinstance(data, bytes) else data.encode()
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except (OSError, ValueError, UnicodeError):
        return b""


# -- levels and figures ------------------------------------------------------------------------


def budget_bands(thresholds: Sequence[float]) -> tuple[Decimal, Decimal]:
    """The budget fractions where the line turns amber and red: the first configured
    warning threshold at the context meter's warning level or above, and the first at its
    critical level or above (``0.8`` and ``0.9`` with the default ``0.5,0.8,0.9``); the
    context meter's own levels where no threshold reaches them."""
    ordered = sorted(thresholds)
    warning = next(
        (t for t in ordered if percent_level(t * 100) != "ok"), CONTEXT_WARNING_PERCENT / 100
    )
    critical = next(
        (t for t in ordered if percent_level(t * 100) == "critical"),
        CONTEXT_CRITICAL_PERCENT / 100,
    )
    return Decimal(repr(warning)), Decimal(repr(max(warning, critical)))


def budget_level(spent: float, budget: float, thresholds: Sequence[float]) -> str:
    """``ok``, ``warning`` or ``critical`` for ``spent`` of ``budget`` (exact decimals)."""
    warning, critical = budget_bands(thresholds)
    s, b = Decimal(repr(spent)), Decimal(repr(budget))
    if b <= 0 or s >= b * critical:
        return "critical"
    return "warning" if s >= b * warning else "ok"


def budget_percent(spent: float, budget: float) -> int:
    """Whole percent of the budget spent, floored (so it never overstates); 100 for $0."""
    if budget <= 0:
        return 100
    return int(Decimal(repr(spent)) * 100 // Decimal(repr(budget)))


def tokens_text(n: int) -> str:
    """``950``, ``61k``, ``1.2M``: a token count at a glance (floored)."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n // 1000}k"
    return f"{n // 100_000 / 10:g}M"


# -- colours -----------------------------------------------------------------------------------

STYLES = {
    "dim": ("2", "dim"),
    "ok": ("32", "fg=green"),
    "warning": ("33", "fg=yellow"),
    "critical": ("1;31", "fg=red,bold"),
    "paused": ("1;97;41", "fg=brightwhite,bg=red,bold"),
}
"""A style's ANSI SGR code and tmux style; the amber of a warning is the terminal's yellow."""
COLOR_MODES = ("auto", "always", "never", "tmux")


class Paint:
    """Styles text as ANSI escapes (``ansi``), tmux ``#[...]`` styles (``tmux``) or not at
    all (``none``); in tmux mode a ``#`` in the text is doubled."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @classmethod
    def choose(cls, color: str | None, terminal: bool) -> Paint:
        """``--color``; by default ANSI for Claude Code (``terminal`` True) or a terminal,
        none for a pipe; ``NO_COLOR`` turns the default off."""
        if color == "tmux":
            return cls("tmux")
        if color == "always":
            return cls("ansi")
        if color == "never" or os.environ.get("NO_COLOR"):
            return cls("none")
        return cls("ansi" if terminal else "none")

    def text(self, text: str) -> str:
        return text.replace("#", "##") if self.mode == "tmux" else text

    def __call__(self, text: str, style: str | None) -> str:
        text = self.text(text)
        if style is None or not text or self.mode == "none":
            return text
        ansi, tmux = STYLES[style]
        if self.mode == "tmux":
            return f"#[{tmux}]{text}#[default]"
        return f"\x1b[{ansi}m{text}\x1b[0m"


# -- the status --------------------------------------------------------------------------------


@dataclass(slots=True)
class Budget:
    scope: str
    """``session`` or ``global``: the budget the line shows."""
    budget_usd: float
    spent_usd: float
    level: str
    percent: int
    period: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "budgetUsd": self.budget_usd,
            "spentUsd": self.spent_usd,
            "percent": self.percent,
            "level": self.level,
            "period": self.period,
        }


@dataclass(slots=True)
class Context:
    tokens: int
    window: int | None
    level: str
    """``ok``, ``warning``, ``critical``, or ``unknown`` without a window."""
    source: str
    """``spendgate`` (the proxy's context meter) or ``claude-code`` (its stdin)."""

    @property
    def percent(self) -> int | None:
        return None if not self.window else self.tokens * 100 // self.window

    def text(self) -> str:
        if not self.window:
            return tokens_text(self.tokens)
        return f"{tokens_text(self.tokens)}/{tokens_text(self.window)} {self.percent}%"

    def to_json(self) -> dict[str, Any]:
        return {
            "contextTokens": self.tokens,
            "contextWindow": self.window,
            "percent": self.percent,
            "level": self.level,
            "source": self.source,
        }


@dataclass(slots=True)
class Status:
    """What one line says about a session, or about the global budget (``scope``)."""

    scope: str
    session_id: str | None
    cost_usd: float | None
    messages: int = 0
    unpriced: int = 0
    budget: Budget | None = None
    context: Context | None = None
    agents: int = 0
    """Agents with messages (the session's main thread, no agent id, is one of them)."""
    model: str | None = None
    paused: bool = False
    pause_reason: str | None = None
    global_paused: bool = False
    global_pause_reason: str | None = None
    paused_agents: list[str] = field(default_factory=list)
    waiting: int = 0
    """Requests waiting for headroom that in-flight reservations hold (any scope)."""
    show_id: bool = False
    """Name the session on the line (``status``; Claude Code knows its own)."""

    def markers(self) -> list[str]:
        out = []
        if self.paused:
            out.append(f"PAUSED ({self.pause_reason or 'manual'})")
        if self.global_paused:
            out.append(f"GLOBAL PAUSED ({self.global_pause_reason or 'manual'})")
        if self.paused_agents:
            out.append(f"PAUSED agent {', '.join(self.paused_agents)}")
        if self.waiting:
            out.append(f"WAITING ({self.waiting})")
        return out

    def cost_text(self) -> str:
        if self.scope == "global":
            return usd(self.cost_usd)
        return total_usd(self.cost_usd, self.messages, self.unpriced)

    def fields(self, paint: Paint) -> dict[str, str]:
        """The ``--format`` fields, styled (percent, context and state carry colours)."""
        b, c = self.budget, self.context
        budget = budget_usd(None if b is None else b.budget_usd)
        if b is not None and b.scope == "global" and self.scope != "global":
            budget = f"global {budget}"
        return {
            "cost": paint.text(self.cost_text()),
            "budget": paint.text(budget),
            "percent": "" if b is None else paint(f"{b.percent}%", b.level),
            "context": "" if c is None else paint(c.text(), _context_style(c)),
            "agents": str(self.agents),
            "model": paint.text(self.model or ""),
            "state": paint(" ".join(self.markers()), "paused"),
            "session": paint.text(self.session_id or ""),
        }

    def line(self, paint: Paint) -> str:
        """``spendgate $0.42 / $5.00 (8%) · ctx 61k/200k 30% · 3 agents · PAUSED (budget)``."""
        head = "spendgate"
        if self.scope == "global":
            head += " global"
        elif self.show_id and self.session_id:
            head += " " + self.session_id
        parts = [paint.text(head) + " " + paint.text(self.cost_text())]
        b = self.budget
        if b is not None:
            figures = f"{usd(b.budget_usd)} ({b.percent}%)"
            if b.scope == "session" or self.scope == "global":
                parts[0] = paint(f"{head} {self.cost_text()} / {figures}", b.level)
            else:
                parts.append(paint(f"global {usd(b.spent_usd)} / {figures}", b.level))
            if b.period and b.period != "total":
                parts.append(paint.text(b.period))
        if self.context is not None:
            parts.append(paint("ctx " + self.context.text(), _context_style(self.context)))
        if self.agents > 1:
            parts.append(f"{self.agents} agents")
        parts.extend(paint(m, "paused") for m in self.markers())
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "scope": self.scope,
            "sessionId": self.session_id,
            "costUsd": self.cost_usd,
            "cost": self.cost_text(),
            "messageCount": self.messages,
            "unpricedMessageCount": self.unpriced,
            "budget": None if self.budget is None else self.budget.to_json(),
            "context": None if self.context is None else self.context.to_json(),
            "agents": self.agents,
            "model": self.model,
            "paused": self.paused,
            "pauseReason": self.pause_reason,
            "globalPaused": self.global_paused,
            "globalPauseReason": self.global_pause_reason,
            "pausedAgents": self.paused_agents,
            "waiting": self.waiting,
            "state": " ".join(self.markers()),
            "line": self.line(Paint("none")),
        }


def _context_style(c: Context) -> str:
    return "dim" if c.level == "unknown" else c.level


def _budget(data: dict[str, Any], scope: str, thresholds: Sequence[float]) -> Budget | None:
    """A budget from an API object with ``budgetUsd``/``spentUsd`` (None when unlimited)."""
    budget = _number(data.get("budgetUsd"))
    if budget is None:
        return None
    spent = _number(data.get("spentUsd")) or 0.0
    period = _text(data.get("periodLabel")) if scope == "global" else None
    return Budget(
        scope,
        budget,
        spent,
        budget_level(spent, budget, thresholds),
        budget_percent(spent, budget),
        period,
    )


def _context(meter: dict[str, Any], given: AgentInput) -> Context | None:
    """The proxy's context meter, with Claude Code's window where the proxy knows none;
    Claude Code's own figures when the proxy has measured nothing."""
    tokens = _count(meter.get("contextTokens"))
    window = _count(meter.get("contextWindow")) or None
    source = "spendgate"
    if tokens is None:
        tokens, window, source = given.context_tokens, given.context_window, "claude-code"
        if tokens is None:
            return None
    elif window is None:
        window = given.context_window
    level = _text(meter.get("level")) if source == "spendgate" and window else None
    if level not in ("ok", "warning", "critical"):
        level = context_level(tokens, window) if window else "unknown"
    return Context(tokens, window, level, source)


def session_status(
    summary: dict[str, Any],
    global_budget: dict[str, Any] | None,
    thresholds: Sequence[float],
    given: AgentInput = AgentInput(),
) -> Status:
    """A session's line from its ``/api/sessions/{id}/cost`` summary and ``/api/budget``."""
    glob = global_budget or {}
    agents = {k: _dict(v) for k, v in _dict(summary.get("byAgent")).items()}
    meter = _dict(summary.get("context"))
    return Status(
        scope="session",
        session_id=_text(summary.get("sessionId")),
        cost_usd=_number(summary.get("spentUsd")),
        messages=_count(summary.get("messageCount")) or 0,
        unpriced=_count(summary.get("unpricedMessageCount")) or 0,
        budget=_budget(summary, "session", thresholds) or _budget(glob, "global", thresholds),
        context=_context(meter, given),
        agents=sum(1 for a in agents.values() if (_count(a.get("messageCount")) or 0) > 0),
        model=given.model or _text(meter.get("modelId")),
        paused=summary.get("paused") is True,
        pause_reason=_text(summary.get("pauseReason")),
        global_paused=glob.get("paused") is True,
        global_pause_reason=_text(glob.get("pauseReason")),
        paused_agents=sorted(k for k, a in agents.items() if a.get("paused") is True),
        waiting=_waiting(summary, glob, *agents.values()),
    )


def _waiting(*scopes: dict[str, Any]) -> int:
    """Requests queued for headroom in any of these API objects (``waiting``)."""
    return sum(_count(s.get("waiting")) or 0 for s in scopes if isinstance(s, dict))


def global_status(global_budget: dict[str, Any], thresholds: Sequence[float]) -> Status:
    """The global budget's line (``status`` without a session, when a global budget is set)."""
    return Status(
        scope="global",
        session_id=None,
        cost_usd=_number(global_budget.get("spentUsd")) or 0.0,
        budget=_budget(global_budget, "global", thresholds),
        global_paused=global_budget.get("paused") is True,
        global_pause_reason=_text(global_budget.get("pauseReason")),
        waiting=_waiting(global_budget),
    )


# -- asking the proxy --------------------------------------------------------------------------


class Unavailable(Exception):
    """The proxy could not say (down, slow, refused the token); the text says which."""


class Api:
    """GETs on the proxy's API over one keep-alive connection, all within one deadline."""

    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT_S) -> None:
        self.url = url
        self.headers = {"Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.deadline = time.monotonic() + timeout
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> Any:
        """The decoded JSON, or None for a 404/400 (unknown or invalid id)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"no answer at {self.url}")
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(urlsplit(self.url).netloc, timeout=left)
            elif self.conn.sock is not None:
                self.conn.sock.settimeout(left)
            self.conn.request("GET", path, headers=self.headers)
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            kind = "no answer" if isinstance(exc, TimeoutError) else "no proxy"
            raise Unavailable(f"{kind} at {self.url}") from None
        if resp.status in (400, 404):
            return None
        if resp.status == 401:
            raise Unavailable("the proxy wants its admin token (SPENDGATE_ADMIN_TOKEN)")
        if resp.status != 200:
            raise Unavailable(f"the proxy at {self.url} answered {resp.status}")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Unavailable(f"{self.url} does not answer like spendgate") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _global(api: Api) -> dict[str, Any] | None:
    data = api.get("/api/budget")
    return data if isinstance(data, dict) else None


def _summary(api: Api, session_id: str) -> dict[str, Any] | None:
    data = api.get(f"/api/sessions/{quote(session_id, safe='')}/cost")
    return data if isinstance(data, dict) else None


def fetch_session(
    api: Api, session_id: str, thresholds: Sequence[float], given: AgentInput = AgentInput()
) -> Status | None:
    """The session's status, or None when the proxy does not know it."""
    summary = _summary(api, session_id)
    if summary is None:
        return None
    return session_status(summary, _global(api), thresholds, given)


def fetch_latest(api: Api, thresholds: Sequence[float]) -> Status | None:
    """The global budget's status when one is set, else the most recently active session's;
    None when there is neither."""
    glob = _global(api)
    if glob is not None and (glob.get("budgetUsd") is not None or glob.get("paused") is True):
        return global_status(glob, thresholds)
    listing = _dict(api.get("/api/sessions")).get("sessions")
    rows = [r for r in listing if isinstance(r, dict)] if isinstance(listing, list) else []
    sid = _text(rows[0].get("sessionId")) if rows else None
    summary = None if sid is None else _summary(api, sid)
    return None if summary is None else session_status(summary, glob, thresholds)


# -- the commands ------------------------------------------------------------------------------


class TemplateError(ValueError):
    pass


def apply_template(template: str, fields: dict[str, str]) -> str:
    """``--format``: ``str.format`` with the :data:`FIELDS`; a bad one is a TemplateError."""
    try:
        return template.format_map(fields)
    except KeyError as exc:
        raise TemplateError(f"no field {exc} in --format (fields: {', '.join(FIELDS)})") from None
    except (IndexError, ValueError, AttributeError, TypeError) as exc:
        raise TemplateError(f"bad --format: {exc}") from None


def _emit(text: str) -> None:
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except UnicodeEncodeError:
        sys.stdout.write(text.encode("ascii", "replace").decode() + "\n")
    except (BrokenPipeError, ValueError):
        pass  # Claude Code moved on to a newer line


def _line(status: Status, paint: Paint, template: str | None) -> str:
    if template is None:
        return status.line(paint)
    return apply_template(template, status.fields(paint))


class Chained:
    """A status line command that was there before spendgate's (``--then``): it runs in
    the background with the same stdin while the proxy is asked."""

    def __init__(self, command: str, stdin: bytes) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._run, args=(command, stdin), daemon=True)
        self.thread.start()

    def _run(self, command: str, stdin: bytes) -> None:
        try:
            done = subprocess.run(
                command, shell=True, input=stdin, capture_output=True, timeout=THEN_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError):
            return
        self.lines = done.stdout.decode("utf-8", "replace").splitlines()

    def join(self, ours: str) -> list[str]:
        """Its first line, then ours, on one line; its other lines after."""
        self.thread.join(THEN_TIMEOUT_S)
        lines = [line.rstrip("\r") for line in self.lines]
        if not lines or not lines[0].strip():
            return [ours, *lines[1:]]
        return [f"{lines[0]} │ {ours}", *lines[1:]]


def statusline(
    load: Callable[[], Settings],
    session: str | None = None,
    template: str | None = None,
    color: str | None = None,
    then: str | None = None,
) -> int:
    """``spendgate statusline``: one line for Claude Code. Always 0, never a traceback."""
    paint = Paint.choose(color, terminal=True)
    chained: Chained | None = None
    try:
        raw = read_stdin()
        chained = Chained(then, raw) if then else None
        line = _statusline(load, parse_input(raw), session, template, paint)
    except Exception:  # anything at all: a line, never a traceback, exit 0
        line = paint("spendgate · status unavailable", "dim")
    for text in chained.join(line) if chained else [line]:
        _emit(text)
    return 0


def _statusline(
    load: Callable[[], Settings],
    given: AgentInput,
    session: str | None,
    template: str | None,
    paint: Paint,
) -> str:
    from spendgate.settings import SettingsError

    try:
        settings = load()
    except SettingsError:
        return paint("spendgate · bad settings (`spendgate status` says which)", "dim")
    sid = session or given.session_id
    if sid is None:
        return paint("spendgate · no session id (pass --session ID)", "dim")
    api = Api(local_url(settings.host, settings.port), settings.admin_token)
    try:
        status = fetch_session(api, sid, settings.budget_thresholds, given)
    except Unavailable as exc:
        return paint(f"spendgate · {exc}", "dim")
    finally:
        api.close()
    if status is None:
        return paint("spendgate · no traffic from this session yet", "dim")
    try:
        return _line(status, paint, template)
    except TemplateError as exc:
        return paint(f"spendgate · {exc}", "dim")


def status(
    settings: Settings,
    session: str | None = None,
    as_json: bool = False,
    template: str | None = None,
    color: str | None = None,
) -> int:
    """``spendgate status``: the same line for shells and tmux, or JSON. Exit 1 when it
    cannot say (proxy down, unknown session, bad template); no sessions at all is 0."""
    paint = Paint.choose(color, terminal=sys.stdout.isatty())
    api = Api(local_url(settings.host, settings.port), settings.admin_token)
    thresholds = settings.budget_thresholds
    try:
        if session is not None:
            found = fetch_session(api, session, thresholds)
            problem, code = f"unknown session {session!r}", 1
        else:
            found = fetch_latest(api, thresholds)
            problem, code = "no sessions yet", 0
    except Unavailable as exc:
        found, problem, code = None, str(exc), 1
    finally:
        api.close()
    if found is not None:
        found.show_id = True
        try:
            text = orjson.dumps(found.to_json()).decode() if as_json else None
            _emit(text or _line(found, paint, template))
            return 0
        except TemplateError as exc:
            problem, code = str(exc), 1
    if as_json:
        _emit(orjson.dumps({"ok": False, "error": problem}).decode())
    else:
        _emit(paint(f"spendgate · {problem}", "dim"))
    return code
