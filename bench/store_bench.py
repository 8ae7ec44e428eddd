"""The SQLite writer on its own: can ``SQLiteStore`` keep up with a steady stream of rows?

Drives :class:`spendgate.store.SQLiteStore` directly (real defaults: WAL, 200 ms flush
interval) with ``add_message`` at an offered rate, sampling ``queue_depth`` as it goes,
then times how long a burst of rows takes to commit. Prints one JSON line.

    python -m bench.store_bench --rate 10000 --duration 5 --burst 50000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from spendgate.records import MessageRecord
from spendgate.store import SQLiteStore

TICK_S = 0.002


def record(i: int) -> MessageRecord:
    return MessageRecord(
        id=f"msg_{i:032x}",
        session_id=f"bench-{i % 16}",
        agent_id=None,
        route="openai",
        provider="openai",
        model="gpt-4o-mini-2024-07-18",
        endpoint="chat",
        status=200,
        stream=True,
        input_tokens=42,
        output_tokens=64,
        cached_input_tokens=0,
        cache_write_tokens=0,
        reasoning_tokens=0,
        cost_usd=Decimal("0.0000447"),
        estimated=False,
        aborted=False,
        started_at=time.time(),
        ttft_ms=1.234,
        duration_ms=5.678,
        key_fingerprint="0123456789ab",
    )


async def sustained(store: SQLiteStore, rate: float, duration: float, first: int) -> dict[str, Any]:
    """Offer ``rate`` rows/s for ``duration`` s; the queue must stay flat, not grow."""
    added = 0
    depths: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < duration:
        due = int(rate * elapsed)
        while added < due:
            store.add_message(record(first + added))
            added += 1
        depths.append((elapsed, store.queue_depth))
        await asyncio.sleep(TICK_S)
    produced = time.perf_counter() - t0
    depth_at_end = store.queue_depth
    await store.flush(timeout=60)
    done = time.perf_counter() - t0
    half = duration / 2
    first_half = max((d for t, d in depths if t < half), default=0)
    second_half = max((d for t, d in depths if t >= half), default=0)
    growing = second_half > max(1.5 * first_half, 0.5 * rate * 0.2 + 500)
    return {
        "offered_rows_per_s": rate,
        "rows": added,
        "produce_s": produced,
        "committed_rows_per_s": added / done,
        "drain_after_stop_ms": (done - produced) * 1000,
        "max_queue_depth": max((d for _, d in depths), default=0),
        "max_queue_depth_first_half": first_half,
        "max_queue_depth_second_half": second_half,
        "queue_depth_at_stop": depth_at_end,
        "queue_growing": growing,
    }


async def burst(store: SQLiteStore, rows: int, first: int) -> dict[str, Any]:
    """Queue ``rows`` at once and time the commit: the writer's capacity."""
    t0 = time.perf_counter()
    for i in range(rows):
        store.add_message(record(first + i))
    queued = time.perf_counter() - t0
    await store.flush(timeout=120)
    total = time.perf_counter() - t0
    return {
        "rows": rows,
        "enqueue_s": queued,
        "commit_s": total - queued,
        "rows_per_s": rows / total,
    }


async def run(args: argparse.Namespace, db: Path) -> dict[str, Any]:
    store = SQLiteStore(db, flush_interval=args.flush_interval_ms / 1000)
    await store.open()
    try:
        steady = await sustained(store, args.rate, args.duration, 0)
        capacity = await burst(store, args.burst, steady["rows"])
    finally:
        await store.close()
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM token_usage").fetchone()[0]
    expected = steady["rows"] + capacity["rows"]
    return {"sustained": steady, "burst": capacity, "stored_rows": stored, "expected": expected}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=10_000, help="offered rows per second")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--burst", type=int, default=50_000)
    p.add_argument("--flush-interval-ms", type=int, default=200, help="spendgate's default")
    p.add_argument("--db", type=Path, help="database file (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="spendgate-store-bench-") as tmp:
        result = asyncio.run(run(args, args.db or Path(tmp) / "bench.db"))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
