"""The context meter's levels: how full a model's context window is (docs/reference.md §7)."""

from __future__ import annotations

CONTEXT_WARNING_PERCENT = 80
CONTEXT_CRITICAL_PERCENT = 90


def context_level(tokens: int, window: int) -> str:
    """``ok``, ``warning`` or ``critical``. Exact integer comparison: 79.9999 % is ``ok``."""
    if tokens * 100 >= CONTEXT_CRITICAL_PERCENT * window:
        return "critical"
    if tokens * 100 >= CONTEXT_WARNING_PERCENT * window:
        return "warning"
    return "ok"


def percent_level(percent: float) -> str:
    """The same levels for a percentage already computed (such as an event's ``percent``,
    which is floored, so it gives the level :func:`context_level` gives)."""
    if percent >= CONTEXT_CRITICAL_PERCENT:
        return "critical"
    return "warning" if percent >= CONTEXT_WARNING_PERCENT else "ok"
