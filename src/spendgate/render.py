"""Text for people: money, and the command line's session tables and cost report (rich).

The command line only parses arguments and calls these with what :mod:`spendgate.reports`
built; ``spendgate top`` uses the same money formatting.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from spendgate.reports import none_priced


def usd(value: float | None) -> str:
    """Dollars with the precision small amounts need; ``None`` (no price known) is ``N/A``."""
    if value is None:
        return "N/A"
    a = abs(value)
    if a == 0:
        return "$0.00"
    if a < 0.01:
        return f"${value:.6f}"
    if a < 1:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def total_usd(value: float | None, messages: int, unpriced: int) -> str:
    """A total of ``messages`` of which ``unpriced`` have no price: ``$0.0123`` when all are
    priced (nothing recorded costs $0), ``$0.0123 + N/A`` when some are unpriced, ``N/A``
    when none is priced; never a plain number for a sum that leaves costs out.

    The dashboard's ``totalUsd`` is the same rule in JavaScript.
    """
    if none_priced(messages, unpriced):
        return "N/A"
    return usd(value or 0.0) + (" + N/A" if unpriced else "")


def budget_usd(value: float | None) -> str:
    return "unlimited" if value is None else usd(value)


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)  # a pipe gets whole lines


def print_sessions(
    rows: list[dict[str, Any]], db_path: Path | str, since: str | None = None
) -> None:
    """``spendgate sessions``: one line per session (``reports.sessions_list`` rows, those
    active ``since`` when given)."""
    console = _console()
    if not rows:
        when = f" active since {since}" if since else ""
        console.print(f"no sessions{when} recorded in {db_path}", markup=False)
        return
    table = Table(
        title=f"{len(rows)} sessions", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    widest = max(len(r["sessionId"]) for r in rows)
    table.add_column("session", no_wrap=True, min_width=min(24, widest))
    for name in ("msgs", "input", "output", "cost", "budget"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("last active", no_wrap=True)
    table.add_column("state")
    labels = any(r["label"] for r in rows)
    if labels:
        table.add_column("label")
    for r in rows:
        last = r["lastActivityAt"] or r["createdAt"]
        state = Text("")
        if r["paused"]:
            state = Text(f"paused ({r['pauseReason'] or 'manual'})", style="bold red")
        table.add_row(
            Text(r["sessionId"]), f"{r['messageCount']:,}", f"{r['totalInputTokens']:,}",
            f"{r['totalOutputTokens']:,}",
            total_usd(r["totalCostUsd"], r["messageCount"], r["unpricedMessageCount"]),
            budget_usd(r["budgetUsd"]),
            time.strftime("%m-%d %H:%M", time.localtime(last)), state,
            *([Text(r["label"] or "")] if labels else []),
        )  # fmt: skip
    console.print(table)


def print_summary(s: dict[str, Any]) -> None:
    """``spendgate report``: totals, budget, context, then one table per model and per agent
    (a ``reports.session_summary``)."""
    console = _console()
    unpriced = s["unpricedMessageCount"]
    total = total_usd(s["totalCostUsd"], s["messageCount"], unpriced)
    count = f"  {s['messageCount']:,} messages" + (f" ({unpriced:,} unpriced)" if unpriced else "")
    count += "  "
    head = Text.assemble((s["sessionId"], "bold"))
    if s.get("label"):
        head.append(f" ({s['label']})")
    head.append(count)
    head.append(total, style="bold")
    if s["paused"]:
        head.append(f"  PAUSED ({s['pauseReason'] or 'manual'})", style="bold red")
    console.print(head)
    budget = f"budget {budget_usd(s['budgetUsd'])}"
    if s["budgetUsd"] is not None:
        budget += f", {usd(s['remainingUsd'])} left"
    console.print(budget, markup=False, highlight=False)
    console.print(
        f"tokens: input {s['totalInputTokens']:,} (cache reads {s['totalCachedInputTokens']:,}, "
        f"cache writes {s['totalCacheWriteTokens']:,}), output {s['totalOutputTokens']:,} "
        f"(reasoning {s['totalReasoningTokens']:,})",
        markup=False,
        highlight=False,
    )
    ctx = s.get("context")
    if ctx:
        window = (
            f"of {ctx['contextWindow']:,} ({ctx['percent']}%, {ctx['level']})"
            if ctx.get("percent") is not None
            else "(window unknown)"
        )
        console.print(
            f"context: {ctx['contextTokens']:,} tokens {window}, model {ctx['modelId']}",
            markup=False,
            highlight=False,
        )
    for title, key in (("model", "byModel"), ("agent", "byAgent")):
        if s[key]:
            console.print(_groups_table(title, s[key], s, total))


def _groups_table(
    title: str, groups: dict[str, dict[str, Any]], s: dict[str, Any], total: str
) -> Table:
    """A session summary's ``byModel`` / ``byAgent``, most costly first."""
    rows = [
        (Text(k), g) for k, g in sorted(groups.items(), key=lambda kv: -(kv[1]["costUsd"] or 0))
    ]
    sums = {
        "messageCount": s["messageCount"], "inputTokens": s["totalInputTokens"],
        "cachedInputTokens": s["totalCachedInputTokens"], "outputTokens": s["totalOutputTokens"],
    }  # fmt: skip
    return _totals_table(f"by {title}", title, rows, (sums, total) if len(groups) > 1 else None)


def _totals_table(
    title: str,
    column: str,
    rows: list[tuple[Text, dict[str, Any]]],
    total: tuple[dict[str, Any], str] | None,
) -> Table:
    """One line per group (messages, tokens, cost), then the ``total`` line if given (its
    sums and its cost already as text)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    widest = max((len(k) for k, _ in rows), default=len(column))
    table.add_column(column, no_wrap=True, min_width=min(24, widest))
    for name in ("msgs", "input", "cached", "output"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)

    def cells(g: dict[str, Any]) -> list[str]:
        return [f"{g['messageCount']:,}", f"{g['inputTokens']:,}",
                f"{g['cachedInputTokens']:,}", f"{g['outputTokens']:,}"]  # fmt: skip

    for key, g in rows:
        cost = total_usd(g["costUsd"], g["messageCount"], g["unpricedMessageCount"])
        table.add_row(key, *cells(g), cost)
    if total is not None:
        sums, cost = total
        table.add_section()
        table.add_row(Text("total", style="bold"), *cells(sums), cost)
    return table


def print_report(r: dict[str, Any]) -> None:
    """``spendgate report --by …``: one line per hour, day, week, month, model, agent or
    session, then the total (a ``reports.Report.to_json()``)."""
    console = _console()
    span = f"{r['since'] or 'the first row'} to {r['until'] or 'now'} (UTC)"
    scope = f"session {r['sessionId']}" if r.get("sessionId") else "all sessions"
    if not r["rows"]:
        console.print(f"no messages from {span} in {scope}", markup=False, highlight=False)
        return
    rows = []
    for row in r["rows"]:
        key = Text("(none)", style="dim") if row["key"] is None else Text(row["key"])
        if row.get("label"):
            key.append(f" ({row['label']})", style="dim")
        rows.append((key, row))
    t = r["total"]
    total = total_usd(t["costUsd"], t["messageCount"], t["unpricedMessageCount"])
    console.print(_totals_table(f"{scope}, {span}, by {r['by']}", r["by"], rows, (t, total)))


def _per_million(value: float | None) -> str:
    return "-" if value is None else f"{value:,.4f}".rstrip("0").rstrip(".")


def print_prices(rows: list[dict[str, Any]], search: str | None) -> None:
    """``spendgate pricing --list``: one line per model id (``reports.price_list`` rows),
    prices in USD per million tokens as the proxy charges them."""
    console = _console()
    if not rows:
        what = f" matching {search!r}" if search else ""
        console.print(f"no models{what} in the price table", markup=False, highlight=False)
        return
    table = Table(
        title=f"{len(rows)} models, USD per million tokens", title_justify="left",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )  # fmt: skip
    table.add_column("model", no_wrap=True)
    for name in ("input", "cached", "output"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("context", justify="right", no_wrap=True)
    table.add_column("priced as / source")
    for r in rows:
        if r["pricedAs"] is None:
            table.add_row(Text(r["id"]), "N/A", "", "N/A", "", Text("no price", style="dim"))
            continue
        via = (
            r["priceSource"] if r["pricedAs"] == r["id"] else f"{r['pricedAs']}, {r['priceSource']}"
        )
        window = r["contextWindow"]
        table.add_row(
            Text(r["id"]), _per_million(r["input"]), _per_million(r["cachedInput"]),
            _per_million(r["output"]), "" if window is None else f"{window:,}", Text(via),
        )  # fmt: skip
    console.print(table)
