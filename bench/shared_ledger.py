"""The shared backends' cost: CPU per request and p50 of ``spendgate serve`` with
PostgreSQL and Redis against SQLite, in the same run (docs/reference.md §6 "Several
replicas"): ``python -m bench.shared_ledger``.

Three proxies, each holding every session to a budget (bench/run.py's ``session``):
``sqlite`` (the defaults: SQLite file, memory ledger and bus; the issue's baseline),
``postgres`` (PostgreSQL store, memory ledger: the store's share) and ``shared``
(PostgreSQL store, Redis ledger and event log: what several replicas run). The runs
alternate between the three, ``--reps`` each; CPU is each proxy process's utime+stime
over a measured run (bench/run.py); the PostgreSQL and Redis servers' own CPU over the
shared runs is reported apart. Then a paced phase (``--rate`` requests/s, below
saturation) gives each proxy's added p50: its p50 less the upstream's own. Ratios are of
medians against ``sqlite``. PostgreSQL and Redis are throw-away servers started like the
tests' (tests/helpers/). Prints one JSON line.

    python -m bench.shared_ledger [--requests 2000] [--reps 3] [--mode json] [--rate 300]
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


def postgres_cpu(pg: Any) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster and its exited children,
    and each live child (the backends of the proxies' pools) on its own."""
    root = int((pg.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root:
            total += sum(int(f) for f in fields[11:15]) / bench.TICK
        elif ppid == root:
            total += (int(fields[11]) + int(fields[12])) / bench.TICK
    return total


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
    servers: dict[str, bench.Server] = {}
    try:
        configs = {
            "sqlite": {},
            "postgres": {"SPENDGATE_STORE_URL": pg.new_database()},
            "shared": {"SPENDGATE_STORE_URL": pg.new_database(), "SPENDGATE_REDIS_URL": redis.url},
        }
        for name, env in configs.items():
            servers[name] = await start(tmp, upstream, name, env)
        for server in servers.values():  # warm up
            await bench.load(server.url, args.mode, 300, args.concurrency)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        backends_cpu: dict[str, list[float]] = {"redis": [], "postgres": []}
        assert redis.proc is not None
        for _ in range(args.reps):
            for name, server in servers.items():
                before = bench.cpu_seconds(redis.proc.pid), postgres_cpu(pg)
                got = await bench.measured_load(server, args.mode, args.requests, args.concurrency)
                after = bench.cpu_seconds(redis.proc.pid), postgres_cpu(pg)
                runs[name].append(got)
                if name == "shared":  # the servers' CPU that the shared proxy's requests cost
                    for key, b, a in zip(("redis", "postgres"), before, after, strict=True):
                        backends_cpu[key].append((a - b) / got["requests"] * 1e6)
        # Latency below saturation: the same paced rate through each proxy and straight to
        # the upstream; a proxy's added p50 is its p50 less the upstream's (bench/run.py).
        n = max(1, int(args.rate * args.paced_s))
        paced: dict[str, list[float]] = {name: [] for name in ("direct", *servers)}
        for _ in range(args.reps):
            got = await bench.load(upstream.url + bench.FLOOR_PATH, args.mode, n,
                                   args.concurrency, rate=args.rate)  # fmt: skip
            paced["direct"].append(got["p50_ms"])
            for name, server in servers.items():
                got = await bench.load(server.url, args.mode, n, args.concurrency, rate=args.rate)
                paced[name].append(got["p50_ms"])
    finally:
        for server in servers.values():
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
    for key, values in backends_cpu.items():
        out[f"{key}_server_cpu_us_per_req"] = round(statistics.median(values))
    direct = statistics.median(paced["direct"])
    for kind in runs:
        out[kind]["paced_added_p50_ms"] = round(statistics.median(paced[kind]) - direct, 2)
    out["paced"] = {"rate": args.rate, "direct_p50_ms": round(direct, 2)}
    base = out["sqlite"]
    for kind in ("postgres", "shared"):
        out[f"{kind}_cpu_ratio"] = round(out[kind]["cpu_us_per_req"] / base["cpu_us_per_req"], 2)
        out[f"{kind}_paced_added_p50_ratio"] = round(
            out[kind]["paced_added_p50_ms"] / base["paced_added_p50_ms"], 2
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=bench.MODES, default="json")
    parser.add_argument("--rate", type=float, default=300.0, help="paced phase: requests/s")
    parser.add_argument("--paced-s", type=float, default=5.0, help="paced phase: seconds")
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(run(args))).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
