"""Session summaries shared by the API and the command line (which reads the file directly)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from spendgate.budgets import Pressure
from spendgate.events import context_data
from spendgate.pricing import PriceTable
from spendgate.records import SessionRecord
from spendgate.store import Store


def _float(value: Decimal | float | None) -> float | None:
    return None if value is None else float(value)


def budget_json(
    budget: Decimal | None,
    spent: Decimal,
    paused: bool,
    reason: str | None,
    pressure: Pressure | None = None,
) -> dict[str, Any]:
    """The budget fields of any scope: a session, an agent, the global budget; with the
    live ledger's ``pressure``, also what holds its headroom now."""
    out = {
        "budgetUsd": _float(budget),
        "spentUsd": float(spent),
        "remainingUsd": None if budget is None else float(budget - spent),
        "paused": paused,
        "pauseReason": reason,
    }
    if pressure is not None:
        out.update(
            inFlight=pressure.in_flight,
            reservedUsd=float(pressure.reserved),
            waiting=pressure.waiting,
        )
    return out


def session_json(
    rec: SessionRecord, spent: Decimal, pressure: Pressure | None = None
) -> dict[str, Any]:
    return {
        "sessionId": rec.id,
        "createdAt": rec.created_at,
        "label": rec.label,
        **budget_json(rec.budget_usd, spent, rec.paused, rec.pause_reason, pressure),
    }


def none_priced(messages: int, unpriced: int) -> bool:
    """Is a total's cost unknown? So when it has messages and every one is unpriced."""
    return 0 < messages <= unpriced


def _total_cost(totals: dict[str, Any]) -> float | None:
    """A ``Store`` totals row's cost as the API shows it: the sum of the priced rows; null
    when :func:`none_priced` (never 0 for those); 0 when there is nothing to sum (no
    messages, or only rows without tokens)."""
    if none_priced(totals["message_count"], totals["unpriced_message_count"]):
        return None
    cost: float | None = totals["cost_usd"]
    return 0.0 if cost is None else cost


def _group(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        (r["key"] if r["key"] is not None else "unknown"): {
            "inputTokens": r["input_tokens"],
            "outputTokens": r["output_tokens"],
            "cachedInputTokens": r["cached_input_tokens"],
            "cacheWriteTokens": r["cache_write_tokens"],
            "reasoningTokens": r["reasoning_tokens"],
            "costUsd": _total_cost(r),
            "messageCount": r["message_count"],
            "unpricedMessageCount": r["unpriced_message_count"],
        }
        for r in rows
    }


async def session_summary(
    store: Store,
    prices: PriceTable,
    rec: SessionRecord,
    spent: Decimal,
    pressure: Pressure | None = None,
) -> dict[str, Any]:
    """The session cost summary (docs/reference.md §8); ``pressure`` from the live
    ledger (the API), none from the file alone (the CLI)."""
    (tot,) = await store.totals(rec.id)
    latest = await store.latest_message(rec.id)
    context = None
    if latest is not None:
        price = prices.resolve(latest.model, latest.provider) if latest.model else None
        window = price.context_window if price else None
        context = context_data(rec.id, latest.model, latest.total_tokens, window)
    summary = session_json(rec, spent, pressure)
    summary.update(
        totalInputTokens=tot["input_tokens"],
        totalOutputTokens=tot["output_tokens"],
        totalCachedInputTokens=tot["cached_input_tokens"],
        totalCacheWriteTokens=tot["cache_write_tokens"],
        totalReasoningTokens=tot["reasoning_tokens"],
        totalCostUsd=_total_cost(tot),
        messageCount=tot["message_count"],
        unpricedMessageCount=tot["unpriced_message_count"],
        byModel=_group(await store.totals(rec.id, "model")),
        byAgent=_group(await store.totals(rec.id, "agent_id")),
        context=context,
    )
    return summary


async def sessions_list(
    store: Store, spent_of: Callable[[str], Decimal] | None = None
) -> list[dict[str, Any]]:
    """Every session with its totals, newest activity first.

    ``spent_of`` is the live ledger's view; without one (the CLI) the rows' sum is used.
    """
    out = []
    for row in await store.session_totals():
        rec = SessionRecord(
            row["id"],
            row["created_at"],
            None if row["budget_usd"] is None else Decimal(repr(row["budget_usd"])),
            bool(row["paused"]),
            row["pause_reason"],
            row["label"],
        )
        summed = Decimal(repr(row["cost_usd"] or 0))
        item = session_json(rec, spent_of(rec.id) if spent_of else summed)
        item.update(
            totalCostUsd=_total_cost(row),
            messageCount=row["message_count"] or 0,
            unpricedMessageCount=row["unpriced_message_count"],
            totalInputTokens=row["input_tokens"] or 0,
            totalOutputTokens=row["output_tokens"] or 0,
            lastActivityAt=row["last_at"],
        )
        out.append(item)
    return out
