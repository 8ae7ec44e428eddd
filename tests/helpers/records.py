"""Records built by hand, for tests that feed a component without a proxy."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from spendgate.records import MessageRecord


def message(**kw: Any) -> MessageRecord:
    values: dict[str, Any] = {
        "id": "msg_1",
        "session_id": "run-1",
        "agent_id": None,
        "route": "openai",
        "provider": "openai",
        "model": "gpt-4o-2024-08-06",
        "endpoint": "chat",
        "status": 200,
        "stream": True,
        "input_tokens": 1200,
        "output_tokens": 300,
        "cached_input_tokens": 1024,
        "cache_write_tokens": 0,
        "reasoning_tokens": 64,
        "cost_usd": Decimal("0.00030735"),
        "estimated": False,
        "aborted": False,
        "started_at": 0.0,
        "ttft_ms": 250.0,
        "duration_ms": 1500.0,
    }
    values.update(kw)
    return MessageRecord(**values)
