"""Shapes that cross the store seam: one message row and one session row."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any


@dataclass(slots=True)
class MessageRecord:
    """One upstream response (SPEC 4's ``token_usage`` row)."""

    id: str
    session_id: str
    agent_id: str | None
    route: str
    provider: str
    model: str | None
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

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_json(self) -> dict[str, Any]:
        """The API's camelCase view: the token.usage fields plus row metadata."""
        return {
            "messageId": self.id,
            "sessionId": self.session_id,
            "agentId": self.agent_id,
            "modelId": self.model,
            "providerId": self.provider,
            "route": self.route,
            "endpoint": self.endpoint,
            "status": self.status,
            "stream": self.stream,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "cachedInputTokens": self.cached_input_tokens,
            "cacheWriteTokens": self.cache_write_tokens,
            "reasoningTokens": self.reasoning_tokens,
            "totalTokens": self.total_tokens,
            "costUsd": None if self.cost_usd is None else float(self.cost_usd),
            "estimated": self.estimated,
            "aborted": self.aborted,
            "startedAt": self.started_at,
            "ttftMs": self.ttft_ms,
            "durationMs": self.duration_ms,
            "error": self.error,
        }

    def csv_cells(self) -> list[Any]:
        """One export row: the ``to_json`` values, with unknown (None) as an empty cell."""
        return ["" if v is None else v for v in self.to_json().values()]


EXPORT_COLUMNS = (  # the keys of MessageRecord.to_json, in order (a test checks it)
    "messageId",
    "sessionId",
    "agentId",
    "modelId",
    "providerId",
    "route",
    "endpoint",
    "status",
    "stream",
    "inputTokens",
    "outputTokens",
    "cachedInputTokens",
    "cacheWriteTokens",
    "reasoningTokens",
    "totalTokens",
    "costUsd",
    "estimated",
    "aborted",
    "startedAt",
    "ttftMs",
    "durationMs",
    "error",
)


@dataclass(slots=True)
class SessionRecord:
    id: str
    created_at: float
    budget_usd: Decimal | None = None
    paused: bool = False
    pause_reason: str | None = None
    label: str | None = None
