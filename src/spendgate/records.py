"""Shapes that cross the store seam: one message row and one session row.

A message row's outside shape is defined once, by :data:`COLUMNS`: each column names the
:class:`MessageRecord` attribute, its key in the API's JSON and the CSV export, its
``token_usage`` column, and its kind (how it is encoded for JSON and SQL). The JSON keys,
the CSV header (:data:`EXPORT_COLUMNS`) and the store's INSERT and SELECT lists are all
derived from it. Adding a column: a field on :class:`MessageRecord`, a line in
``COLUMNS``, and a migration in :mod:`spendgate.store` (an import-time check keeps the
first two in step).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal
from operator import attrgetter
from typing import Any, NamedTuple

from spendgate.timespec import iso

VALUE = "value"
"""Stored and shown as it is (text, integer, real, or None)."""
FLAG = "flag"
"""A bool: JSON true/false, an INTEGER 0/1 in SQL (read back as a bool)."""
MONEY = "money"
"""A ``Decimal`` or None: a float in JSON, REAL in SQL (read back exactly via ``repr``)."""
TIME = "time"
"""A Unix time (REAL in SQL): a number in the API's JSON, ISO-8601 UTC in exports."""


class Column(NamedTuple):
    attr: str
    """The :class:`MessageRecord` attribute (a field, or a property when ``derived``)."""
    key: str | None
    """Its JSON / CSV key; None: stored but not exported."""
    sql: str
    """Its ``token_usage`` column."""
    kind: str = VALUE
    derived: bool = False
    """Computed from other fields: written and exported, never read back."""


def _col(attr: str, key: str | None, kind: str = VALUE, derived: bool = False) -> Column:
    return Column(attr, key, attr, kind, derived)  # the SQL column is named as the attribute


@dataclass(slots=True)
class MessageRecord:
    """One upstream response (the message row, docs/reference.md §5).

    The fields are in the order of :data:`COLUMNS` (less the derived ones); build it by
    keyword.
    """

    id: str
    session_id: str
    agent_id: str | None
    model: str | None
    provider: str
    route: str
    endpoint: str
    status: int
    stream: bool
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal | None
    estimated: bool
    aborted: bool
    started_at: float
    ttft_ms: float | None
    duration_ms: float
    key_fingerprint: str | None = None
    error: str | None = None
    note: str | None = None
    """Why the numbers are what they are, when that is not plain: the reason a row is
    estimated, or what was adjusted (docs/reference.md §5)."""
    transport: str = "http"
    """How the request came: ``http``, or ``websocket`` (one ``response.create`` on a
    Responses API WebSocket, docs/reference.md §1 "WebSocket")."""
    service_tier: str | None = None
    """The service tier the response states (``flex``, ``priority``, ``standard``...)."""
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    """Audio and image parts of the input and output tokens, priced at their own rates."""
    tool_cost_usd: Decimal | None = None
    """The per-call tool fees in the table's figure (web search, file search...)."""
    table_cost_usd: Decimal | None = None
    """The price table's figure, tool fees included: ``cost_usd`` too unless the
    provider reported its own cost."""
    priced_as: str | None = None
    """The price entry that priced the row (docs/reference.md §4 "How it was priced")."""
    price_source: str | None = None
    """``bundled 2026-11-22``, ``update …``, ``overrides …``, ``file …``, ``local`` or
    ``provider`` (the provider's reported cost is ``cost_usd``)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_json(self) -> dict[str, Any]:
        """The API's camelCase view: the token.usage fields plus row metadata."""
        out = dict(zip(EXPORT_COLUMNS, _export_values(self), strict=True))
        for key in _EXPORT_MONEY:
            value = out[key]
            if value is not None:
                out[key] = float(value)
        return out

    def export_json(self, session_label: str | None = None) -> dict[str, Any]:
        """One row of an export (docs/reference.md §5): ``to_json`` with its times as
        ISO-8601 UTC (``2026-12-01T13:05:09.250Z``) rather than Unix seconds, then the
        session's label (:data:`EXPORT_HEADER`)."""
        out = self.to_json()
        for key in _EXPORT_TIMES:
            out[key] = iso(out[key])
        out[SESSION_LABEL_KEY] = session_label
        return out

    def csv_cells(self, session_label: str | None = None) -> list[Any]:
        """One CSV export row: the ``export_json`` values, unknown (None) as an empty cell."""
        return ["" if v is None else v for v in self.export_json(session_label).values()]


COLUMNS: tuple[Column, ...] = (
    _col("id", "messageId"),
    _col("session_id", "sessionId"),
    _col("agent_id", "agentId"),
    _col("model", "modelId"),
    _col("provider", "providerId"),
    _col("route", "route"),
    _col("endpoint", "endpoint"),
    _col("status", "status"),
    _col("stream", "stream", FLAG),
    _col("input_tokens", "inputTokens"),
    _col("output_tokens", "outputTokens"),
    _col("cached_input_tokens", "cachedInputTokens"),
    _col("cache_write_tokens", "cacheWriteTokens"),
    _col("reasoning_tokens", "reasoningTokens"),
    _col("total_tokens", "totalTokens", derived=True),
    _col("cost_usd", "costUsd", MONEY),
    _col("estimated", "estimated", FLAG),
    _col("aborted", "aborted", FLAG),
    _col("started_at", "startedAt", TIME),
    _col("ttft_ms", "ttftMs"),
    _col("duration_ms", "durationMs"),
    _col("key_fingerprint", None),
    _col("error", "error"),
    _col("note", "note"),
    _col("transport", "transport"),
    _col("service_tier", "serviceTier"),
    _col("input_audio_tokens", "inputAudioTokens"),
    _col("input_image_tokens", "inputImageTokens"),
    _col("output_audio_tokens", "outputAudioTokens"),
    _col("output_image_tokens", "outputImageTokens"),
    _col("tool_cost_usd", "toolCostUsd", MONEY),
    _col("table_cost_usd", "tableCostUsd", MONEY),
    _col("priced_as", "pricedAs"),
    _col("price_source", "priceSource"),
)
"""Every column of a message row, in JSON / CSV order."""

STORED_FIELDS = tuple(c for c in COLUMNS if not c.derived)
"""The columns read back into a :class:`MessageRecord`, in its fields' order."""
if tuple(f.name for f in fields(MessageRecord)) != tuple(c.attr for c in STORED_FIELDS):
    raise TypeError("MessageRecord's fields and records.COLUMNS disagree")

_EXPORTED = tuple(c for c in COLUMNS if c.key is not None)
EXPORT_COLUMNS: tuple[str, ...] = tuple(c.key for c in _EXPORTED if c.key is not None)
"""The keys of :meth:`MessageRecord.to_json`, in order: the CSV export's header."""
SESSION_LABEL_KEY = "sessionLabel"
EXPORT_HEADER: tuple[str, ...] = (*EXPORT_COLUMNS, SESSION_LABEL_KEY)
"""An export row's keys: the message's (:data:`EXPORT_COLUMNS`), then its session's label
(the row holds no label: a session's can change, so the export adds the current one)."""
_export_values = attrgetter(*(c.attr for c in _EXPORTED))
_EXPORT_TIMES = tuple(c.key for c in _EXPORTED if c.kind == TIME and c.key is not None)
_EXPORT_MONEY = tuple(c.key for c in _EXPORTED if c.kind == MONEY and c.key is not None)


@dataclass(slots=True)
class SessionRecord:
    id: str
    created_at: float
    budget_usd: Decimal | None = None
    paused: bool = False
    pause_reason: str | None = None
    label: str | None = None


@dataclass(slots=True)
class AgentBudgetRecord:
    """An agent's budget inside a session (docs/reference.md §6)."""

    session_id: str
    agent_id: str
    budget_usd: Decimal | None = None
    paused: bool = False
    pause_reason: str | None = None


@dataclass(slots=True)
class GlobalBudgetRecord:
    """The budget across all sessions (docs/reference.md §6).

    ``configured`` is ``SPENDGATE_GLOBAL_BUDGET_USD`` as it was when this budget was
    saved: a budget set through the API outlives a restart, until the setting changes.
    """

    budget_usd: Decimal | None = None
    paused: bool = False
    pause_reason: str | None = None
    configured: Decimal | None = None


class Pruned(NamedTuple):
    """What removing old sessions removed (or, in a dry run, would remove)
    (docs/reference.md §5 "Removing old sessions")."""

    sessions: list[str]
    """Their ids, sorted."""
    messages: int
    """Their message rows."""
    period_spend: Decimal
    """What their rows started at or after the given period start cost (all of it
    without one): the global budget's spend that goes with them."""
    kept: list[str]
    """Sessions old enough but asked to be kept (requests in flight), sorted."""
