"""The two stores side by side: a batch insert of N rows and the totals reads, SQLite
against PostgreSQL (docs/reference.md §5 "PostgreSQL").

Each store is driven directly (``add_message`` N rows, then ``flush``: the writer's
batches, BATCH_MAX rows per transaction, one statement per batch on PostgreSQL), then
the reads the API makes: ``session_totals`` (every session with its totals) and
``totals`` of one session, each timed as the best of a few runs. PostgreSQL is the
server at ``--pg-url``, else a throw-away one started like the tests' (Debian's
``postgresql`` package, tests/helpers/postgres.py; fsync off there, as in the tests).
Prints one JSON line.

    python -m bench.store_backends --rows 20000 --sessions 200
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.store_bench import record
from spendgate.records import SessionRecord
from spendgate.store import SQLiteStore, Store

REPEAT = 5


async def measure(store: Store, rows: int, sessions: int) -> dict[str, Any]:
    await store.open()
    try:
        for j in range(sessions):  # session_totals lists the sessions that have a row
            store.save_session(SessionRecord(f"bench-{j}", time.time()))
        for i in range(rows):
            m = record(i)
            m.session_id = f"bench-{i % sessions}"
            store.add_message(m)
        t0 = time.perf_counter()
        await store.flush(timeout=600)  # type: ignore[call-arg]
        insert_s = time.perf_counter() - t0
        one = record(rows)
        one.session_id = "bench-0"
        store.add_message(one)  # a read right after a write: the usual API case
        t0 = time.perf_counter()
        await store.flush()
        one_row_ms = (time.perf_counter() - t0) * 1000
        list_ms = min([await _timed(store.session_totals) for _ in range(REPEAT)])
        one_ms = min([await _timed(lambda: store.totals("bench-0")) for _ in range(REPEAT)])
        listed = await store.session_totals()
        assert sum(r["message_count"] for r in listed) == rows + 1
    finally:
        await store.close()
    return {
        "insert_ms": round(insert_s * 1000, 1),
        "rows_per_s": round(rows / insert_s),
        "one_row_flush_ms": round(one_row_ms, 2),
        "session_totals_ms": round(list_ms, 2),
        "totals_ms": round(one_ms, 2),
    }


async def _timed(read: Any) -> float:
    t0 = time.perf_counter()
    await read()
    return (time.perf_counter() - t0) * 1000


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from spendgate.store_postgres import PostgresStore

    tmp = Path(tempfile.mkdtemp(prefix="spendgate-bench-"))
    out: dict[str, Any] = {"rows": args.rows, "sessions": args.sessions}
    out["sqlite"] = await measure(SQLiteStore(tmp / "bench.db"), args.rows, args.sessions)
    server = None
    url = args.pg_url
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers.postgres import PostgresServer, missing

        why = missing()
        if why is not None:
            raise SystemExit(f"no PostgreSQL: {why} (or pass --pg-url)")
        server = PostgresServer()
        url = server.new_database()
    try:
        out["postgres"] = await measure(
            PostgresStore(url, tmp / "pg-journal"), args.rows, args.sessions
        )
    finally:
        if server is not None:
            server.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--pg-url", default=None, help="an empty PostgreSQL database")
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(run(args))).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
