"""Reports over time on a large database: how long does ``Store.report`` take?

Writes ``--rows`` message rows spread over ``--days`` days and 200 sessions into a
fresh SQLite file through :class:`spendgate.store.SQLiteStore`, then times each
grouping (all time, and the last 7 days) as ``GET /api/report`` runs it (the best of
three runs), then removing the older half of the sessions (``Store.prune``, a dry run
and the real one). Prints one JSON line of milliseconds.

    python -m bench.report_bench --rows 300000 --days 365
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import orjson

from bench.store_bench import record
from spendgate.store import REPORT_BY, SQLiteStore

MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", None)


async def run(rows: int, days: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "report.db")
        await store.open(start_writer=False)
        now = time.time()
        step = days * 86400 / rows
        for i in range(rows):
            store.add_message(
                replace(
                    record(i),
                    session_id=f"s-{i * 200 // rows}",  # 200 sessions one after another
                    agent_id=None if i % 3 else f"agent-{i % 7}",
                    model=MODELS[i % len(MODELS)],
                    started_at=now - i * step,
                    cost_usd=None if i % 11 == 0 else Decimal("0.0000447"),
                )
            )
            if i % 50_000 == 49_999:
                await store.flush()
        await store.flush()
        out: dict[str, object] = {"rows": rows, "days": days}
        for since, name in ((None, "all"), (now - 7 * 86400, "7d")):
            for by in REPORT_BY:
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    await store.report(by, since)
                    best = min(best, time.perf_counter() - t0)
                out[f"{name}.{by}_ms"] = round(best * 1000, 1)
        half = now - days * 86400 / 2
        for dry_run in (True, False):
            t0 = time.perf_counter()
            pruned = await store.prune(half, dry_run=dry_run)
            name = "prune_dry_run" if dry_run else "prune"
            out[f"{name}_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["pruned_sessions"], out["pruned_rows"] = len(pruned.sessions), pruned.messages
        await store.close()
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--days", type=int, default=365)
    args = p.parse_args()
    print(orjson.dumps(asyncio.run(run(args.rows, args.days))).decode())


if __name__ == "__main__":
    main()
