"""Live event shapes (docs/reference.md §7).

Data keys are camelCase: they go out as JSON as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

from spendgate.context import context_level
from spendgate.pricing import UNPRICED, Charge
from spendgate.usage import NO_EXTRAS, TokenCounts

TOKEN_USAGE = "token.usage"
CONTEXT_USAGE = "context.usage"
BUDGET_WARNING = "budget.warning"
BUDGET_PAUSED = "budget.paused"
BUDGET_RESUMED = "budget.resumed"
BUDGET_UNENFORCEABLE = "budget.unenforceable"
SESSION_LABEL = "session.label"
EVENT_TYPES = (
    TOKEN_USAGE,
    CONTEXT_USAGE,
    BUDGET_WARNING,
    BUDGET_PAUSED,
    BUDGET_RESUMED,
    BUDGET_UNENFORCEABLE,
    SESSION_LABEL,
)
GLOBAL_SESSION = ""
"""The ``session_id`` of an event about no one session (the global budget): every
subscriber gets it, whatever sessions it filters on."""


class Event:
    """One live event. Its ``data`` may be given, or made on first use by ``make``: most
    events are only kept for replay and never read, so their payload is never built."""

    __slots__ = ("_data", "_make", "id", "session_id", "type", "wire")

    def __init__(
        self,
        type: str,
        session_id: str,
        data: dict[str, Any] | None = None,
        make: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if (data is None) == (make is None):
            raise TypeError("an Event needs exactly one of data and make")
        self.type = type
        self.session_id = session_id
        self._data = data
        self._make = make
        self.id = 0
        """Assigned by the bus on publish; increases across restarts."""
        self.wire: bytes | None = None
        """The SSE encoding, made once however many subscribers receive it."""

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            assert self._make is not None
            self._data, self._make = self._make(), None
        return self._data

    def encoded(self) -> bytes:
        if self.wire is None:
            self.wire = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.id,
                self.type.encode(),
                orjson.dumps(self.data),
            )
        return self.wire

    def __repr__(self) -> str:
        return f"Event({self.type!r}, {self.session_id!r}, id={self.id})"


def token_usage_data(
    *,
    message_id: str,
    session_id: str,
    agent_id: str | None,
    provider: str,
    model: str | None,
    counts: TokenCounts,
    cost: Decimal | None,
    session_cost: Decimal,
    final: bool,
    estimated: bool,
    timestamp: float,
    transport: str = "http",
    billed: Charge | None = None,
) -> dict[str, Any]:
    """A ``token.usage`` payload (docs/reference.md §7), from the values at the time of
    the event: ``final`` False for the throttled live updates of a running stream (no
    ``billed``: how it was priced is known at the end)."""
    extras = counts.extras or NO_EXTRAS
    billed = billed or UNPRICED
    return {
        "messageId": message_id,
        "sessionId": session_id,
        "agentId": agent_id,
        "inputTokens": counts.input_tokens,
        "outputTokens": counts.output_tokens,
        "cachedInputTokens": counts.cached_input_tokens,
        "cacheWriteTokens": counts.cache_write_tokens,
        "reasoningTokens": counts.reasoning_tokens,
        "totalTokens": counts.total_tokens,
        "costUsd": None if cost is None else float(cost),
        "sessionCostUsd": float(session_cost),
        "modelId": model,
        "providerId": provider,
        "final": final,
        "estimated": estimated,
        "timestamp": timestamp,
        "transport": transport,
        "serviceTier": extras.service_tier,
        "inputAudioTokens": extras.input_audio_tokens,
        "inputImageTokens": extras.input_image_tokens,
        "outputAudioTokens": extras.output_audio_tokens,
        "outputImageTokens": extras.output_image_tokens,
        "toolCostUsd": None if billed.tools is None else float(billed.tools),
        "tableCostUsd": None if billed.table is None else float(billed.table),
        "pricedAs": billed.priced_as,
        "priceSource": billed.price_source,
    }


def budget_event(
    type_: str,
    scope: str,
    session_id: str | None,
    budget: float | None,
    spent: float,
    *,
    agent_id: str | None = None,
    period: str | None = None,
    **extra: Any,
) -> Event:
    """A budget event of one scope: ``agentId`` on agent budgets, ``period`` on the
    global one, whose ``sessionId`` is null."""
    data: dict[str, Any] = {"scope": scope, "sessionId": session_id}
    if agent_id is not None:
        data["agentId"] = agent_id
    if scope == "global":
        data["period"] = period
    data.update(budgetUsd=budget, spentUsd=spent, **extra)
    return Event(type_, session_id or GLOBAL_SESSION, data)


def session_label_event(session_id: str, label: str | None) -> Event:
    """A session's label was set or cleared (docs/reference.md §7)."""
    return Event(SESSION_LABEL, session_id, {"sessionId": session_id, "label": label})


def context_data(
    session_id: str, model: str | None, tokens: int, window: int | None
) -> dict[str, Any]:
    """The context meter: the latest message's size against the model's window."""
    if not window:
        return {
            "sessionId": session_id,
            "modelId": model,
            "contextTokens": tokens,
            "contextWindow": None,
            "percent": None,
            "remainingTokens": None,
            "level": "unknown",
        }
    percent = (tokens * 10_000 // window) / 100  # floored, so it never overstates the level
    return {
        "sessionId": session_id,
        "modelId": model,
        "contextTokens": tokens,
        "contextWindow": window,
        "percent": percent,
        "remainingTokens": max(0, window - tokens),
        "level": context_level(tokens, window),
    }
