"""The shared ledger's cost: CPU per request and p50 of ``spendgate serve`` with the
Redis ledger and event log against the memory ledger, in the same run
(docs/reference.md §6 "Several replicas"): ``python -m bench.shared_ledger``.

Both proxies store rows in the same PostgreSQL (Redis needs a shared store), so only the
ledger and the bus differ; both hold every session to a budget (bench/run.py's
``session``). The runs alternate between the two, ``--reps`` each; CPU is each proxy
process's utime+stime over a measured run (bench/run.py), and the Redis server's own
CPU over the Redis runs is reported apart. PostgreSQL and Redis are throw-away servers
started like the tests' (tests/helpers/). Prints one JSON line.

    python -m bench.shared_ledger [--requests 2000] [--reps 3] [--mode json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers

from bench import run as bench


async def start(tmp: Path, upstream: bench.Server, name: str, env: dict[str, str]) -> bench.Server:
    port = bench.free_port()
    full = {
        "SPENDGATE_HOST": bench.HOST,
        "SPENDGATE_PORT": str(port),
        "SPENDGATE_DB_PATH": str(tmp / name / "spendgate.db"),
        "SPENDGATE_OPENAI_BASE_URL": upstream.url.rstrip("/"),
        **bench.BUDGETS["session"],
        **env,
    }
    argv = [sys.executable, "-m", "spendgate", "serve"]
    health = f"http://{bench.HOST}:{port}/healthz"
    return await bench.start_server(name, argv, health, tmp, full, base_path=bench.SPENDGATE_PATH)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.helpers.postgres import PostgresServer
    from tests.helpers.postgres import missing as pg_missing
    from tests.helpers.redis_server import RedisServer
    from tests.helpers.redis_server import missing as redis_missing

    for why in (pg_missing(), redis_missing()):
        if why is not None:
            raise SystemExit(f"cannot run: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="spendgate-bench-"))
    pg = PostgresServer()
    redis = RedisServer(bench.free_port(), tmp)
    redis.start(appendonly=False)
    upstream = await bench.start_upstream(tmp)
    servers: list[bench.Server] = []
    try:
        store = {"SPENDGATE_STORE_URL": pg.new_database()}
        memory = await start(tmp, upstream, "memory", store)
        servers.append(memory)
        shared = await start(tmp, upstream, "redis", {**store, "SPENDGATE_REDIS_URL": redis.url})
        servers.append(shared)
        for server in servers:  # warm up
            await bench.load(server.url, args.mode, 300, args.concurrency)
        runs: dict[str, list[dict[str, Any]]] = {"memory": [], "redis": []}
        redis_cpu: list[float] = []
        assert redis.proc is not None
        for _ in range(args.reps):
            runs["memory"].append(
                await bench.measured_load(memory, args.mode, args.requests, args.concurrency)
            )
            before = bench.cpu_seconds(redis.proc.pid)
            got = await bench.measured_load(shared, args.mode, args.requests, args.concurrency)
            redis_cpu.append((bench.cpu_seconds(redis.proc.pid) - before) / got["requests"] * 1e6)
            runs["redis"].append(got)
    finally:
        for server in servers:
            await bench.stop_server(server)
        await bench.stop_server(upstream)
        redis.stop()
        pg.close()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    out: dict[str, Any] = {"mode": args.mode, "requests": args.requests, "reps": args.reps}
    for kind in runs:
        out[kind] = {
            "cpu_us_per_req": round(median(kind, "cpu_us_per_req")),
            "p50_ms": round(median(kind, "p50_ms"), 2),
            "runs_cpu_us": [round(r["cpu_us_per_req"]) for r in runs[kind]],
        }
    out["redis_server_cpu_us_per_req"] = round(statistics.median(redis_cpu))
    out["cpu_ratio"] = round(out["redis"]["cpu_us_per_req"] / out["memory"]["cpu_us_per_req"], 2)
    out["added_p50_ms"] = round(out["redis"]["p50_ms"] - out["memory"]["p50_ms"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=bench.MODES, default="json")
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(run(args))).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
