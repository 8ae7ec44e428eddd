"""Session summaries shared by the API and the command line (which reads the file directly)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from decimal import Decimal
from typing import Any

from spendgate.budgets import Pressure
from spendgate.events import context_data
from spendgate.pricing import ModelPrice, PriceTable
from spendgate.records import SessionRecord
from spendgate.store import Store
from spendgate.timespec import TimeSpecError, iso, iso_bound, parse


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
    cost = totals["cost_usd"]
    return 0.0 if cost is None else float(cost)


def _decimal(value: Decimal | float | None) -> Decimal | None:
    """A store's money as a ``Decimal``: PostgreSQL's NUMERIC is one already; SQLite's
    REAL reads back exactly through ``repr`` (docs/reference.md §5)."""
    if value is None or isinstance(value, Decimal):
        return value
    return Decimal(repr(value))


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


SESSION_TIMES = ("createdAt", "lastActivityAt")
"""The Unix times of a session's JSON (the API's); exports show them as ISO-8601 UTC."""


def exported(session: dict[str, Any]) -> dict[str, Any]:
    """A session's JSON as the command line's ``--format json`` writes it: its times as
    ISO-8601 UTC (docs/reference.md §11), as the message exports show theirs."""
    return {k: iso(v) if k in SESSION_TIMES else v for k, v in session.items()}


async def sessions_list(
    store: Store,
    spent_of: Callable[[Collection[str]], Awaitable[dict[str, Decimal]]] | None = None,
    since: float | None = None,
) -> list[dict[str, Any]]:
    """Every session with its totals, newest activity first; with ``since``, only those
    active (or created, when without messages) at or after it.

    ``spent_of`` is the live ledger's view (one call for them all, so a shared ledger
    answers in one round trip); without one (the CLI) the rows' sum is used.
    """
    out = []
    rows = [
        row
        for row in await store.session_totals()
        if since is None or (row["last_at"] or row["created_at"]) >= since
    ]
    live = await spent_of([row["id"] for row in rows]) if spent_of else {}
    for row in rows:
        rec = SessionRecord(
            row["id"],
            row["created_at"],
            _decimal(row["budget_usd"]),
            bool(row["paused"]),
            row["pause_reason"],
            row["label"],
        )
        summed = _decimal(row["cost_usd"]) or Decimal(0)
        item = session_json(rec, live.get(rec.id, summed) if spent_of else summed)
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


REPORT_FIELDS = (
    ("messageCount", "message_count"),
    ("inputTokens", "input_tokens"),
    ("outputTokens", "output_tokens"),
    ("cachedInputTokens", "cached_input_tokens"),
    ("costUsd", "cost_usd"),
    ("unpricedMessageCount", "unpriced_message_count"),
)
"""A report row's JSON keys (and CSV columns, after ``key``) and the store's names."""


def bounds(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    """A report's ``since`` and ``until`` as Unix times (:mod:`spendgate.timespec` forms;
    ``until`` exclusive, a date taking in its whole day); TimeSpecError when unreadable
    or not in order. The API and the command line read them alike."""
    start = None if not since else parse(since, now, "since")
    end = None if not until else parse(until, now, "until", end_of_day=True)
    if start is not None and end is not None and start >= end:
        raise TimeSpecError(f"since ({since}) must be before until ({until})")
    return start, end


class Report:
    """A report over time (docs/reference.md §8 ``GET /api/report``): the store's rows
    and their total, with exact costs (Decimal) until shown."""

    def __init__(
        self,
        by: str,
        since: float | None,
        until: float | None,
        rows: list[dict[str, Any]],
        session: str | None = None,
    ) -> None:
        self.by, self.since, self.until, self.rows, self.session = by, since, until, rows, session
        total: dict[str, Any] = {name: 0 for _, name in REPORT_FIELDS}
        total["cost_usd"] = None
        for r in rows:
            for _, name in REPORT_FIELDS:
                if name != "cost_usd":
                    total[name] += r[name]
            if r["cost_usd"] is not None:
                total["cost_usd"] = (total["cost_usd"] or Decimal(0)) + r["cost_usd"]
        self.total = total

    @staticmethod
    def cost(row: dict[str, Any]) -> Decimal | None:
        """A row's or the total's cost as shown: None when :func:`none_priced`, 0 when
        nothing had a cost (the rule of :func:`_total_cost`), else the exact sum."""
        if none_priced(row["message_count"], row["unpriced_message_count"]):
            return None
        cost: Decimal | None = row["cost_usd"]
        return Decimal(0) if cost is None else cost

    def _fields(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {key: row[name] for key, name in REPORT_FIELDS}
        out["costUsd"] = _float(self.cost(row))
        return out

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            item = {"key": r["key"], **self._fields(r)}
            if self.by == "session":
                item["label"] = r.get("label")
            rows.append(item)
        out: dict[str, Any] = {
            "since": iso_bound(self.since),
            "until": iso_bound(self.until),
            "by": self.by,
            "timezone": "UTC",
        }
        if self.session is not None:
            out["sessionId"] = self.session
        out.update(rows=rows, total=self._fields(self.total))
        return out

    def csv_rows(self) -> list[list[Any]]:
        """The header and one line per row (no total line: a reader sums them). Costs
        exact (``0.0427``), unknown ones and null keys empty."""
        head = ["key", *(key for key, _ in REPORT_FIELDS)]
        if self.by == "session":
            head.append("label")
        lines: list[list[Any]] = [head]
        for r in self.rows:
            cost = self.cost(r)
            cells = [r[name] for _, name in REPORT_FIELDS]
            cells[4] = "" if cost is None else format(cost, "f")
            line = ["" if r["key"] is None else r["key"], *cells]
            if self.by == "session":
                line.append(r.get("label") or "")
            lines.append(line)
        return lines


async def over_time(
    store: Store,
    by: str,
    since: float | None,
    until: float | None,
    session: str | None = None,
) -> Report:
    """Totals across sessions (or of one) per hour, day, week, month, model, agent or
    session, aggregated by the store."""
    return Report(by, since, until, await store.report(by, since, until, session), session)


def _searchable(text: str) -> str:
    return text.lower().replace(".", "-").replace("_", "-")


def price_list(
    table: PriceTable,
    charged: Callable[[str], ModelPrice | None],
    search: str | None = None,
) -> list[dict[str, Any]]:
    """``spendgate pricing --list``: every id of the effective table (bundled, updated,
    overrides, the user's file) and every alias, with what ``charged`` (the proxy's own
    lookup) charges for it, sorted by id; ``search`` keeps the ids that contain it, case,
    dots and dashes aside (``sonnet-4.5`` finds ``claude-sonnet-4-5``)."""
    ids = {p.model for p in table} | set(table.aliases)
    if search:
        wanted = _searchable(search.strip())
        ids = {i for i in ids if wanted in _searchable(i)}
    out = []
    for model in sorted(ids):
        price = charged(model)
        row: dict[str, Any] = {"id": model, "alias": table.aliases.get(model)}
        row.update(price.to_json() if price is not None else {"pricedAs": None})
        out.append(row)
    return out
