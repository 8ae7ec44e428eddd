"""Removing old sessions (docs/reference.md §5 "Removing old sessions"): which sessions,
and how the store and the running proxy's ledger forget them.

The API (``DELETE /api/sessions?before=``) and ``spendgate prune`` (through that API
while a proxy runs, else on the database file) share this; the store chooses and
deletes in one transaction.
"""

from __future__ import annotations

from typing import Any

from spendgate.budgets import BudgetLedger, Change
from spendgate.records import Pruned
from spendgate.store import Store
from spendgate.timespec import iso_bound


async def prune_live(
    store: Store, ledger: BudgetLedger, before: float, dry_run: bool
) -> tuple[Pruned, Change]:
    """In a running proxy: sessions with requests in flight or waiting are kept; the
    ledger forgets the rest, and the global budget the spend of theirs in its period
    (what a restart would load from the rows left). The caller applies the change."""
    _, _, period, change = await ledger.global_budget()
    pruned = await store.prune(
        before,
        keep=await ledger.busy_sessions(),
        period_start=None if period is None else period.start,
        dry_run=dry_run,
    )
    if not dry_run and pruned.sessions:
        forgot = await ledger.forget(pruned.sessions, pruned.period_spend)
        change.records.extend(forgot.records)
        change.events.extend(forgot.events)
    return pruned, change


def pruned_json(pruned: Pruned, before: float, dry_run: bool) -> dict[str, Any]:
    """The API's answer, and what the command line reads and says."""
    return {
        "before": iso_bound(before),
        "dryRun": dry_run,
        "sessionCount": len(pruned.sessions),
        "messageCount": pruned.messages,
        "sessions": pruned.sessions,
        "keptInFlight": pruned.kept,
    }
