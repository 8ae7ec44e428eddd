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


def print_sessions(rows: list[dict[str, Any]], db_path: Path) -> None:
    """``spendgate sessions``: one line per session (``reports.sessions_list`` rows)."""
    console = _console()
    if not rows:
        console.print(f"no sessions recorded in {db_path}", markup=False)
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
    head = Text.assemble((s["sessionId"], "bold"), count, (total, "bold"))
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
    table = Table(title=f"by {title}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column(title, no_wrap=True, min_width=min(24, max(map(len, groups))))
    for name in ("msgs", "input", "cached", "output"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("cost", justify="right", no_wrap=True)
    for name, g in sorted(groups.items(), key=lambda kv: -(kv[1]["costUsd"] or 0)):
        table.add_row(
            Text(name), f"{g['messageCount']:,}", f"{g['inputTokens']:,}",
            f"{g['cachedInputTokens']:,}", f"{g['outputTokens']:,}",
            total_usd(g["costUsd"], g["messageCount"], g["unpricedMessageCount"]),
        )  # fmt: skip
    if len(groups) > 1:
        table.add_section()
        table.add_row(
            Text("total", style="bold"), f"{s['messageCount']:,}", f"{s['totalInputTokens']:,}",
            f"{s['totalCachedInputTokens']:,}", f"{s['totalOutputTokens']:,}", total,
        )  # fmt: skip
    return table
